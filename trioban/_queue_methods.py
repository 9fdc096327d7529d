"""The queue-control methods of ``Oban`` (a mixin of ``trioban._instance.Oban``): this
node's queues directly, every node's through signals on the notifier."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from . import _pg
from ._checks import check_limit, check_queue, check_type
from ._config import Config
from ._leader import Leadership
from ._producer import QueueInfo
from ._queues import SIGNAL, Queues
from ._sql import query


class QueueMethods:
    """Pause, resume, scale, start, stop and inspect queues; ``Oban`` supplies the state."""

    config: Config
    _pool: _pg.Pool
    _queues: Queues
    _leadership: Leadership
    _origin: str  # marks this instance's own signals

    if TYPE_CHECKING:  # Oban's own method, which signals are sent with

        async def notify(
            self,
            channel: str,
            payload: Mapping[str, Any] | Sequence[Mapping[str, Any]],
            *,
            conn: _pg.Connection | None = None,
        ) -> None: ...

    def check_queue(self, queue: str) -> QueueInfo:
        """This node's view of ``queue``: limit, paused, running job ids."""
        return self._queues.get(check_queue(queue)).info()

    async def check_all_queues(self) -> list[QueueInfo]:
        """Every queue on every live node, as of each node's last heartbeat.

        Ordered by queue, then node; up to ``heartbeat_interval`` seconds old.
        """
        params = {"after": self.config.rescue_after}
        async with self._pool.connection() as conn:
            cur = await conn.execute(query("live_producers", self.config.prefix), params)
            rows = await cur.fetchall()
        return [
            QueueInfo(
                queue=queue,
                node=node,
                limit=int(meta.get("limit", 0)),
                paused=bool(meta.get("paused", False)),
                running=tuple(meta.get("running", ())),
            )
            for node, queue, meta in rows
        ]

    @property
    def is_leader(self) -> bool:
        """Whether this instance leads its cluster now (it runs the lifeline and pruner)."""
        return self._leadership.is_leader

    async def pause_queue(
        self, queue: str, *, local_only: bool = False, node: str | None = None
    ) -> None:
        """Stop fetching new jobs of ``queue`` (running jobs finish) on every node, or one."""
        await self._queue_action("pause", queue, local_only, node)

    async def resume_queue(
        self, queue: str, *, local_only: bool = False, node: str | None = None
    ) -> None:
        """Resume fetching jobs of ``queue`` on every node, or one."""
        await self._queue_action("resume", queue, local_only, node)

    async def scale_queue(
        self, queue: str, *, limit: int, local_only: bool = False, node: str | None = None
    ) -> None:
        """Change the concurrency limit of ``queue`` on every node running it, or one."""
        await self._queue_action("scale", queue, local_only, node, limit=check_limit(limit))

    async def start_queue(
        self, queue: str, *, limit: int, local_only: bool = False, node: str | None = None
    ) -> None:
        """Start running ``queue`` with ``limit`` on every node (or one) not running it yet."""
        message = self._queue_message("start", queue, local_only, node, limit=check_limit(limit))
        if queue not in self._queues.producers and node in (None, self.config.node):
            await self._queues.start(queue, limit)
        await self._send(message, local_only)

    async def stop_queue(
        self, queue: str, *, local_only: bool = False, node: str | None = None
    ) -> None:
        """Stop running ``queue`` on every node (or one): running jobs get the shutdown grace."""
        await self._queue_action("stop", queue, local_only, node)

    def _queue_message(
        self, action: str, queue: object, local_only: object, node: object, **extra: Any
    ) -> dict[str, Any]:
        """A queue signal, its arguments checked first: nothing is done with bad ones."""
        check_queue(queue)
        check_type(local_only, bool, "local_only to be True or False")
        if node is not None and (not isinstance(node, str) or not node):
            raise ValueError(f"expected node to be a node name or None, got {node!r}")
        if local_only and node not in (None, self.config.node):
            raise ValueError(
                f"local_only=True acts on this node ({self.config.node!r}) only, not on node "
                f"{node!r}: pass node={node!r} without local_only to reach that node"
            )
        return {"action": action, "queue": queue, "node": node, **extra}

    async def _queue_action(
        self, action: str, queue: str, local_only: bool, node: str | None, **extra: Any
    ) -> None:
        await self._send(self._queue_message(action, queue, local_only, node, **extra), local_only)

    async def _send(self, message: dict[str, Any], local_only: bool) -> None:
        """Apply a queue signal here, then send it to the other nodes unless ``local_only``."""
        self._queues.check_open()
        self._queues.apply(message)
        if not local_only:
            await self._signal(message)
        else:
            await trio.lowlevel.checkpoint()

    async def _signal(self, message: dict[str, Any]) -> None:
        await self.notify(SIGNAL, {**message, "origin": self._origin})

    def _on_signal(self, message: Any) -> None:
        if isinstance(message, dict) and message.get("origin") != self._origin:
            self._queues.apply(message)
