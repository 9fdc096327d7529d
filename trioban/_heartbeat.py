"""Heartbeats: every producer's row in ``trioban_producers`` says it is alive and how it runs.

The lifeline rescues only jobs whose producer stopped heartbeating, so a job running for
hours on a live node is never run twice; ``check_all_queues`` reads the same rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import trio

from ._sql import query

if TYPE_CHECKING:
    from ._pg import Pool
    from ._producer import Producer

log = logging.getLogger("trioban.heartbeat")

CLEANUP_TIMEOUT = 2.0
"""Seconds a stopping node spends deleting its rows; the lifeline forgets them otherwise."""


async def run(
    pool: Pool,
    prefix: str,
    interval: float,
    producers: Mapping[str, Producer],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Heartbeat this node's producers every ``interval`` seconds; entered after the first.

    Rows of producers that stopped are deleted; on exit every row this node wrote goes too.
    """
    written: set[str] = set()
    started = False
    try:
        while True:
            live = list(producers.values())
            try:
                await beat(pool, prefix, live)
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
                await _delete(pool, prefix, written | {p.uuid for p in producers.values()})
            except Exception as exc:
                log.warning("could not delete this node's producer rows (%s)", exc)


async def beat(pool: Pool, prefix: str, producers: Iterable[Producer]) -> None:
    """Write one heartbeat for ``producers`` in one statement."""
    rows = [
        {
            "uuid": producer.uuid,
            "node": info.node,
            "queue": info.queue,
            "meta": {"limit": info.limit, "paused": info.paused, "running": info.running},
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
