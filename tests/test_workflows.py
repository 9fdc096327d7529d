"""Workflows (dependencies between jobs) and batches (callbacks), on several nodes."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from functools import partial

import psycopg
import pytest
import trio

import trioban
import trioban.testing
from trioban import Batch, JobState, Workflow, _lifeline, _pruner, _settle, _store

from .helpers import eventually, reaches, waiting_on_a_lock
from .nodes import node_processes
from .workers import MailBatch, echo, flow_step, gates, steer, unique_echo, wait_gate


def config(dsn: str, **settings: object) -> trioban.Config:
    return trioban.Config(dsn=dsn, queues={"default": 10}, stage_interval=0.2).evolve(**settings)


async def _rows(oban: trioban.Oban, statement: str, *params: object) -> list[tuple[object, ...]]:
    async with oban.transaction() as conn:
        cur = await conn.execute(statement, params)
        return await cur.fetchall()


async def _create_logs(oban: trioban.Oban) -> None:
    """The tables flow_step (with ``log``) and MailBatch's handlers log their runs to."""
    async with oban.transaction() as conn:
        await conn.execute("CREATE TABLE flow_runs (job_id bigint, name text, node text)")
        await conn.execute("CREATE TABLE batch_calls (batch_id text, handler text, node text)")


@pytest.fixture
async def oban(dsn: str) -> AsyncIterator[trioban.Oban]:
    async with trioban.open(config(dsn)) as instance:
        await _create_logs(instance)
        yield instance


async def _settled(oban: trioban.Oban, workflow_id: str) -> dict[str, JobState]:
    final = {JobState.COMPLETED, JobState.CANCELLED, JobState.DISCARDED}
    status: dict[str, JobState] = {}

    async def done() -> bool:
        status.update(await oban.workflow_status(workflow_id))
        return bool(status) and set(status.values()) <= final

    with trio.fail_after(30):
        await eventually(done)
    return status


def step(value: int = 0, **args: object) -> trioban.Job:
    return flow_step.new({"value": value, **args})


def later(value: int = 0) -> trioban.Job:
    """A step that waits (scheduled an hour ahead) until a test settles it."""
    return flow_step.new({"value": value}, schedule_in=3600)


@pytest.fixture
async def quiet(dsn: str) -> AsyncIterator[trioban.Oban]:
    """An instance that runs no jobs and never leads (another peer holds the lease), so no
    sweep runs: what settles a workflow here is the code under test, or a sweep it calls."""

    def take_the_lease() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO oban_peers VALUES ('oban', 'elsewhere', timezone('UTC', now()), "
                "timezone('UTC', now()) + interval '1 day')"
            )

    await trio.to_thread.run_sync(take_the_lease)
    async with trioban.open(config(dsn, queues={})) as instance:
        assert not instance.is_leader
        yield instance


# -- building ------------------------------------------------------------------------------


def test_bad_workflows_are_rejected_when_built() -> None:
    with pytest.raises(ValueError, match="already has a step named 'a'"):
        Workflow().add("a", step()).add("a", step())
    with pytest.raises(ValueError, match="depends on 'nope', which is not a step"):
        Workflow().add("a", step(), deps=["nope"]).build()
    cyclic = Workflow().add("a", step(), deps=["c"]).add("b", step(), deps=["a"])
    cyclic.add("c", step(), deps=["b"])
    with pytest.raises(ValueError, match="cycle: a -> b -> c -> a"):
        cyclic.build()
    with pytest.raises(TypeError, match="list of step names"):
        Workflow().add("a", step(), deps="b")
    with pytest.raises(ValueError, match="no steps"):
        Workflow().build()
    with pytest.raises(TypeError, match="unsaved Job"):
        Workflow().add("a", "job")  # type: ignore[arg-type]


def test_unique_jobs_cant_be_steps() -> None:
    """A duplicate step isn't inserted: a second run would depend on the first run's job
    (and be released when it finished), so unique steps are refused when added."""
    with pytest.raises(ValueError, match=r"step 'load' is a unique job .*unique=False"):
        Workflow().add("load", unique_echo.new({}))
    # None keeps the worker's constraint, like new()'s other options.
    with pytest.raises(ValueError, match="is a unique job"):
        Workflow().add("load", unique_echo.new({}, unique=None))
    (job,) = Workflow().add("load", unique_echo.new({}, unique=False)).build()
    assert job._unique is None


def test_held_jobs_are_suspended_and_tagged() -> None:
    wf = Workflow("wf-1").add("a", step()).add("b", step(), deps=["a"], ignore_cancelled=True)
    a, b = wf.build()
    assert (a.state, b.state) == (JobState.AVAILABLE, JobState.SUSPENDED)
    assert b.meta["workflow_id"] == "wf-1"
    assert b.meta["deps"] == ["a"]
    assert b.meta["ignore_cancelled"] is True
    assert wf.sinks() == ["b"]


# -- running -------------------------------------------------------------------------------


async def test_bad_workflow_and_batch_ids_are_refused(oban: trioban.Oban) -> None:
    with pytest.raises(TypeError, match=r"expected a workflow id \(a non-empty str\), got 7"):
        await oban.workflow_status(7)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a workflow id"):
        await oban.append_workflow("", lambda wf: None)
    with pytest.raises(TypeError, match=r"expected a batch id \(a non-empty str\), got ''"):
        await oban.batch_status("")
    assert await oban.workflow_status("no-such-workflow") == {}


