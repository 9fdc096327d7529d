"""Named SQL statements, loaded once, rendered per schema prefix.

The prefix is validated against a strict identifier pattern by ``Config`` and quoted by
``psycopg.sql.Identifier`` before it replaces the ``{prefix}`` marker; values are always bound
as parameters. Nothing else is spliced into SQL.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Final, LiteralString

from psycopg import sql

from ._config import IDENTIFIER, validate_identifier

__all__ = [
    "IDENTIFIER", "JOB_COLUMNS", "QUERIES", "SCHEMA_VERSION", "channel", "query",
    "quoted_prefix", "schema_sql", "uninstall_sql",
]  # fmt: skip

SCHEMA_VERSION: Final = 3
"""The version of sql/schema.sql; install() upgrades older schemas."""

JOB_COLUMNS: Final = (
    "id", "state", "queue", "worker", "args", "meta", "tags", "errors", "attempt",
    "max_attempts", "priority", "inserted_at", "scheduled_at", "attempted_at",
    "attempted_by", "completed_at", "discarded_at", "cancelled_at",
)  # fmt: skip
_JOB_SELECT = ", ".join(f"j.{name}" for name in JOB_COLUMNS).replace("j.state", "j.state::text")
_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _read(filename: str) -> str:
    return resources.files("trioban.sql").joinpath(filename).read_text(encoding="utf-8")


def _parse(text: str) -> dict[str, str]:
    parts = _NAME_LINE.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


QUERIES: Final = _parse(_read("queries.sql"))


def quoted_prefix(prefix: str) -> str:
    """Validate a schema name and return it quoted for SQL."""
    return sql.Identifier(validate_identifier("prefix", prefix)).as_string()


@functools.cache
def query(name: str, prefix: str) -> LiteralString:
    """The named statement rendered for ``prefix``."""
    # Built only from this package's own SQL and a validated, quoted identifier.
    text = QUERIES[name].replace("{insert_job_row}", QUERIES["insert_job_row"])
    return text.replace("{job}", _JOB_SELECT).replace("{prefix}", quoted_prefix(prefix))


def schema_sql(prefix: str) -> str:
    """The idempotent schema script for ``prefix``."""
    script = _read("schema.sql").replace("{version}", str(SCHEMA_VERSION))
    return script.replace("{prefix}", quoted_prefix(prefix))


def uninstall_sql(prefix: str) -> str:
    """The script removing trioban's objects from ``prefix``."""
    return _read("uninstall.sql").replace("{prefix}", quoted_prefix(prefix))


@functools.cache
def channel(prefix: str, name: str) -> str:
    """The PostgreSQL channel of notifier channel ``name`` under ``prefix``."""
    quoted_prefix(prefix)
    return f"{prefix}.oban_{name}"
