"""The stager: makes due scheduled and retryable jobs available, and is the fallback poll.

Each tick also wakes this node's producers, so jobs whose insert notification was missed
(notifier reconnecting, PostgreSQL restarting) are picked up within one interval.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import trio
import trio.lowlevel

from . import _store, telemetry

if TYPE_CHECKING:
    from ._pg import Pool
    from ._producer import Producer

log = logging.getLogger("trioban.stager")

LIMIT: Final = 5_000
"""Jobs staged per statement; a backlog larger than this is staged over several ticks."""


async def run(
    pool: Pool,
    prefix: str,
    interval: float,
    producers: Mapping[str, Producer],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Stage due jobs every ``interval`` seconds (jittered) until cancelled."""
    task_status.started()
    while True:
        try:
            staged = await _store.stage(pool, prefix, LIMIT)
            telemetry.emit("stager.stage", {"count": staged}, {})
        except Exception as exc:
            log.warning("staging failed (%s); retrying next tick", exc)
            staged = 0
        for producer in list(producers.values()):
            producer.wake()
        if staged < LIMIT:
            # Jitter keeps the nodes of a cluster from ticking in lockstep.
            await trio.sleep(interval * random.uniform(0.9, 1.1))  # noqa: S311
        else:
            await trio.lowlevel.checkpoint()  # a backlog: stage the next batch at once