async def test_bad_append_callbacks_deps_and_batch_jobs_are_refused_clearly(
    quiet: trioban.Oban,
) -> None:
    wf = Workflow().add("a", later())
    await quiet.insert_workflow(wf)

    async def add_later(more: Workflow) -> None:
        more.add("b", step())

    with pytest.raises(TypeError, match="not an async one"):
        await quiet.append_workflow(wf.workflow_id, add_later)
    with pytest.raises(ValueError, match="extend added no steps"):
        await quiet.append_workflow(wf.workflow_id, lambda more: None)
    with pytest.raises(TypeError, match="expected extend to be a function"):
        await quiet.append_workflow(wf.workflow_id, "b")  # type: ignore[arg-type]
    assert await quiet.workflow_status(wf.workflow_id) == {"a": JobState.SCHEDULED}
    for deps in ({"a": 1}, None, 3):
        with pytest.raises(TypeError, match="expected deps of 'b' to be a list of step names"):
            Workflow().add("a", step()).add("b", step(), deps=deps)  # type: ignore[arg-type]
    for jobs in (step(), None):
        with pytest.raises(TypeError, match=r"expected Batch\(jobs=\) to be a list"):
            Batch(jobs)  # type: ignore[arg-type]


async def test_linear_workflow_relays_its_final_result(oban: trioban.Oban) -> None:
    wf = (
        Workflow()
        .add("extract", step(1, log=True))
        .add("transform", step(10, log=True), deps=["extract"])
        .add("load", step(100, log=True), deps=["transform"])
    )
    with trio.fail_after(20):
        result = await oban.relay_workflow(wf, timeout=15)
    assert result == {"step": "load", "total": 111, "inputs": ["transform"]}
    order = await _rows(oban, "SELECT name FROM flow_runs ORDER BY job_id")
    assert [name for (name,) in order] == ["extract", "transform", "load"]
    # Each step started only after its dep completed.
    gaps = await _rows(
        oban,
        "SELECT d.completed_at <= j.attempted_at FROM oban_jobs j JOIN oban_jobs d "
        "ON d.meta->>'name' = j.meta->'deps'->>0 WHERE j.meta->'deps' != '[]'",
    )
    assert gaps == [(True,), (True,)]


async def test_fan_out_and_fan_in(oban: trioban.Oban) -> None:
    wf = Workflow().add("start", step(1))
    for i in range(5):
        wf.add(f"part{i}", step(10), deps=["start"])
    wf.add("merge", step(0), deps=[f"part{i}" for i in range(5)])
    with trio.fail_after(20):
        merged = await oban.relay_workflow(wf, timeout=15)
    assert merged["total"] == 5 * 11
    assert merged["inputs"] == [f"part{i}" for i in range(5)]
    # Several final steps: a dict of their results.
    two_ends = Workflow().add("a", step(1)).add("b", step(2), deps=["a"]).add("c", step(3))
    with trio.fail_after(20):
        ends = await oban.relay_workflow(two_ends, timeout=15)
    assert {name: r["total"] for name, r in ends.items()} == {"b": 3, "c": 3}


async def test_a_wide_workflow_inserted_by_copy_runs_in_order(oban: trioban.Oban) -> None:
    """120 parts between a start and a merge: a batch large enough for the COPY path, with
    suspended steps and workflow meta, behaves as a small one does."""
    wf = Workflow().add("start", step(1))
    for i in range(120):
        wf.add(f"part{i}", step(1), deps=["start"])
    wf.add("merge", step(0), deps=[f"part{i}" for i in range(120)])
    jobs = await oban.insert_workflow(wf)
    assert [job.state for job in jobs].count(JobState.SUSPENDED) == 121
    status = await _settled(oban, wf.workflow_id)
    assert set(status.values()) == {JobState.COMPLETED}
    results = await oban.workflow_results(jobs[-1])
    assert sum(r["total"] for r in results.values()) == 120 * 2


async def test_dep_results_are_structured_for_downstream_steps(oban: trioban.Oban) -> None:
    wf = Workflow().add("one", step(1)).add("two", step(2)).add("sum", step(), deps=["one", "two"])
    jobs = await oban.insert_workflow(wf)
    await _settled(oban, wf.workflow_id)
    results = await oban.workflow_results(jobs[2])
    assert {name: r["total"] for name, r in results.items()} == {"one": 1, "two": 2}
    with pytest.raises(ValueError, match="not a step of a workflow"):
        await oban.workflow_results(await oban.insert(echo.new({})))


async def test_a_failed_dep_cancels_its_dependents_transitively(oban: trioban.Oban) -> None:
    wf = (
        Workflow()
        .add("bad", step(outcome="discard"))
        .add("child", step(), deps=["bad"])
        .add("grandchild", step(), deps=["child"])
        .add("tolerant", step(), deps=["bad"], ignore_discarded=True)
        .add("unrelated", step())
    )
    jobs = await oban.insert_workflow(wf)
    status = await _settled(oban, wf.workflow_id)
    assert status == {
        "bad": JobState.DISCARDED,
        "child": JobState.CANCELLED,
        "grandchild": JobState.CANCELLED,
        "tolerant": JobState.COMPLETED,
        "unrelated": JobState.COMPLETED,
    }
    child = await oban.get_job(jobs[1].id or 0)
    assert child is not None
    assert child.errors[-1]["error"] == "upstream failed: bad discarded"
    grandchild = await oban.get_job(jobs[2].id or 0)
    assert grandchild is not None
    assert grandchild.errors[-1]["error"] == "upstream failed: child cancelled"
    tolerant = await oban.get_job(jobs[3].id or 0)
    assert tolerant is not None
    assert tolerant.state is JobState.COMPLETED


