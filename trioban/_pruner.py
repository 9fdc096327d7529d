"""The pruner: the leader deletes finished jobs older than ``prune_max_age``, in bounded runs.

A batch (its jobs and its callback jobs) is pruned whole, once all of its rows are finished and
old enough: which callbacks fire is decided by counting the batch's rows, and the callback rows
hold the unique keys that enqueue each callback once. A workflow is pruned whole too: a step
still to run reads its deps' results. A workflow being appended to is skipped: its new steps
may depend on finished ones (the append holds the workflow's bucket, one of 16, until it
commits, and a run prunes only the buckets it could take). A run judges a page of batch rows
and a page of workflow rows, so its cost doesn't grow with the batches and workflows kept. A
cron job is kept at least ``CRON_MIN_AGE``: its row holds the unique key that lets its slot
run once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from . import telemetry
from ._sql import query

if TYPE_CHECKING:
    from ._pg import Pool

log = logging.getLogger("trioban.pruner")

LOCK_TIMEOUT_MS: Final = 2000
"""How long a run waits for a row lock: an append to a workflow waits for the run."""

CRON_MIN_AGE: Final = 3 * 3600.0
"""Seconds a finished cron job is kept at least: longer than a clock change repeats a slot
(2 hours at most, Antarctica/Troll) plus the scheduler's catch-up window."""


class Pruner:
    """The leader's pruner, a run per call. Batches and workflows are taken a page of rows per
    run, each in id order, so every cycle of pages reaches each of them however many there are."""

    def __init__(self, pool: Pool, prefix: str, max_age: float, limit: int) -> None:
        self._pool = pool
        self._prefix = prefix
        self._max_age = max_age
        self._limit = limit
        self.batch_after = ""  # where the previous batch page ended ("" starts over)
        self.workflow_after = ""  # where the previous workflow page ended ("" starts over)

    async def __call__(self) -> int:
        """Delete completed, cancelled or discarded jobs older than ``max_age``: up to
        ``limit`` outside batches and workflows, the whole batches among the next page of
        ``limit`` batch jobs, and the whole workflows among the next page of ``limit`` workflow
        jobs (a batch or workflow the page ends within goes whole, past ``limit``)."""
        params: dict[str, object] = {
            "max_age": self._max_age,
            "cron_max_age": max(self._max_age, CRON_MIN_AGE),
            "limit": self._limit,
            "batch_after": self.batch_after,
            "workflow_after": self.workflow_after,
        }
        async with self._pool.connection() as conn, conn.transaction():
            # Holding the buckets, it must not wait long for a row a transaction holds (appends
            # would wait on it in turn): past the timeout the run fails, and the next one tries.
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'")
            # The buckets of workflows being appended to are skipped (see the module doc).
            lock = {"prefix": self._prefix}
            cur = await conn.execute(query("lock_prunable_workflows", self._prefix), lock)
            free = await cur.fetchone()
            params["workflow_buckets"] = free[0] if free else []
            cur = await conn.execute(query("prune_jobs", self._prefix), params)
            row = await cur.fetchone()
        count, last_batch, batches, last_workflow, workflows = row or (0, None, 0, None, 0)
        # A short page ends its cycle: the next run starts again from the first one.
        self.batch_after = str(last_batch) if batches == self._limit else ""
        self.workflow_after = str(last_workflow) if workflows == self._limit else ""
        deleted = int(count)
        telemetry.emit("pruner.prune", {"count": deleted}, {})
        if deleted:
            log.info("pruned %d finished jobs", deleted)
        return deleted


async def prune(pool: Pool, prefix: str, max_age: float, limit: int) -> int:
    """One run of a new ``Pruner`` (its pages start from the first batch and workflow)."""
    return await Pruner(pool, prefix, max_age, limit)()
