"""trioban.testing, used the way a user would: a pytest project that enables the plugin;
and its helpers' edge cases, in process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import attrs
import psycopg
import pytest
import trio

import trioban
from trioban import Job, JobState, Snooze, Workflow, worker
from trioban._codec import dumps
from trioban._devserver import TempServer
from trioban.testing import (
    _contains,
    all_enqueued,
    assert_enqueued,
    drain_queue,
    perform_job,
    refute_enqueued,
)

from .conftest import ExistingServer
from .workers import Address, OrderArgs, Receipt, Size, flow_step, place_order, steer

USER_TESTS = """
import pytest
import trio
import trioban
from trioban import Config, JobState, RelayDiscard, Snooze, worker
from trioban.testing import (
    all_enqueued, assert_enqueued, drain_queue, perform_job, refute_enqueued,
)


@worker(queue="mail")
async def send(job):
    if job.args.get("fail"):
        raise RuntimeError("smtp down")
    if job.args.get("later"):
        return Snooze(60)
    return {"sent": job.args["to"]}


@worker(queue="mail")
async def slow(job):
    await trio.sleep(60)


@worker(queue="mail")
async def fan_out(job):
    await trioban.current_instance().insert(send.new({"to": "from-fan-out"}))


async def test_perform_job_maps_results():
    done = await perform_job(send, {"to": "a"})
    assert (done.state, done.result, done.error) == (JobState.COMPLETED, {"sent": "a"}, None)
    failed = await perform_job(send, {"to": "a", "fail": True})
    assert failed.state is JobState.RETRYABLE
    assert "smtp down" in failed.error
    snoozed = await perform_job(send, {"to": "a", "later": True})
    assert snoozed.state is JobState.SCHEDULED
    with pytest.raises(TypeError, match="JSON-serialisable"):
        await perform_job(send, {"to": object()})


async def test_assert_enqueued_with_partial_args(oban):
    await oban.insert(send.new({"to": "a", "subject": {"lang": "fr", "x": 1}}, meta={"k": 1}))
    await assert_enqueued(oban, worker=send, args={"to": "a"})
    await assert_enqueued(oban, args={"subject": {"lang": "fr"}}, meta={"k": 1}, queue="mail")
    await refute_enqueued(oban, worker=send, args={"to": "b"})
    with pytest.raises(AssertionError, match="found none"):
        await assert_enqueued(oban, worker="other.worker")
    assert len(await all_enqueued(oban)) == 1


async def test_drain_queue(oban):
    await oban.insert_all([send.new({"to": "a"}), send.new({"to": "b", "fail": True})])
    later = await oban.insert(send.new({"to": "c"}, schedule_in=3600))
    counts = await drain_queue(oban, "mail")
    assert (counts["completed"], counts["retryable"]) == (1, 1)
    await refute_enqueued(oban, args={"to": "a"})
    counts = await drain_queue(oban, "mail", with_scheduled=True)
    assert (counts["completed"], counts["retryable"]) == (1, 1)  # c, and b failing again
    assert (await oban.get_job(later.id)).state is JobState.COMPLETED


async def test_drain_recursion_and_safety(oban):
    await oban.insert(fan_out.new({}))
    assert (await drain_queue(oban, "mail"))["completed"] == 1
    await assert_enqueued(oban, args={"to": "from-fan-out"})
    await oban.insert(fan_out.new({}))
    assert (await drain_queue(oban, "mail", with_recursion=True))["completed"] == 3
    await oban.insert(send.new({"fail": True}))
    with pytest.raises(RuntimeError, match="smtp down"):
        await drain_queue(oban, "mail", with_safety=False)


async def test_drain_without_safety_leaves_no_job_executing(oban):
    # The failing job runs first; the others must not stay claimed ('executing') for ever.
    failing = await oban.insert(send.new({"fail": True}, priority=0))
    others = await oban.insert_all([send.new({"to": str(i)}, priority=1) for i in range(3)])
    with pytest.raises(RuntimeError, match="smtp down"):
        await drain_queue(oban, "mail", with_safety=False)
    assert (await oban.get_job(failing.id)).state is JobState.RETRYABLE
    assert [(await oban.get_job(j.id)).state for j in others] == [JobState.AVAILABLE] * 3
    assert (await drain_queue(oban, "mail"))["completed"] == 3


