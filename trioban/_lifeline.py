"""The lifeline: the leader puts back jobs whose node died while running them.

A job is an orphan when it is ``executing``, started more than ``rescue_after`` seconds ago,
and its producer has not heartbeated for as long. It goes back to ``available`` (the attempt
counts) or, out of attempts, to ``discarded``; either way an error entry says why.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from . import telemetry
from ._sql import channel, query

if TYPE_CHECKING:
    from ._pg import Pool

log = logging.getLogger("trioban.lifeline")

LIMIT: Final = 5_000
"""Orphans rescued per statement."""


async def rescue(
    pool: Pool,
    prefix: str,
    after: float,
    settle: Callable[[list[int]], Awaitable[object]] | None = None,
) -> int:
    """Rescue orphaned jobs and forget dead producers; returns how many jobs were rescued.

    ``settle(ids)`` is given the jobs discarded (out of attempts): no ack will settle their
    workflows and batches.
    """
    params = {
        "after": after,
        "limit": LIMIT,
        "insert_channel": channel(prefix, "insert"),
        "relay_channel": channel(prefix, "relay"),
    }
    async with pool.connection() as conn:
        cur = await conn.execute(query("rescue_jobs", prefix), params)
        rows = await cur.fetchall()
        # Rows stay a while after their producer stops: a live node's late beat isn't lost.
        await conn.execute(query("forget_producers", prefix), {"after": after * 10})
    telemetry.emit("lifeline.rescue", {"count": len(rows)}, {})
    if rows:
        discarded = [job_id for job_id, state in rows if state == "discarded"]
        log.warning(
            "rescued %d orphaned jobs (%d discarded, out of attempts): %s",
            len(rows),
            len(discarded),
            [job_id for job_id, _ in rows][:20],
        )
        if discarded and settle is not None:
            await settle(discarded)
    return len(rows)
