"""The life of a job against a real PostgreSQL: insert, fetch, run, ack, retry, schedule."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import trioban
from trioban import Config, JobState, RelayCancelled, RelayDiscard, Unique, _acker, _heartbeat, _pg

from . import workers
from .helpers import eventually
from .workers import (
    breaks_when_cancelled,
    echo,
    exits,
    flaky,
    interrupted,
    record,
    sleeper,
    steer,
    swallows_cancel,
    too_slow,
    wait_gate,
)


@asynccontextmanager
async def running(dsn: str, **settings: Any) -> AsyncIterator[trioban.Oban]:
    settings.setdefault("queues", {"default": 10})
    settings.setdefault("stage_interval", 0.1)
    settings.setdefault("shutdown_grace", 0.5)
    async with trioban.open(Config(dsn=dsn, **settings)) as oban:
        yield oban


async def test_insert_returns_saved_job_and_it_completes(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn) as oban:
            job = await oban.insert(echo.new({"value": 7}, tags=["a"], meta={"m": 1}))
            assert job.id is not None
            # The queue is drained (its producer fetched as it started): claimed on insert.
            assert job.state is JobState.EXECUTING
            assert job.attempted_by == (oban.config.node, oban._queues.producers["default"].uuid)
            assert job.inserted_at is not None
            assert await oban.relay(echo.new({"value": 8}), timeout=5) == 8
            stored = await oban.get_job(job.id)
            assert stored is not None
            assert stored.tags == ("a",)
            assert stored.meta == {"m": 1}
            assert stored.args == {"value": 7}
            assert await oban.get_job(10**12) is None


async def test_every_result_type_maps_to_its_state(dsn: str) -> None:
    with trio.fail_after(15):
        async with running(dsn) as oban:
            assert await oban.relay(steer.new({"kind": "value"}), timeout=5) == {
                "kind": "value",
                "attempt": 1,
            }
            assert await oban.relay(echo.new({}), timeout=5) is None
            with pytest.raises(RelayCancelled, match="told to cancel"):
                await oban.relay(steer.new({"kind": "cancel"}), timeout=5)
            with pytest.raises(RelayDiscard, match="told to discard"):
                await oban.relay(steer.new({"kind": "discard"}), timeout=5)
            # Snooze: rescheduled, not counted as a failure; the relay keeps waiting.
            snoozed = await oban.dispatch(steer.new({"kind": "snooze"}))
            assert await snoozed.result(timeout=5) == {"kind": "snooze", "attempt": 2}
            assert snoozed.job.id is not None
            job = await oban.get_job(snoozed.job.id)
            assert job is not None
            assert (job.state, job.attempt, job.max_attempts, job.errors) == (
                JobState.COMPLETED, 2, 21, ()
            )  # fmt: skip
            # An exception: retryable with the traceback recorded.
            failing = await oban.dispatch(steer.new({"kind": "raise"}, max_attempts=5))
            with pytest.raises(RelayDiscard, match="boom from the worker"):
                await failing.result(timeout=5)
            assert failing.job.id is not None
            job = await oban.get_job(failing.job.id)
            assert job is not None
            assert job.state in (JobState.RETRYABLE, JobState.AVAILABLE, JobState.EXECUTING)
            assert "RuntimeError: boom from the worker" in job.errors[0]["error"]
            assert "Traceback" in job.errors[0]["error"]
            assert job.errors[0]["attempt"] == 1


async def test_unserialisable_result_fails_the_job_clearly(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn) as oban:
            relay = await oban.dispatch(steer.new({"kind": "unserialisable"}, max_attempts=1))
            with pytest.raises(RelayDiscard, match="not JSON-serialisable"):
                await relay.result(timeout=5)
            assert relay.job.id is not None
            job = await oban.get_job(relay.job.id)
            assert job is not None
            assert job.state is JobState.DISCARDED


async def test_retries_with_backoff_until_success_or_exhaustion(dsn: str) -> None:
    with trio.fail_after(15):
        async with running(dsn) as oban:
            relay = await oban.dispatch(flaky.new({"succeed_on": 3}))
            assert await relay.result(timeout=10, with_retries=True) == "ok on 3"
            assert relay.job.id is not None
            job = await oban.get_job(relay.job.id)
            assert job is not None
            assert job.attempt == 3
            assert [e["attempt"] for e in job.errors] == [1, 2]
            exhausted = await oban.dispatch(flaky.new({"succeed_on": 99}))
            with pytest.raises(RelayDiscard, match="failing attempt 3"):
                await exhausted.result(timeout=10, with_retries=True)
            assert exhausted.job.id is not None
            job = await oban.get_job(exhausted.job.id)
            assert job is not None
            assert (job.state, job.attempt, len(job.errors)) == (JobState.DISCARDED, 3, 3)


async def test_default_backoff_schedules_the_retry_in_the_future(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn) as oban:
            relay = await oban.dispatch(steer.new({"kind": "raise"}))
            with pytest.raises(RelayDiscard):
                await relay.result(timeout=5)
            assert relay.job.id is not None
            job = await oban.get_job(relay.job.id)
            assert job is not None
            assert job.scheduled_at is not None
            assert job.attempted_at
            assert job.state is JobState.RETRYABLE
            delay = (job.scheduled_at - job.attempted_at).total_seconds()
            assert 15 <= delay <= 20  # 15 + 2**1, jittered by 10%


async def test_scheduled_jobs_wait_until_due_then_run(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn) as oban:
            future = await oban.insert(echo.new({"value": 1}, schedule_in=3600))
            assert future.state is JobState.SCHEDULED
            relay = await oban.dispatch(echo.new({"value": 2}, schedule_in=3600))
            assert relay.job.state is JobState.SCHEDULED
            # Postgres time doesn't follow the Trio clock: make it due by rewriting the row.
            async with oban.transaction() as conn:
                await conn.execute(
                    "UPDATE oban_jobs SET scheduled_at = scheduled_at - interval '2 hours' "
                    "WHERE id = %s",
                    [relay.job.id],
                )
            assert await relay.result(timeout=5) == 2
            assert future.id is not None
            still = await oban.get_job(future.id)
            assert still is not None
            assert still.state is JobState.SCHEDULED


async def test_priority_orders_execution(dsn: str) -> None:
    workers.seen.clear()
    with trio.fail_after(10):
        async with running(dsn, queues={"default": 1}) as oban:
            await oban.pause_queue("default", local_only=True)
            jobs = [record.new({"tag": f"p{p}"}, priority=p) for p in (5, 0, 9, 3, 0)]
            await oban.insert_all(jobs)
            last = await oban.dispatch(record.new({"tag": "last"}, priority=9))
            await oban.resume_queue("default", local_only=True)
            await last.result(timeout=5)
    assert workers.seen == ["p0", "p0", "p3", "p5", "p9", "last"]


async def test_insert_all_is_one_statement_in_order(dsn: str) -> None:
    with trio.fail_after(20):
        async with running(dsn, queues={}) as oban:
            jobs = await oban.insert_all([echo.new({"value": i}) for i in range(2000)])
            assert [j.args["value"] for j in jobs] == list(range(2000))
            ids = [j.id or 0 for j in jobs]
            assert ids == sorted(ids)
            assert len(set(ids)) == 2000
            assert await oban.insert_all([]) == []
            with pytest.raises(TypeError, match="list of jobs"):
                await oban.insert_all(echo.new({}))  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="already saved"):
                await oban.insert(jobs[0])


async def test_transactional_insert_commits_or_rolls_back(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn, queues={}) as oban, oban.listen(["insert"]) as messages:
            inserted: list[trioban.Job] = []
            with pytest.raises(RuntimeError, match="abort"):
                await _insert_then_fail(oban, inserted)
            rolled = inserted[0]
            assert rolled.id is not None
            assert await oban.get_job(rolled.id) is None
            async with oban.transaction() as conn:
                kept = await oban.insert(echo.new({"value": 2}), conn=conn)
                assert kept.id is not None
            assert await oban.get_job(kept.id) is not None
            # Only the committed insert was announced.
            channel, payload = await messages.receive()
            assert (channel, payload) == ("insert", {"queue": "default"})
            with trio.move_on_after(0.3):
                extra = await messages.receive()
                pytest.fail(f"a rolled-back insert was announced: {extra}")
            # Anything but a connection from oban.transaction() is refused, saying so.
            with psycopg.connect(oban.config.dsn or "") as foreign:
                with pytest.raises(TypeError, match=r"conn to be a connection from .*transaction"):
                    await oban.insert(echo.new({}), conn=foreign)  # type: ignore[arg-type]
                with pytest.raises(TypeError, match=r"got a psycopg\.Connection"):
                    await oban.notify("gossip", {"a": 1}, conn=foreign)  # type: ignore[arg-type]


async def _insert_then_fail(oban: trioban.Oban, inserted: list[trioban.Job]) -> None:
    async with oban.transaction() as conn:
        inserted.append(await oban.insert(echo.new({"value": 1}), conn=conn))
        raise RuntimeError("abort")


async def test_a_call_needing_a_second_connection_inside_a_transaction_fails_at_once(
    dsn: str,
) -> None:
    """With pool_size=1, an insert without conn= inside oban.transaction() can never get a
    connection: it raises at once (and the transaction rolls back) instead of hanging."""
    with trio.fail_after(10):
        async with running(dsn, queues={}, pool_size=1) as oban:
            kept: list[trioban.Job] = []
            with pytest.raises(trioban.TriobanError, match="as `conn=` to the calls that take"):
                async with oban.transaction() as conn:
                    kept.append(await oban.insert(echo.new({"value": 1}), conn=conn))
                    await oban.insert(echo.new({"value": 2}))
            assert kept[0].id is not None
            assert await oban.get_job(kept[0].id) is None
            assert (await oban.insert(echo.new({"value": 3}))).id is not None  # pool intact


async def test_concurrency_limit_is_respected(dsn: str) -> None:
    workers.concurrency.update(now=0, max=0, started=0)
    gate = workers.gates["limit"] = trio.Event()
    with trio.fail_after(15):
        async with running(dsn, queues={"default": 3}) as oban:
            relays = [await oban.dispatch(wait_gate.new({"gate": "limit"})) for _ in range(12)]
            await workers.wait_started(3)
            await trio.sleep(0.2)  # give an over-eager producer the chance to exceed the limit
            assert oban.check_queue("default").running.__len__() == 3
            gate.set()
            outcomes = await oban.await_many(relays, timeout=10)
            assert [o.unwrap() for o in outcomes] == ["opened"] * 12
    assert workers.concurrency["max"] == 3


async def test_graceful_shutdown_finishes_short_jobs(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn, shutdown_grace=5) as oban:
            workers.concurrency["started"] = 0
            relay = await oban.dispatch(sleeper.new({"seconds": 0.3}))
            await workers.wait_started(1)
        async with running(dsn, queues={}) as oban:
            assert relay.job.id is not None
            job = await oban.get_job(relay.job.id)
            assert job is not None
            assert job.state is JobState.COMPLETED


async def test_a_cancelled_exit_cuts_running_jobs_off_and_says_so(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Leaving the block by cancellation cancels its jobs at once (Trio's rule: the grace is
    for a normal exit). They stay executing for the lifeline, and the log names them."""
    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            async with running(dsn, shutdown_grace=5) as oban:
                workers.concurrency["started"] = 0
                relay = await oban.dispatch(sleeper.new({"seconds": 60}))
                await workers.wait_started(1)
                scope.cancel()
                await trio.sleep_forever()
        assert relay.job.id is not None
        assert f"1 jobs left executing for rescue: [{relay.job.id}]" in caplog.text
        async with running(dsn, queues={}) as oban:
            job = await oban.get_job(relay.job.id)
            assert job is not None
            assert job.state is JobState.EXECUTING


