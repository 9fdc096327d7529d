"""Nodes killed, PostgreSQL restarted, notifier connections cut: nothing committed is lost."""

from __future__ import annotations

import logging
import os
import signal
from functools import partial

import psycopg
import pytest
import trio

import trioban
from trioban._devserver import temp_postgres

from .. import workers
from ..helpers import eventually
from ..nodes import node_processes
from ..workers import count_run, echo, sleeper
from .conftest import size
from .helpers import count, create_runs, rows


def fast(dsn: str, **settings: object) -> trioban.Config:
    """Heartbeats every 0.25 s, rescue after 1.5 s: faults heal within test time."""
    base = trioban.Config(dsn=dsn, heartbeat_interval=0.25, rescue_after=1.5, stage_interval=0.2)
    return base.evolve(**settings)


NODE_FAST = ("--heartbeat", "0.25", "--rescue-after", "1.5")


async def _all_completed(oban: trioban.Oban, total: int) -> bool:
    done = await count(oban, "SELECT count(*) FROM oban_jobs WHERE state = 'completed'")
    return done == total


async def test_kill_9_one_of_three_nodes_mid_drain(dsn: str) -> None:
    """5,000 jobs on 3 node processes, one killed with SIGKILL while they run: every job
    completes; a job runs twice only if the killed node ran it first (then exactly twice)."""
    jobs = size(5_000, 20_000)
    conf = fast(dsn)
    async with trioban.open(conf) as oban:
        await create_runs(oban)
        with trio.fail_after(120):
            async with node_processes(dsn, "default:20", 3, *NODE_FAST) as procs:
                await oban.insert_all([count_run.new({"i": i, "sleep": 0.02}) for i in range(jobs)])
                await eventually(lambda: _at_least(oban, "SELECT count(*) FROM runs", jobs // 5))
                victim = procs[0]
                victim.send_signal(signal.SIGKILL)
                await victim.wait()
                await eventually(lambda: _all_completed(oban, jobs))
        per_job = await rows(
            oban,
            "SELECT job_id, count(*), count(DISTINCT node) FROM runs GROUP BY job_id",
        )
        assert len(per_job) == jobs, "every job ran"
        counts = [(int(str(runs)), int(str(nodes))) for _, runs, nodes in per_job]
        twice = [nodes for runs, nodes in counts if runs > 1]
        assert all(runs <= 2 for runs, _ in counts)
        # Twice only as first on the killed node, then on a live one: never twice on one node.
        assert all(nodes == 2 for nodes in twice), "a job ran twice on live nodes"
        rescued = await count(
            oban,
            "SELECT count(*) FROM oban_jobs WHERE errors[1]->>'error' LIKE 'rescued: %%'",
        )
        logging.getLogger(__name__).info("rescued %d jobs, %d ran twice", rescued, len(twice))
        assert rescued >= 1


async def _at_least(oban: trioban.Oban, statement: str, minimum: int) -> bool:
    return await count(oban, statement) >= minimum


async def test_postgres_restart_during_a_drain_with_relays_in_flight() -> None:
    """10,000 jobs draining and 500 relays waiting when PostgreSQL stops (immediate) and
    starts again: every job completes, every relay gets its result, the instance recovers
    by itself."""
    jobs, relays_n = size(10_000, 50_000), 500
    # Durable, as in production: the jobs' own side effects (the runs rows) commit durably,
    # while claims and acks commit asynchronously and may be lost (and are recovered).
    with temp_postgres(durable=True) as server:
        conf = fast(server.dsn(), queues={"default": 30})
        with trio.fail_after(240):
            async with trioban.open(conf) as oban:
                await create_runs(oban)
                await oban.insert_all([count_run.new({"i": i}) for i in range(jobs)])
                relays = [await oban.dispatch(echo.new({"value": i})) for i in range(relays_n)]
                await eventually(lambda: _at_least(oban, "SELECT count(*) FROM runs", jobs // 10))
                await trio.to_thread.run_sync(server.restart)
                outcomes = await oban.await_many(relays, timeout=120)
                assert [o.unwrap() for o in outcomes] == list(range(relays_n))
                await eventually(lambda: _all_completed(oban, jobs + relays_n), interval=0.2)
                ran = await count(oban, "SELECT count(DISTINCT job_id) FROM runs")
                missing = await rows(
                    oban,
                    "SELECT id, attempt, attempted_at, completed_at, errors, meta FROM oban_jobs "
                    "WHERE worker = %s AND id NOT IN (SELECT job_id FROM runs)",
                    count_run.name,
                )
                assert ran == jobs, missing

                async def notifier_connected() -> bool:
                    return oban.notifier_status() == "connected"

                # The work may finish first: the notifier's reconnect backs off up to 6 s.
                with trio.fail_after(10):
                    await eventually(notifier_connected)


async def test_notifier_connection_killed_every_second(dsn: str) -> None:
    """Relays keep flowing while the notifier's connection is terminated every second
    for 30 s (2 minutes under TRIOBAN_HEAVY): none is lost."""
    storm = size(30, 120)
    conf = fast(dsn, queues={"default": 20})
    finished: list[object] = []
    async with trioban.open(conf) as oban:
        with trio.fail_after(storm + 60):
            async with trio.open_nursery() as nursery:

                async def kill_notifier() -> None:
                    for _ in range(storm):
                        await trio.sleep(1)
                        await rows(
                            oban,
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name LIKE 'trioban-notifier%%'",
                        )
                    nursery.cancel_scope.cancel()

                async def relay_forever(worker_no: int) -> None:
                    n = 0
                    while True:
                        value = f"{worker_no}-{n}"
                        assert await oban.relay(echo.new({"value": value}), timeout=30) == value
                        finished.append(value)
                        n += 1

                nursery.start_soon(kill_notifier)
                for worker_no in range(20):
                    nursery.start_soon(relay_forever, worker_no)
    assert len(finished) > storm * 20  # relays completed all through the storm


async def test_graceful_shutdown_under_load(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """Leaving the block with jobs running: those finishing within the grace period are
    acked; the rest are reported and left executing for the lifeline; nothing is lost."""
    conf = trioban.Config(dsn=dsn, queues={"default": 20}, shutdown_grace=0.5)
    workers.concurrency.update(now=0, max=0, started=0)
    with trio.fail_after(60), caplog.at_level(logging.WARNING, "trioban.producer"):
        async with trioban.open(conf) as oban:
            quick = await oban.insert_all([sleeper.new({"seconds": 0.1}) for _ in range(10)])
            slow = await oban.insert_all([sleeper.new({"seconds": 30}) for _ in range(10)])
            # Started, not only claimed: a claim in flight as the queue stops is handed back.
            await workers.wait_started(20)
    async with trioban.open(conf.evolve(queues={})) as observer:
        states = {
            str(state): n
            for state, n in await rows(
                observer, "SELECT state::text, count(*) FROM oban_jobs GROUP BY 1"
            )
        }
        executing = [
            job_id
            for (job_id,) in await rows(
                observer, "SELECT id FROM oban_jobs WHERE state = 'executing' ORDER BY id"
            )
        ]
    assert states == {"completed": len(quick), "executing": len(slow)}
    assert executing == sorted(job.id or 0 for job in slow)
    assert f"{len(slow)} jobs left executing for rescue: {executing}" in caplog.text


@pytest.mark.skipif(os.environ.get("TRIOBAN_HEAVY") != "1", reason="the heavy variant only")
@pytest.mark.timeout(900)  # ten minutes of load, past the suite's default limit
async def test_soak_memory_and_tasks_stay_flat(dsn: str) -> None:
    """10 minutes of relays and jobs: task count and registry size come back to baseline."""
    import tracemalloc

    conf = trioban.Config(dsn=dsn, queues={"default": 20})
    async with trioban.open(conf) as oban:
        tracemalloc.start()
        baseline_tasks = _count_tasks()
        first = tracemalloc.take_snapshot()
        with trio.move_on_after(600):
            while True:
                relays = [await oban.dispatch(echo.new({"value": i})) for i in range(100)]
                await oban.await_many(relays, timeout=30)
        growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(first, "filename"))
        tracemalloc.stop()
        assert len(oban._relays) == 0
        assert _count_tasks() == baseline_tasks
        assert growth < 20 * 1024 * 1024


def _count_tasks() -> int:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count, stack = 0, [root]
    while stack:
        task = stack.pop()
        count += 1
        stack.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return count


async def test_a_node_whose_connections_hang_keeps_heartbeating(dsn: str) -> None:
    """Its connections hang (half-open TCP, here: its backends stopped with SIGSTOP). Each
    heartbeat is cut off and the next goes over another connection, so the node still vouches
    for its jobs: the lifeline would otherwise rescue a job it is still running."""
    conf = fast(dsn, queues={"default": 2}, rescue_after=60)
    frozen: list[int] = []

    def latest_beat() -> object:
        with psycopg.connect(dsn, autocommit=True) as conn:  # a new backend: not stopped
            return conn.execute("SELECT max(updated_at) FROM trioban_producers").fetchone()

    def stop_backends() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            query = (
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            for (pid,) in conn.execute(query).fetchall():
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)

    async def beaten_since(last: object) -> bool:
        return await trio.to_thread.run_sync(latest_beat) != last

    async with trioban.open(conf):
        try:
            with trio.fail_after(60):
                await eventually(partial(beaten_since, (None,)))
                try:
                    await trio.to_thread.run_sync(stop_backends)
                except PermissionError:
                    pytest.skip("the server's processes belong to another user")
                before = await trio.to_thread.run_sync(latest_beat)
                await eventually(partial(beaten_since, before), interval=0.5)
        finally:
            for pid in frozen:  # before the instance closes: its exit uses them too
                os.kill(pid, signal.SIGCONT)