async def test_ignore_cancelled_for_a_whole_workflow(oban: trioban.Oban) -> None:
    wf = Workflow(ignore_cancelled=True)
    wf.add("cancelled", step(outcome="cancel")).add("after", step(5), deps=["cancelled"])
    with trio.fail_after(20):
        result = await oban.relay_workflow(wf, timeout=15)
    assert result == {"step": "after", "total": 5, "inputs": ["cancelled"]}
    strict = Workflow().add("cancelled", step(outcome="cancel"))
    strict.add("after", step(), deps=["cancelled"])
    with trio.fail_after(20), pytest.raises(trioban.RelayCancelled, match="cancelled cancelled"):
        await oban.relay_workflow(strict, timeout=15)


async def test_append_to_a_running_workflow(oban: trioban.Oban) -> None:
    wf = Workflow().add("a", step(1)).add("b", step(2), deps=["a"])
    await oban.insert_workflow(wf)
    await _settled(oban, wf.workflow_id)
    appended = await oban.append_workflow(
        wf.workflow_id, lambda more: more.add("c", step(3), deps=["b"]).add("d", step(), deps=["c"])
    )
    assert [job.meta["name"] for job in appended] == ["c", "d"]
    status = await _settled(oban, wf.workflow_id)
    assert list(status) == ["a", "b", "c", "d"]
    assert set(status.values()) == {JobState.COMPLETED}
    with pytest.raises(ValueError, match="already has a step named 'a'"):
        await oban.append_workflow(wf.workflow_id, lambda more: more.add("a", step()))
    with pytest.raises(ValueError, match="no workflow 'missing'"):
        await oban.append_workflow("missing", lambda more: more.add("x", step()))


async def _append_extra(oban: trioban.Oban, workflow_id: str, outcomes: list[str]) -> None:
    try:
        await oban.append_workflow(workflow_id, lambda wf: wf.add("extra", later(), deps=["a"]))
        outcomes.append("added")
    except ValueError as exc:
        outcomes.append(str(exc))


async def test_concurrent_appends_of_one_step_name_add_it_once(
    quiet: trioban.Oban, dsn: str
) -> None:
    """Appends hold the workflow's id while they read its names and insert: of four racing
    appends of "extra" from two instances, one adds it and three are told it exists."""
    refused = "workflow {} already has a step named 'extra'"
    async with trioban.open(config(dsn, queues={})) as other:
        for _ in range(3):
            wf = Workflow().add("a", later())
            await quiet.insert_workflow(wf)
            outcomes: list[str] = []
            async with trio.open_nursery() as nursery:
                for oban in (quiet, other, quiet, other):
                    nursery.start_soon(_append_extra, oban, wf.workflow_id, outcomes)
            assert sorted(outcomes) == ["added", *[refused.format(repr(wf.workflow_id))] * 3]
            rows = await _rows(
                quiet,
                "SELECT count(*) FROM oban_jobs WHERE meta->>'workflow_id' = %s"
                " AND meta->>'name' = 'extra'",
                wf.workflow_id,
            )
            assert rows == [(1,)]


async def test_an_append_with_a_unique_step_is_refused_whole(quiet: trioban.Oban) -> None:
    """A unique step appended would, as a duplicate, not be inserted: "c" would wait on a
    missing step for ever. It is refused when added, and the append inserts nothing."""
    wf = Workflow().add("a", later())
    await quiet.insert_workflow(wf)
    await quiet.insert(unique_echo.new({"value": 1}))  # the job "b" would duplicate

    def extend(more: Workflow) -> None:
        more.add("c", step(), deps=["b"]).add("b", unique_echo.new({"value": 1}), deps=["a"])

    with pytest.raises(ValueError, match="step 'b' is a unique job"):
        await quiet.append_workflow(wf.workflow_id, extend)
    assert list(await quiet.workflow_status(wf.workflow_id)) == ["a"]


async def test_a_unique_job_never_duplicates_a_step(quiet: trioban.Oban) -> None:
    """Steps hold no unique key: a unique job like a step is inserted, not taken for it."""
    wf = Workflow().add("a", unique_echo.new({"value": 1}, unique=False))
    (held,) = await quiet.insert_workflow(wf)
    job = await quiet.insert(unique_echo.new({"value": 1}))
    assert (job.conflict, job.id != held.id, "workflow_id" in job.meta) == (False, True, False)


