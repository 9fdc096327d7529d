"""Named SQL statements, loaded once, rendered per schema prefix.

The prefix is validated against a strict identifier pattern by ``Config`` and quoted by
``psycopg.sql.Identifier`` before it replaces the ``{prefix}`` marker; values are always bound
as parameters. Nothing else is spliced into SQL.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from importlib import resources
from typing import Final, LiteralString

import attrs
from psycopg import sql

from ._config_rules import IDENTIFIER, validate_identifier

__all__ = [
    "IDENTIFIER", "JOB_COLUMNS", "QUERIES", "SCHEMA_VERSION", "Prepared", "channel", "prepared",
    "query", "quoted_prefix", "schema_sql", "text_array", "uninstall_sql",
]  # fmt: skip

_MAX_NAME: Final = 63
"""PostgreSQL's longest identifier (NAMEDATALEN - 1), which channel names must fit too."""

SCHEMA_VERSION: Final = 3
"""The version of sql/schema.sql; install() upgrades older schemas."""

JOB_COLUMNS: Final = (
    "id", "state", "queue", "worker", "args", "meta", "tags", "errors", "attempt",
    "max_attempts", "priority", "inserted_at", "scheduled_at", "attempted_at",
    "attempted_by", "completed_at", "discarded_at", "cancelled_at",
)  # fmt: skip
_JOB_SELECT = ", ".join(f"j.{name}" for name in JOB_COLUMNS).replace("j.state", "j.state::text")
_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")


def _read(filename: str) -> str:
    return resources.files("trioban.sql").joinpath(filename).read_text(encoding="utf-8")


def _parse(text: str) -> dict[str, str]:
    parts = _NAME_LINE.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


QUERIES: Final = _parse(_read("queries.sql"))


def quoted_prefix(prefix: str) -> str:
    """Validate a schema name and return it quoted for SQL."""
    return sql.Identifier(validate_identifier("prefix", prefix)).as_string()


_FRAGMENTS: Final = ("insert_job_row", "claim_candidates", "listed_jobs")
"""Named blocks that statements include as ``{name}``."""


@functools.cache
def query(name: str, prefix: str) -> LiteralString:
    """The named statement rendered for ``prefix``."""
    # Built only from this package's own SQL and a validated, quoted identifier.
    text = QUERIES[name]
    for fragment in _FRAGMENTS:
        text = text.replace(f"{{{fragment}}}", QUERIES[fragment])
    return text.replace("{job}", _JOB_SELECT).replace("{prefix}", quoted_prefix(prefix))


@attrs.frozen
class Prepared:
    """A statement for ``Connection.run``: prepared once per connection, run by name."""

    name: bytes
    sql: bytes
    params: tuple[str, ...]  # the parameter names, in $1, $2, ... order


@functools.cache
def prepared(name: str, prefix: str) -> Prepared:
    """The named statement rendered for ``prefix``, with ``$n`` placeholders."""
    params: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(0) == "%%":
            return "%"
        if match.group(1) not in params:
            params.append(match.group(1))
        return f"${params.index(match.group(1)) + 1}"

    lines = query(name, prefix).splitlines()
    code = "\n".join(line for line in lines if not line.lstrip().startswith("--"))
    text = _PLACEHOLDER.sub(number, code)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return Prepared(f"trioban_{name[:30]}_{digest}".encode(), text.encode(), tuple(params))


def text_array(items: Sequence[str]) -> str:
    """A ``text[]`` literal of ``items``, every element quoted (a text-format parameter)."""
    quoted = (item.replace("\\", "\\\\").replace('"', '\\"') for item in items)
    return "{" + ",".join(f'"{item}"' for item in quoted) + "}"


def schema_sql(prefix: str) -> str:
    """The idempotent schema script for ``prefix``."""
    script = _read("schema.sql").replace("{version}", str(SCHEMA_VERSION))
    return script.replace("{prefix}", quoted_prefix(prefix))


def uninstall_sql(prefix: str) -> str:
    """The script removing trioban's objects from ``prefix``."""
    return _read("uninstall.sql").replace("{prefix}", quoted_prefix(prefix))


@functools.cache
def channel(prefix: str, name: str) -> str:
    """The PostgreSQL channel of notifier channel ``name`` under ``prefix``.

    Raises ``ValueError`` if it is longer than PostgreSQL's 63-byte names: pg_notify would
    reject it and LISTEN silently truncate it (so every message would be missed).
    """
    quoted_prefix(prefix)
    full = f"{prefix}.oban_{name}"
    if len(full.encode()) > _MAX_NAME:
        room = _MAX_NAME - len(f"{prefix}.oban_".encode())
        raise ValueError(
            f"channel name {name!r} is too long for prefix {prefix!r}: '<prefix>.oban_<name>' "
            f"must fit PostgreSQL's {_MAX_NAME}-byte names, so use at most {room} chars"
        )
    return full
