"""Cluster-wide queue control and job cancellation, with in-process and separate-process nodes."""

from __future__ import annotations

import random
import string
from functools import partial

import psycopg
import pytest
import trio

import trioban
from trioban import Config, JobState, RelayCancelled, _pg, _store
from trioban._queues import settle_claims

from . import workers
from .helpers import eventually, reaches, waiting_on_a_lock
from .nodes import node_processes
from .workers import echo, gates, read_tenant, record, tenant, wait_gate


def _conf(dsn: str, **settings: object) -> Config:
    return Config(dsn=dsn, stage_interval=0.1, shutdown_grace=0.5, **settings)  # type: ignore[arg-type]


async def test_pause_resume_scale_reach_every_node(dsn: str) -> None:
    with trio.fail_after(20):
        async with (
            trioban.open(_conf(dsn, queues={"default": 2}, node="a")) as a,
            trioban.open(_conf(dsn, queues={"default": 2}, node="b")) as b,
            trioban.open(_conf(dsn, queues={}, node="control")) as control,
        ):
            nodes = (a, b)

            async def all_paused(paused: bool) -> bool:
                return all(n.check_queue("default").paused is paused for n in nodes)

            await control.pause_queue("default")
            await eventually(lambda: all_paused(True))
            job = await control.insert(echo.new({"value": 1}))
            await trio.sleep(0.3)
            assert job.id is not None
            stored = await control.get_job(job.id)
            assert stored is not None
            assert stored.state is JobState.AVAILABLE
            await control.resume_queue("default")
            await eventually(lambda: all_paused(False))
            assert await control.relay(echo.new({"value": 2}), timeout=5) == 2

            await control.scale_queue("default", limit=7, node="b")

            async def scaled() -> bool:
                return b.check_queue("default").limit == 7

            await eventually(scaled)
            assert a.check_queue("default").limit == 2
            with pytest.raises(ValueError, match="limit"):
                await control.scale_queue("default", limit=0)


async def test_start_and_stop_queues(dsn: str) -> None:
    """A queue started on an insert-only node is woken by inserts (no stager tick here)."""
    with trio.fail_after(20):
        async with (
            trioban.open(_conf(dsn, queues={}, node="worker").evolve(stage_interval=60)) as worker,
            trioban.open(_conf(dsn, queues={}, node="control")) as control,
        ):
            insert_channel = "public.oban_insert"
            # Insert-only nodes don't listen for inserts (each would come back to them).
            assert insert_channel not in worker._notifier._listening
            with pytest.raises(ValueError, match="does not run on this node"):
                worker.check_queue("default")
            await control.start_queue("default", limit=3, node="worker")

            async def started() -> bool:
                return "default" in worker._queues.producers

            await eventually(started)
            assert worker.check_queue("default").limit == 3
            assert await control.relay(echo.new({"value": "ran"}), timeout=5) == "ran"
            assert await control.relay(echo.new({"value": "woken"}), timeout=5) == "woken"
            assert insert_channel in worker._notifier._listening
            assert insert_channel not in control._notifier._listening
            with pytest.raises(ValueError, match="does not run on this node"):
                control.check_queue("default")  # node="worker" only
            await control.stop_queue("default")

            async def stopped() -> bool:
                return "default" not in worker._queues.producers

            await eventually(stopped)