async def test_ctrl_c_in_a_job_comes_out_as_keyboard_interrupt(dsn: str) -> None:
    """Trio delivers Ctrl-C to whichever task runs, perhaps a job: it leaves open() as the
    KeyboardInterrupt a script's ``except KeyboardInterrupt`` expects, not an InternalError."""
    with trio.fail_after(10), pytest.raises(KeyboardInterrupt):
        async with running(dsn) as oban:
            await oban.insert(interrupted.new({}))
            await trio.sleep_forever()


async def test_shutdown_leaves_overdue_jobs_executing(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn, shutdown_grace=0.2) as oban:
            workers.concurrency["started"] = 0
            relay = await oban.dispatch(sleeper.new({"seconds": 60}))
            await workers.wait_started(1)
            started = trio.current_time()
        assert trio.current_time() - started < 2
        async with running(dsn, queues={}) as oban:
            assert relay.job.id is not None
            job = await oban.get_job(relay.job.id)
            assert job is not None
            assert job.state is JobState.EXECUTING


@pytest.mark.parametrize(
    ("kind", "error"),
    [("exit", "SystemExit: 2"), ("asyncio", "CancelledError: its own"), ("other", "Unusual: odd")],
)
async def test_a_job_raising_a_base_exception_fails_and_the_node_keeps_running(
    dsn: str, kind: str, error: str
) -> None:
    """A BaseException from job code (SystemExit from an argparse error, an asyncio
    CancelledError of its own, a library's own) fails the attempt like an exception; it
    doesn't stop the node, nor every node the job is retried on."""
    with trio.fail_after(10):
        async with running(dsn) as oban:
            relay = await oban.dispatch(exits.new({"kind": kind}))
            with pytest.raises(RelayDiscard, match=error):
                await relay.result(timeout=5)
            assert await oban.relay(echo.new({"value": 1}), timeout=5) == 1


