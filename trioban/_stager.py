"""The stager: makes due scheduled and retryable jobs available, and is the fallback poll.

Each tick also wakes this node's producers, so jobs whose insert notification was missed
(notifier reconnecting, PostgreSQL restarting) are picked up within one interval. It runs on
every instance, but a tick while the node runs no queue does nothing: an insert-only node stays
quiet, and one whose queue is started later (``start_queue``) stages from its next tick.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import trio
import trio.lowlevel

from . import _store, telemetry
from ._pg import bounded

if TYPE_CHECKING:
    from ._pg import Pool
    from ._producer import Producer

log = logging.getLogger("trioban.stager")

LIMIT: Final = 5_000
"""Jobs staged per statement; a backlog larger than this is staged over several ticks."""
STAGE_TIMEOUT: Final = 30.0
"""Seconds a staging statement may take, its checkout included: on a connection that hung
(half-open TCP) it would wait for ever. Longer than the heartbeat's bound (``TICK_TIMEOUT``):
staging a full batch on a busy server takes a while, and one cut off stages nothing."""


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
        staged = await _stage(pool, prefix) if producers else 0
        for producer in list(producers.values()):
            producer.wake()
        if staged < LIMIT:
            # Jitter keeps the nodes of a cluster from ticking in lockstep.
            await trio.sleep(interval * random.uniform(0.9, 1.1))  # noqa: S311
        else:
            await trio.lowlevel.checkpoint()  # a backlog: stage the next batch at once


async def _stage(pool: Pool, prefix: str) -> int:
    try:
        with bounded(STAGE_TIMEOUT):
            staged = await _store.stage(pool, prefix, LIMIT)
    except Exception as exc:
        log.warning("staging failed (%s); retrying next tick", exc)
        return 0
    telemetry.emit("stager.stage", {"count": staged}, {})
    return staged
