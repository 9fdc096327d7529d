"""Cron: jobs enqueued on a schedule, exactly once per slot across any number of nodes.

Entries come from ``Config(crontab=[...])`` and from ``@worker(cron="...")``. Each minute the
leader enqueues the entries due in that minute; nodes that aren't leading do the same a few
seconds later as a fallback (a leader that can't import the worker or failed to insert, a
leader that died). A slot's job is built by its worker's ``new()`` (queue, priority, args
checks, encryption), importing the worker's module if needed; an entry whose worker can't be
found is skipped with an error, never inserted with guessed options. Every slot's job carries
a unique key (expression, worker, args and options, time zone, minute), so the unique index
lets exactly one insert per slot through (the pruner keeps the row long enough). A minute at
or before the last one handled is skipped: a wall clock stepping backwards never enqueues a
slot twice from one node. Slots whose insert failed are tried again the next minutes (up to
``CATCH_UP`` minutes late), so a brief database outage doesn't lose them.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
import trio
from croniter import croniter

from . import _codec, telemetry
from ._errors import ConfigError
from ._job import Job
from ._unique import STATE_GROUPS, Claim
from ._validate import check_meta, check_text

if TYPE_CHECKING:
    from ._leader import Leadership

log = logging.getLogger("trioban.cron")

FALLBACK_DELAY: Final = 5.0
"""Seconds into a minute after which a node that isn't leading enqueues due slots itself."""
CATCH_UP: Final = 5
"""Minutes back a node retries slots whose insert failed; older ones are given up (a long
outage or a suspended machine doesn't bring a flood of stale jobs)."""
_MINUTE: Final = timedelta(minutes=1)
_OPTIONS: Final = frozenset(
    {"args", "queue", "priority", "max_attempts", "tags", "meta", "timezone"}
)
NICKNAMES: Final = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)
# croniter's random fields ("R", "R(0-10)/5"): each node would draw its own minute.
_RANDOM: Final = re.compile(r"^[hr](\(\d+-\d+\))?(/\d+)?$", re.IGNORECASE)


@final
@attrs.frozen
class CronEntry:
    """One scheduled job: a cron expression, a worker (by dotted name) and job options."""

    expression: str
    worker: str
    args: Mapping[str, Any] = attrs.field(factory=dict)
    options: Mapping[str, Any] = attrs.field(factory=dict)
    timezone: str = "UTC"

    def is_due(self, minute: datetime) -> bool:
        """Whether the entry fires in the (UTC) ``minute``, read in the entry's time zone."""
        return bool(croniter.match(self.expression, minute.astimezone(ZoneInfo(self.timezone))))

    def key(self, minute: datetime) -> str:
        """The unique key of this entry's job for ``minute``.

        Keyed on the local wall time. In the hour an autumn clock change repeats, a fixed-time
        entry (``30 2 * * *``) gets the same keys again, so it runs once; any other
        (``*/5 * * * *``) gets new ones and keeps running: classic cron's rule.
        """
        local = minute.astimezone(ZoneInfo(self.timezone))
        text = f"cron\0{self.expression}\0{self.worker}\0{local.replace(tzinfo=None).isoformat()}"
        if local.fold and not fixed_time(self.expression):
            text += "\0repeat"  # the second pass of the repeated hour
        # Entries may differ only there, or only in their time zone (09:00 in Paris and in
        # New York read the same). An entry with none of them keeps its older releases' key.
        if self.args or self.options:
            text += "\0" + _codec.canonical_dumps({"args": self.args, "options": self.options})
        if self.timezone != "UTC":
            text += f"\0{self.timezone}"
        return hashlib.sha256(text.encode()).hexdigest()


def fixed_time(expression: str) -> bool:
    """Whether ``expression`` fires at fixed times of day: neither its minute nor its hour
    field is a wildcard (``*``, ``*/5``), as classic cron tells them apart."""
    fields = expression.split()
    if len(fields) == 1:  # a nickname: only @hourly repeats within a day
        return fields[0].lower() != "@hourly"
    return not (fields[0].startswith("*") or fields[1].startswith("*"))


