"""The Trio-native PostgreSQL driver: the only code that knows psycopg internals.

psycopg's I/O is a set of generators (``psycopg.generators``) that yield "wait for read/write"
and are resumed when the socket is ready. ``Connection`` subclasses ``psycopg.AsyncConnection``
and drives them with Trio's own waits, instead of asyncio's. Undocumented seams this relies on
(psycopg is pinned to the tested minor version; tests/test_pg.py checks each seam):

- ``AsyncConnection.wait(gen, interval, timeout)`` and ``psycopg.errors._WaitTimeout``;
- ``AsyncConnection.lock`` (an asyncio.Lock, replaced by a trio.Lock);
- ``psycopg.generators.execute`` and ``psycopg.errors.error_from_result``, which ``run`` uses
  for the hot statements, skipping the cursor layer;
- ``AsyncTransaction.status`` (``transaction()`` is re-implemented to roll back when cancelled);
- ``AsyncConnection._connect_gen``, ``_cancel_gen``, ``_get_connection_params`` and
  ``psycopg._conninfo_attempts.conninfo_attempts`` (``connect()`` is re-implemented: psycopg's
  calls asyncio directly).
"""

from __future__ import annotations

import logging
import math
import os
import re
import select
from collections.abc import AsyncIterator, Generator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import psycopg
import trio
from psycopg import errors as e
from psycopg import generators, pq
from psycopg._conninfo_attempts import conninfo_attempts
from psycopg._enums import Ready, Wait
from psycopg.adapt import Transformer
from psycopg.conninfo import conninfo_to_dict, make_conninfo, timeout_from_conninfo
from psycopg.types.json import set_json_loads

from .. import _codec
from .._errors import TriobanError
from .._sql import Prepared

log = logging.getLogger("trioban.pg")

RV = TypeVar("RV")
_ACTIVE: Final = pq.TransactionStatus.ACTIVE
_IDLE: Final = pq.TransactionStatus.IDLE
_CANCEL_TIMEOUT: Final = 5.0
_ROLLBACK_TIMEOUT: Final = 5.0
CONNECT_TIMEOUT: Final = 10
"""Seconds to connect when neither the DSN nor PGCONNECT_TIMEOUT sets ``connect_timeout``
(libpq would wait for the system's TCP timeout, minutes when packets are dropped)."""
KEEPALIVES: Final = {"keepalives_idle": "30", "keepalives_interval": "10", "keepalives_count": "3"}
"""TCP keepalive settings for connections whose DSN sets none: a server gone without a word
(a half-open connection) is noticed after about a minute of silence rather than the system's
two hours. The notifier's connection waits in silence for notifications. Unix sockets ignore
them."""
_IS_PREPARED: Final = b"SELECT 1 FROM pg_prepared_statements WHERE name = $1"


class DatabaseUnavailable(TriobanError):
    """Raised when no connection to PostgreSQL can be made."""


