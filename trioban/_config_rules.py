"""The rules of each ``Config`` setting (its field validators), and the DSN as ``repr`` shows it."""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

import attrs
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._cron import check_timezone
from ._errors import ConfigError
from ._validate import (
    MAX_QUEUE_LIMIT,
    check_text,
    queue_name_error,
    valid_queue_limit,
    valid_queue_name,
)

IDENTIFIER_RULE: Final = "[a-z_][a-z0-9_]{0,62}"
"""What a prefix (PostgreSQL schema) or channel name must match, whole."""
IDENTIFIER: Final = re.compile(IDENTIFIER_RULE + r"\Z")
"""The rule up to the very end of the text (``$`` would also match before a final newline)."""

MAX_PREFIX: Final = 40
"""Longest prefix: every notifier channel, ``<prefix>.oban_<name>``, must fit PostgreSQL's
63-byte names (pg_notify rejects a longer one; LISTEN silently truncates it)."""

_MAX_SECONDS: Final = 10 * 365 * 86_400
"""Longest interval or age, in seconds (10 years)."""
_MIN_TICK: Final = 0.01
"""Shortest stage or heartbeat interval: a shorter one would spin against the database."""
FOREVER_HINT: Final = "use None to keep jobs forever ('none' or false in TOML)"


def validate_identifier(field: str, value: object) -> str:
    """Return ``value`` if it is a safe SQL identifier, else raise ``ConfigError``."""
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise ConfigError(
            field, f"expected a name matching {IDENTIFIER_RULE} (lowercase), got {value!r}"
        )
    return value


def prefix(field: str, value: object) -> None:
    validate_identifier(field, value)
    if isinstance(value, str) and value.startswith("pg_"):
        raise ConfigError(
            field,
            f"PostgreSQL reserves schema names starting with 'pg_' for itself (CREATE SCHEMA "
            f"refuses them); choose another prefix, got {value!r}",
        )
    if isinstance(value, str) and len(value) > MAX_PREFIX:
        raise ConfigError(
            field,
            f"expected at most {MAX_PREFIX} chars, so notifier channels "
            f"('<prefix>.oban_<name>') fit PostgreSQL's 63-byte names; got {len(value)} chars",
        )


def default_node() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def text(field: str, value: object, *, limit: int = 255) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise ConfigError(
            field, f"expected a non-empty str of at most {limit} chars, got {value!r}"
        )
    # Refused here, not at open(): a NUL or a lone surrogate breaks the connection string
    # (node, dsn) or every query storing it (name: leader election would fail forever).
    try:
        check_text(value, field)
    except ValueError as exc:
        raise ConfigError(field, str(exc)) from None
    return value


def number(field: str, value: object, *, low: float, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            field,
            f"expected a number of seconds, got {value!r}"
            + (f"; {FOREVER_HINT}" if field == "prune_max_age" else ""),
        )
    if not math.isfinite(value) or value < low or (low_open and value == low):
        rule = f"> {low:g}" if low_open else f">= {low:g}"
        raise ConfigError(field, f"expected a finite number {rule}, got {value!r}")
    # Larger intervals overflow PostgreSQL's timestamp arithmetic (now() - interval) and
    # would fail every run of the lifeline or pruner, long after the config was accepted.
    if value > _MAX_SECONDS:
        raise ConfigError(
            field,
            f"expected at most {_MAX_SECONDS} seconds (10 years), got {value!r}"
            + (f"; {FOREVER_HINT}" if field == "prune_max_age" else ""),
        )
    return float(value)


