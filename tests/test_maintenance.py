"""Leadership, heartbeats, the lifeline and the pruner, with nodes in separate processes."""

from __future__ import annotations

import pytest
import trio
from psycopg import sql

import trioban
from trioban import JobState

from . import workers
from .helpers import eventually
from .nodes import node_processes
from .workers import echo, long_count, sleeper, wait_gate

RESCUE_AFTER = 1.5


def fast(dsn: str, **settings: object) -> trioban.Config:
    """Heartbeats every 0.25 s, rescue after 1.5 s: the lifeline within test time."""
    conf = trioban.Config(dsn=dsn, heartbeat_interval=0.25, rescue_after=RESCUE_AFTER)
    return conf.evolve(**settings)


NODE_OPTIONS = ("--heartbeat", "0.25", "--rescue-after", "1.5")


async def _scalar(oban: trioban.Oban, statement: str, *params: object) -> int:
    async with oban.transaction() as conn:
        cur = await conn.execute(sql.SQL(statement), params)
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_one_leader_and_a_quick_handover(dsn: str) -> None:
    # Elections every 5 s: a handover well under that comes from the resignation notice.
    conf = trioban.Config(dsn=dsn)
    leave = trio.Event()

    async def lead(*, task_status: trio.TaskStatus[trioban.Oban]) -> None:
        async with trioban.open(conf) as leader:
            task_status.started(leader)
            await leave.wait()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            leader = await nursery.start(lead)
            async with trioban.open(conf) as follower:
                assert leader.is_leader
                assert not follower.is_leader
                async with trioban.open(conf.evolve(queues={})) as other:
                    assert not other.is_leader
                # A follower that left changed nothing.
                assert leader.is_leader
                assert not follower.is_leader
                leave.set()
                started = trio.current_time()

                async def took_over() -> bool:
                    await trio.lowlevel.checkpoint()
                    return follower.is_leader

                await eventually(took_over)
                assert trio.current_time() - started < 1.0


async def test_instances_with_other_names_lead_separately(dsn: str) -> None:
    with trio.fail_after(10):
        async with (
            trioban.open(fast(dsn, name="a")) as a,
            trioban.open(fast(dsn, name="b")) as b,
        ):
            assert a.is_leader
            assert b.is_leader


async def test_check_all_queues_sees_every_node(dsn: str) -> None:
    conf = fast(dsn, queues={"default": 3, "other": 2})
    with trio.fail_after(20):
        async with (
            trioban.open(conf.evolve(node="n1")) as n1,
            trioban.open(conf.evolve(node="n2", queues={"default": 5})) as n2,
        ):
            infos = await n1.check_all_queues()
            assert [(i.queue, i.node, i.limit, i.paused) for i in infos] == [
                ("default", "n1", 3, False),
                ("default", "n2", 5, False),
                ("other", "n1", 2, False),
            ]
            await n2.pause_queue("default", node="n2")
            job = await n1.insert(wait_gate.new({"gate": "check-all"}, queue="other"))

            async def shows_both() -> bool:
                infos = {(i.queue, i.node): i for i in await n1.check_all_queues()}
                return infos[("default", "n2")].paused and infos[("other", "n1")].running == (
                    job.id,
                )

            await eventually(shows_both)
            await n1.cancel_job(job.id or 0)
        # Nodes that stopped cleanly delete their rows.
        async with trioban.open(conf.evolve(queues={})) as observer:
            assert await observer.check_all_queues() == []


