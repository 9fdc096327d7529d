"""Install and verify the Oban-compatible schema under a prefix."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import psycopg
import trio

from ._errors import TriobanError
from ._sql import SCHEMA_VERSION, query, quoted_prefix, schema_sql, uninstall_sql

if TYPE_CHECKING:
    from ._pg import Connection

__all__ = ["SCHEMA_VERSION", "SchemaError", "install", "schema_sql", "uninstall", "verify"]

log = logging.getLogger("trioban.schema")

# Serialises concurrent installers (several nodes starting at once) on one database.
_INSTALL_LOCK: Final = 0x7472696F62616E  # "trioban"

# The existing tables schema.sql alters, locked in this order before it runs (keep in step).
_ALTERED_TABLES: Final = ("oban_jobs", "trioban_producers")
# How long one attempt waits for those locks, and how many attempts an upgrade makes.
_LOCK_TIMEOUT: Final = "1s"
_LOCK_ATTEMPTS: Final = 5
_RETRY_PAUSE: Final = 0.5  # seconds, times the attempt number


class SchemaError(TriobanError):
    """Raised when the schema is missing or older than this trioban needs."""


async def install(conn: Connection, prefix: str) -> None:
    """Create or upgrade the schema under ``prefix``; safe to run on every start.

    A current schema is left alone without taking a lock, so nodes starting while others
    run never wait on (or block) the job table. An upgrade retries a few times while busy
    nodes hold the tables, then raises ``SchemaError``.
    """
    if await installed_version(conn, prefix) >= SCHEMA_VERSION:
        return
    for attempt in range(1, _LOCK_ATTEMPTS + 1):
        try:
            await _upgrade(conn, prefix)
            return
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
            log.warning(
                "schema upgrade in prefix %r could not lock its tables (attempt %d of %d): %s",
                prefix,
                attempt,
                _LOCK_ATTEMPTS,
                str(exc).splitlines()[0],
            )
            if attempt < _LOCK_ATTEMPTS:
                await trio.sleep(_RETRY_PAUSE * attempt)
    raise SchemaError(
        f"could not upgrade the trioban schema in prefix {prefix!r}: long transactions kept "
        f"its tables locked through {_LOCK_ATTEMPTS} attempts; let them finish (or stop the "
        "nodes) and run `trioban install` or open again"
    )


async def _upgrade(conn: Connection, prefix: str) -> None:
    """Run schema.sql in one transaction, its table locks taken up front.

    The script's statements would lock the job table step by step (CREATE INDEX's share lock,
    then ALTER TABLE's access exclusive one), a cycle with nodes that take row locks and then
    write; taking the strongest lock first, with a timeout, can't deadlock or wait forever.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_INSTALL_LOCK])
        if await installed_version(conn, prefix) >= SCHEMA_VERSION:
            return  # another node upgraded it while this one waited
        await conn.execute("SELECT set_config('lock_timeout', %s, true)", [_LOCK_TIMEOUT])
        cur = await conn.execute(
            "SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = ANY(%s)",
            [prefix, list(_ALTERED_TABLES)],
        )
        existing = {row[0] for row in await cur.fetchall()}
        tables = [f"{quoted_prefix(prefix)}.{name}" for name in _ALTERED_TABLES if name in existing]
        if tables:  # a fresh install has none
            await conn.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE".encode())
        await conn.execute(schema_sql(prefix).encode())


async def uninstall(conn: Connection, prefix: str, *, drop_schema: bool = False) -> None:
    """Drop trioban's tables and type under ``prefix`` (and the schema, if asked and not
    ``public``). Every job is lost."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_INSTALL_LOCK])
        await conn.execute(uninstall_sql(prefix).encode())
        if drop_schema and prefix != "public":
            try:
                await conn.execute(f"DROP SCHEMA IF EXISTS {quoted_prefix(prefix)}".encode())
            except psycopg.errors.DependentObjectsStillExist:
                raise SchemaError(
                    f"schema {prefix!r} holds objects trioban didn't create, so it can't be "
                    "dropped; nothing was uninstalled. Uninstall without dropping the schema, "
                    "or move those objects out first"
                ) from None


async def installed_version(conn: Connection, prefix: str) -> int:
    """The schema version recorded under ``prefix`` (0 when there is none)."""
    try:
        async with conn.transaction():
            cur = await conn.execute(query("schema_version", prefix))
            row = await cur.fetchone()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        row = None
    return int(row[0]) if row and row[0] is not None else 0


async def verify(conn: Connection, prefix: str) -> None:
    """Raise ``SchemaError`` unless the schema under ``prefix`` is installed and current."""
    version = await installed_version(conn, prefix) or None
    if version is None or version < SCHEMA_VERSION:
        raise SchemaError(
            f"the trioban schema in prefix {prefix!r} is missing or out of date "
            f"(found version {version}, need {SCHEMA_VERSION}); run `trioban install --prefix "
            f"{prefix}` (with --dsn) or open with Config(install=True)"
        )