async def test_unknown_worker_is_discarded_and_the_node_keeps_running(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn) as oban:
            async with oban.transaction() as conn:
                cur = await conn.execute(
                    "INSERT INTO oban_jobs (worker, args) VALUES ('nowhere.Missing', '{}') "
                    "RETURNING id"
                )
                row = await cur.fetchone()
                assert row is not None
                await conn.execute(
                    "SELECT pg_notify('public.oban_insert', '{\"queue\":\"default\"}')"
                )
            assert await oban.relay(echo.new({"value": "alive"}), timeout=5) == "alive"
            job = None
            for _ in range(100):
                job = await oban.get_job(row[0])
                assert job is not None
                if job.state is JobState.DISCARDED:
                    break
                await trio.sleep(0.05)
            assert job is not None
            assert job.state is JobState.DISCARDED
            assert "unknown worker 'nowhere.Missing'" in job.errors[-1]["error"]


async def test_worker_timeout_is_an_error_and_retried(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn) as oban:
            relay = await oban.dispatch(too_slow.new({}))
            with pytest.raises(RelayDiscard, match=r"exceeded its worker's timeout of 0\.2s"):
                await relay.result(timeout=5, with_retries=True)
            assert relay.job.id is not None
            job = await oban.get_job(relay.job.id)
            assert job is not None
            assert (job.state, job.attempt) == (JobState.DISCARDED, 2)


