"""Acks PostgreSQL would refuse: a job's outcome is always recorded, and one bad ack never
holds up the others (nor gets its job rescued and run again on a live node)."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import trio

import trioban
from trioban import Job, JobState, RelayDiscard, Snooze, _ack, _pg, _store, worker
from trioban._acker import Acker
from trioban._job import evolve
from trioban._validate import MAX_ATTEMPTS

from .helpers import eventually, reaches
from .test_lifecycle import running
from .workers import echo

SURROGATE = b"caf\xe9".decode("utf-8", "surrogateescape")  # a filename that isn't UTF-8
BACKOFF: dict[str, Callable[[int], Any]] = {}


# Text PostgreSQL refuses: jsonb has no NUL, and UTF-8 has no lone surrogate.
ERRORS = {"nul": "bad byte \x00 in input", "surrogate": f"no file {SURROGATE}"}
RESULTS: dict[str, Any] = {"nul": {"text": "a\x00b"}, "surrogate": [SURROGATE], "key": {"\x00": 1}}


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


RESULTS["deep"] = _nested(300)  # decoding it again, deeper in the stack, could fail


@worker(queue="default", max_attempts=1)
async def fails_with(job: Job) -> None:
    raise ValueError(ERRORS[job.args["kind"]])


@worker(queue="default", max_attempts=1, recorded=True)
async def returns_unstorable(job: Job) -> Any:
    return RESULTS[job.args["kind"]]


@worker(queue="default")
async def snoozes(job: Job) -> Snooze:
    return Snooze(job.args["seconds"])


@worker(queue="default", max_attempts=2, backoff=lambda attempt: BACKOFF["now"](attempt))
async def fails_with_backoff(job: Job) -> None:
    raise RuntimeError("retry me")


async def settled(oban: trioban.Oban, job_id: int | None) -> Job:
    """The job once it is no longer executing (or available to run)."""
    assert job_id is not None
    found: list[Job] = []

    async def done() -> bool:
        job = await oban.get_job(job_id)
        assert job is not None
        found[:] = [job]
        return job.state not in (JobState.AVAILABLE, JobState.EXECUTING)

    await eventually(done)
    return found[0]


@pytest.mark.parametrize(("kind", "escaped"), [("nul", "\\x00"), ("surrogate", "\\udce9")])
async def test_an_error_text_postgres_refuses_is_recorded_escaped(
    dsn: str, kind: str, escaped: str
) -> None:
    """The reviewer's case: a failure whose text holds a NUL (or a lone surrogate) is recorded
    with the character escaped, and the next job's ack is written too."""
    with trio.fail_after(10):
        async with running(dsn) as oban:
            failed = await oban.insert(fails_with.new({"kind": kind}))
            assert await oban.relay(echo.new({"value": 1}), timeout=5) == 1
            job = await settled(oban, failed.id)
            assert job.state is JobState.DISCARDED
            error = job.errors[0]["error"]
            assert f"ValueError: {'bad byte' if kind == 'nul' else 'no file'}" in error
            assert escaped in error
            assert job.attempt == 1  # ran once: not rescued and run again


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("nul", "NUL character"),
        ("surrogate", "UTF-8 can't encode"),
        ("key", "NUL character"),
        ("deep", "nests lists and objects more than 256 levels deep"),
    ],
)
async def test_a_result_postgres_refuses_fails_the_job_saying_why(
    dsn: str, kind: str, reason: str
) -> None:
    """A result isn't silently altered: the job fails, and a relay's caller learns why."""
    with trio.fail_after(10):
        async with running(dsn) as oban:
            relay = await oban.dispatch(returns_unstorable.new({"kind": kind}))
            with pytest.raises(RelayDiscard, match=reason):
                await relay.result(timeout=5)
            job = await settled(oban, relay.job.id)
            assert job.state is JobState.DISCARDED
            assert "result" not in job.meta
            assert "can't" in job.errors[0]["error"]


async def test_huge_snoozes_are_clamped_and_full_max_attempts_stays_in_range(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn) as oban:
            far = await oban.insert(snoozes.new({"seconds": 1e20}))
            full = await oban.insert(snoozes.new({"seconds": 60}, max_attempts=MAX_ATTEMPTS))
            job = await settled(oban, far.id)
            assert job.state is JobState.SCHEDULED
            assert job.scheduled_at is not None
            years = (job.scheduled_at - datetime.now(UTC)) / timedelta(days=365.25)
            assert 99 < years <= 100  # _ack.MAX_DELAY
            assert job.max_attempts == 21  # the snooze isn't counted
            job = await settled(oban, full.id)
            assert job.state is JobState.SCHEDULED
            assert job.max_attempts == MAX_ATTEMPTS  # no room to grant one more