async def test_cancelled_drain_records_the_running_job(oban):
    await oban.insert_all([slow.new({}), slow.new({})])
    with trio.move_on_after(0.5):
        await drain_queue(oban, "mail")
    states = sorted(job.state.value for job in await all_enqueued(oban, queue="mail"))
    assert states == ["available", "retryable"]


async def test_inline_mode(trioban_dsn):
    async with trioban.open(Config(dsn=trioban_dsn, testing="inline")) as oban:
        job = await oban.insert(send.new({"to": "x"}))
        assert job.state is JobState.COMPLETED
        assert await oban.relay(send.new({"to": "y"})) == {"sent": "y"}
        with pytest.raises(RelayDiscard, match="smtp down"):
            await oban.relay(send.new({"to": "y", "fail": True}))
        await refute_enqueued(oban)  # nothing was stored
"""


def test_the_plugin_in_a_user_project(
    pytester: pytest.Pytester, pg_server: TempServer | ExistingServer
) -> None:
    pytester.makeconftest('pytest_plugins = ["trioban.testing"]\n')
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_user=USER_TESTS)
    pytester._monkeypatch.setenv("TRIOBAN_TEST_DSN", pg_server.dsn("postgres"))
    before = _plugin_databases(pg_server)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=7)
    # The session's databases, its template too, are dropped: a long-lived server keeps none.
    assert _plugin_databases(pg_server) == before


def _plugin_databases(server: TempServer | ExistingServer) -> set[str]:
    with psycopg.connect(server.dsn("postgres")) as conn:
        cur = conn.execute(r"SELECT datname FROM pg_database WHERE datname LIKE 'trioban\_%'")
        return {row[0] for row in cur.fetchall()}


def test_the_helpers_import_without_pytest() -> None:
    # pytest is not a dependency of trioban: only the plugin's fixtures need it.
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "from trioban.testing import perform_job, drain_queue, assert_enqueued\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture
async def oban(dsn: str) -> AsyncIterator[trioban.Oban]:
    async with trioban.open(trioban.Config(dsn=dsn, testing="manual")) as instance:
        yield instance


@worker(queue="drain", priority=1)
async def fan_out(job: Job) -> None:
    """Enqueues an urgent job, claimed before the jobs already waiting if it were run."""
    await trioban.current_instance().insert(urgent.new({"of": job.id}))
    if job.args.get("fail"):
        raise RuntimeError("fan-out failed")


@worker(queue="drain", priority=0)
async def urgent(job: Job) -> None:
    pass


@worker(queue="drain", priority=2)
async def waiting(job: Job) -> None:
    if job.args.get("fail"):
        raise RuntimeError("waiting failed")


async def _states(oban: trioban.Oban, jobs: list[Job]) -> list[JobState]:
    found = [await oban.get_job(job.id) for job in jobs if job.id is not None]
    return [job.state for job in found if job is not None]


async def test_drain_runs_the_jobs_available_when_it_starts(oban: trioban.Oban) -> None:
    with trio.fail_after(10):
        first = await oban.insert_all([fan_out.new({}), waiting.new({})])
        counts = await drain_queue(oban, "drain")
        assert counts["completed"] == 2
        assert await _states(oban, first) == [JobState.COMPLETED] * 2
        # The urgent job it enqueued waits (claimed and handed back), not left executing.
        [left] = await all_enqueued(oban, queue="drain")
        assert (left.worker, left.state) == (urgent.name, JobState.AVAILABLE)
        assert (await drain_queue(oban, "drain"))["completed"] == 1


async def test_drain_without_safety_leaves_a_job_enqueued_meanwhile_untouched(
    oban: trioban.Oban,
) -> None:
    """The urgent job fan_out enqueues isn't claimed by the round, nor left claimed when a
    worker's exception ends it."""
    with trio.fail_after(10):
        await oban.insert_all([fan_out.new({}), waiting.new({"fail": True})])
        with pytest.raises(RuntimeError, match="waiting failed"):
            await drain_queue(oban, "drain", with_safety=False)
        [left] = await all_enqueued(oban, worker=urgent)
        assert (left.state, left.attempt) == (JobState.AVAILABLE, 0)


@worker(queue="enc", encrypted=trioban.Encrypted(key=b"k" * 32))
async def charge(job: Job) -> None:
    pass


@attrs.frozen
class Order:
    n: int
    tags: tuple[str, ...] = ()


@worker(queue="enc", args=Order)
async def ship(job: Job) -> None:
    pass


