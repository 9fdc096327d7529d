"""The notifier: one LISTEN connection, one reader task, table dispatch to bounded channels.

Channels are scoped to the instance's prefix (``<prefix>.oban_<name>``). Notifications are
delivered only after the sending transaction commits. When the connection drops, the reader
reconnects with jittered backoff, listens again on every channel, and tells subscribers so
they can catch up on what they may have missed (producers fetch, relays poll).
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing, asynccontextmanager
from typing import Any, Final, NoReturn

import psycopg
import trio
from psycopg import sql
from psycopg.conninfo import make_conninfo

from . import _codec, _pg, telemetry
from ._config_rules import IDENTIFIER, IDENTIFIER_RULE
from ._errors import TriobanError
from ._sql import channel

log = logging.getLogger("trioban.notifier")

Handler = Callable[[Any], None]
"""A subscriber: called with the decoded payload; must not block (e.g. ``send_nowait``)."""

LISTEN_BUFFER: Final = 1000
"""Messages a ``listen()`` consumer may fall behind by before new ones are dropped (~1 MB)."""

_BACKOFF_MIN: Final = 0.05
_BACKOFF_MAX: Final = 5.0
_HEALTHY_AFTER: Final = 5.0
"""Seconds a connection must stay up before a drop reconnects at once (backoff reset)."""


def check_channel(name: str) -> str:
    """Validate a notifier channel name (it becomes part of a PostgreSQL identifier)."""
    if not isinstance(name, str) or not IDENTIFIER.fullmatch(name) or len(name) > 50:
        raise ValueError(
            f"expected a channel name matching {IDENTIFIER_RULE} (at most 50 chars), got {name!r}"
        )
    return name


def _backoff(delay: float) -> float:
    """The next delay before reconnecting: doubled, jittered, at most ``_BACKOFF_MAX``."""
    return min(_BACKOFF_MAX, max(_BACKOFF_MIN, delay * 2) * random.uniform(0.8, 1.2))  # noqa: S311


class Notifier:
    """Listens on the instance's channels and hands each payload to its subscribers."""

    def __init__(self, dsn: str, prefix: str, node: str) -> None:
        # Named so operators (and tests) can find the LISTEN connection in pg_stat_activity.
        self._dsn = make_conninfo(dsn, application_name=f"trioban-notifier {node}"[:63])
        self._prefix = prefix
        self._handlers: dict[str, list[Handler]] = {}
        self._reconnect_hooks: list[Callable[[], None]] = []
        self._listening: set[str] = set()
        self._read_scope: trio.CancelScope | None = None
        self._listened = trio.Event()
        # The send ends of the open ``listen()`` blocks: closed when the notifier stops, so
        # their consumers' ``async for`` ends.
        self._listeners: set[trio.MemorySendChannel[tuple[str, Any]]] = set()
        self._stopped = False
        self.connected = False

    def subscribe(self, name: str, handler: Handler) -> None:
        """Call ``handler(payload)`` for every message on channel ``name``."""
        self._handlers.setdefault(channel(self._prefix, check_channel(name)), []).append(handler)
        self._refresh()

    def unsubscribe(self, name: str, handler: Handler) -> None:
        """Stop calling ``handler`` for channel ``name``."""
        full = channel(self._prefix, name)
        handlers = self._handlers.get(full, [])
        if handler in handlers:
            handlers.remove(handler)
        if not handlers:
            self._handlers.pop(full, None)

    def on_reconnect(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` after every reconnection (messages may have been missed)."""
        self._reconnect_hooks.append(hook)

    def _refresh(self) -> None:
        # A new channel needs a LISTEN: interrupt the idle read so the reader issues it. While
        # the reader is LISTENing there is no read scope: ``_listen`` goes round again instead.
        if self._read_scope is not None and not self._handlers.keys() <= self._listening:
            self._read_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read notifications until cancelled, reconnecting whenever the connection drops.

        Until the first connection listens, a failure is raised: ``open()`` fails as it does
        when the database is unreachable. Later ones are retried with jittered backoff, reset
        only by a connection that stayed up ``_HEALTHY_AFTER`` seconds, so a server that
        accepts connections and drops them is not reconnected to in a tight loop.
        """
        try:
            await self._connect_and_read(task_status)
        finally:
            self._stop()

    async def _connect_and_read(self, task_status: trio.TaskStatus[None]) -> NoReturn:
        delay = 0.0
        started = False
        while True:
            listened_at = None
            try:
                conn = await _pg.connect(self._dsn, autocommit=True)
                try:
                    self._set_connected(True)
                    await self._listen(conn)
                    listened_at = trio.current_time()
                    if started:
                        for hook in self._reconnect_hooks:
                            hook()
                    else:
                        task_status.started()
                        started = True
                    await self._read(conn)
                finally:
                    self._set_connected(False)
                    self._listening.clear()
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await conn.close()
            except (psycopg.Error, OSError) as exc:
                if not started:
                    raise
                if listened_at is not None and trio.current_time() - listened_at >= _HEALTHY_AFTER:
                    delay = 0.0  # a healthy connection dropped: back at once, then back off
                log.warning("notifier connection failed (%s); reconnecting in %.2fs", exc, delay)
                await trio.sleep(delay)
                delay = _backoff(delay)

    def _stop(self) -> None:
        """No more messages: every ``listen()`` consumer gets ``EndOfChannel``, and waiting
        for a LISTEN or starting a ``listen()`` from now on raises."""
        self._stopped = True
        for send in self._listeners:
            send.close()
        self._listeners.clear()
        self._listened.set()

    def _check_running(self) -> None:
        if self._stopped:
            raise TriobanError(
                "this trioban instance is closed: its notifier has stopped; listen inside "
                "`async with trioban.open(conf) as oban:`"
            )

    async def _read(self, conn: _pg.Connection) -> NoReturn:
        while True:
            try:
                with trio.CancelScope() as self._read_scope:
                    # Closed here when cut off: left to the garbage collector, psycopg's
                    # generator would release the connection's lock from another task.
                    async with aclosing(conn.notifies()) as notes:
                        async for note in notes:
                            self._dispatch(note.channel, note.payload)
            finally:
                self._read_scope = None
            await self._listen(conn)

    async def _listen(self, conn: _pg.Connection) -> None:
        # A channel subscribed during these round trips had no read scope to interrupt: go
        # round again until every subscribed channel is listened on.
        while True:
            wanted = set(self._handlers)
            stale = self._listening - wanted
            # Forgotten before any round trip: a ``listen()`` of a stale channel entered
            # meanwhile must wait for its next LISTEN, not pass while its UNLISTEN is under way.
            self._listening -= stale
            for name in wanted - self._listening:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))
                self._listening.add(name)
            for name in stale:
                await conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(name)))
            self._listened.set()
            self._listened = trio.Event()
            if self._handlers.keys() <= wanted:
                return

    async def wait_listening(self, names: Iterable[str]) -> None:
        """Wait until the connection is listening on every channel in ``names``."""
        full = {channel(self._prefix, name) for name in names}
        while not (self.connected and full <= self._listening):
            self._check_running()
            await self._listened.wait()

    def _dispatch(self, full_channel: str, payload: str) -> None:
        handlers = self._handlers.get(full_channel)
        if not handlers:
            return
        try:
            decoded = _codec.decode_payload(payload)
        except _codec.PayloadError as exc:
            log.warning("skipping a message on %s: %s", full_channel, exc)
            return
        for handler in tuple(handlers):
            try:
                handler(decoded)
            except Exception:
                log.exception("notifier subscriber %r failed on %s", handler, full_channel)

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            status = "connected" if connected else "disconnected"
            log.info("notifier %s", status)
            telemetry.emit("notifier.status", {}, {"status": status})

    @asynccontextmanager
    async def listen(
        self, names: Iterable[str]
    ) -> AsyncIterator[trio.MemoryReceiveChannel[tuple[str, Any]]]:
        """Receive ``(channel, payload)`` for ``names`` until the block exits.

        The channel buffers ``LISTEN_BUFFER`` messages; when the consumer falls further behind,
        new messages are dropped and counted in a logged warning. The channel ends
        (``EndOfChannel``) when the notifier stops, as its instance closes; on a closed
        instance, ``TriobanError`` is raised.
        """
        wanted = list(dict.fromkeys(check_channel(name) for name in names))  # each one once
        if not wanted:
            raise ValueError("listen() needs at least one channel name")
        self._check_running()
        send, receive = trio.open_memory_channel[tuple[str, Any]](LISTEN_BUFFER)
        dropped = 0

        def handler_for(name: str) -> Handler:
            def handle(payload: Any) -> None:
                nonlocal dropped
                try:
                    send.send_nowait((name, payload))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.unsubscribe(name, handle)  # the consumer closed its end: it's gone
                except trio.WouldBlock:
                    dropped += 1
                    if dropped in (1, 10, 100) or dropped % 1000 == 0:
                        log.warning("listen(): consumer is behind; %d messages dropped", dropped)

            return handle

        handlers = [(name, handler_for(name)) for name in wanted]
        self._listeners.add(send)
        try:
            for name, handler in handlers:
                self.subscribe(name, handler)
            await self.wait_listening(wanted)
            with send, receive:
                yield receive
        finally:
            self._listeners.discard(send)
            for name, handler in handlers:
                self.unsubscribe(name, handler)