async def test_queue_signals_with_a_bad_queue_or_limit_are_ignored(dsn: str) -> None:
    """Signals come from any process that can notify: a node checks them as its own queue
    methods would, so none starts a queue named 'None', scales past the limit or fails on a
    malformed cancel signal."""
    bad: list[dict[str, object]] = [
        {"action": "start", "limit": 5},  # no queue
        {"action": "start", "queue": "x y", "limit": 2},
        {"action": "start", "queue": "big", "limit": 10**9},
        {"action": "start", "queue": "flag", "limit": True},
        {"action": "scale", "queue": "default", "limit": 10**6},
        {"action": "pkill", "job_ids": 5},
        {"action": "pkill", "job_ids": [1], "claims": ["not a time"]},
        {"action": "pkill", "job_ids": [1, 2], "claims": [1]},
    ]
    with trio.fail_after(20):
        async with (
            trioban.open(_conf(dsn, queues={"default": 1}, node="worker")) as worker,
            trioban.open(_conf(dsn, queues={}, node="control")) as control,
        ):
            # One notification, handled in order: the last signal shows the others were seen.
            ok = {"action": "start", "queue": "ok", "limit": 2}
            await control.notify("signal", [*bad, ok])

            async def started() -> bool:
                return "ok" in worker._queues.producers

            await eventually(started)
            assert set(worker._queues.producers) == {"default", "ok"}
            assert worker.check_queue("default").limit == 1


async def test_a_cancel_signal_skips_a_job_id_that_isnt_an_integer(dsn: str) -> None:
    """A malformed id (from a bug, or a user's own signal) is skipped: the ids after it are
    still cancelled."""
    workers.concurrency.update(now=0, max=0, started=0)
    with trio.fail_after(10):
        async with trioban.open(_conf(dsn, queues={"default": 1})) as oban:
            relay = await oban.dispatch(wait_gate.new({"gate": "never-opened"}))
            await workers.wait_started(1)
            signal = {"action": "pkill", "job_ids": [{"id": 1}, "2", relay.job.id]}
            await oban.notify("signal", signal)
            with pytest.raises(RelayCancelled):
                await relay.result(timeout=5)


async def test_a_queue_started_at_run_time_fetches_the_jobs_waiting(dsn: str) -> None:
    """No stager runs and nothing is inserted after the start: ``start_queue`` returns once
    the new producer has fetched, so the job already waiting is running by then."""
    workers.concurrency.update(now=0, max=0, started=0)
    conf = _conf(dsn, queues={}).evolve(stage_interval=60)
    with trio.fail_after(10):
        async with trioban.open(conf) as oban:
            relay = await oban.dispatch(wait_gate.new({"gate": "started-late"}))
            await oban.start_queue("default", limit=1, local_only=True)
            assert oban.check_queue("default").running == (relay.job.id,)
            gates.setdefault("started-late", trio.Event()).set()
            assert await relay.result(timeout=5) == "opened"


async def test_a_stopped_queue_vouches_for_its_jobs_until_they_finish(dsn: str) -> None:
    """A stopped queue's running jobs get the grace period, and its producer heartbeats them
    meanwhile: the lifeline doesn't rescue (to run again) a job older than ``rescue_after``."""
    workers.concurrency.update(now=0, max=0, started=0)
    conf = _conf(dsn, queues={"default": 1}, heartbeat_interval=0.1, rescue_after=0.3)
    with trio.fail_after(10):
        async with trioban.open(conf.evolve(shutdown_grace=10)) as oban:
            relay = await oban.dispatch(wait_gate.new({"gate": "draining"}))
            job_id = relay.job.id
            assert job_id is not None
            await workers.wait_started(1)
            await oban.stop_queue("default", local_only=True)
            # PostgreSQL's clock: the job grows well past rescue_after while the leader's
            # lifeline runs every 0.1 s.
            await trio.sleep(1.0)
            job = await oban.get_job(job_id)
            assert job is not None
            assert (job.state, job.errors) == (JobState.EXECUTING, ())
            gates["draining"].set()
            assert await relay.result(timeout=5) == "opened"
            job = await oban.get_job(job_id)
            assert job is not None
            assert (job.state, job.attempt) == (JobState.COMPLETED, 1)

            async def drained() -> bool:
                return not oban._queues.producers.draining

            await eventually(drained)