async def test_enqueued_args_match_what_an_encrypted_worker_gets(oban: trioban.Oban) -> None:
    await oban.insert(charge.new({"amount": 5, "to": {"id": 7, "name": "x"}}))
    [found] = await assert_enqueued(oban, worker=charge, args={"to": {"id": 7}})
    assert set(found.args) == {"encrypted"}  # jobs as stored
    await assert_enqueued(oban, args={"amount": 5})
    await refute_enqueued(oban, worker=charge.name, args={"amount": 6})


async def test_encrypted_args_of_a_worker_not_importable_cannot_be_matched(
    oban: trioban.Oban, dsn: str
) -> None:
    job = await oban.insert(charge.new({"amount": 5}))
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE oban_jobs SET worker = 'tests.nowhere.charge' WHERE id = %s", [job.id])
    with pytest.raises(trioban.TriobanError, match=r"encrypted and its worker .* not importable"):
        await refute_enqueued(oban, args={"amount": 5})
    await assert_enqueued(oban, worker="tests.nowhere.charge")  # no args filter: no decryption


async def test_enqueued_args_may_be_a_structured_instance(oban: trioban.Oban) -> None:
    await oban.insert(ship.new(Order(4, ("a", "b"))))
    await assert_enqueued(oban, worker=ship, args=Order(4, ("a", "b")))
    await assert_enqueued(oban, worker=ship.name, args={"tags": ["b"]})
    await refute_enqueued(oban, worker=ship, args=Order(5))
    with pytest.raises(TypeError, match="args class of the worker given as worker="):
        await all_enqueued(oban, args=Order(4))
    with pytest.raises(TypeError, match=r"for tests\.test_testing\.charge \(args=None\)"):
        await all_enqueued(oban, worker=charge, args=Order(4))


CONTAINMENT = [
    ({"a": [1, 2]}, {"a": 1}),
    ({"a": [[1, 2], 3]}, {"a": [1]}),
    ({"a": [1, [2]]}, {"a": [[2]]}),
    ({"a": [{"b": 1, "c": 2}]}, {"a": [{"b": 1}]}),
    ({"a": [1, 1]}, {"a": [1, 1, 1]}),
    ({"a": 1}, {"a": 1.0}),
    ({"a": True}, {"a": 1}),
    ({"a": 0}, {"a": False}),
    ({"a": {}}, {"a": []}),
    ({"a": "x"}, {"a": ["x"]}),
    ({"a": None}, {"a": None}),
    ({"a": {"b": {"c": 1, "d": 2}}}, {"a": {"b": {"d": 2}}}),
    ({"a": 1}, {"b": None}),
]


def test_args_match_as_jsonb_containment(dsn: str) -> None:
    # Args are matched in Python (encrypted args are readable only here), meta in PostgreSQL:
    # both must mean the same.
    with psycopg.connect(dsn) as conn:
        for have, want in CONTAINMENT:
            cur = conn.execute("SELECT %s::jsonb @> %s::jsonb", [dumps(have), dumps(want)])
            row = cur.fetchone()
            assert row is not None
            assert _contains(have, want) is row[0], (have, want)


@worker(queue="perform")
async def stamp(job: Job) -> datetime:
    return datetime(2024, 1, 1, tzinfo=UTC)  # not JSON; nobody asks for it


@worker(queue="perform")
async def forwards_meta(job: Job) -> dict[str, Any]:
    follow_up = stamp.new({}, meta=job.meta)  # keeps the trace id for the follow-up job
    return {"seen": dict(job.meta), "follow_up": dict(follow_up.meta)}


async def test_perform_job_runs_the_job_as_a_node_does(oban: trioban.Oban) -> None:
    """The worker sees the job's own meta, and a result nobody records is not serialised: the
    same jobs complete through drain_queue (a node's path)."""
    with trio.fail_after(10):
        stamped = await perform_job(stamp, {})
        assert (stamped.state, stamped.error) == (JobState.COMPLETED, None)
        assert stamped.result == datetime(2024, 1, 1, tzinfo=UTC)
        forwarded = await perform_job(forwards_meta, {}, meta={"trace": "abc"})
        assert (forwarded.state, forwarded.error) == (JobState.COMPLETED, None)
        assert forwarded.result == {"seen": {"trace": "abc"}, "follow_up": {"trace": "abc"}}
        assert forwarded.job.meta == {"trace": "abc"}
        await oban.insert_all([stamp.new({}), forwards_meta.new({}, meta={"trace": "abc"})])
        assert (await drain_queue(oban, "perform"))["completed"] == 2


