"""The lifeline: the leader puts back jobs whose node died while running them.

A job is an orphan when it is ``executing``, started more than ``rescue_after`` seconds ago,
and its producer has not heartbeated for as long. It goes back to ``available`` (the attempt
counts) or, out of attempts, to ``discarded``; either way an error entry says why.

A stale heartbeat proves a node dead only if the node could have written one: the leader
judges only once its own database calls have all succeeded for ``rescue_after`` (after an
outage, every row is stale), and each producer by the larger of that and its own
``rescue_after`` (a node may heartbeat less often than the leader).
"""

from __future__ import annotations

import logging
import math
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
    *,
    steady: float = math.inf,
) -> int:
    """Rescue orphaned jobs and forget dead producers; returns how many jobs were rescued.

    ``settle(ids)`` is given the jobs discarded (out of attempts): no ack will settle their
    workflows and batches. ``steady``: seconds this peer's database calls have all succeeded;
    nothing is judged before ``after`` of them.
    """
    if steady < after:
        return 0
    params = {
        "after": after,
        "steady": steady,
        "limit": LIMIT,
        "insert_channel": channel(prefix, "insert"),
        "relay_channel": channel(prefix, "relay"),
    }
    async with pool.connection() as conn:
        cur = await conn.execute(query("rescue_jobs", prefix), params)
        rows = await cur.fetchall()
        # Rows stay a while after their producer stops: a live node's late beat isn't lost.
        await conn.execute(query("forget_producers", prefix), {"after": after, "steady": steady})
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


class Lifeline:
    """The leader's lifeline, a tick per call: ``rescue`` with this peer's steady time."""

    def __init__(
        self,
        pool: Pool,
        prefix: str,
        after: float,
        steady_for: Callable[[], float],
        settle: Callable[[list[int]], Awaitable[object]] | None = None,
    ) -> None:
        self._pool = pool
        self._prefix = prefix
        self._after = after
        self._steady_for = steady_for
        self._settle = settle

    async def __call__(self) -> int:
        """One tick; returns how many jobs were rescued."""
        steady = self._steady_for()
        return await rescue(self._pool, self._prefix, self._after, self._settle, steady=steady)