async def test_appended_steps_inherit_the_workflow_options(quiet: trioban.Oban) -> None:
    wf = Workflow(ignore_cancelled=True).add("a", later()).add("b", step(), deps=["a"])
    await quiet.insert_workflow(wf)
    (c,) = await quiet.append_workflow(
        wf.workflow_id, lambda more: more.add("c", step(), deps=["a"])
    )
    assert c.meta["ignore_cancelled"] is True
    strict = Workflow().add("a", later())
    await quiet.insert_workflow(strict)
    (d,) = await quiet.append_workflow(
        strict.workflow_id, lambda more: more.add("d", step(), deps=["a"])
    )
    assert "ignore_cancelled" not in d.meta
    await quiet.cancel_job(await _step_id(quiet, wf.workflow_id, "a"))
    await quiet.cancel_job(await _step_id(quiet, strict.workflow_id, "a"))
    assert await quiet.workflow_status(wf.workflow_id) == {
        "a": JobState.CANCELLED,
        "b": JobState.AVAILABLE,
        "c": JobState.AVAILABLE,
    }
    assert (await quiet.workflow_status(strict.workflow_id))["d"] is JobState.CANCELLED


async def _step_id(oban: trioban.Oban, workflow_id: str, name: str) -> int:
    rows = await _rows(
        oban,
        "SELECT id FROM oban_jobs WHERE meta->>'workflow_id' = %s AND meta->>'name' = %s",
        workflow_id,
        name,
    )
    return int(str(rows[0][0]))


async def test_a_200_job_dag_across_node_processes(oban: trioban.Oban, dsn: str) -> None:
    """Random deps on earlier steps; 2 node processes and this one share the work."""
    rng = random.Random(7)
    wf = Workflow()
    for i in range(200):
        earlier = rng.sample(range(i), k=min(i, rng.randint(0, 3)))
        wf.add(f"s{i}", step(1, log=True), deps=[f"s{j}" for j in earlier])
    with trio.fail_after(90):
        async with node_processes(dsn, "default:10", 2):
            await oban.insert_workflow(wf)
            status = await _settled(oban, wf.workflow_id)
    assert set(status.values()) == {JobState.COMPLETED}
    runs = await _rows(
        oban, "SELECT count(*), count(DISTINCT job_id), count(DISTINCT node) FROM flow_runs"
    )
    assert runs[0][:2] == (200, 200)
    # No step started before every one of its deps completed.
    early = await _rows(
        oban,
        "SELECT count(*) FROM oban_jobs j CROSS JOIN jsonb_array_elements_text(j.meta->'deps') "
        "AS dep(name) JOIN oban_jobs d ON d.meta->>'name' = dep.name "
        "WHERE d.completed_at > j.attempted_at",
    )
    assert early == [(0,)]


async def test_concurrent_last_deps_release_the_dependent_once(
    oban: trioban.Oban, dsn: str
) -> None:
    """40 fan-ins whose 8 deps all finish together on 3 node processes: each sink runs once."""
    flows = []
    for _ in range(40):
        wf = Workflow()
        for i in range(8):
            wf.add(f"d{i}", step(sleep=0.3))
        wf.add("sink", step(log=True), deps=[f"d{i}" for i in range(8)])
        flows.append(wf)
    with trio.fail_after(90):
        async with node_processes(dsn, "default:50", 3):
            async with trio.open_nursery() as nursery:
                for wf in flows:
                    nursery.start_soon(oban.insert_workflow, wf)
            for wf in flows:
                await _settled(oban, wf.workflow_id)
    sinks = await _rows(oban, "SELECT count(*), count(DISTINCT job_id) FROM flow_runs")
    assert sinks == [(40, 40)]


async def test_the_leader_sweep_settles_what_a_dead_node_left(oban: trioban.Oban) -> None:
    # A dep finished but nobody released the dependent (as if the acking node died).
    wf = Workflow().add("a", step()).add("b", step(), deps=["a"])
    jobs = await oban.insert_workflow(wf)
    await _rows(
        oban,
        "UPDATE oban_jobs SET state = 'completed', completed_at = now() WHERE id = %s RETURNING id",
        jobs[0].id,
    )
    status = await _settled(oban, wf.workflow_id)  # the sweep runs every heartbeat interval
    assert status == {"a": JobState.COMPLETED, "b": JobState.COMPLETED}


async def test_cancelling_a_waiting_step_settles_its_workflow_and_batch(
    quiet: trioban.Oban,
) -> None:
    """A step cancelled before it ran is never acked: the cancel itself settles its
    dependents (and its batch's callbacks), not a sweep some time later."""
    wf = Workflow().add("a", later()).add("b", step(), deps=["a"])
    wf.add("c", step(), deps=["a"], ignore_cancelled=True).add("d", step(), deps=["b"])
    jobs = await quiet.insert_workflow(wf)
    assert await quiet.cancel_all_jobs([jobs[0].id or 0]) == 1
    assert await quiet.workflow_status(wf.workflow_id) == {
        "a": JobState.CANCELLED,
        "b": JobState.CANCELLED,
        "c": JobState.AVAILABLE,
        "d": JobState.CANCELLED,
    }
    # A held step cancelled directly cancels its own dependents too.
    chain = Workflow().add("a", later()).add("b", step(), deps=["a"]).add("c", step(), deps=["b"])
    held = await quiet.insert_workflow(chain)
    assert await quiet.cancel_job(held[1].id or 0)
    assert (await quiet.workflow_status(chain.workflow_id))["c"] is JobState.CANCELLED
    batch = Batch([MailBatch.new({}, schedule_in=3600)], callback=MailBatch)
    (job,) = await quiet.insert_all(batch)
    assert await quiet.cancel_job(job.id or 0)
    callbacks = await _rows(
        quiet,
        "SELECT meta->>'callback' FROM oban_jobs WHERE meta->>'batch_id' = %s "
        "AND meta ? 'callback' ORDER BY 1",
        batch.batch_id,
    )
    assert callbacks == [("handle_attempted",), ("handle_cancelled",), ("handle_exhausted",)]