async def test_a_fetch_in_flight_when_the_queue_stops_hands_its_jobs_back(dsn: str) -> None:
    """The jobs a fetch claims after the queue stopped don't start: they are made available
    again, their attempt given back, and the stop ends as soon as the running job is done
    (not after the grace)."""
    workers.concurrency.update(now=0, max=0, started=0)
    conf = _conf(dsn, queues={"default": 2}).evolve(stage_interval=60, shutdown_grace=5)
    with trio.fail_after(15):
        async with trioban.open(conf) as oban:
            relay = await oban.dispatch(wait_gate.new({"gate": "in-flight"}))
            await workers.wait_started(1)
            await oban.pause_queue("default", local_only=True)
            waiting = await oban.insert(echo.new({"value": 1}))
            assert waiting.id is not None
            with psycopg.connect(dsn) as lock:
                # In a thread: the loop must go on (the pruner's transaction may hold a lock
                # that the LOCK waits for, and needs the loop to commit).
                exclusive = "LOCK TABLE oban_jobs IN EXCLUSIVE MODE"  # the fetch waits
                await trio.to_thread.run_sync(lock.execute, exclusive)
                await oban.resume_queue("default", local_only=True)

                async def fetch_in_flight() -> bool:
                    return await waiting_on_a_lock(oban, "%attempted_by = ARRAY%") == 1

                await eventually(fetch_in_flight)
                await oban.stop_queue("default", local_only=True)
            gates.setdefault("in-flight", trio.Event()).set()

            async def drained() -> bool:
                return not oban._queues.producers.draining

            with trio.fail_after(2):  # the grace is 5 s
                await eventually(drained)
            assert await relay.result(timeout=1) == "opened"
            job = await reaches(oban, waiting.id, JobState.AVAILABLE)  # handed back
            assert job.max_attempts - job.attempt == waiting.max_attempts


async def test_cancel_a_job_executing_in_another_process(dsn: str) -> None:
    with trio.fail_after(60):
        async with (
            trioban.open(_conf(dsn, queues={})) as caller,
            node_processes(dsn, "default:1", 1),
        ):
            relay = await caller.dispatch(wait_gate.new({"gate": "never-opened"}))
            job_id = relay.job.id
            assert job_id is not None

            async def executing() -> bool:
                job = await caller.get_job(job_id)
                return job is not None and job.state is JobState.EXECUTING

            await eventually(executing)
            assert await caller.cancel_job(job_id, reason="changed my mind") is True
            with pytest.raises(RelayCancelled, match="changed my mind"):
                await relay.result(timeout=5)
            job = await caller.get_job(job_id)
            assert job is not None
            assert job.state is JobState.CANCELLED
            # The node's only slot was freed by cancelling the job's scope over there.
            assert await caller.relay(echo.new({"value": "next"}), timeout=10) == "next"


async def test_cancel_a_job_executing_on_this_node(dsn: str) -> None:
    workers.concurrency.update(now=0, max=0, started=0)
    with trio.fail_after(10):
        async with trioban.open(_conf(dsn, queues={"default": 1})) as oban:
            relay = await oban.dispatch(wait_gate.new({"gate": "local-never"}))
            await workers.wait_started(1)
            assert relay.job.id is not None
            assert await oban.cancel_all_jobs([relay.job.id], reason="stop") == 1
            with pytest.raises(RelayCancelled, match="stop"):
                await relay.result(timeout=5)
            assert await oban.relay(echo.new({"value": 1}), timeout=5) == 1
            assert workers.concurrency["now"] == 0


async def test_gossip_between_processes(dsn: str) -> None:
    with trio.fail_after(60):
        async with (
            trioban.open(_conf(dsn, queues={})) as oban,
            node_processes(dsn, "default:1", 2),
            oban.listen(["gossip"]) as messages,
        ):
            await oban.notify("gossip", {"ping": 7})
            answers = set()
            async for _channel, payload in messages:
                if payload.get("pong") == 7:
                    answers.add(payload["node"])
                if len(answers) == 2:
                    break
            assert oban.config.node not in answers


