"""Configuration: one validated, immutable ``Config``, from keywords, the environment or TOML."""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from . import _config_rules as rules
from ._cron import CronEntry, parse_crontab
from ._errors import ConfigError

_FOREVER: Final = frozenset({"none", "off"})
"""The text of ``prune_max_age`` (a variable, a TOML string) that means None: keep forever. Not
an empty one: a template's unset variable must not switch pruning off."""


@attrs.frozen(kw_only=True)
class Config:
    """Settings of a trioban instance; every value is validated when the ``Config`` is built.

    Attributes:
        dsn: PostgreSQL connection string (``None``: the embedded server, when installed);
            ``repr`` shows its password as ``***``.
        queues: queue name -> concurrency limit on this node; ``{}`` is an insert-only instance.
        prefix: the PostgreSQL schema holding the tables, a lowercase identifier
            (``[a-z_][a-z0-9_]*``, not ``pg_...``: PostgreSQL reserves those); it also scopes
            notifier channels (at most ``MAX_PREFIX``, 40, chars so channel names fit
            PostgreSQL's limit).
        node: this process's name in the cluster (default ``<hostname>-<pid>``).
        name: the instance's name among instances sharing a prefix.
        install: install or upgrade the schema on ``open()`` (else only verify it).
        pool_size: connections in the pool used for inserts and queries.
        shutdown_grace: seconds running jobs get to finish when the instance closes.
        stage_interval: seconds between stager runs (also the fallback poll for producers).
        heartbeat_interval: seconds between producer heartbeats.
        rescue_after: seconds an executing job may go without a live producer listing it in
            its heartbeat (its node died, or a crash lost its ack) before it is rescued; at
            least twice ``heartbeat_interval``.
        prune_max_age: seconds a finished (completed, cancelled, discarded) job is kept;
            ``None`` keeps them forever.
        prune_limit: jobs the pruner deletes per run, so a backlog never locks for long (a
            batch goes whole, so one larger batch may pass it).
        crontab: scheduled jobs, ``[(expression, worker), (expression, worker, {options})]``
            with options ``args``, ``queue``, ``priority``, ``max_attempts``, ``tags``,
            ``meta``, ``timezone``; each slot is enqueued once across the cluster.
        timezone: the time zone crontab expressions are read in, unless an entry says.
        testing: ``"disabled"``; ``"manual"``: no queue runs, jobs are inserted for tests to
            drain (see ``trioban.testing``); ``"inline"``: ``insert`` runs each job here at
            once without storing it, and relays return at once.

    >>> Config(dsn="postgresql:///app", queus={"default": 10})
    Traceback (most recent call last):
    ...
    trioban._errors.ConfigError: queus: unknown setting 'queus'; did you mean 'queues'?
    """

    dsn: str | None = attrs.field(
        default=None, validator=rules.check(rules.dsn), repr=rules.masked_dsn
    )
    queues: Mapping[str, int] = attrs.field(factory=dict, converter=rules.queues)
    prefix: str = attrs.field(default="public", validator=rules.check(rules.prefix))
    node: str = attrs.field(factory=rules.default_node, validator=rules.check(rules.text))
    name: str = attrs.field(default="oban", validator=rules.check(rules.name))
    install: bool = attrs.field(default=True, validator=rules.check(rules.flag))
    pool_size: int = attrs.field(default=10, validator=rules.check(rules.pool_size))
    shutdown_grace: float = attrs.field(default=15.0, validator=rules.check(rules.non_negative))
    stage_interval: float = attrs.field(default=1.0, validator=rules.check(rules.tick))
    heartbeat_interval: float = attrs.field(default=5.0, validator=rules.check(rules.tick))
    rescue_after: float = attrs.field(default=60.0, validator=rules.check(rules.positive))
    prune_max_age: float | None = attrs.field(
        default=86_400.0, validator=rules.check(rules.optional_positive)
    )
    prune_limit: int = attrs.field(default=10_000, validator=rules.check(rules.prune_limit))
    # Given as entries (see above); held as a tuple of CronEntry.
    crontab: Sequence[Any] = attrs.field(default=())
    timezone: str = attrs.field(default="UTC", validator=rules.check(rules.timezone))
    testing: str = attrs.field(default="disabled", validator=rules.check(rules.testing))
    # Per crontab entry: given without a time zone of its own, so it takes the config's, now
    # and after evolve(timezone=...). Not a setting (init=False), but compared: it changes
    # what evolve() makes of the config.
    _zone_follows: tuple[bool, ...] = attrs.field(init=False, default=(), repr=False)

    def __new__(cls, *args: Any, **settings: Any) -> Config:
        # Runs before attrs' typed __init__, so an unknown keyword gets a ConfigError with a
        # suggestion instead of a bare TypeError; type checkers still see attrs' signature.
        _reject_unknown(settings)
        return super().__new__(cls)

    def __attrs_post_init__(self) -> None:
        # Parsed here, not by a converter: entries default to the config's time zone.
        given = self.crontab
        object.__setattr__(self, "crontab", parse_crontab(given, self.timezone))
        object.__setattr__(self, "_zone_follows", tuple(map(_follows_zone, given)))
        # Two beats fit in the window: the latest beat surely lists a job claimed before it.
        if self.rescue_after < 2 * self.heartbeat_interval:
            raise ConfigError(
                "rescue_after",
                f"expected at least twice heartbeat_interval ({self.heartbeat_interval:g}s), "
                f"got {self.rescue_after:g}s",
            )

    def evolve(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied, validated like the original.

        Crontab entries given without a time zone take the copy's ``timezone``.
        """
        _reject_unknown(changes)
        if "crontab" not in changes:
            changes["crontab"] = [
                (entry.expression, entry.worker, {"args": entry.args, **entry.options})
                if follows
                else entry
                for entry, follows in zip(self.crontab, self._zone_follows, strict=True)
            ]
        return attrs.evolve(self, **changes)

    @classmethod
    def build(cls, **settings: Any) -> Config:
        """``Config(**settings)``, raising ``ConfigError`` (with a suggestion) for unknown keys."""
        _reject_unknown(settings)
        return cls(**settings)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        env_prefix: str = "TRIOBAN_",
        **overrides: Any,
    ) -> Config:
        """Settings from ``TRIOBAN_*`` variables (``TRIOBAN_QUEUES="default:10,math:5"``).

        ``env_prefix`` names the variables read (``<env_prefix><FIELD>``). Keyword
        ``overrides`` (``prefix=`` too: the schema, like every other setting) win over the
        environment, which wins over the defaults (an override of None is not given, except
        ``prune_max_age=None``: keep jobs forever). The variables trioban reads elsewhere
        (``TRIOBAN_DATA_DIR``, ``TRIOBAN_PG_BIN``, ``TRIOBAN_TEST_DSN``, ``TRIOBAN_HEAVY``,
        ``TRIOBAN_BENCH_DSN``) are skipped; any other unknown ``TRIOBAN_*`` name raises
        ``ConfigError`` (a typo).
        """
        env = os.environ if environ is None else environ
        settings: dict[str, Any] = {}
        for key, raw in env.items():
            if not key.startswith(env_prefix) or key in _OTHER_VARIABLES:
                continue
            field = key[len(env_prefix) :].lower()
            if field not in _FIELDS:
                hint = _suggest(field)
                raise ConfigError(
                    key,
                    f"unknown setting {key!r}"
                    + (f"; did you mean {env_prefix}{hint.upper()}?" if hint else ""),
                )
            settings[field] = _parse_env(key, field, raw)
        return cls.build(**(settings | _explicit(overrides)))

    @classmethod
    def from_toml(
        cls, path: str | os.PathLike[str], *, section: str = "trioban", **overrides: Any
    ) -> Config:
        """Settings from a TOML file's ``[trioban]`` table, or ``[tool.trioban]`` of pyproject.

        Keyword ``overrides`` win over the file, which wins over the defaults. TOML has no
        null: ``prune_max_age = "none"`` or ``false`` keeps jobs forever (None).
        """
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                "path", f"cannot read {file}: {exc.strerror}; check the path"
            ) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                "path", f"{file} is not UTF-8 text (byte {exc.start}); TOML files are UTF-8"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("path", f"{file} is not valid TOML: {exc}") from None
        except RecursionError:
            raise ConfigError("path", f"{file} nests arrays or tables too deeply") from None
        table = data.get(section, data.get("tool", {}).get(section))
        if not isinstance(table, dict):
            raise ConfigError("path", f"{file} has no [{section}] or [tool.{section}] table")
        settings = dict(table)
        if _keeps_forever(settings.get("prune_max_age")):
            settings["prune_max_age"] = None
        return cls.build(**(settings | _explicit(overrides)))


_FIELDS: Final = frozenset(field.name for field in attrs.fields(Config) if field.init)
_OTHER_VARIABLES: Final = frozenset(
    {"TRIOBAN_DATA_DIR", "TRIOBAN_PG_BIN", "TRIOBAN_TEST_DSN", "TRIOBAN_HEAVY", "TRIOBAN_BENCH_DSN"}
)
"""Environment variables trioban reads elsewhere (the embedded and test servers, the test
suite, the benchmarks): ``from_env`` skips them rather than call them unknown settings."""
_OPTIONAL: Final = frozenset({"prune_max_age"})


def _keeps_forever(value: object) -> bool:
    """Whether a file's or a variable's ``prune_max_age`` says None (keep jobs forever)."""
    return value is False or (isinstance(value, str) and value.strip().lower() in _FOREVER)


def _follows_zone(item: object) -> bool:
    """Whether a (validated) crontab item takes the config's time zone: given as a tuple
    without a ``timezone`` option. A ``CronEntry`` keeps its own."""
    if isinstance(item, CronEntry) or not isinstance(item, Sequence):
        return False
    return len(item) < 3 or "timezone" not in item[2]


def _suggest(name: str) -> str | None:
    found = difflib.get_close_matches(name, sorted(_FIELDS), n=1)
    return found[0] if found else None


def _reject_unknown(settings: Mapping[str, Any]) -> None:
    for key in settings:
        if key not in _FIELDS:
            hint = _suggest(key)
            raise ConfigError(
                key, f"unknown setting {key!r}" + (f"; did you mean {hint!r}?" if hint else "")
            )


def _explicit(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides that were really given: None means "not set", so it doesn't erase a value,
    but for a setting whose None has a meaning of its own (``prune_max_age=None``: forever)."""
    return {k: v for k, v in overrides.items() if v is not None or k in _OPTIONAL}


def parse_queues(text: str, field: str) -> dict[str, int]:
    """Parse ``"default:10,math:5"`` into ``{"default": 10, "math": 5}``."""
    queues: dict[str, int] = {}
    for item in text.split(","):
        name, sep, limit = (part.strip() for part in item.partition(":"))
        try:
            # ASCII and isdecimal(): int() refuses digits like '²', and takes other scripts'.
            if not name or not sep or not (limit.isascii() and limit.isdecimal()):
                raise ValueError
            value = int(limit)  # ValueError past 4,300 digits
        except ValueError:
            raise ConfigError(
                field, f"expected 'name:limit' items like 'default:10', got {item[:80]!r}"
            ) from None
        if name in queues:
            raise ConfigError(field, f"expected each queue once, got {name[:80]!r} twice")
        queues[name] = value
    return queues


def _parse_env(key: str, field: str, raw: str) -> Any:
    kind = attrs.fields_dict(Config)[field].default
    if field in _OPTIONAL and _keeps_forever(raw):
        return None
    if field == "queues":
        return parse_queues(raw, key) if raw.strip() else {}
    if field == "crontab":
        try:
            return json.loads(raw) if raw.strip() else []
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            raise ConfigError(
                key, f"expected a JSON list of [expression, worker] entries, got {raw[:80]!r}"
            ) from None
    if field == "install":
        lowered = raw.strip().lower()
        if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
            raise ConfigError(key, f"expected 1/0, true/false or yes/no, got {raw!r}")
        return lowered in {"1", "true", "yes", "on"}
    if isinstance(kind, int | float) and not isinstance(kind, bool):
        try:
            return type(kind)(raw)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {raw[:80]!r}") from None
    return raw