async def test_a_job_raising_as_it_is_cancelled_ends_as_its_cancellation_says(
    dsn: str,
) -> None:
    """Its timeout: a failure naming both the timeout and the error; cancel_job: cancelled
    (not failed and retried)."""
    workers.concurrency.update(now=0, max=0, started=0)
    with trio.fail_after(10):
        async with running(dsn) as oban:
            relay = await oban.dispatch(breaks_when_cancelled.new({}))
            with pytest.raises(RelayDiscard, match=r"timeout of 0\.3s, then RuntimeError: cleanup"):
                await relay.result(timeout=5)
            relay = await oban.dispatch(breaks_when_cancelled.new({}))
            await workers.wait_started(2)
            assert relay.job.id is not None
            await oban.cancel_job(relay.job.id, reason="not needed")
            with pytest.raises(RelayCancelled, match="not needed"):
                await relay.result(timeout=5)


async def test_a_job_that_swallows_its_timeout_still_timed_out(dsn: str) -> None:
    """It caught the Cancelled and returned: it ran past its timeout all the same."""
    with trio.fail_after(10):
        async with running(dsn) as oban:
            with pytest.raises(RelayDiscard, match=r"exceeded its worker's timeout of 0\.2s"):
                await oban.relay(swallows_cancel.new({}), timeout=5)


