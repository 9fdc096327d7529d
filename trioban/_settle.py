"""What happens after jobs of workflows and batches are acked: release dependents, run callbacks.

Called by the acker once a batch of acks is written (so every ack it read is committed), by
``cancel_job`` (a job cancelled while waiting is never acked), and by the leader's sweep for
anything left unsettled.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from . import _store
from ._batch import (
    BATCH_ID,
    CALLBACK,
    CALLBACK_ARGS,
    CALLBACK_OPTIONS,
    CALLBACK_QUEUE,
    CALLBACK_WORKER,
    CALLBACKS,
)
from ._job import Job
from ._sql import channel, query
from ._unique import STATE_GROUPS, Claim

if TYPE_CHECKING:
    from ._ack import Ack
    from ._pg import Connection, Pool

log = logging.getLogger("trioban.settle")

MAX_DEPTH: Final = 1_000
"""Rounds of cascading cancellation followed before giving up (a DAG is never deeper)."""
SWEEP_BATCHES: Final = 100
"""Recently finished batches the leader's sweep checks per tick: a page, the next tick the next."""
SWEEP_WORKFLOWS: Final = 500
"""Workflows with held jobs the leader's sweep settles per tick: a page, the next tick the next."""
SWEEP_WINDOW: Final = 600.0
"""Seconds back, before the previous cycle began, the sweep looks for finished batch jobs."""
_EVER: Final = 3e9
"""A window of about 95 years: the first cycle's, which looks at every batch kept."""


async def after_acks(pool: Pool, prefix: str, acks: Sequence[Ack]) -> None:
    """Settle the workflows and batches the (written) ``acks`` belong to."""
    workflows = {ack.workflow for ack in acks if ack.workflow and ack.final}
    batches = {ack.batch for ack in acks if ack.batch}
    if workflows:
        await release(pool, prefix, workflows)
    if batches:
        await run_callbacks(pool, prefix, batches)


async def settle_jobs(pool: Pool, prefix: str, job_ids: Sequence[int]) -> None:
    """Settle the workflows and batches of jobs that finished without an ack: cancelled
    while waiting, or discarded by the lifeline."""
    async with pool.connection() as conn:
        cur = await conn.execute(query("workflow_batch_ids", prefix), {"ids": list(job_ids)})
        rows = await cur.fetchall()
    workflows = {workflow for workflow, _ in rows if workflow}
    batches = {batch for _, batch in rows if batch}
    if workflows:
        await release(pool, prefix, workflows)
    if batches:
        await run_callbacks(pool, prefix, batches)


async def release(pool: Pool, prefix: str, workflows: Collection[str]) -> int:
    """Release or cancel the held jobs of ``workflows`` whose deps allow it, transitively."""
    params = {
        "insert_channel": channel(prefix, "insert"),
        "relay_channel": channel(prefix, "relay"),
    }
    pending, settled = sorted(workflows), 0
    for _ in range(MAX_DEPTH):
        async with pool.connection() as conn:
            cur = await conn.execute(
                query("release_workflow_jobs", prefix), {**params, "workflows": pending}
            )
            rows = await cur.fetchall()
        settled += len(rows)
        # A cancelled job may hold up jobs of its own: settle those next.
        pending = sorted({workflow for _, state, workflow in rows if state == "cancelled"})
        if not pending:
            return settled
    log.warning("workflow cancellation deeper than %d levels: %s", MAX_DEPTH, pending)
    return settled


