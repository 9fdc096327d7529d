"""Leadership, heartbeats, the lifeline and the pruner, with nodes in separate processes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing
from psycopg import sql

import trioban
from trioban import Batch, JobState, Workflow, _lifeline, _pg, telemetry
from trioban._leader import Leadership, while_leading
from trioban._pruner import Pruner, prune

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


async def test_a_tiny_prune_max_age_prunes_at_most_once_a_second(dsn: str) -> None:
    """Each run reads the table: a prune_max_age of a microsecond must not run it back to
    back (thousands of times a second)."""
    runs = 0

    def count(event: str, measurements: Mapping[str, float], metadata: Mapping[str, Any]) -> None:
        nonlocal runs
        runs += 1

    telemetry.attach("count-prunes", ["pruner.prune"], count)
    try:
        async with trioban.open(fast(dsn, queues={}, prune_max_age=1e-6)):
            await trio.sleep(2.5)
    finally:
        telemetry.detach("count-prunes")
    assert 1 <= runs <= 4


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


# -- after an outage, with nodes of other settings --------------------------------------------


async def _rows(pool: _pg.Pool, statement: str, *params: object) -> list[tuple[object, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(sql.SQL(statement), params)
        return await cur.fetchall() if cur.description else []


async def _running_job(
    pool: _pg.Pool,
    *,
    beat_ago: float | None,
    own_rescue_after: float | None = None,
    started_ago: float = 3600,
    listed: bool = True,
) -> tuple[int, str]:
    """An executing job and the producer running it, which last heartbeated ``beat_ago``
    seconds ago (None: not yet), listing the job if ``listed``; returns both ids."""
    producer = str(uuid.uuid4())
    [(job_id,)] = await _rows(
        pool,
        "INSERT INTO oban_jobs (state, worker, attempt, attempted_at, attempted_by) "
        "VALUES ('executing', 'tests.workers.echo', 1, "
        "timezone('UTC', now()) - make_interval(secs => %s), ARRAY['live', %s]) RETURNING id",
        started_ago,
        producer,
    )
    meta: dict[str, object] = {"running": [job_id] if listed else []}
    if own_rescue_after is not None:
        meta["rescue_after"] = own_rescue_after
    if beat_ago is not None:
        await _beat(pool, producer, meta, ago=beat_ago)
    return int(str(job_id)), producer


async def _beat(pool: _pg.Pool, producer: str, meta: object, *, ago: float = 0) -> None:
    """A heartbeat of ``producer`` ``ago`` seconds ago."""
    await _rows(
        pool,
        "INSERT INTO trioban_producers AS p (uuid, node, queue, updated_at, meta) VALUES "
        "(%s, 'live', 'default', timezone('UTC', now()) - make_interval(secs => %s), %s) "
        "ON CONFLICT (uuid) DO UPDATE SET updated_at = excluded.updated_at, meta = excluded.meta",
        producer,
        ago,
        json.dumps(meta),
    )


async def _executing(pool: _pg.Pool) -> set[int]:
    rows = await _rows(pool, "SELECT id FROM oban_jobs WHERE state = 'executing'")
    return {int(str(job_id)) for (job_id,) in rows}


async def test_after_an_outage_the_lifeline_gives_live_nodes_time_to_heartbeat(
    dsn: str, mock_clock: trio.testing.MockClock
) -> None:
    """No node could heartbeat through an outage, so once PostgreSQL is back every producer
    row looks stale, or is missing (a queue started just before): the lifeline judges only
    after this peer has reached the database for ``rescue_after``, time for live nodes to
    beat again. (Trio's clock moves on jump() only.)"""
    async with _pg.open_pool(dsn, size=2) as pool:
        long_job, producer = await _running_job(pool, beat_ago=60)  # a long job, a long outage
        new_job, new_producer = await _running_job(pool, beat_ago=None)
        leadership = Leadership(pool, "public", "oban", "leader/1", 60.0)
        lifeline = _lifeline.Lifeline(pool, "public", RESCUE_AFTER, leadership.steady_for)
        await leadership._elect()  # the first call to succeed since PostgreSQL came back
        assert leadership.is_leader
        assert await lifeline() == 0
        mock_clock.jump(RESCUE_AFTER / 2)
        assert await lifeline() == 0
        # The node is alive: it beats again meanwhile.
        await _beat(pool, producer, {"running": [long_job]})
        await _beat(pool, new_producer, {"running": [new_job]})
        mock_clock.jump(RESCUE_AFTER / 2)
        assert await lifeline() == 0
        assert await _executing(pool) == {long_job, new_job}

        # A tick failing on the database starts the wait over (a blip the lease outlived);
        # a tick failing for another reason doesn't.
        async def fails(error: Exception) -> None:
            await trio.lowlevel.checkpoint()
            raise error

        async with trio.open_nursery() as nursery:
            await nursery.start(while_leading, leadership, 60.0, "a", lambda: fails(ValueError()))
            await trio.testing.wait_all_tasks_blocked()
            assert leadership.steady_for() >= RESCUE_AFTER
            down = _pg.DatabaseUnavailable("cannot connect")
            await nursery.start(while_leading, leadership, 60.0, "b", lambda: fails(down))
            await trio.testing.wait_all_tasks_blocked()
            assert leadership.steady_for() == 0
            nursery.cancel_scope.cancel()
        await _beat(pool, producer, {"running": [long_job]}, ago=60)  # the node died
        await _rows(pool, "DELETE FROM trioban_producers WHERE uuid = %s", new_producer)
        await leadership._elect()
        assert await lifeline() == 0
        mock_clock.jump(RESCUE_AFTER)
        assert await lifeline() == 2  # a dead node's jobs are rescued once the wait is over
        assert await _executing(pool) == set()


async def test_a_node_is_judged_by_its_own_longer_rescue_after(dsn: str) -> None:
    """A node heartbeating less often than the leader says so in its rows: the leader gives
    its jobs the node's own ``rescue_after``, also to list a job it just claimed, and also to
    heartbeat again after an outage."""
    conf = fast(dsn, queues={"default": 1}, heartbeat_interval=0.5, rescue_after=30.0)
    with trio.fail_after(10):
        async with trioban.open(conf) as oban:
            meta = await _rows(oban._pool, "SELECT meta->'rescue_after' FROM trioban_producers")
            assert meta == [(30.0,)]
        async with _pg.open_pool(dsn, size=2) as pool:
            live, _ = await _running_job(pool, beat_ago=5, own_rescue_after=30)
            claimed, _ = await _running_job(
                pool, beat_ago=1, own_rescue_after=30, started_ago=5, listed=False
            )
            dead, _ = await _running_job(pool, beat_ago=60, own_rescue_after=30)
            # Reaching the database for 10 s is too short for that node to beat again.
            assert await _lifeline.rescue(pool, "public", RESCUE_AFTER, steady=10) == 0
            assert await _lifeline.rescue(pool, "public", RESCUE_AFTER) == 1
            assert await _executing(pool) == {live, claimed}
            assert dead not in await _executing(pool)


@pytest.mark.parametrize("testing", ["manual", "inline"])
async def test_a_testing_instance_never_takes_the_lease(dsn: str, testing: str) -> None:
    """A test instance runs no lifeline, sweep or pruner: leading, it would starve the
    cluster of them."""
    with trio.fail_after(10):
        async with (
            trioban.open(fast(dsn, testing=testing)) as test_instance,
            trioban.open(fast(dsn)) as node,
        ):
            assert not test_instance.is_leader
            assert node.is_leader


# -- pruning workflows -----------------------------------------------------------------------

DAY = 86_400.0


async def _finish(oban: trioban.Oban, ids: list[int | None], *, ago: float) -> None:
    """Complete jobs ``ago`` seconds ago, as if they ran then."""
    await _scalar(
        oban,
        "WITH done AS (UPDATE oban_jobs SET state = 'completed', attempt = 1, "
        "completed_at = timezone('UTC', now()) - make_interval(secs => %s) "
        "WHERE id = ANY(%s) RETURNING id) SELECT count(*) FROM done",
        ago,
        ids,
    )


async def test_a_workflow_is_pruned_whole_once_every_step_is_finished(dsn: str) -> None:
    """A step still to run reads its deps' results: a workflow's finished steps stay until
    every step is finished and old, then the workflow goes whole."""
    with trio.fail_after(10):
        async with trioban.open(trioban.Config(dsn=dsn, queues={}, prune_max_age=None)) as oban:
            first, second = Workflow(), Workflow()
            for wf in (first, second):
                wf.add("a", echo.new({})).add("b", echo.new({}))
                wf.add("c", echo.new({}), deps=["a", "b"])
            a, b, c = [job.id for job in await oban.insert_workflow(first)]
            others = [job.id for job in await oban.insert_workflow(second)]
            loose = await oban.insert(echo.new({}))
            await _finish(oban, [a, loose.id, *others], ago=2 * DAY)
            assert await prune(oban._pool, "public", DAY, 100) == 1 + 3  # b is still to run
            assert await oban.workflow_status(first.workflow_id) == {
                "a": JobState.COMPLETED,
                "b": JobState.AVAILABLE,
                "c": JobState.SUSPENDED,
            }
            await _finish(oban, [b, c], ago=60)
            assert await prune(oban._pool, "public", DAY, 100) == 0  # b and c are recent
            await _finish(oban, [b, c], ago=2 * DAY)
            assert await prune(oban._pool, "public", DAY, 1) == 3  # whole, past the limit
            assert await _scalar(oban, "SELECT count(*) FROM oban_jobs") == 0


async def test_the_pruner_pages_through_workflows(dsn: str) -> None:
    """A run reads a page of workflow rows, not every workflow: the pages go round in id
    order, so a workflow still running at the front holds none of the others back."""
    with trio.fail_after(10):
        async with trioban.open(trioban.Config(dsn=dsn, queues={}, prune_max_age=None)) as oban:
            ids = []
            for name in ("wf-1", "wf-2", "wf-3"):
                wf = Workflow(workflow_id=name).add("a", echo.new({})).add("b", echo.new({}))
                ids += [job.id for job in await oban.insert_workflow(wf)]
            await _finish(oban, ids[1:], ago=2 * DAY)  # wf-1's first step is still to run
            pruner = Pruner(oban._pool, "public", DAY, 2)
            assert [await pruner() for _ in range(5)] == [0, 2, 2, 0, 0]
            assert pruner.workflow_after == "wf-1"
            assert await oban.workflow_status("wf-1") == {
                "a": JobState.AVAILABLE,
                "b": JobState.COMPLETED,
            }


async def _insert_batches(
    oban: trioban.Oban, names: list[str], size: int
) -> dict[str, list[int | None]]:
    """Batches of ``size`` jobs (no callback), their job ids by batch id."""
    saved = {}
    for name in names:
        jobs = await oban.insert_all(Batch([echo.new({}) for _ in range(size)], batch_id=name))
        saved[name] = [job.id for job in jobs]
    return saved


async def _batch_rows(oban: trioban.Oban) -> dict[object, int]:
    rows = await _rows(oban._pool, "SELECT meta->>'batch_id', count(*) FROM oban_jobs GROUP BY 1")
    return {name: int(str(count)) for name, count in rows}


async def test_the_pruner_pages_through_batches_and_prunes_each_whole(dsn: str) -> None:
    """A run reads a page of batch rows, not every batch: a page ending within a batch still
    deletes it whole, the next page starts after it, and the pages go round in id order."""
    with trio.fail_after(10):
        async with trioban.open(trioban.Config(dsn=dsn, queues={}, prune_max_age=None)) as oban:
            ids = await _insert_batches(oban, ["b-1", "b-2", "b-3", "b-4"], 3)
            await _finish(oban, [i for batch in ids.values() for i in batch], ago=2 * DAY)
            await _finish(oban, ids["b-2"][2:], ago=60)  # b-2 finished one job lately
            pruner = Pruner(oban._pool, "public", DAY, 2)
            runs = []
            for _ in range(5):
                runs.append(await pruner())
                assert set((await _batch_rows(oban)).values()) <= {3}  # whole, never part
            assert runs == [3, 0, 3, 3, 0]  # a batch a run: 3 rows past the limit of 2
            assert (pruner.batch_after, await _batch_rows(oban)) == ("", {"b-2": 3})
            await _finish(oban, ids["b-2"], ago=2 * DAY)
            assert [await pruner(), await pruner()] == [3, 0]  # the next cycle reaches b-2
            assert await _batch_rows(oban) == {}


async def test_the_pruner_keeps_a_batch_with_an_unfinished_or_recent_job(dsn: str) -> None:
    """A batch on the page with one job still to run or finished lately stays whole, while a
    finished and old batch on the same page goes."""
    with trio.fail_after(10):
        async with trioban.open(trioban.Config(dsn=dsn, queues={}, prune_max_age=None)) as oban:
            ids = await _insert_batches(oban, ["running", "recent", "old"], 2)
            await _finish(oban, [*ids["running"][:1], *ids["recent"], *ids["old"]], ago=2 * DAY)
            await _finish(oban, ids["recent"][1:], ago=60)
            assert await prune(oban._pool, "public", DAY, 10) == 2
            assert await _batch_rows(oban) == {"running": 2, "recent": 2}