async def test_retry_job_runs_a_finished_job_again(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn) as oban:
            relay = await oban.dispatch(steer.new({"kind": "discard"}))
            with pytest.raises(RelayDiscard):
                await relay.result(timeout=5)
            assert relay.job.id is not None
            assert await oban.retry_job(relay.job.id) is True
            with pytest.raises(RelayDiscard):
                await relay.result(timeout=5)
            job = await oban.get_job(relay.job.id)
            assert job is not None
            assert job.attempt == 2
            with pytest.raises(TypeError, match="job id"):
                await oban.retry_job("1")  # type: ignore[arg-type]


async def test_cancel_job_before_it_runs(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn, queues={}) as oban:
            job = await oban.insert(echo.new({}))
            assert job.id is not None
            assert await oban.cancel_job(job.id) is True
            assert await oban.cancel_job(job.id) is False
            stored = await oban.get_job(job.id)
            assert stored is not None
            assert stored.state is JobState.CANCELLED


async def test_open_rejects_bad_input(dsn: str) -> None:
    with pytest.raises(TypeError, match=r"trioban\.Config"):
        async with trioban.open({"dsn": dsn}):  # type: ignore[arg-type]
            pass


async def test_a_users_exception_comes_out_unchanged(dsn: str) -> None:
    class Mine(Exception):
        pass

    with trio.fail_after(10), pytest.raises(Mine):
        async with running(dsn):
            raise Mine


async def test_insert_only_instance_runs_no_producers(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn, queues={}) as oban:
            job = await oban.insert(echo.new({}))
            assert job.id is not None
            with pytest.raises(ValueError, match="insert-only"):
                oban.check_queue("default")
            await trio.sleep(0.3)
            stored = await oban.get_job(job.id)
            assert stored is not None
            assert stored.state is JobState.AVAILABLE


async def test_claim_on_insert_when_the_queue_is_drained(dsn: str) -> None:
    """A job for a queue this node runs, with a free slot and nothing waiting, is inserted
    already claimed (executing, attempt 1) and runs at once; with no free slot it waits."""
    workers.gates.clear()
    with trio.fail_after(20):
        # No stager ticks: each wakes the producer, which then fetches before claiming again.
        async with running(dsn, queues={"default": 1}, stage_interval=60) as oban:
            await oban.relay(echo.new({"value": "warm"}))
            producer = oban._queues.producers["default"]

            async def drained() -> bool:  # the producer's fetch after the warm job came back
                return producer.claimable

            await eventually(drained)
            gated = await oban.insert(wait_gate.new({"gate": "claim"}))
            assert gated.state is JobState.EXECUTING
            assert gated.attempt == 1
            assert gated.attempted_by[0] == oban.config.node
            waiting = await oban.insert(echo.new({"value": "later"}))
            assert waiting.state is JobState.AVAILABLE  # the one slot is taken
            await oban.pause_queue("default", local_only=True)
            workers.gates.setdefault("claim", trio.Event()).set()
            await wait_for_state(oban, gated.id or 0, JobState.COMPLETED)
            paused = await oban.insert(echo.new({"value": "paused"}))
            assert paused.state is JobState.AVAILABLE  # a paused queue claims nothing
            await oban.resume_queue("default", local_only=True)
            await wait_for_state(oban, waiting.id or 0, JobState.COMPLETED)
            await wait_for_state(oban, paused.id or 0, JobState.COMPLETED)