async def test_perform_job_gives_a_recorded_result_as_fetch_recorded_does() -> None:
    """Through JSON and structured again; one that can't be recorded fails the job, as on a
    node."""
    order = OrderArgs(1, Size.SMALL, datetime(2024, 1, 2, tzinfo=UTC), Address("Paris"))
    with trio.fail_after(10):
        placed = await perform_job(place_order, order)
        bad = await perform_job(place_order, attrs.evolve(order, order_id=0))
    assert (placed.state, placed.error) == (JobState.COMPLETED, None)
    assert placed.result == Receipt(
        order_id=1, summary="1x small to Paris on 2024-01-02", total=9.5
    )
    assert (bad.state, bad.result) == (JobState.DISCARDED, None)
    assert "the result of tests.workers.place_order" in (bad.error or "")


async def test_a_step_waiting_on_its_deps_is_enqueued(oban: trioban.Oban) -> None:
    """A suspended step will run: refute_enqueued must not pass while it waits."""
    wf = Workflow().add("a", flow_step.new({"value": 1})).add("b", flow_step.new({}), deps=["a"])
    await oban.insert_workflow(wf)
    [held] = await assert_enqueued(oban, worker=flow_step, meta={"name": "b"})
    assert held.state is JobState.SUSPENDED
    with pytest.raises(AssertionError, match="expected no job enqueued"):
        await refute_enqueued(oban, worker=flow_step, meta={"name": "b"})
    await drain_queue(oban, "default", with_recursion=True)
    await refute_enqueued(oban, worker=flow_step)


async def test_perform_job_gives_the_reason_of_a_cancel_or_discard() -> None:
    """As a node records it: in ``errors``, and here in ``error`` too."""
    with trio.fail_after(10):
        cancelled = await perform_job(steer, {"kind": "cancel"})
        discarded = await perform_job(steer, {"kind": "discard"})
    assert (cancelled.state, cancelled.error) == (JobState.CANCELLED, "told to cancel")
    assert (discarded.state, discarded.error) == (JobState.DISCARDED, "told to discard")
    assert [entry["error"] for entry in cancelled.job.errors] == ["told to cancel"]
    assert (cancelled.job.state, cancelled.job.id) == (JobState.CANCELLED, None)


@worker(queue="snooze")
async def always_snoozes(job: Job) -> Snooze:
    return Snooze(0)


async def test_a_drain_runs_a_job_that_snoozed_no_more(oban: trioban.Oban) -> None:
    """Made due again each round, it would keep a drain with_scheduled and with_recursion going
    for ever: it stays scheduled for the next drain."""
    job = await oban.insert(always_snoozes.new({}))
    with trio.fail_after(10):
        counts = await drain_queue(oban, "snooze", with_scheduled=True, with_recursion=True)
        assert counts["scheduled"] == 1
        assert (await drain_queue(oban, "snooze", with_scheduled=True))["scheduled"] == 1
    [left] = await all_enqueued(oban, queue="snooze")
    assert (left.id, left.state, left.attempt) == (job.id, JobState.SCHEDULED, 2)


async def test_drain_queue_takes_one_queue_by_name(oban: trioban.Oban) -> None:
    with pytest.raises(TypeError, match=r"got None; drain_queue drains one queue: call it once"):
        await drain_queue(oban, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"a str\), got .*; pass the worker's queue, 'snooze'"):
        await drain_queue(oban, always_snoozes)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected queue to be a queue name \(a str\), got 5"):
        await drain_queue(oban, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected queue to be a name of 1 to 127"):
        await drain_queue(oban, "")


async def test_enqueued_filters_of_the_wrong_type_are_refused(oban: trioban.Oban) -> None:
    """They would match nothing, so refute_enqueued would always pass, or fail in PostgreSQL."""
    await oban.insert(always_snoozes.new({}, meta={"k": 1}))
    for meta in ([1], "x"):
        with pytest.raises(TypeError, match=r"expected meta to be a mapping .*, got"):
            await refute_enqueued(oban, meta=meta)
    with pytest.raises(TypeError, match=r"expected queue to be a queue name \(a str\), got 5"):
        await all_enqueued(oban, queue=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected worker to be a worker"):
        await assert_enqueued(oban, worker=5)
