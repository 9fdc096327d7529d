"""trioban.testing, used the way a user would: a pytest project that enables the plugin."""

from __future__ import annotations

import pytest

from trioban._devserver import TempServer

from .conftest import ExistingServer

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
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=7)