class Sweep:
    """The leader's safety net, a tick per call: settle workflows and batches left unsettled
    (the acking node died or failed to settle). Workflows with held jobs, and recently
    finished batches, are taken a page per tick, in id order, so every cycle of pages reaches
    each of them however many there are."""

    def __init__(self, pool: Pool, prefix: str) -> None:
        self._pool = pool
        self._prefix = prefix
        # Where each paging query's previous page ended ("" starts over).
        self.after = {"held_workflows": "", "recent_batches": ""}
        # How far back this batch cycle looks: to SWEEP_WINDOW before the previous cycle
        # began, so no batch falls between cycles however long they were apart (an outage,
        # leadership elsewhere); the first cycle looks at every batch (a node died unswept).
        self._window = _EVER
        self._cycle_began: float | None = None

    async def __call__(self) -> int:
        """One tick; returns how many jobs it released, cancelled or enqueued."""
        began, new_cycle = trio.current_time(), not self.after["recent_batches"]
        if new_cycle and self._cycle_began is not None:
            self._window = SWEEP_WINDOW + began - self._cycle_began
        async with self._pool.connection() as conn:
            workflows = await self._page(conn, "held_workflows", SWEEP_WORKFLOWS)
            batches = await self._page(conn, "recent_batches", SWEEP_BATCHES)
        if new_cycle:  # its first page was read
            self._cycle_began = began
        settled = await release(self._pool, self._prefix, workflows) if workflows else 0
        return settled + (await run_callbacks(self._pool, self._prefix, batches) if batches else 0)

    async def _page(self, conn: Connection, name: str, limit: int) -> list[str]:
        params = {"after": self.after[name], "limit": limit, "window": self._window}
        cur = await conn.execute(query(name, self._prefix), params)
        ids = [row[0] for row in await cur.fetchall()]
        # A short page ends the cycle: the next tick starts again from the first id.
        self.after[name] = ids[-1] if len(ids) == limit else ""
        return ids


async def run_callbacks(pool: Pool, prefix: str, batches: Collection[str]) -> int:
    """Enqueue each reached batch callback once; returns how many were new."""
    async with pool.connection() as conn:
        cur = await conn.execute(query("batch_progress", prefix), {"batches": sorted(batches)})
        rows = await cur.fetchall()
    jobs = [job for row in rows for job in _callbacks(*row)]
    if not jobs:
        return 0
    async with pool.connection() as conn:
        saved = await _store.insert_with_unique(conn, prefix, jobs)
    return sum(not job.conflict for job in saved)


def _callbacks(
    batch_id: str,
    total: int,
    completed: int,
    cancelled: int,
    discarded: int,
    attempted: int,
    meta: dict[str, Any],
) -> list[Job]:
    finished = completed + cancelled + discarded == total
    reached = {
        "handle_attempted": attempted == total,
        "handle_exhausted": finished,
        "handle_completed": completed == total,
        "handle_discarded": finished and discarded > 0,
        "handle_cancelled": finished and cancelled > 0,
    }
    wanted = [name for name in meta.get(CALLBACKS, ()) if reached.get(name)]
    return [_callback_job(batch_id, name, meta) for name in wanted]


def _callback_job(batch_id: str, name: str, meta: dict[str, Any]) -> Job:
    # The args are already in the callback worker's stored form (Batch made them with its
    # new(): encrypted, structured), so this node needn't import the worker.
    key = hashlib.sha256(f"batch\0{batch_id}\0{name}".encode()).hexdigest()
    # The worker's options; batches inserted by older versions have none (Job's defaults).
    fields = attrs.fields(Job)
    defaults = {"max_attempts": fields.max_attempts.default, "priority": fields.priority.default}
    options: dict[str, Any] = defaults | (meta.get(CALLBACK_OPTIONS) or {})
    return Job(
        worker=str(meta[CALLBACK_WORKER]),
        args=MappingProxyType(dict(meta.get(CALLBACK_ARGS) or {})),
        queue=str(meta.get(CALLBACK_QUEUE) or "default"),
        meta={BATCH_ID: batch_id, CALLBACK: name},
        max_attempts=int(options["max_attempts"]),
        priority=int(options["priority"]),
        tags=tuple(options.get("tags", ())),
        _unique=Claim(key=key, period=None, states=STATE_GROUPS["all"], replace={}),
    )