async def test_jobs_still_run_while_the_notifier_is_down(dsn: str) -> None:
    from .test_relay import _terminate_notifier

    with trio.fail_after(20):
        async with trioban.open(_conf(dsn, queues={"default": 2}, node="lonely")) as oban:
            assert await _terminate_notifier(oban) == 1
            # Inserted from elsewhere while this node may be deaf: the stager's poll finds it.
            async with trioban.open(_conf(dsn, queues={}, node="inserter")) as other:
                relay = await other.dispatch(echo.new({"value": "polled"}))
                assert await relay.result(timeout=10) == "polled"


async def test_cancel_with_a_reason_too_long_for_a_notification(dsn: str) -> None:
    """The reason travels whole into the job's errors; the notices and cancel signals carry its
    start (a notification holds at most 8,000 bytes, and random text doesn't compress)."""
    workers.concurrency.update(now=0, max=0, started=0)
    reason = "".join(random.choices(string.ascii_letters + string.digits, k=12_000))
    with trio.fail_after(15):
        async with trioban.open(_conf(dsn, queues={"default": 3})) as oban:
            relays = [await oban.dispatch(wait_gate.new({"gate": "long-never"})) for _ in range(3)]
            await workers.wait_started(3)
            ids = [relay.job.id or 0 for relay in relays]
            assert await oban.cancel_all_jobs(ids, reason=reason) == 3
            for relay in relays:
                with pytest.raises(RelayCancelled) as caught:
                    await relay.result(timeout=5)
                assert reason[:1000] in str(caught.value)
                assert reason not in str(caught.value)
            job = await oban.get_job(ids[0])
            assert job is not None
            assert job.state is JobState.CANCELLED
            assert job.errors[-1]["error"] == reason

            async def stopped() -> bool:
                return workers.concurrency["now"] == 0

            await eventually(stopped)


async def test_a_job_claimed_on_insert_as_its_queue_stops_is_handed_back(dsn: str) -> None:
    """The claim is made, the queue stops while the insert is in flight: the job, inserted
    claimed, doesn't start and doesn't wait for the lifeline; it is made available again with
    its attempt given back."""
    with trio.fail_after(10):
        async with trioban.open(_conf(dsn, queues={"default": 1})) as oban:
            new = echo.new({"value": 1})
            batch, claims = oban._queues.claim([new])
            assert claims  # a slot is reserved: the job goes in claimed
            await oban.stop_queue("default", local_only=True)
            (saved,) = await oban._inserter.insert(batch, settle_claims(claims))
            assert saved.state is JobState.EXECUTING
            job = await reaches(oban, saved.id, JobState.AVAILABLE)
            assert (job.attempt, job.max_attempts) == (1, new.max_attempts + 1)


async def test_cancel_reaches_a_job_of_a_stopped_queue(dsn: str) -> None:
    """A stopped queue's job, running in its grace, is cancelled like any other (a retry
    could otherwise run it twice at once)."""
    workers.concurrency.update(now=0, max=0, started=0)
    with trio.fail_after(10):
        async with trioban.open(
            _conf(dsn, queues={"default": 1}).evolve(shutdown_grace=10)
        ) as oban:
            relay = await oban.dispatch(wait_gate.new({"gate": "stopped-never"}))
            await workers.wait_started(1)
            await oban.stop_queue("default", local_only=True)
            assert relay.job.id is not None
            assert await oban.cancel_all_jobs([relay.job.id], reason="stop") == 1
            with pytest.raises(RelayCancelled, match="stop"):
                await relay.result(timeout=5)

            async def stopped() -> bool:
                return workers.concurrency["now"] == 0 and not oban._queues.producers.draining

            await eventually(stopped)