async def test_a_job_inserted_here_is_not_overtaken_by_a_claim(dsn: str) -> None:
    """An available job this node inserts wakes its producer at once: a job inserted next is
    not claimed ahead of it, even before the insert notification comes back (here it never
    does)."""
    with trio.fail_after(20):
        async with running(dsn, queues={"default": 1}, stage_interval=60) as oban:
            await _drain_unnotified(oban)
            first = await oban.insert(record.new({"tag": "first"}, unique=Unique(period=None)))
            assert first.state is JobState.AVAILABLE  # unique inserts are never claimed
            await _second_runs_after_first(oban)


async def test_a_job_committed_in_a_transaction_is_not_overtaken_by_a_claim(dsn: str) -> None:
    """The same for a job inserted in ``oban.transaction()``: its producer is woken when the
    transaction commits."""
    with trio.fail_after(20):
        async with running(dsn, queues={"default": 1}, stage_interval=60) as oban:
            await _drain_unnotified(oban)
            async with oban.transaction() as conn:
                first = await oban.insert(record.new({"tag": "first"}), conn=conn)
            assert first.state is JobState.AVAILABLE  # inserts in a transaction aren't claimed
            assert not oban._uncommitted  # forgotten once the transaction is over
            await _second_runs_after_first(oban)


async def _drain_unnotified(oban: trioban.Oban) -> None:
    """Wait until the default queue is idle, with insert notifications unsubscribed."""
    await oban.relay(echo.new({"value": "warm"}))
    producer = oban._queues.producers["default"]
    oban._notifier.unsubscribe("insert", oban._queues._on_insert)

    async def drained() -> bool:
        return producer.claimable

    await eventually(drained)
    workers.seen.clear()


async def _second_runs_after_first(oban: trioban.Oban) -> None:
    second = await oban.insert(record.new({"tag": "second"}))
    assert second.state is JobState.AVAILABLE

    async def both_ran() -> bool:
        return len(workers.seen) == 2

    await eventually(both_ran)
    assert workers.seen == ["first", "second"]


async def test_cancelled_claimed_inserts_give_back_their_slots_or_run(dsn: str) -> None:
    """An insert cancelled before it starts inserts nothing; one cancelled while its caller
    writes it is cancelled on the server; one cancelled after a writer task took it is
    inserted and, claimed, runs all the same. Every reserved slot comes back."""
    with trio.fail_after(20):
        async with running(dsn, queues={"default": 2}, stage_interval=60) as oban:
            await oban.relay(echo.new({"value": "warm"}))
            producer = oban._queues.producers["default"]

            async def drained() -> bool:
                return producer.claimable

            await eventually(drained)
            workers.seen.clear()
            with trio.CancelScope() as cancelled:
                cancelled.cancel()  # already cancelled: the insert doesn't start
                await oban.insert(record.new({"tag": "never"}))

            async def insert_then_cancel(tag: str, scope: trio.CancelScope) -> None:
                with scope:
                    await oban.insert(record.new({"tag": tag}))

            inline, queued = trio.CancelScope(), trio.CancelScope()
            async with oban.transaction() as conn, trio.open_nursery() as nursery:
                # The table is locked: both inserts wait on the server once sent.
                await conn.execute("LOCK TABLE oban_jobs IN EXCLUSIVE MODE")
                nursery.start_soon(insert_then_cancel, "inline", inline)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(insert_then_cancel, "orphan", queued)
                await trio.testing.wait_all_tasks_blocked()
                inline.cancel()
                queued.cancel()
            assert inline.cancelled_caught
            assert queued.cancelled_caught

            async def orphan_ran() -> bool:
                return workers.seen == ["orphan"]

            await eventually(orphan_ran)  # "never" and "inline" were not inserted
            await eventually(drained)
            assert producer._reserved == 0
            async with oban.transaction() as conn:
                cur = await conn.execute(
                    "SELECT args->>'tag' FROM oban_jobs WHERE worker = 'tests.workers.record'"
                )
                assert await cur.fetchall() == [("orphan",)]