# SQLSTATE classes that say "not now" rather than "not this": connection exception, invalid
# transaction state (a read-only server mid-failover), transaction rollback (deadlock,
# serialization), insufficient resources, object not in prerequisite state (lock not
# available), operator intervention (shutdown, cancel), system error, internal error.
_TRANSIENT_CLASSES: Final = frozenset({"08", "25", "40", "53", "55", "57", "58", "XX"})


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` says PostgreSQL can't take a statement right now (unreachable, failing
    over, overloaded, shutting down), so the same statement may succeed later; False when it
    refuses the statement itself (bad data, a constraint, a bug)."""
    sqlstate = getattr(exc, "sqlstate", None) if isinstance(exc, psycopg.Error) else None
    if sqlstate:
        return sqlstate[:2] in _TRANSIENT_CLASSES
    # No SQLSTATE: the client failed, which only a lost or unusable connection does.
    transient_types = (DatabaseUnavailable, psycopg.OperationalError, psycopg.InterfaceError)
    return isinstance(exc, (*transient_types, OSError))


def _poll(fileno: int, wait: int) -> int:
    """Readiness of ``fileno`` for ``wait`` right now, without blocking."""
    poller = select.poll()
    poller.register(
        fileno, (select.POLLIN if wait & Wait.R else 0) | (select.POLLOUT if wait & Wait.W else 0)
    )
    ready = 0
    for _, events in poller.poll(0):
        if events & (select.POLLIN | select.POLLERR | select.POLLHUP):
            ready |= Ready.R
        if events & select.POLLOUT:
            ready |= Ready.W
    return ready


async def _ready(fileno: int, wait: int) -> int:
    """Wait until ``fileno`` is ready for what ``wait`` asks; return what it is ready for."""
    if wait == Wait.R:
        await trio.lowlevel.wait_readable(fileno)
        return Ready.R
    # A socket asked for writing is nearly always writable: a zero-timeout poll is much
    # cheaper than a trip through the scheduler. While it isn't, keep checking both ways, so
    # a server that is itself blocked sending to us can't deadlock the exchange.
    while not (ready := _poll(fileno, wait)):
        with trio.move_on_after(0.01):
            await trio.lowlevel.wait_writable(fileno)
    return ready


async def _drive(gen: Generator[Any, int, RV], fileno: int) -> RV:
    try:
        wait = next(gen)
        while True:
            wait = gen.send(await _ready(fileno, wait))
    except StopIteration as done:
        result: RV = done.value
        return result
    except OSError as exc:
        raise e.OperationalError("connection socket closed") from exc


async def _drive_conn(gen: Generator[tuple[int, int], int, RV]) -> RV:
    try:
        fileno, wait = next(gen)
        while True:
            fileno, wait = gen.send(await _ready(fileno, wait))
    except StopIteration as done:
        result: RV = done.value
        return result
    except OSError as exc:
        raise e.OperationalError("connection socket closed") from exc


class Connection(psycopg.AsyncConnection[tuple[Any, ...]]):
    """A psycopg async connection whose waits are Trio's (use ``connect()``)."""

    def __init__(self, pgconn: pq.abc.PGconn, **kwargs: Any) -> None:
        super().__init__(pgconn, **kwargs)
        # psycopg's own preparing off: having prepared a query itself, psycopg sends DEALLOCATE
        # ALL at each rollback, which drops run()'s statements too, under a transaction.
        self.prepare_threshold = None
        self._trio_lock = trio.Lock()
        self.lock = self._trio_lock  # type: ignore[assignment]
        self.created_at = trio.current_time()
        # Statements run() has prepared here, and ones whose prepare was interrupted.
        self._statements_ready: set[bytes] = set()
        self._statements_unsure: set[bytes] = set()
        set_json_loads(_codec.loads, self)  # json and jsonb columns
        self._row_loader = Transformer(self)

    @asynccontextmanager
    async def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AsyncIterator[psycopg.AsyncTransaction]:
        """psycopg's transaction block, whose rollback also runs when the block is cancelled.

        psycopg's own exit awaits the rollback in the cancelled scope, where it can't run, and
        leaves its transaction open on the connection (the pool must then throw it away).
        Here the rollback is shielded and bounded, as is that of a commit cancelled before
        the COMMIT was sent.
        """
        tx = psycopg.AsyncTransaction(self, savepoint_name, force_rollback)
        await tx.__aenter__()
        try:
            yield tx
        except BaseException as exc:
            with trio.move_on_after(_ROLLBACK_TIMEOUT, shield=True):
                if await tx.__aexit__(type(exc), exc, exc.__traceback__):
                    return  # a psycopg.Rollback raised in the block: rolled back as asked
            raise
        try:
            await tx.__aexit__(None, None, None)
        except BaseException as exc:
            if tx.status is tx.Status.ACTIVE:  # cancelled before the COMMIT was sent
                with trio.move_on_after(_ROLLBACK_TIMEOUT, shield=True):
                    await tx.__aexit__(type(exc), exc, exc.__traceback__)
            raise

    async def run(self, statement: Prepared, params: Mapping[str, object]) -> list[tuple[Any, ...]]:
        """Run ``statement`` with ``params`` (sent as text) and return its rows.

        The lean path for the hot statements: prepared on first use on this connection, then
        one round trip with no cursor and no query parsing. Types and errors are psycopg's.
        """
        values = [None if (v := params[n]) is None else str(v).encode() for n in statement.params]
        try:
            self._trio_lock.acquire_nowait()  # the query checkpoints: skip the lock's own trip
        except trio.WouldBlock:
            await self._trio_lock.acquire()
        try:
            try:
                result = await self._run(statement, values)
            except e.InvalidSqlStatementName:
                # DEALLOCATE or DISCARD ALL ran on this connection. Outside a transaction
                # nothing ran, so prepare again; inside one, the transaction is lost anyway.
                self._statements_ready.clear()
                if self.pgconn.transaction_status != _IDLE:
                    raise
                result = await self._run(statement, values)
        finally:
            self._trio_lock.release()
        self._row_loader.set_pgresult(result)
        return self._row_loader.load_rows(0, result.ntuples, tuple)

    async def _run(self, statement: Prepared, values: list[bytes | None]) -> pq.abc.PGresult:
        if statement.name not in self._statements_ready:
            await self._prepare(statement)
        self.pgconn.send_query_prepared(statement.name, values)
        return self._checked(await self.wait(generators.execute(self.pgconn)))

    async def _prepare(self, statement: Prepared) -> None:
        if statement.name in self._statements_unsure:
            self.pgconn.send_query_params(_IS_PREPARED, [statement.name])
            if self._checked(await self.wait(generators.execute(self.pgconn))).ntuples:
                self._statements_unsure.discard(statement.name)
                self._statements_ready.add(statement.name)
                return
        self._statements_unsure.add(statement.name)  # until the server has answered
        self.pgconn.send_prepare(statement.name, statement.sql)
        self._checked(await self.wait(generators.execute(self.pgconn)))
        self._statements_unsure.discard(statement.name)
        self._statements_ready.add(statement.name)

    def _checked(self, results: list[pq.abc.PGresult]) -> pq.abc.PGresult:
        for result in results:
            if result.status == pq.ExecStatus.FATAL_ERROR:
                raise e.error_from_result(result, encoding=self.info.encoding)
        return results[-1]

    async def wait(
        self,
        gen: Generator[Any, int, RV],
        interval: float = 0.1,
        timeout: float | None = None,  # noqa: ASYNC109 (psycopg's signature)
    ) -> RV:
        """Drive a psycopg generator with Trio; cancelling it cancels the query on the server."""
        try:
            if timeout is None:
                return await _drive(gen, self.pgconn.socket)
            with trio.move_on_after(timeout):
                return await _drive(gen, self.pgconn.socket)
            raise e._WaitTimeout("wait timeout expired")
        except trio.Cancelled:
            if self.pgconn.transaction_status == _ACTIVE:
                await self._cancel_and_settle(gen)  # noqa: ASYNC102  # shielded inside
            raise

    async def _cancel_and_settle(self, gen: Generator[Any, int, Any]) -> None:
        # Shielded and bounded: the caller is being cancelled, but the connection must end up
        # idle (or closed), never stuck in a query the next user would inherit.
        with trio.move_on_after(_CANCEL_TIMEOUT, shield=True) as scope:
            try:
                await self._send_cancel()
                await _drive(gen, self.pgconn.socket)
            except e.QueryCanceled:
                pass  # what we asked for: the connection is idle (or aborted, in a transaction)
            except Exception as exc:
                log.warning("cancelling a query failed (%s); closing the connection", exc)
                self.pgconn.finish()
        if scope.cancelled_caught:
            log.warning("query not cancelled within %ss; closing the connection", _CANCEL_TIMEOUT)
            self.pgconn.finish()

    async def _send_cancel(self) -> None:
        if psycopg.capabilities.has_cancel_safe():
            await _drive_conn(self._cancel_gen())
        else:
            await trio.to_thread.run_sync(self.cancel)

    @classmethod
    async def connect_trio(cls, conninfo: str, *, autocommit: bool = True) -> Connection:
        """Open a connection, trying each host the conninfo names in turn."""
        params = {**KEEPALIVES, **await cls._get_connection_params(conninfo)}
        timeout = timeout_from_conninfo(params)
        if params.get("connect_timeout") is None and "PGCONNECT_TIMEOUT" not in os.environ:
            timeout = CONNECT_TIMEOUT
        attempts = await trio.to_thread.run_sync(conninfo_attempts, params)
        errors: list[str] = []
        for attempt in attempts:
            try:
                with trio.fail_after(timeout if timeout else math.inf):
                    conn = await _drive_conn(cls._connect_gen(make_conninfo("", **attempt)))
            except trio.TooSlowError:
                host, port = attempt.get("host") or "the default host", attempt.get("port") or 5432
                errors.append(f"no answer from {host}:{port} within {timeout:g}s (connect_timeout)")
                continue
            except e.Error as exc:
                errors.append(str(exc) or type(exc).__name__)
                continue
            conn._autocommit = bool(autocommit)
            return conn
        raise e.OperationalError("; ".join(errors) or "no host to connect to")


def with_options(conninfo: str, **settings: str) -> str:
    """``conninfo`` with server settings added to its ``options`` (e.g. synchronous_commit);
    a setting its ``options`` already name is left as the DSN has it."""
    params = conninfo_to_dict(conninfo)
    options = str(params.get("options") or "")
    named = set(re.findall(r"(?:-c\s*|--)([\w.]+)=", options))
    extra = " ".join(f"-c {name}={value}" for name, value in settings.items() if name not in named)
    params["options"] = f"{options} {extra}".strip()
    return make_conninfo("", **params)


async def connect(conninfo: str, *, autocommit: bool = True) -> Connection:
    """Open a Trio-driven connection (autocommit by default)."""
    return await Connection.connect_trio(conninfo, autocommit=autocommit)


def alive(conn: Connection) -> bool:
    """Whether an idle connection is still open. One the server has closed (a restart, an
    idle timeout, pg_terminate_backend) shows as readable: read what it sent, and see."""
    if conn.closed:
        return False
    pgconn = conn.pgconn
    for _ in range(3):  # a goodbye message, then the end of the stream
        if not _poll(pgconn.socket, Wait.R):
            break
        try:
            pgconn.consume_input()
        except e.OperationalError:
            return False
    return pgconn.status == pq.ConnStatus.OK


async def close_quietly(conn: Connection) -> None:
    """Close ``conn`` (shielded); a failure to close a dead connection is only logged."""
    with trio.CancelScope(shield=True):
        try:
            await conn.close()
        except Exception as exc:  # closing a dead connection may fail; it's gone either way
            log.debug("closing a connection failed: %s", exc)