def check_expression(expression: object, field: str) -> str:
    """Validate a five-field cron expression (or ``@hourly``-style nickname).

    croniter also takes a seconds and a year field, and random ``R`` fields: refused, as
    a slot is a minute, and each node would draw its own random minute.
    """
    expected = f"expected a cron expression like '*/5 * * * *' or '@hourly', got {expression!r}"
    if not isinstance(expression, str):
        raise ConfigError(field, expected)
    fields = expression.split()
    if len(fields) == 1 and fields[0].startswith("@"):
        if fields[0].lower() not in NICKNAMES:
            raise ConfigError(field, f"{expected}; nicknames are {', '.join(sorted(NICKNAMES))}")
    elif len(fields) != 5:
        raise ConfigError(field, f"{expected}: five fields (minute hour day month weekday)")
    elif any(_RANDOM.match(part) for part in fields):
        raise ConfigError(field, f"{expected}: random fields (R) would differ on every node")
    if not croniter.is_valid(expression):
        raise ConfigError(field, expected)
    return expression


def check_timezone(name: object, field: str) -> str:
    """Validate an IANA time zone name."""
    if not isinstance(name, str) or not name:
        raise ConfigError(field, f"expected a time zone name like 'Europe/Paris', got {name!r}")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(field, f"unknown time zone {name!r}; use an IANA name") from None
    return name


def parse_crontab(value: object, timezone: str = "UTC") -> tuple[CronEntry, ...]:
    """``Config.crontab``: ``[(expression, worker), (expression, worker, {options}), ...]``.

    ``worker`` is a ``Worker`` or its dotted name; options are ``args``, ``queue``,
    ``priority``, ``max_attempts``, ``tags``, ``meta`` and ``timezone``.
    """
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(
            "crontab", f"expected a list of (expression, worker) entries, got {value!r}"
        )
    return tuple(_entry(item, index, timezone) for index, item in enumerate(value))


def _entry(item: object, index: int, timezone: str) -> CronEntry:
    field = f"crontab[{index}]"
    if isinstance(item, CronEntry):
        return item
    if isinstance(item, str) or not isinstance(item, Sequence) or len(item) not in (2, 3):
        raise ConfigError(field, f"expected (expression, worker[, options]), got {item!r}")
    expression = check_expression(item[0], field)
    target = item[1]
    name = getattr(target, "name", target)
    if not isinstance(name, str) or "." not in name:
        raise ConfigError(field, f"expected a worker or its dotted name, got {target!r}")
    try:
        check_text(name, f"{field}'s worker name")
    except ValueError as exc:
        raise ConfigError(field, str(exc)) from None
    options = dict(item[2]) if len(item) == 3 and isinstance(item[2], Mapping) else None
    if len(item) == 3 and options is None:
        raise ConfigError(field, f"expected options as a mapping, got {item[2]!r}")
    options = options or {}
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ConfigError(field, f"unknown options {sorted(unknown)}; allowed: {sorted(_OPTIONS)}")
    args = options.pop("args", {})
    if not isinstance(args, Mapping):
        raise ConfigError(field, f"expected args to be a mapping, got {args!r}")
    zone = check_timezone(options.pop("timezone", timezone), field)
    try:
        check_meta(options.get("meta", {}))  # checked again per slot, by the worker's new()
    except (TypeError, ValueError) as exc:
        raise ConfigError(field, str(exc)) from None
    return CronEntry(
        expression, name, MappingProxyType(dict(args)), MappingProxyType(options), zone
    )


def minute_of(moment: datetime) -> datetime:
    """``moment`` floored to its minute, in UTC."""
    return moment.astimezone(UTC).replace(second=0, microsecond=0)


def slot_job(entry: CronEntry, minute: datetime, build: Callable[..., Job]) -> Job:
    """The job of ``entry`` for ``minute``, built by its worker's ``new`` (``build``)."""
    meta = {**entry.options.get("meta", {}), "cron": True, "cron_expr": entry.expression}
    options = {k: v for k, v in entry.options.items() if k != "meta"}
    job = build(dict(entry.args), meta=meta, unique=False, **options)
    claim = Claim(key=entry.key(minute), period=None, states=STATE_GROUPS["all"], replace={})
    return attrs.evolve(job, _unique=claim)