async def wait_for_state(oban: trioban.Oban, job_id: int, state: JobState) -> None:
    async def reached() -> bool:
        job = await oban.get_job(job_id)
        return job is not None and job.state is state

    await eventually(reached)


class Boom(Exception):
    pass


@pytest.mark.parametrize("exit_by", ["error", "cancel"])
async def test_acks_queued_when_the_block_exits_abruptly_are_written(
    dsn: str, exit_by: str
) -> None:
    """The block exits with an exception, or is cancelled, while one ack is being written (a
    row lock holds it up) and another waits behind it: both are written, neither job is left
    executing to be run again."""
    workers.concurrency.update(now=0, max=0, started=0)
    locker = await _pg.connect(dsn)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as scope:
                    try:
                        async with running(dsn) as oban:
                            ids = await _two_acks_held_up(oban, locker)
                            nursery.start_soon(_rollback_soon, locker)
                            if exit_by == "cancel":
                                scope.cancel()
                                await trio.sleep_forever()
                            raise Boom
                    except Boom:
                        pass
            cur = await locker.execute(
                "SELECT state::text FROM oban_jobs WHERE id = ANY(%s)", [ids]
            )
            assert await cur.fetchall() == [("completed",), ("completed",)]
    finally:
        await locker.close()


async def _two_acks_held_up(oban: trioban.Oban, locker: _pg.Connection) -> list[int]:
    """Two finished jobs: the first's ack blocked on ``locker``'s row lock, the second's queued."""
    gates = [f"held-{id(oban)}", f"queued-{id(oban)}"]
    jobs = [await oban.insert(wait_gate.new({"gate": gate})) for gate in gates]
    ids = [job.id or 0 for job in jobs]
    await workers.wait_started(2)
    await locker.execute("BEGIN")
    await locker.execute("SELECT 1 FROM oban_jobs WHERE id = %s FOR UPDATE", [ids[0]])
    workers.gates.setdefault(gates[0], trio.Event()).set()
    await _waiting_for_a_lock(locker)
    workers.gates.setdefault(gates[1], trio.Event()).set()
    producer = oban._queues.producers["default"]

    async def both_acks_queued() -> bool:
        return not producer.running

    await eventually(both_acks_queued)
    return ids


async def _rollback_soon(locker: _pg.Connection) -> None:
    await trio.sleep(0.3)  # the instance is shutting down by now
    await locker.execute("ROLLBACK")


async def _waiting_for_a_lock(conn: _pg.Connection) -> None:
    async def waiting() -> bool:
        cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
        return await cur.fetchone() != (0,)

    await eventually(waiting)


async def _outage(dsn: str) -> None:
    """From now on this database refuses connections, and the open ones are closed."""
    params = conninfo_to_dict(dsn)
    name = sql.Identifier(str(params["dbname"]))
    async with await _pg.connect(make_conninfo("", **{**params, "dbname": "postgres"})) as conn:
        await conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(name))
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            [params["dbname"]],
        )