def integer(field: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"expected an int, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(field, f"expected an int between {low} and {high}, got {value}")
    return value


def queues(value: Mapping[str, int]) -> Mapping[str, int]:
    if not isinstance(value, Mapping):
        raise ConfigError("queues", f"expected a mapping of queue name to limit, got {value!r}")
    checked: dict[str, int] = {}
    for name, limit in value.items():
        if not valid_queue_name(name):
            raise ConfigError("queues", queue_name_error(name, "each queue"))
        if not valid_queue_limit(limit):
            raise ConfigError(
                "queues",
                f"expected queues[{name!r}] to be an int between 1 and {MAX_QUEUE_LIMIT}, "
                f"got {limit!r}",
            )
        checked[name] = limit
    return MappingProxyType(checked)


def check(rule: Callable[[str, Any], object]) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """An attrs validator applying ``rule(field_name, value)``."""

    def validate(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        rule(attribute.name, value)

    return validate


def dsn(field: str, value: object) -> None:
    if value is None:
        return
    text(field, value, limit=10_000)
    assert isinstance(value, str)
    # libpq's own complaint is not repeated: it may quote part of a password.
    params = _params(value)
    if params is None:
        raise ConfigError(
            field,
            "expected a PostgreSQL connection string (postgresql://user:password@host:port/"
            "dbname, or key=value pairs such as 'host=db dbname=app'); libpq can't read this "
            "one (percent-encode / @ : ? # in a URL's user or password)",
        )
    ports = str(params.get("port") or "").split(",")  # several hosts: one port each, or none
    if not all(port == "" or (port.isascii() and port.isdigit()) for port in ports):
        raise ConfigError(
            field,
            "expected the connection string's port to be a number; a / or : in a URL's "
            "password must be percent-encoded (%2F, %3A), or libpq reads it as the port",
        )


_SECRETS: Final = ("password", "sslpassword")
_URL_USER_PASSWORD: Final = re.compile(r"(\Apostgres(?:ql)?://[^:@/]*:)[^@/]*(?=@)")
"""The password of a URL's ``user:password@``: libpq reads it up to the first ``@`` or ``/``."""
_SECRET_VALUE: Final = re.compile(
    r"((?:\A|[?&\s])(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|(?:[^\s&\\]|\\.)*)"
)
"""A ``password=`` of a URL's query or of a key/value connection string, and its value."""


def masked_dsn(dsn: str | None) -> str:
    """``repr`` of a DSN with its passwords replaced by ``***`` (for ``repr(Config)``)."""
    if dsn is None:
        return "None"
    masked = _SECRET_VALUE.sub(r"\g<1>***", _URL_USER_PASSWORD.sub(r"\g<1>***", dsn))
    params = _params(dsn)
    if params is None:  # not a connection string open() could use: the best guess will do
        return repr(masked)
    hidden = {key: "***" for key in _SECRETS if key in params}
    if not hidden:
        return repr(dsn)
    if _params(masked) == params | hidden:
        return repr(masked)
    # A form the patterns missed (a percent-encoded key, say): show it as key/value pairs.
    return repr(make_conninfo("", **(params | hidden)))


def _params(dsn: str) -> dict[str, Any] | None:
    """The parameters of a connection string, as libpq parses it (None: it can't)."""
    try:
        return conninfo_to_dict(dsn)
    except psycopg.Error:
        return None


def flag(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(field, f"expected True or False, got {value!r}")


def positive(field: str, value: object) -> None:
    number(field, value, low=0.0, low_open=True)


def non_negative(field: str, value: object) -> None:
    number(field, value, low=0.0, low_open=False)


def tick(field: str, value: object) -> None:
    number(field, value, low=_MIN_TICK, low_open=False)


def optional_positive(field: str, value: object) -> None:
    if value is not None:
        positive(field, value)


def prune_limit(field: str, value: object) -> None:
    integer(field, value, 1, 1_000_000)


def testing(field: str, value: object) -> None:
    if value not in ("disabled", "manual", "inline"):
        raise ConfigError(field, f"expected 'disabled', 'manual' or 'inline', got {value!r}")


def timezone(field: str, value: object) -> None:
    check_timezone(value, field)


def pool_size(field: str, value: object) -> None:
    integer(field, value, 1, 1000)


def name(field: str, value: object) -> None:
    text(field, value, limit=63)
