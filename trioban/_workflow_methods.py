"""The workflow and batch methods of ``Oban`` (a mixin of ``trioban._instance.Oban``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from . import _pg, _settle, _store
from ._batch import BATCH_ID, Batch
from ._checks import check_key, check_timeout, check_type, inline_refusal
from ._config import Config
from ._errors import RelayTimeout
from ._executor import resolve
from ._job import Job, JobState
from ._relay import Registry, Relay, insert_relayed
from ._relay import await_many as _await_many
from ._sql import query
from ._workflow import NAME, WORKFLOW_ID, Workflow


class WorkflowMethods:
    """Insert, extend and inspect workflows and batches; ``Oban`` supplies the state."""

    config: Config
    _pool: _pg.Pool
    _relays: Registry

    if TYPE_CHECKING:  # Oban's own methods, which these build on

        async def insert_all(
            self, jobs: Iterable[Job] | Workflow | Batch, *, conn: _pg.Connection | None = None
        ) -> list[Job]: ...

        def transaction(self) -> AbstractAsyncContextManager[_pg.Connection]: ...

    async def _insert_new_workflow(
        self, workflow_id: str, jobs: list[Job], *, conn: _pg.Connection | None = None
    ) -> list[Job]:
        """Insert a new workflow's jobs, refusing an id already in use: the runs' steps and
        deps would mix. The id is locked until the insert commits, then checked."""
        if self.config.testing == "inline":
            return await self.insert_all(jobs)
        if conn is None:
            async with self.transaction() as tx:
                return await self._insert_new_workflow(workflow_id, jobs, conn=tx)
        prefix = self.config.prefix
        params = {"workflow_id": workflow_id, "prefix": prefix}
        await conn.execute(query("lock_workflow_id", prefix), params)
        cur = await conn.execute(query("workflow_exists", prefix), params)
        row = await cur.fetchone()
        if row is not None and row[0]:
            raise ValueError(
                f"workflow {workflow_id!r} already exists: give each run its own id (the "
                "default), or add steps to it with append_workflow()"
            )
        return await self.insert_all(jobs, conn=conn)

    async def insert_workflow(
        self, workflow: Workflow, *, conn: _pg.Connection | None = None
    ) -> list[Job]:
        """Insert a workflow's jobs (checked: known deps, no cycles) in one transaction.

        Raises ``ValueError`` if a workflow with its id is already in the database.
        """
        check_type(workflow, Workflow, "a trioban.Workflow")
        return await self.insert_all(workflow, conn=conn)

    async def append_workflow(
        self, workflow_id: str, extend: Callable[[Workflow], object]
    ) -> list[Job]:
        """Add steps to a workflow already inserted: ``extend(wf)`` calls ``wf.add(...)``.

        New steps may depend on existing ones; one whose deps already finished is released
        at once. They inherit the workflow's ``ignore_cancelled``/``ignore_discarded``.
        """
        check_key(workflow_id, "a workflow id")
        if not callable(extend):
            raise TypeError(f"expected extend to be a function calling wf.add(...), got {extend!r}")
        if self.config.testing == "inline":
            raise inline_refusal("workflow")
        prefix = self.config.prefix
        params = {"workflow_id": workflow_id, "prefix": prefix}
        async with self.transaction() as conn:
            # Held until the steps are in: concurrent appends see each other's names, and
            # the pruner leaves the workflow's steps alone (new ones may depend on them).
            await conn.execute(query("lock_workflow_id", prefix), params)
            await conn.execute(query("hold_workflow_steps", prefix), params)
            steps = await _store.workflow_steps(conn, prefix, workflow_id)
            if not steps:
                raise ValueError(f"there is no workflow {workflow_id!r} to append to")
            cur = await conn.execute(query("workflow_options", prefix), params)
            row = await cur.fetchone()
            appended = Workflow._appending(workflow_id, steps, row[0] if row else None)
            _extend(extend, appended)
            saved = await self.insert_all(appended, conn=conn)
        await _settle.release(self._pool, prefix, [workflow_id])
        return saved

    async def workflow_status(self, workflow_id: str) -> dict[str, JobState]:
        """Each step of a workflow and its state, in insertion order ({} if unknown)."""
        check_key(workflow_id, "a workflow id")
        async with self._pool.connection() as conn:
            return await _store.workflow_steps(conn, self.config.prefix, workflow_id)

    async def workflow_results(self, job: Job) -> dict[str, Any]:
        """The results of ``job``'s deps by step name (from inside a workflow step).

        Structured with each dep worker's ``result`` class; a dep that didn't complete (it was
        cancelled or discarded and ignored) maps to None.
        """
        check_type(job, Job, "a Job")
        workflow_id, deps = job.meta.get(WORKFLOW_ID), job.meta.get("deps")
        if workflow_id is None or not isinstance(deps, list):
            raise ValueError(f"job {job.id} is not a step of a workflow")
        results: dict[str, Any] = dict.fromkeys(deps)
        check_key(workflow_id, "a workflow id")
        async with self._pool.connection() as conn:
            rows = await _store.workflow_rows(conn, self.config.prefix, workflow_id, deps)
        for name, state, worker_name, result in rows:
            worker = await resolve(worker_name)  # its module may not be imported here yet
            if state == "completed" and result is not None:
                results[name] = result if worker is None else worker.load_result(result)
        return results

    async def relay_workflow(
        self,
        workflow: Workflow,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 (mirrors relay())
    ) -> Any:
        """Insert a workflow and await its final step's result.

        With several final steps (nothing depends on them), returns a dict of their results by
        name. Raises like ``relay``: ``RelayTimeout``, or the first failure of a final step.
        """
        check_type(workflow, Workflow, "a trioban.Workflow")
        deadline = trio.current_time() + check_timeout(timeout)
        jobs, sinks = workflow.build(), set(workflow.sinks())
        insert = partial(self._insert_new_workflow, workflow.workflow_id)
        flags = [job.meta[NAME] in sinks for job in jobs]
        relays: list[Relay | None] | None = None
        with trio.move_on_at(deadline):  # one deadline for both steps, as in relay()
            _, relays = await insert_relayed(self._relays, insert, jobs, flags)
        if relays is None:
            raise RelayTimeout(
                f"timed out inserting workflow {workflow.workflow_id} within {timeout}s"
            )
        waiting = [relay for relay in relays if relay is not None]
        remaining = max(0.0, deadline - trio.current_time())
        outcomes = await _await_many(waiting, remaining)
        results = {
            relay.job.meta[NAME]: result.unwrap()
            for relay, result in zip(waiting, outcomes, strict=True)
        }
        return next(iter(results.values())) if len(results) == 1 else results

    async def _insert_new_batch(
        self, batch_id: str, jobs: list[Job], *, conn: _pg.Connection | None = None
    ) -> list[Job]:
        """Insert a batch's jobs, refusing the batch if each is a unique duplicate of a job
        outside it: its callbacks count its own jobs, so with none they would never run."""
        if all(job._unique is None for job in jobs):
            return await self.insert_all(jobs, conn=conn)
        if conn is None:
            async with self.transaction() as tx:
                return await self._insert_new_batch(batch_id, jobs, conn=tx)
        async with conn.transaction():  # a savepoint: a refusal undoes this insert only
            saved = await self.insert_all(jobs, conn=conn)
            if not any(job.meta.get(BATCH_ID) == batch_id for job in saved):
                raise ValueError(_duplicates_only(batch_id, saved))
        return saved

    async def batch_status(self, batch_id: str) -> dict[str, int]:
        """How many of a batch's jobs are in each state, and ``total`` (callbacks excluded)."""
        check_key(batch_id, "a batch id")
        counts = {state.value: 0 for state in JobState}
        counts.update(await _store.batch_counts(self._pool, self.config.prefix, batch_id))
        return {**counts, "total": sum(counts.values())}


def _duplicates_only(batch_id: str, saved: list[Job]) -> str:
    ids = ", ".join(str(job.id) for job in saved[:5]) + (", ..." if len(saved) > 5 else "")
    return (
        f"batch {batch_id} would have no jobs: each is a unique duplicate of an existing job "
        f"outside it (ids {ids}), so, as for an empty batch, none of its callbacks could ever "
        "run; nothing was inserted"
    )


def _extend(extend: Callable[[Workflow], object], appended: Workflow) -> None:
    """Run an ``append_workflow`` callback, which must add steps, and synchronously."""
    returned = extend(appended)
    if inspect.isawaitable(returned):
        if inspect.iscoroutine(returned):
            returned.close()  # never awaited, on purpose: no warning
        raise TypeError(
            "extend must be a plain function that calls wf.add(...), not an async one: "
            "the steps must be added before the append's transaction commits"
        )
    if not len(appended):
        raise ValueError(
            f"extend added no steps to workflow {appended.workflow_id}; call wf.add(...) in it"
        )