def _raises(attempt: int) -> float:
    raise ZeroDivisionError("backoff bug")


@pytest.mark.parametrize(
    "backoff",
    [_raises, lambda _: math.nan, lambda _: math.inf, lambda _: -1.0, lambda _: "soon"],
    ids=["raises", "nan", "inf", "negative", "not-a-number"],
)
async def test_a_broken_backoff_falls_back_to_the_default(
    dsn: str, backoff: Callable[[int], Any], caplog: pytest.LogCaptureFixture
) -> None:
    delay = await _retried_after(dsn, backoff)
    assert 10 < delay < 19  # the default: 17 s, jittered by 10%, minus time passed
    assert "used the default" in caplog.text


async def test_a_huge_backoff_is_clamped(dsn: str) -> None:
    delay = await _retried_after(dsn, lambda _: 1e20)
    assert delay == pytest.approx(_ack.MAX_DELAY, abs=60)


async def _retried_after(dsn: str, backoff: Callable[[int], Any]) -> float:
    """Seconds until the retry of a job whose worker has ``backoff``; the node keeps working."""
    BACKOFF["now"] = backoff
    with trio.fail_after(10):
        async with running(dsn) as oban:
            inserted = await oban.insert(fails_with_backoff.new({}))
            job = await settled(oban, inserted.id)
            assert job.state is JobState.RETRYABLE
            assert job.scheduled_at is not None
            assert await oban.relay(echo.new({"value": 2}), timeout=5) == 2
            return (job.scheduled_at - datetime.now(UTC)).total_seconds()


async def _executing(oban: trioban.Oban, count: int) -> list[Job]:
    """``count`` jobs marked executing, as if claimed by a node that doesn't exist."""
    jobs = await oban.insert_all([echo.new({"i": i}) for i in range(count)])
    async with oban.transaction() as conn:
        await conn.execute(
            "UPDATE oban_jobs SET state = 'executing', attempt = 1, "
            "attempted_at = timezone('UTC', now()) WHERE id = ANY(%s)",
            [[job.id for job in jobs]],
        )
    claimed = [await oban.get_job(job.id or 0) for job in jobs]
    return [job for job in claimed if job is not None]


