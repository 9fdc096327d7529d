"""The pruner: the leader deletes finished jobs older than ``prune_max_age``, in batches."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import telemetry
from ._sql import query

if TYPE_CHECKING:
    from ._pg import Pool

log = logging.getLogger("trioban.pruner")


async def prune(pool: Pool, prefix: str, max_age: float, limit: int) -> int:
    """Delete up to ``limit`` completed, cancelled or discarded jobs older than ``max_age``."""
    async with pool.connection() as conn:
        cur = await conn.execute(query("prune_jobs", prefix), {"max_age": max_age, "limit": limit})
        deleted = cur.rowcount
    telemetry.emit("pruner.prune", {"count": deleted}, {})
    if deleted:
        log.info("pruned %d finished jobs", deleted)
    return deleted