async def test_retrying_a_waiting_step_leaves_it_to_its_deps(quiet: trioban.Oban) -> None:
    """A held step made available would run before its deps completed."""
    wf = Workflow().add("a", later()).add("b", step(), deps=["a"])
    a, b = await quiet.insert_workflow(wf)
    assert await quiet.retry_job(b.id or 0) is False
    assert await quiet.workflow_status(wf.workflow_id) == {
        "a": JobState.SCHEDULED,
        "b": JobState.SUSPENDED,
    }
    assert await quiet.retry_job(a.id or 0) is True  # any other waiting job: available now
    assert (await quiet.workflow_status(wf.workflow_id))["a"] is JobState.AVAILABLE


async def test_retrying_a_cancelled_step_waits_for_its_deps_again(quiet: trioban.Oban) -> None:
    """Retried, a cancelled step with deps doesn't run ahead of them: it waits, runs once
    they are done, and is cancelled again if one of them failed."""
    wf = Workflow().add("a", later()).add("b", step(), deps=["a"])
    a, b = await quiet.insert_workflow(wf)
    assert await quiet.cancel_job(b.id or 0)
    assert await quiet.retry_job(b.id or 0) is True
    assert await quiet.workflow_status(wf.workflow_id) == {
        "a": JobState.SCHEDULED,
        "b": JobState.SUSPENDED,
    }
    assert await quiet.cancel_job(b.id or 0)
    await _rows(quiet, "UPDATE oban_jobs SET state = 'completed' WHERE id = %s RETURNING id", a.id)
    assert await quiet.retry_job(b.id or 0) is True  # its dep is done: it runs now
    assert (await quiet.workflow_status(wf.workflow_id))["b"] is JobState.AVAILABLE
    await _rows(quiet, "UPDATE oban_jobs SET state = 'discarded' WHERE id = %s RETURNING id", a.id)
    assert await quiet.cancel_job(b.id or 0)
    assert await quiet.retry_job(b.id or 0) is True
    retried = await quiet.get_job(b.id or 0)
    assert retried is not None
    assert retried.state is JobState.CANCELLED
    assert retried.errors[-1]["error"] == "upstream failed: a discarded"


def _nightly(run: str) -> Workflow:
    return Workflow("nightly").add("a", later()).add("b", step(run=run), deps=["a"])


async def test_a_workflow_id_in_use_is_refused(quiet: trioban.Oban) -> None:
    """A second run under the same id would mix its steps and deps with the first's."""
    await quiet.insert_workflow(_nightly("first"))
    refused = "workflow 'nightly' already exists"
    with pytest.raises(ValueError, match=refused):
        await quiet.insert_workflow(_nightly("second"))
    with pytest.raises(ValueError, match=refused):
        await quiet.insert_all(_nightly("second"))
    with pytest.raises(ValueError, match=refused):
        await quiet.relay_workflow(_nightly("second"), timeout=1)
    with pytest.raises(ValueError, match=refused):
        async with quiet.transaction() as conn:
            await quiet.insert_workflow(_nightly("second"), conn=conn)
    rows = await _rows(
        quiet, "SELECT args->>'run' FROM oban_jobs WHERE meta ? 'workflow_id' ORDER BY id"
    )
    assert rows == [(None,), ("first",)]
    assert len(quiet._relays) == 0
    # Adding steps to it is what append_workflow is for.
    await quiet.append_workflow("nightly", lambda more: more.add("c", step(), deps=["b"]))
    assert list(await quiet.workflow_status("nightly")) == ["a", "b", "c"]


async def test_concurrent_inserts_of_one_workflow_id_let_one_through(
    quiet: trioban.Oban,
) -> None:
    refused: list[str] = []

    async def insert(run: str) -> None:
        try:
            await quiet.insert_workflow(_nightly(run))
        except ValueError:
            refused.append(run)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for run in ("one", "two", "three"):
                nursery.start_soon(insert, run)
    assert len(refused) == 2
    assert len(await quiet.workflow_status("nightly")) == 2


async def test_relay_workflow_checks_its_timeout_before_inserting(quiet: trioban.Oban) -> None:
    for timeout, error in ((float("nan"), ValueError), ("5", TypeError), (-1, ValueError)):
        with pytest.raises(error, match="timeout"):
            await quiet.relay_workflow(_nightly("x"), timeout=timeout)  # type: ignore[arg-type]
    assert await quiet.workflow_status("nightly") == {}


async def test_relay_workflow_puts_its_insert_under_its_timeout(quiet: trioban.Oban) -> None:
    """One deadline for the insert and the wait, as in relay(): it can cut the insert short."""
    with pytest.raises(trioban.RelayTimeout, match="timed out inserting workflow nightly"):
        await quiet.relay_workflow(_nightly("x"), timeout=1e-6)