async def test_a_queue_started_again_waits_for_its_stopped_jobs(dsn: str) -> None:
    """Started again while the stopped producer's job runs in its grace: the new producer
    waits for it, so the limit of 1 holds."""
    workers.concurrency.update(now=0, max=0, started=0)
    with trio.fail_after(15):
        async with trioban.open(
            _conf(dsn, queues={"default": 1}).evolve(shutdown_grace=10)
        ) as oban:
            first = await oban.dispatch(wait_gate.new({"gate": "restart-1"}))
            await workers.wait_started(1)
            await oban.stop_queue("default", local_only=True)
            second = await oban.dispatch(wait_gate.new({"gate": "restart-2"}))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(oban.start_queue, "default", limit=1, local_only=True))
                await trio.sleep(0.5)
                assert workers.concurrency["now"] == 1
                gates["restart-1"].set()
                await workers.wait_started(2)
            gates["restart-2"].set()
            assert [await first.result(timeout=5), await second.result(timeout=5)] == ["opened"] * 2
            assert workers.concurrency["max"] == 1


async def test_claims_on_insert_go_to_the_most_urgent_jobs_first(dsn: str) -> None:
    """One free slot, a batch of two: the priority 0 job runs first, as a fetch would order
    them, not the one listed first."""
    workers.seen.clear()
    with trio.fail_after(10):
        async with trioban.open(
            _conf(dsn, queues={"default": 1}).evolve(stage_interval=60)
        ) as oban:
            await oban.relay(echo.new({"value": 0}), timeout=5)  # the queue is drained
            jobs = [record.new({"tag": p}, priority=p) for p in (9, 0)]
            await oban.insert_all(jobs)

            async def both() -> bool:
                return len(workers.seen) == 2

            await eventually(both)
    assert workers.seen == [0, 9]


async def test_a_job_claimed_on_insert_does_not_see_the_inserters_context(dsn: str) -> None:
    """A job claimed as it is inserted starts in its producer's context, as a fetched one
    does: the inserting task's context vars (a tenant, a trace span) don't reach it."""
    with trio.fail_after(10):
        async with trioban.open(
            _conf(dsn, queues={"default": 1}).evolve(stage_interval=60)
        ) as oban:
            await oban.relay(echo.new({"value": 0}), timeout=5)  # the queue is drained
            tenant.set("request-42")
            assert await oban.relay(read_tenant.new({}), timeout=5) is None


async def test_a_cancel_that_overtakes_its_jobs_claim_stops_the_job(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that waited on the fetch's row lock returns with it: its signal can reach the
    producer before the fetch's result does. The job must still not run."""
    workers.seen.clear()
    fetch = _store.fetch
    cancelled: list[bool] = []

    async def fetch_then_cancel(
        pool: _pg.Pool, prefix: str, queue: str, demand: int, node: str, producer: str
    ) -> list[trioban.Job]:
        jobs = await fetch(pool, prefix, queue, demand, node, producer)
        for job in jobs:
            if job.args.get("tag") == "overtaken":
                assert job.id is not None
                cancelled.append(await oban.cancel_job(job.id, reason="overtaken"))
        return jobs

    monkeypatch.setattr(_store, "fetch", fetch_then_cancel)
    with trio.fail_after(10):
        async with (
            trioban.open(_conf(dsn, queues={"default": 1})) as oban,
            trioban.open(_conf(dsn, queues={}, node="inserter")) as inserter,
        ):
            # Inserted elsewhere, so this node fetches it (its own insert would claim it).
            job = await inserter.insert(record.new({"tag": "overtaken"}))
            assert job.id is not None
            await eventually(lambda: _true(bool(cancelled)))
            assert cancelled == [True]
            await inserter.insert(record.new({"tag": "after"}))
            await eventually(lambda: _true("after" in workers.seen))  # the slot is free
            stored = await reaches(oban, job.id, JobState.CANCELLED)
            assert stored.errors[-1]["error"] == "overtaken"
    assert workers.seen == ["after"]  # the cancelled job never ran


async def _true(value: bool) -> bool:
    return value
