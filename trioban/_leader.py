"""Leadership: one peer per prefix and instance name runs the lifeline and the pruner.

A peer holds a lease in ``oban_peers`` and renews it every interval. It counts itself leader
only while its own clock says the lease it last won is still good, so a peer cut off from the
database stops leading before another can take over. A stopping leader resigns and says so on
the ``leader`` channel, and the others elect at once.

A peer also keeps track of how long its database calls have all succeeded (``steady_for``):
after an outage, no node could heartbeat, so the lifeline waits until live nodes have had
``rescue_after`` to heartbeat again before it judges any of them dead.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import trio

from . import _codec, _pg, _store, telemetry
from ._sql import query

if TYPE_CHECKING:
    from ._pg import Pool

log = logging.getLogger("trioban.leader")

CHANNEL: Final = "leader"
LEASE_INTERVALS: Final = 3
"""The lease outlives its renewal interval this many times over in the database."""


class Leadership:
    """This instance's side of the election."""

    def __init__(self, pool: Pool, prefix: str, name: str, peer: str, interval: float) -> None:
        self._pool = pool
        self._prefix = prefix
        self._name = name
        self.peer = peer
        self._interval = interval
        self._until = float("-inf")  # trio clock time the lease we hold runs out, locally
        self._reported = False  # the leadership last logged and emitted (leader.change)
        self._steady_since: float | None = None  # when our calls last began to succeed
        self._wake = trio.Event()

    @property
    def is_leader(self) -> bool:
        """Whether this peer holds the lease now."""
        return trio.current_time() < self._until

    def steady_for(self) -> float:
        """Seconds since this peer's database calls last failed (0 until one succeeds)."""
        since = self._steady_since
        return 0.0 if since is None else trio.current_time() - since

    def unsteady(self) -> None:
        """A call of this peer found the database unreachable: the steady time starts over."""
        self._steady_since = None

    def elect_soon(self, _payload: object = None) -> None:
        """Run an election now (the leader resigned)."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Elect every interval until cancelled, then resign; entered after the first election."""
        try:
            await self._elect()
            task_status.started()
            while True:
                with trio.move_on_after(self._interval):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self._elect()
        finally:
            if self._reported:  # the lease may have lapsed here, not yet in the database
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 2):
                    await self._resign()

    async def _elect(self) -> None:
        asked = trio.current_time()
        ttl = self._interval * LEASE_INTERVALS
        params = {"name": self._name, "node": self.peer, "ttl": ttl}
        try:
            with _pg.bounded(_pg.TICK_TIMEOUT):
                async with self._pool.connection() as conn:
                    cur = await conn.execute(query("elect_leader", self._prefix), params)
                    won = await cur.fetchone() is not None
        except Exception as exc:
            log.warning("leader election failed (%s); acting as a follower", exc)
            self.unsteady()
            won = False
        else:
            if self._steady_since is None:  # now, not "asked": it may have waited for PostgreSQL
                self._steady_since = trio.current_time()
        # Trust the lease one interval less than the database does.
        self._until = asked + ttl - self._interval if won else float("-inf")
        self._report(won)

    def _report(self, leading: bool) -> None:
        """Log and emit a change of leadership, against the last one reported: a lease that
        lapsed here between elections is reported when the next one doesn't renew it."""
        if leading == self._reported:
            return
        self._reported = leading
        verb = "is now" if leading else "is no longer"
        log.info("%s %s leader of %r", self.peer, verb, self._name)
        telemetry.emit("leader.change", {}, {"peer": self.peer, "leader": leading})

    async def _resign(self) -> None:
        self._until = float("-inf")
        self._report(False)
        try:
            async with self._pool.connection() as conn:
                await conn.execute(
                    query("resign_leader", self._prefix), {"name": self._name, "node": self.peer}
                )
                payload = _codec.encode_payload({"resigned": self.peer})
                await _store.notify(conn, self._prefix, CHANNEL, [payload])
        except Exception as exc:
            log.warning("could not resign leadership (%s); the lease will expire", exc)


async def while_leading(
    leadership: Leadership,
    interval: float,
    name: str,
    work: Callable[[], Awaitable[object]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``work()`` every ``interval`` seconds while this peer leads, until cancelled."""
    task_status.started()
    while True:
        if leadership.is_leader:
            try:
                await work()
            except Exception as exc:
                if _pg.transient(exc):
                    leadership.unsteady()
                log.warning("%s failed (%s); retrying next tick", name, exc)
        await trio.sleep(interval)