async def test_the_sweep_reaches_stranded_workflows_among_many_waiting(
    quiet: trioban.Oban, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three pages of waiting workflows: the sweep pages through them in id order, so it
    reaches a stranded workflow wherever it sits, however many others wait."""
    monkeypatch.setattr(_settle, "SWEEP_WORKFLOWS", 50)
    flows = [
        Workflow(f"wf{i:03d}").add("a", later()).add("b", step(), deps=["a"]) for i in range(153)
    ]
    await quiet.insert_all([job for wf in flows for job in wf.build()])
    first, middle, last = [await _step_id(quiet, f"wf{i:03d}", "a") for i in (0, 76, 152)]
    # What the acker settles unless it fails: a dep completed, one cancelled...
    await _rows(
        quiet,
        "UPDATE oban_jobs SET state = CASE WHEN id = %s THEN 'completed' ELSE 'cancelled' END"
        "::oban_job_state WHERE id = ANY(%s) RETURNING id",
        first,
        [first, middle],
    )
    # ...and one discarded.
    await _rows(quiet, "UPDATE oban_jobs SET state = 'discarded' WHERE id = %s RETURNING id", last)
    # Pages wf000-049, wf050-099, wf100-149, then a short one (wf150-152) ends the cycle.
    sweep = _settle.Sweep(quiet._work_pool, "public")
    settled = [await sweep() for _ in range(4)]
    assert settled == [1, 1, 0, 1]
    states = [(await quiet.workflow_status(f"wf{i:03d}"))["b"] for i in (0, 76, 152)]
    assert states == [JobState.AVAILABLE, JobState.CANCELLED, JobState.CANCELLED]
    assert sweep.after["held_workflows"] == ""  # the next tick starts over


async def test_a_step_the_lifeline_discards_settles_its_workflow(quiet: trioban.Oban) -> None:
    """An orphan out of attempts is discarded by the lifeline, not acked: the lifeline settles
    its workflow itself (its dependent is cancelled at once, not at the sweep's next pass)."""
    wf = Workflow().add("a", later()).add("b", step(), deps=["a"])
    await quiet.insert_all(wf.build())
    await _rows(
        quiet,
        "UPDATE oban_jobs SET state = 'executing', attempt = max_attempts, "
        "attempted_at = timezone('UTC', now()) - interval '1 hour', "
        "attempted_by = ARRAY['gone', %s] WHERE id = %s RETURNING id",
        "00000000-0000-0000-0000-000000000000",
        await _step_id(quiet, wf.workflow_id, "a"),
    )
    settle = partial(_settle.settle_jobs, quiet._work_pool, "public")
    assert await _lifeline.rescue(quiet._work_pool, "public", 60, settle=settle) == 1
    status = await quiet.workflow_status(wf.workflow_id)
    assert status == {"a": JobState.DISCARDED, "b": JobState.CANCELLED}


async def test_a_pruned_dep_counts_as_finished(quiet: trioban.Oban) -> None:
    wf = Workflow().add("a", later()).add("b", later()).add("c", step(), deps=["a", "b"])
    jobs = await quiet.insert_workflow(wf)
    await _rows(quiet, "DELETE FROM oban_jobs WHERE id = %s RETURNING id", jobs[0].id)
    assert await _settle.release(quiet._pool, "public", [wf.workflow_id]) == 0  # b waits
    await _rows(quiet, "DELETE FROM oban_jobs WHERE id = %s RETURNING id", jobs[1].id)
    assert await _settle.release(quiet._pool, "public", [wf.workflow_id]) == 1
    assert await quiet.workflow_status(wf.workflow_id) == {"c": JobState.AVAILABLE}


async def test_a_batch_holding_a_step_stays_until_its_workflow_could_go(
    quiet: trioban.Oban,
) -> None:
    """A job in both goes with its batch, but a step still to run reads its result."""
    (a,) = Batch([step()], callback=MailBatch).build()
    wf = Workflow().add("a", a).add("b", later(), deps=["a"])
    jobs = await quiet.insert_workflow(wf)
    finish = (
        "UPDATE oban_jobs SET state = 'completed', completed_at = timezone('UTC', now()) "
        "WHERE id = %s RETURNING id"
    )
    await _rows(quiet, finish, jobs[0].id)
    assert await _pruner.prune(quiet._pool, "public", max_age=0, limit=100) == 0
    assert set(await quiet.workflow_status(wf.workflow_id)) == {"a", "b"}
    await _rows(quiet, finish, jobs[1].id)
    assert await _pruner.prune(quiet._pool, "public", max_age=0, limit=100) == 2


async def test_a_pruner_run_waits_on_a_held_row_only_so_long(quiet: trioban.Oban) -> None:
    """It holds the workflow buckets while it deletes: waiting on a row that a transaction
    holds (here, the one appending), it held every append up, this one for good."""
    (done,) = await quiet.insert_all(Batch([step()], callback=MailBatch))
    finish = "UPDATE oban_jobs SET state = 'completed', completed_at = now() WHERE id = %s"
    await _rows(quiet, finish + " RETURNING id", done.id)
    (a,) = await quiet.insert_workflow(Workflow().add("a", later()))
    timed_out: list[bool] = []

    async def prune() -> None:
        with pytest.raises(psycopg.errors.LockNotAvailable):
            await _pruner.prune(quiet._pool, "public", max_age=0, limit=100)
        timed_out.append(True)

    async def pruner_waits() -> bool:
        return await waiting_on_a_lock(quiet, "%Delete finished jobs%") == 1

    with trio.fail_after(_pruner.LOCK_TIMEOUT_MS / 1000 + 5):
        async with trio.open_nursery() as nursery, quiet.transaction() as holder:
            await holder.execute("SELECT id FROM oban_jobs WHERE id = %s FOR UPDATE", [done.id])
            nursery.start_soon(prune)
            await eventually(pruner_waits)
            await quiet.append_workflow(a.meta["workflow_id"], lambda wf: wf.add("b", step()))
    assert timed_out == [True]


async def test_the_pruner_leaves_the_steps_of_a_workflow_being_appended_to(
    quiet: trioban.Oban, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The dep was cancelled: pruned under the append, it would count as finished, and the new
    # step would be released instead of cancelled.
    (a,) = await quiet.insert_workflow(Workflow().add("a", later()))
    assert a.id is not None
    workflow_id = a.meta["workflow_id"]
    await quiet.cancel_job(a.id)
    read_steps, pruned = _store.workflow_steps, []

    async def read_then_prune(*args: object) -> dict[str, JobState]:
        steps = await read_steps(*args)  # type: ignore[arg-type]
        pruned.append(await _pruner.prune(quiet._pool, "public", max_age=0, limit=100))
        return steps

    with monkeypatch.context() as patch:
        patch.setattr(_store, "workflow_steps", read_then_prune)
        await quiet.append_workflow(workflow_id, lambda wf: wf.add("b", step(), deps=["a"]))
    assert pruned == [0]
    status = await quiet.workflow_status(workflow_id)
    assert status == {"a": JobState.CANCELLED, "b": JobState.CANCELLED}
    # Once the append has committed, the finished workflow is pruned whole.
    assert await _pruner.prune(quiet._pool, "public", max_age=0, limit=100) == 2


# -- batches -------------------------------------------------------------------------------


async def _calls(oban: trioban.Oban, batch_id: str) -> list[str]:
    rows = await _rows(
        oban, "SELECT handler FROM batch_calls WHERE batch_id = %s ORDER BY handler", batch_id
    )
    return [str(handler) for (handler,) in rows]


async def test_batch_callbacks_when_everything_completes(oban: trioban.Oban) -> None:
    batch = Batch(callback=MailBatch, callback_args={"campaign": 1})
    for _ in range(5):
        batch.add(MailBatch.new({}))
    await oban.insert_all(batch)
    with trio.fail_after(20):
        await eventually(partial(_has_calls, oban, batch.batch_id, 3))
    await trio.sleep(0.3)  # any callback that shouldn't fire has had its chance
    assert await _calls(oban, batch.batch_id) == ["attempted", "completed", "exhausted"]
    status = await oban.batch_status(batch.batch_id)
    assert (status["completed"], status["total"]) == (5, 5)
    # A callback job gets the callback args.
    args = await _rows(
        oban, "SELECT DISTINCT args FROM oban_jobs WHERE meta->>'callback' IS NOT NULL"
    )
    assert args == [({"campaign": 1},)]


async def test_handle_attempted_waits_for_a_first_attempt_still_running(
    oban: trioban.Oban,
) -> None:
    """A job executing its first attempt hasn't been attempted yet (it counted as attempted)."""
    gate = gates["batch-attempt"] = trio.Event()
    batch = Batch([wait_gate.new({"gate": "batch-attempt"}), MailBatch.new({})], callback=MailBatch)
    _, quick = await oban.insert_all(batch)
    with trio.fail_after(20):
        await reaches(oban, quick.id, JobState.COMPLETED)
        await trio.sleep(0.3)  # a callback that shouldn't fire has had its chance
        assert await _calls(oban, batch.batch_id) == []
        gate.set()
        await eventually(partial(_has_calls, oban, batch.batch_id, 3))
    assert await _calls(oban, batch.batch_id) == ["attempted", "completed", "exhausted"]


async def _has_calls(oban: trioban.Oban, batch_id: str, count: int) -> bool:
    return len(await _calls(oban, batch_id)) >= count


async def test_batch_callbacks_for_failures(oban: trioban.Oban) -> None:
    batch = Batch(
        [
            MailBatch.new({}),
            MailBatch.new({"outcome": "discard"}),
            MailBatch.new({"outcome": "cancel"}),
        ],
        callback=MailBatch,
    )
    await oban.insert_all(batch)
    with trio.fail_after(20):
        await eventually(partial(_has_calls, oban, batch.batch_id, 4))
    await trio.sleep(0.3)
    assert await _calls(oban, batch.batch_id) == [
        "attempted",
        "cancelled",
        "discarded",
        "exhausted",
    ]
    status = await oban.batch_status(batch.batch_id)
    assert {k: status[k] for k in ("completed", "discarded", "cancelled", "total")} == {
        "completed": 1,
        "discarded": 1,
        "cancelled": 1,
        "total": 3,
    }


async def test_batch_callbacks_run_once_under_concurrent_acks(oban: trioban.Oban, dsn: str) -> None:
    batches = [
        Batch([MailBatch.new({"sleep": 0.2}) for _ in range(6)], callback=MailBatch)
        for _ in range(30)
    ]
    with trio.fail_after(90):
        async with node_processes(dsn, "default:40", 3):
            await oban.insert_all([job for batch in batches for job in batch.build()])
            for batch in batches:
                await eventually(partial(_has_calls, oban, batch.batch_id, 3))
            await trio.sleep(0.5)
    calls = await _rows(
        oban, "SELECT count(*), count(DISTINCT (batch_id, handler)) FROM batch_calls"
    )
    assert calls == [(90, 90)]


def test_bad_batches_are_rejected() -> None:
    with pytest.raises(TypeError, match="class worker"):
        Batch(callback=flow_step)
    with pytest.raises(TypeError, match="unsaved Job"):
        Batch().add("job")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no jobs"):
        Batch().build()


async def test_the_leader_sweep_enqueues_callbacks_a_dead_node_missed(oban: trioban.Oban) -> None:
    batch = Batch([MailBatch.new({})], callback=MailBatch)
    (job,) = await oban.insert_all(batch)
    # Finished, but the node that acked it died before checking the batch.
    await _rows(
        oban,
        "UPDATE oban_jobs SET state = 'completed', completed_at = now(), attempt = 1 "
        "WHERE id = %s RETURNING id",
        job.id,
    )
    with trio.fail_after(20):
        await eventually(partial(_has_calls, oban, batch.batch_id, 3))
    assert await _calls(oban, batch.batch_id) == ["attempted", "completed", "exhausted"]


# -- testing modes -------------------------------------------------------------------------


async def test_the_inline_mode_refuses_workflows_and_batches(dsn: str) -> None:
    """Inline runs each job once, at insert, in the order given: a step ran before its dep, a
    step whose dep was discarded ran, and a batch's callbacks never did."""
    wf = Workflow().add("load", step(log=True), deps=["extract"]).add("extract", step(log=True))
    batch = Batch([MailBatch.new({})], callback=MailBatch)
    refused = r"inline testing mode .* can't run a {}.*testing='manual'.*drain_queue"
    async with trioban.open(config(dsn, testing="inline")) as inline:
        await _create_logs(inline)
        for insert in (
            partial(inline.insert_workflow, wf),
            partial(inline.insert_all, wf),
            partial(inline.relay_workflow, wf),
        ):
            with pytest.raises(trioban.TriobanError, match=refused.format("workflow")):
                await insert()
        for jobs in (batch, batch.build()):
            with pytest.raises(trioban.TriobanError, match=refused.format("batch")):
                await inline.insert_all(jobs)
        assert len(inline._relays) == 0
        assert await _rows(inline, "SELECT * FROM flow_runs") == []
        assert (await inline.insert(echo.new({}))).state is JobState.COMPLETED


async def test_drain_queue_runs_workflows_and_batches_in_the_manual_mode(dsn: str) -> None:
    """What the inline mode's error points to: steps in dependency order, dep results, the
    dependents of a failed step cancelled, and batch callbacks."""
    async with trioban.open(config(dsn, testing="manual")) as oban:
        await _create_logs(oban)
        wf = Workflow().add("load", step(100, log=True), deps=["extract"])
        wf.add("extract", step(1, log=True))
        load, _ = await oban.insert_workflow(wf)
        failed = Workflow().add("bad", step(outcome="discard"))
        failed.add("after", step(log=True), deps=["bad"])
        await oban.insert_workflow(failed)
        batch = Batch([MailBatch.new({}), MailBatch.new({})], callback=MailBatch)
        await oban.insert_all(batch)
        with trio.fail_after(10):
            counts = await trioban.testing.drain_queue(oban, "default", with_recursion=True)
        # extract, load, the batch's 2 jobs and its 3 callbacks; bad.
        assert (counts["completed"], counts["discarded"]) == (7, 1)
        order = await _rows(
            oban,
            "SELECT meta->>'name' FROM oban_jobs WHERE meta->>'workflow_id' = %s "
            "ORDER BY attempted_at",
            wf.workflow_id,
        )
        assert order == [("extract",), ("load",)]  # load was added (and inserted) first
        ran = await oban.get_job(load.id or 0)
        assert ran is not None
        assert ran.meta["result"] == {"step": "load", "total": 101, "inputs": ["extract"]}
        assert await oban.workflow_status(failed.workflow_id) == {
            "bad": JobState.DISCARDED,
            "after": JobState.CANCELLED,
        }
        assert await _calls(oban, batch.batch_id) == ["attempted", "completed", "exhausted"]


# -- step results --------------------------------------------------------------------------


async def test_a_step_result_that_cant_be_stored_completes_the_step(
    oban: trioban.Oban, caplog: pytest.LogCaptureFixture
) -> None:
    """The same worker completes as a plain job; as a step it was discarded (and its
    dependents cancelled) because steps keep their results for workflow_results."""
    caplog.set_level(logging.WARNING, "trioban.executor")
    wf = Workflow().add("touch", steer.new({"kind": "unserialisable"}))
    wf.add("after", step(), deps=["touch"])
    touch, after = await oban.insert_workflow(wf)
    status = await _settled(oban, wf.workflow_id)
    assert status == {"touch": JobState.COMPLETED, "after": JobState.COMPLETED}
    assert await oban.workflow_results(after) == {"touch": None}
    ran = await oban.get_job(touch.id or 0)
    assert ran is not None
    assert not ran.errors
    assert "result" not in ran.meta
    assert f"job {touch.id} " in caplog.text
    assert "its result, a dict, is not JSON" in caplog.text
    # Relayed, the result is asked for: the step fails, saying why.
    relayed = Workflow().add("touch", steer.new({"kind": "unserialisable"}, max_attempts=1))
    with trio.fail_after(20), pytest.raises(trioban.RelayDiscard, match="not JSON-serialisable"):
        await oban.relay_workflow(relayed, timeout=15)