class Scheduler:
    """Enqueues due cron slots; runs on every node that has entries."""

    def __init__(
        self,
        entries: Iterable[CronEntry],
        leadership: Leadership,
        insert_all: Callable[[list[Job]], Awaitable[list[Job]]],
        builder: Callable[[str], Callable[..., Job] | None],
        *,
        transient: Callable[[BaseException], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.entries = tuple(entries)
        self._leadership = leadership
        self._insert_all = insert_all
        self._builder = builder
        self._transient = transient  # whether a failed insert may succeed if tried later
        self._clock = clock
        self._last: datetime | None = None  # the last minute handled by this node

    async def enqueue(self, minute: datetime, *, guard: bool = True) -> int:
        """Insert the jobs due in ``minute`` (once per slot); returns how many were new.

        With ``guard``, a minute at or before the last one handled is skipped, and the minute
        counts as handled once its insert succeeded.
        """
        if guard and self._last is not None and minute <= self._last:
            log.warning("clock went back to %s (last slot %s); skipping", minute, self._last)
            return 0
        jobs: list[Job] = []
        for entry in self.entries:
            if entry.is_due(minute) and (job := await self._slot_job(entry, minute)) is not None:
                jobs.append(job)
        created = 0
        if jobs:
            saved = await self._insert_all(jobs)
            created = sum(not job.conflict for job in saved)
            telemetry.emit("cron.enqueue", {"count": created}, {"minute": minute})
        if guard:
            self._last = minute
        return created

    async def _slot_job(self, entry: CronEntry, minute: datetime) -> Job | None:
        """``entry``'s job for ``minute``, or None (logged) if its worker can't build it."""
        build = self._builder(entry.worker)
        if build is None:  # not imported on this node yet: import it, as running its job would
            module = entry.worker.rsplit(".", 1)[0]
            try:
                await trio.to_thread.run_sync(importlib.import_module, module)
            except Exception as exc:
                log.warning("cannot import %s for cron worker %s: %s", module, entry.worker, exc)
            build = self._builder(entry.worker)
        if build is None:
            text = "cron entry %r: no module importable here registers %s; skipped on this node"
            log.error(text, entry.expression, entry.worker)
            return None
        try:
            return slot_job(entry, minute, build)
        except (TypeError, ValueError) as exc:  # args or options the worker rejects
            log.error("cron entry %r for %s: %s; skipped", entry.expression, entry.worker, exc)
            return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Each minute: the leader enqueues at once, the others after ``FALLBACK_DELAY``."""
        task_status.started()
        if self._last is None:  # the minute it starts in has begun: the next one is its first
            self._last = minute_of(datetime.fromtimestamp(self._clock(), UTC))
        while True:
            now = self._clock()
            await trio.sleep(60 - now % 60 + 0.05)  # just past the next minute boundary
            minute = minute_of(datetime.fromtimestamp(self._clock(), UTC))
            if not self._leadership.is_leader:
                await trio.sleep(FALLBACK_DELAY)
            await self.catch_up(minute)

    async def catch_up(self, minute: datetime) -> int:
        """Enqueue ``minute``, after the earlier minutes (up to ``CATCH_UP`` back) that this
        node hasn't handled: their insert failed for now (the database unreachable), or the
        loop ran late. A minute whose insert PostgreSQL refuses outright is given up (logged),
        so it never holds back the minutes after it."""
        start = minute
        if self._last is not None and self._last < minute:
            start = max(self._last + _MINUTE, minute - CATCH_UP * _MINUTE)
        created = 0
        while start <= minute:
            try:
                created += await self.enqueue(start)
            except Exception as exc:
                if self._transient(exc):
                    log.warning("enqueueing cron jobs for %s failed (%s); will retry", start, exc)
                    break
                log.error("enqueueing cron jobs for %s failed (%s); skipped", start, exc)
                self._last = start
            start += _MINUTE
        return created
