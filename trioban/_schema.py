"""Install and verify the Oban-compatible schema under a prefix."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import psycopg

from ._errors import TriobanError
from ._sql import query, schema_sql

if TYPE_CHECKING:
    from ._pg import Connection

__all__ = ["SCHEMA_VERSION", "SchemaError", "install", "schema_sql", "verify"]

SCHEMA_VERSION: Final = 1
# Serialises concurrent installers (several nodes starting at once) on one database.
_INSTALL_LOCK: Final = 0x7472696F62616E  # "trioban"


class SchemaError(TriobanError):
    """Raised when the schema is missing or older than this trioban needs."""


async def install(conn: Connection, prefix: str) -> None:
    """Create or upgrade the schema under ``prefix``; safe to run on every start."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_INSTALL_LOCK])
        await conn.execute(schema_sql(prefix).encode())


async def verify(conn: Connection, prefix: str) -> None:
    """Raise ``SchemaError`` unless the schema under ``prefix`` is installed and current."""
    try:
        cur = await conn.execute(query("schema_version", prefix))
        row = await cur.fetchone()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        row = None
    version = row[0] if row else None
    if version is None or version < SCHEMA_VERSION:
        raise SchemaError(
            f"the trioban schema in prefix {prefix!r} is missing or out of date "
            f"(found version {version}, need {SCHEMA_VERSION}); run `await oban.install()` "
            "or open with Config(install=True)"
        )