async def test_an_ack_refused_on_its_own_is_replaced_and_the_rest_written(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Defence in depth: an ack the statement refuses (here a delay past ``interval``'s range,
    built below the executor's checks) doesn't hold up the acks batched with it; its job ends
    ``discarded``, saying its outcome could not be written."""
    with trio.fail_after(10):
        async with running(dsn, queues={}) as oban:
            good, poison, after = await _executing(oban, 3)
            await oban._acker.send(_ack.build_ack(good, "completed"))
            await oban._acker.send(_ack.build_ack(poison, "retryable", schedule_in=1e300))
            await oban._acker.send(_ack.build_ack(after, "completed"))
            assert (await settled(oban, good.id)).state is JobState.COMPLETED
            assert (await settled(oban, after.id)).state is JobState.COMPLETED
            refused = await settled(oban, poison.id)
            assert refused.state is JobState.DISCARDED
            assert "(retryable) could not be written" in refused.errors[-1]["error"]
            assert refused.errors[-1]["attempt"] == 1
    assert f"job {poison.id}: its outcome (retryable) can't be written" in caplog.text


async def test_unwritten_lists_acks_queued_or_being_written_until_committed(dsn: str) -> None:
    locker = await _pg.connect(dsn)
    try:
        with trio.fail_after(10):
            async with running(dsn, queues={}) as oban:
                (job,) = await _executing(oban, 1)
                assert job.id is not None

                async def noop(acks: object) -> None:
                    pass

                acker = Acker(oban._work_pool, "public", noop, oban._relays)
                assert acker.unwritten() == set()
                await acker.send(_ack.build_ack(job, "completed"))
                assert acker.unwritten() == {job.id}  # queued
                await locker.execute("BEGIN")
                await locker.execute("SELECT 1 FROM oban_jobs WHERE id = %s FOR UPDATE", [job.id])
                async with trio.open_nursery() as nursery:
                    await nursery.start(acker.run)
                    acker.close()
                    await _waiting_for_a_lock(locker)
                    assert acker.unwritten() == {job.id}  # being written
                    await locker.execute("ROLLBACK")
                assert acker.unwritten() == set()  # committed
                assert (await settled(oban, job.id)).state is JobState.COMPLETED
    finally:
        await locker.close()


async def _waiting_for_a_lock(conn: _pg.Connection) -> None:
    async def waiting() -> bool:
        cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
        return (await cur.fetchone()) != (0,)

    await eventually(waiting)


async def test_an_ack_whose_replacement_is_refused_too_is_dropped_alone(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An ack refused even as ``discarded`` (an id past bigint's range) is logged and dropped:
    the acker goes on with the others."""
    with trio.fail_after(10):
        async with running(dsn, queues={}) as oban:
            (good,) = await _executing(oban, 1)
            bogus = _ack.build_ack(evolve(good, id=2**70), "completed")
            await oban._acker.send(bogus)
            await oban._acker.send(_ack.build_ack(good, "completed"))
            assert (await settled(oban, good.id)).state is JobState.COMPLETED
            assert oban._acker.unwritten() == set()
    assert f"job {2**70}: not written as discarded either" in caplog.text


async def test_a_finished_job_whose_ack_is_on_its_way_is_not_rescued(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat lists the jobs whose acks are queued (``acking``), so the lifeline leaves
    a finished job alone while its outcome waits to be written, however long that takes."""
    gate = trio.Event()
    real_ack = _store.ack

    async def held_ack(*args: Any) -> set[int]:
        await gate.wait()
        return await real_ack(*args)

    monkeypatch.setattr(_store, "ack", held_ack)
    settings = {"heartbeat_interval": 0.1, "rescue_after": 0.3}
    with trio.fail_after(15):
        async with running(dsn, **settings) as oban:
            job = await oban.insert(echo.new({"value": "once"}))
            assert job.id is not None

            async def acking() -> bool:
                return job.id in oban._acker.unwritten()

            await eventually(acking)
            await trio.sleep(1.0)  # the leader's lifeline runs every 0.1 s meanwhile
            held = await oban.get_job(job.id)
            assert held is not None
            assert (held.state, held.errors) == (JobState.EXECUTING, ())
            gate.set()
            done = await reaches(oban, job.id, JobState.COMPLETED)
            assert (done.attempt, done.errors) == (1, ())


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (psycopg.errors.ReadOnlySqlTransaction("read-only: a standby mid-failover"), True),
        (psycopg.errors.DeadlockDetected("deadlock detected"), True),
        (psycopg.errors.AdminShutdown("terminating connection"), True),
        (psycopg.OperationalError("connection lost"), True),
        (_pg.DatabaseUnavailable("cannot connect"), True),
        (psycopg.errors.UntranslatableCharacter("\\u0000 cannot be converted"), False),
        (psycopg.errors.ProgramLimitExceeded("index row size exceeds maximum"), False),
        (UnicodeEncodeError("utf-8", "\udce9", 0, 1, "surrogates not allowed"), False),
    ],
)
def test_transient_tells_not_now_from_not_this(error: Exception, retried: bool) -> None:
    assert _pg.transient(error) is retried


async def test_acks_refused_while_the_server_is_read_only_are_retried_not_dropped(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failover: the pool reaches a read-only server for a while. The acks wait and are
    written once it accepts writes; none is dropped or replaced, no job runs twice."""
    real_ack = _store.ack
    writable = trio.Event()

    async def read_only_for_now(*args: Any) -> set[int]:
        if not writable.is_set():
            raise psycopg.errors.ReadOnlySqlTransaction("cannot execute UPDATE in a read-only tx")
        return await real_ack(*args)

    monkeypatch.setattr(_store, "ack", read_only_for_now)
    with trio.fail_after(15):
        async with running(dsn) as oban:
            jobs = await oban.insert_all([echo.new({"value": i}) for i in range(3)])

            async def all_acking() -> bool:
                return {job.id for job in jobs} <= oban._acker.unwritten()

            await eventually(all_acking)
            await trio.sleep(0.3)  # several failed attempts
            assert {job.id for job in jobs} <= oban._acker.unwritten()
            writable.set()
            for job in jobs:
                done = await reaches(oban, job.id, JobState.COMPLETED)
                assert (done.attempt, done.errors) == (1, ())
