"""Heartbeats: every producer's row in ``trioban_producers`` says it is alive and how it runs.

The lifeline rescues only jobs whose producer stopped heartbeating, so a job running for
hours on a live node is never run twice; ``check_all_queues`` reads the same rows. Each row
carries its node's ``rescue_after``: a leader configured to rescue sooner still gives this
node's jobs that long.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio

from ._pg import TICK_TIMEOUT, bounded
from ._sql import query

if TYPE_CHECKING:
    from ._pg import Pool
    from ._producer import Producer, Producers

log = logging.getLogger("trioban.heartbeat")

CLEANUP_TIMEOUT = 2.0
"""Seconds a stopping node spends deleting its rows; the lifeline forgets them otherwise."""


async def run(
    pool: Pool,
    prefix: str,
    interval: float,
    rescue_after: float,
    producers: Producers,
    unwritten: Callable[[], set[int]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Heartbeat this node's producers every ``interval`` seconds; entered after the first.

    A stopped producer beats until its jobs are done (``Producers.draining``), then its row
    is deleted; on exit every row this node wrote goes too. Jobs whose acks are not yet
    written (``unwritten()``) are vouched for too, so the lifeline doesn't rescue and run again
    a finished job whose outcome is still on its way (a database outage, say).
    """
    written: set[str] = set()
    started = False
    try:
        while True:
            live = producers.beating()
            try:
                with bounded(TICK_TIMEOUT):
                    await beat(pool, prefix, live, rescue_after, sorted(unwritten()))
                    await _delete(pool, prefix, written - {p.uuid for p in live})
                written = {p.uuid for p in live}
            except Exception as exc:
                log.warning("heartbeat failed (%s); retrying", exc)
            if not started:
                started = True
                task_status.started()
            await trio.sleep(interval)
    finally:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT):
            try:
                await _delete(pool, prefix, written | {p.uuid for p in producers.beating()})
            except Exception as exc:
                log.warning("could not delete this node's producer rows (%s)", exc)


async def beat(
    pool: Pool,
    prefix: str,
    producers: Iterable[Producer],
    rescue_after: float,
    acking: list[int] | None = None,
) -> None:
    """Write one heartbeat for ``producers`` in one statement. ``acking``: the node's jobs
    whose acks are queued, listed in every row (the lifeline matches a job with its producer's
    row, and an ack doesn't say which producer ran the job)."""
    extra = {"acking": acking} if acking else {}
    rows = [
        {
            "uuid": producer.uuid,
            "node": info.node,
            "queue": info.queue,
            "meta": {
                "limit": info.limit,
                "paused": info.paused,
                "running": info.running,
                "rescue_after": rescue_after,
                **extra,
            },
        }
        for producer in producers
        for info in [producer.info()]
    ]
    if rows:
        async with pool.connection() as conn:
            params = {"producers": json.dumps(rows)}
            await conn.execute(query("heartbeat_producers", prefix), params)


async def _delete(pool: Pool, prefix: str, uuids: set[str]) -> None:
    if uuids:
        async with pool.connection() as conn:
            await conn.execute(query("delete_producers", prefix), {"uuids": sorted(uuids)})
