"""Install and verify the Oban-compatible schema under a prefix."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import psycopg

from ._errors import TriobanError
from ._sql import SCHEMA_VERSION, query, quoted_prefix, schema_sql, uninstall_sql

if TYPE_CHECKING:
    from ._pg import Connection

__all__ = ["SCHEMA_VERSION", "SchemaError", "install", "schema_sql", "uninstall", "verify"]

# Serialises concurrent installers (several nodes starting at once) on one database.
_INSTALL_LOCK: Final = 0x7472696F62616E  # "trioban"


class SchemaError(TriobanError):
    """Raised when the schema is missing or older than this trioban needs."""


async def install(conn: Connection, prefix: str) -> None:
    """Create or upgrade the schema under ``prefix``; safe to run on every start.

    A current schema is left alone without taking a lock, so nodes starting while others
    run never wait on (or block) the job table.
    """
    if await installed_version(conn, prefix) >= SCHEMA_VERSION:
        return
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_INSTALL_LOCK])
        await conn.execute(schema_sql(prefix).encode())


async def uninstall(conn: Connection, prefix: str, *, drop_schema: bool = False) -> None:
    """Drop trioban's tables and type under ``prefix`` (and the schema, if asked and not
    ``public``). Every job is lost."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_INSTALL_LOCK])
        await conn.execute(uninstall_sql(prefix).encode())
        if drop_schema and prefix != "public":
            await conn.execute(f"DROP SCHEMA IF EXISTS {quoted_prefix(prefix)}".encode())


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
            f"(found version {version}, need {SCHEMA_VERSION}); run `await oban.install()` "
            "or open with Config(install=True)"
        )
