"""The connection pool: a bounded set of autocommit connections shared by tasks."""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Final

import attrs
import psycopg
import trio
from psycopg import pq

from .._errors import TriobanError
from ._driver import Connection, DatabaseUnavailable, alive, close_quietly, connect

log = logging.getLogger("trioban.pg")

_IDLE: Final = pq.TransactionStatus.IDLE
_ROLLBACK_TIMEOUT: Final = 5.0
_RETRY_FOR: Final = 4.0
"""Seconds after its first try that a checkout starts no new try to connect (its backoff,
0.05 s doubling, makes seven tries in about 3 s against a server that refuses at once)."""
CHECKOUT_TIMEOUT: Final = 30.0
"""Seconds a checkout waits for a connection to come free before raising ``PoolTimeout``."""
TICK_TIMEOUT: Final = 5.0
"""Seconds a periodic statement (a heartbeat, an election) may take, its checkout included.
On a connection that hung (half-open TCP: the server gone without a word) it would wait for
ever; cut off, the connection is closed and the next tick gets another."""


@contextmanager
def bounded(seconds: float) -> Iterator[None]:
    """Cut the block off after ``seconds`` with a ``TimeoutError``: for periodic work, whose
    callers already log a failure and retry at the next tick."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise TimeoutError(f"cut off after {seconds:g}s (a hung connection?)") from None


class PoolTimeout(DatabaseUnavailable):
    """Raised when no connection of the pool came free in time: all are in use."""


@attrs.frozen
class PoolStatistics:
    """A snapshot of a pool: its size and how many connections are idle or in use."""

    size: int
    idle: int
    in_use: int
    waiting: int


class Pool:
    """A bounded pool of autocommit connections (use ``open_pool()``)."""

    def __init__(
        self, conninfo: str, size: int, max_lifetime: float, checkout_timeout: float
    ) -> None:
        self._conninfo = conninfo
        self._size = size
        self._max_lifetime = max_lifetime
        self._checkout_timeout = checkout_timeout
        self._slots = trio.Semaphore(size)
        self._idle: deque[Connection] = deque()
        self._in_use: dict[Connection, trio.lowlevel.Task] = {}  # and the task holding it
        self._closed = False

    def statistics(self) -> PoolStatistics:
        """The pool's current numbers."""
        waiting = self._slots.statistics().tasks_waiting
        return PoolStatistics(self._size, len(self._idle), len(self._in_use), waiting)

    def connection(self) -> Checkout:
        """Check out a connection (``async with``); it returns to the pool clean (idle) or is
        discarded."""
        return Checkout(self)

    async def _acquire(self) -> Connection:
        if self._closed:
            raise TriobanError(
                "the connection pool is closed: its trioban instance has closed; use the "
                "instance inside `async with trioban.open(conf) as oban:`"
            )
        task = trio.lowlevel.current_task()
        try:
            # A free slot is taken without a trip through the scheduler; the query checkpoints.
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._wait_for_slot(task)
        try:
            conn = await self._checkout()
        except BaseException:
            self._slots.release()
            raise
        self._in_use[conn] = task
        return conn

    async def _wait_for_slot(self, task: trio.lowlevel.Task) -> None:
        if sum(holder is task for holder in self._in_use.values()) >= self._size:
            raise TriobanError(
                f"this task already holds all {self._size} connections of the pool and asked "
                "for another, which would wait forever. Inside `oban.transaction()`, pass its "
                "connection as `conn=` to the calls that take one (`insert`, `insert_all`, "
                "`insert_workflow`, `notify`); make other calls (such as `relay` or "
                "`dispatch`) outside the transaction, or raise `pool_size`"
            )
        with trio.move_on_after(self._checkout_timeout):
            await self._slots.acquire()
            return
        raise PoolTimeout(
            f"no connection of the pool came free within {self._checkout_timeout:g}s: all "
            f"{self._size} are in use. Raise `pool_size`, or hold connections for less time "
            "(a task holding one and waiting for another, e.g. a call without `conn=` inside "
            "`oban.transaction()`, can keep them all)"
        )

    async def _release(self, conn: Connection) -> None:
        try:
            del self._in_use[conn]
            await self._checkin(conn)  # shielded inside
        finally:
            self._slots.release()

    async def _checkout(self) -> Connection:
        """An idle connection, else a new one. Connecting is tried seven times with backoff,
        in about 3 s, but none is started after ``_RETRY_FOR`` (a server that doesn't answer
        holds a try for its ``connect_timeout``, 10 s by default, so that one is the last);
        a connection returned meanwhile is taken instead: at the server's connection limit,
        the pool works with the connections it has."""
        delay, give_up = 0.05, trio.current_time() + _RETRY_FOR
        while True:
            while self._idle:
                conn = self._idle.pop()
                if alive(conn):
                    return conn
                await close_quietly(conn)
            try:
                return await connect(self._conninfo)
            except (psycopg.Error, OSError) as exc:
                if delay > 2 or trio.current_time() + delay > give_up:
                    raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
                log.warning("connecting failed (%s); retrying in %.2fs", exc, delay)
                await trio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311
                delay *= 2

    async def _checkin(self, conn: Connection) -> None:
        if conn.closed or conn.broken or self._closed:
            await close_quietly(conn)
            return
        if conn.pgconn.transaction_status != _IDLE:
            with trio.move_on_after(_ROLLBACK_TIMEOUT, shield=True):
                try:
                    await conn.rollback()
                except Exception as exc:
                    log.warning("rollback on return failed (%s); discarding", exc)
            if conn.closed or conn.pgconn.transaction_status != _IDLE:
                await close_quietly(conn)
                return
        if trio.current_time() - conn.created_at > self._max_lifetime:
            await close_quietly(conn)
            return
        self._idle.append(conn)

    async def aclose(self) -> None:
        """Close every idle connection; ones in use are closed as they come back."""
        self._closed = True
        while self._idle:
            await close_quietly(self._idle.pop())


class Checkout:
    """``async with pool.connection() as conn``: a slot, then an idle or new connection.

    A class rather than a generator-based context manager: every statement passes through here.
    """

    __slots__ = ("_conn", "_pool")

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def __aenter__(self) -> Connection:
        self._conn = await self._pool._acquire()
        return self._conn

    async def __aexit__(self, *exc_info: object) -> None:
        await self._pool._release(self._conn)  # noqa: ASYNC102  # shielded inside


@asynccontextmanager
async def open_pool(
    conninfo: str,
    *,
    size: int = 10,
    max_lifetime: float = 3600.0,
    checkout_timeout: float = CHECKOUT_TIMEOUT,
) -> AsyncIterator[Pool]:
    """A connection pool of at most ``size`` connections, closed when the block exits."""
    pool = Pool(conninfo, size, max_lifetime, checkout_timeout)
    try:
        yield pool
    finally:
        with trio.CancelScope(shield=True):
            await pool.aclose()
