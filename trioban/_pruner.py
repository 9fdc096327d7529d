"""The pruner: the leader deletes finished jobs older than ``prune_max_age``, in bounded runs.

A batch (its jobs and its callback jobs) is pruned whole, once all of its rows are finished and
old enough: which callbacks fire is decided by counting the batch's rows, and the callback rows
hold the unique keys that enqueue each callback once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import telemetry
from ._sql import query

if TYPE_CHECKING:
    from ._pg import Pool

log = logging.getLogger("trioban.pruner")


async def prune(pool: Pool, prefix: str, max_age: float, limit: int) -> int:
    """Delete completed, cancelled or discarded jobs older than ``max_age``: up to ``limit``
    outside batches, and whole batches of up to about ``limit`` jobs (at least one batch)."""
    async with pool.connection() as conn:
        cur = await conn.execute(query("prune_jobs", prefix), {"max_age": max_age, "limit": limit})
        row = await cur.fetchone()
    deleted = int(row[0]) if row is not None else 0
    telemetry.emit("pruner.prune", {"count": deleted}, {})
    if deleted:
        log.info("pruned %d finished jobs", deleted)
    return deleted