async def test_lifeline_rescues_the_jobs_of_a_killed_node(dsn: str) -> None:
    """kill -9 a node mid-job: its jobs complete on another node within 2x rescue_after;
    the long jobs of the live node (longer than rescue_after) run once."""
    conf = fast(dsn)
    async with trioban.open(conf) as oban:
        async with oban.transaction() as conn:
            await conn.execute(
                "CREATE TABLE lifeline_runs (job_id bigint NOT NULL, node text, phase text)"
            )

        async def reached(phase: str, minimum: int) -> bool:
            statement = "SELECT count(*) FROM lifeline_runs WHERE phase = %s"
            return await _scalar(oban, statement, phase) >= minimum

        with trio.fail_after(60):
            async with node_processes(dsn, "default:5", 1, *NODE_OPTIONS) as [doomed]:
                # The doomed node fills its five slots with jobs that would run 30 s.
                await oban.insert_all([long_count.new({"seconds": 30}) for _ in range(5)])
                await eventually(lambda: reached("start", 5))
                async with node_processes(dsn, "default:10", 1, *NODE_OPTIONS):
                    # The survivor's own jobs run 3 s: twice rescue_after, on a live node.
                    await oban.insert_all([long_count.new({"seconds": 3}) for _ in range(3)])
                    await eventually(lambda: reached("start", 8))
                    doomed.kill()
                    await doomed.wait()
                    killed_at = trio.current_time()
                    await eventually(lambda: reached("done", 8))
                    elapsed = trio.current_time() - killed_at

        # Every job finished once; the killed node's jobs started twice, the others once.
        runs = await _scalar(
            oban,
            "SELECT count(*) FROM (SELECT job_id FROM lifeline_runs WHERE phase = 'done' "
            "GROUP BY job_id HAVING count(*) = 1) AS once",
        )
        starts = await _scalar(
            oban,
            "SELECT count(*) FROM (SELECT job_id FROM lifeline_runs WHERE phase = 'start' "
            "GROUP BY job_id HAVING count(*) = 2) AS twice",
        )
        assert (runs, starts) == (8, 5)
        assert elapsed < 2 * RESCUE_AFTER + 3, elapsed  # the live node's 3 s jobs
        rescued = await _scalar(
            oban,
            "SELECT count(*) FROM oban_jobs WHERE state = 'completed' AND attempt = 2 "
            "AND errors[1]->>'error' LIKE 'rescued: %%'",
        )
        assert rescued == 5


async def test_an_orphan_out_of_attempts_is_discarded_and_its_relay_told(dsn: str) -> None:
    conf = fast(dsn, queues={"default": 2}, shutdown_grace=0)
    workers.concurrency.update(now=0, max=0, started=0)
    with trio.fail_after(20):
        async with trioban.open(conf.evolve(queues={})) as caller:
            async with trioban.open(conf):
                relay = await caller.dispatch(sleeper.new({"seconds": 60}, max_attempts=1))
                # Started, not only claimed: a claim still in flight as the queue stops is
                # handed back (available) rather than left executing.
                await workers.wait_started(1)
            # The runner left the job executing (no grace); the caller's lifeline finds it.
            with pytest.raises(trioban.RelayDiscard, match="stopped heartbeating"):
                await relay.result(timeout=10)
            job = await caller.get_job(relay.job.id or 0)
            assert job is not None
            assert job.state is JobState.DISCARDED


async def test_pruner_deletes_old_finished_jobs_only(dsn: str) -> None:
    conf = fast(dsn, queues={"default": 5}, prune_max_age=0.5)
    with trio.fail_after(20):
        async with trioban.open(conf.evolve(prune_max_age=None)) as oban:
            done = [await oban.relay(echo.new({"value": i})) for i in range(3)]
            waiting = await oban.insert(echo.new({"value": "later"}, schedule_in=3600))
        async with trioban.open(conf.evolve(queues={})) as oban:

            async def pruned() -> bool:
                return await _scalar(oban, "SELECT count(*) FROM oban_jobs") == 1

            await eventually(pruned)
            assert done == [0, 1, 2]
            kept = await oban.get_job(waiting.id or 0)
            assert kept is not None
            assert kept.state is JobState.SCHEDULED


async def test_a_job_whose_ack_was_lost_on_a_live_node_is_rescued(dsn: str) -> None:
    """After a PostgreSQL crash loses an ack, the job shows executing on a node that is alive
    but no longer runs it: the lifeline puts it back (its producer doesn't list it)."""
    conf = fast(dsn, queues={"default": 2})
    with trio.fail_after(20):
        async with trioban.open(conf) as oban:
            done = await oban.relay(echo.new({"value": "first"}), timeout=5)
            assert done == "first"
            job_id = await _scalar(oban, "SELECT max(id) FROM oban_jobs")
            # What the crash leaves behind: the claim survived, the ack didn't.
            await _scalar(
                oban,
                "UPDATE oban_jobs SET state = 'executing', completed_at = NULL, "
                "attempted_at = attempted_at - interval '1 hour' WHERE id = %s RETURNING id",
                job_id,
            )

            async def ran_again() -> bool:
                job = await oban.get_job(job_id)
                return job is not None and job.state is JobState.COMPLETED and job.attempt == 2

            await eventually(ran_again)