async def test_shutdown_during_an_outage_ends_and_names_the_unwritten_jobs(
    dsn: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL can't be reached when the block exits: the acker stops ``DRAIN_TIMEOUT``
    after the grace and logs the jobs it couldn't ack (they stay executing for the lifeline);
    job tasks waiting for room in its (full) buffer are let go."""
    monkeypatch.setattr(_acker, "DRAIN_TIMEOUT", 1.0)
    monkeypatch.setattr(_acker, "BUFFER", 1)
    workers.concurrency.update(now=0, max=0, started=0)
    first, rest = f"outage-1-{trio.current_time()}", f"outage-2-{trio.current_time()}"
    with trio.fail_after(15):
        async with running(dsn, shutdown_grace=0.5) as oban:
            jobs = await oban.insert_all(
                [wait_gate.new({"gate": gate}) for gate in [first, rest, rest, rest]]
            )
            await workers.wait_started(4)
            await _outage(dsn)
            producer = oban._queues.producers["default"]
            workers.gates.setdefault(first, trio.Event()).set()

            async def acker_busy() -> bool:  # retrying the first ack, as long as it must
                return jobs[0].id not in producer.running

            await eventually(acker_busy)
            workers.gates.setdefault(rest, trio.Event()).set()

            async def all_finished() -> bool:  # one ack in the buffer, two waiting for room
                return workers.concurrency["now"] == 0

            await eventually(all_finished)
            assert len(producer.running) == 2
            stopping = trio.current_time()
        took = trio.current_time() - stopping
    # The grace and the acker's drain, then the heartbeat's bounded cleanup; the rest is quick.
    assert took < 0.5 + 1.0 + _heartbeat.CLEANUP_TIMEOUT + 1.5, took
    ids = sorted(job.id or 0 for job in jobs)
    assert "stopped with 4 job outcomes unwritten (shutdown deadline)" in caplog.text
    assert f"lifeline to rescue: {ids}" in caplog.text


async def test_a_queue_started_on_an_insert_only_node_gets_its_jobs_staged(dsn: str) -> None:
    """The stager runs on every instance (quietly while it runs no queue), so the scheduled
    jobs of a queue started later are staged without another node's help."""
    with trio.fail_after(10):
        async with running(dsn, queues={}) as oban:
            await oban.start_queue("default", limit=2, local_only=True)
            job = await oban.insert(echo.new({"value": 1}, schedule_in=0.2))
            assert job.state is JobState.SCHEDULED
            await wait_for_state(oban, job.id or 0, JobState.COMPLETED)


async def test_inserts_racing_the_close_end_and_later_ones_are_refused(dsn: str) -> None:
    """Tasks outside the block keep inserting while it exits: each insert is written or fails
    with a clear error; none waits for ever on a writer that has stopped."""
    outcomes: list[str] = []

    async def keep_inserting(oban: trioban.Oban) -> None:
        while True:
            try:
                await oban.insert(echo.new({"value": 1}))
            except trioban.TriobanError as exc:
                outcomes.append(str(exc))
                return

    with trio.fail_after(20):
        async with (
            trio.open_nursery() as outside,
            trioban.open(Config(dsn=dsn, queues={})) as oban,
        ):
            for _ in range(8):
                outside.start_soon(keep_inserting, oban)
            await trio.sleep(0.3)
        assert len(outcomes) == 8
        assert all("closed" in outcome for outcome in outcomes)
        with pytest.raises(trioban.TriobanError, match="cannot insert: this trioban instance"):
            await oban.insert(echo.new({"value": 2}))


async def test_a_cancelled_exit_while_jobs_are_claimed_on_insert_is_a_plain_cancel(
    dsn: str,
) -> None:
    """Cancelling the scope around open() closes each producer's nursery before its queue
    stops: jobs claimed on insert from then on are handed back, not started there."""

    async def keep_inserting(oban: trioban.Oban) -> None:
        while True:
            await oban.insert(sleeper.new({"seconds": 0.01}))

    conf = Config(dsn=dsn, queues={"default": 1000}, shutdown_grace=1)
    for attempt in range(8):
        with trio.fail_after(30), trio.move_on_after(0.4 + attempt * 0.037) as scope:
            async with trioban.open(conf) as oban, trio.open_nursery() as nursery:
                for _ in range(30):
                    nursery.start_soon(keep_inserting, oban)
        assert scope.cancelled_caught
