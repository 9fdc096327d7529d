"""Jobs, their states, and the values a worker may return to steer its job."""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, final

import attrs

if TYPE_CHECKING:
    from ._unique import Claim


class JobState(enum.StrEnum):
    """The states of Oban's ``oban_job_state`` enum."""

    AVAILABLE = "available"
    SCHEDULED = "scheduled"
    SUSPENDED = "suspended"
    EXECUTING = "executing"
    RETRYABLE = "retryable"
    COMPLETED = "completed"
    DISCARDED = "discarded"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({JobState.COMPLETED, JobState.DISCARDED, JobState.CANCELLED})
AUTO_STATES = frozenset({JobState.AVAILABLE, JobState.SCHEDULED})
"""States an insert derives from ``scheduled_at``; any other state is written as given."""


@final
@attrs.frozen(kw_only=True)
class Job:
    """A job: built unsaved by ``Worker.new()``, returned saved by ``oban.insert()``.

    ``args`` is a read-only mapping, or an instance of the worker's structured args class
    inside the worker. Timestamps are timezone-aware UTC datetimes. ``conflict`` is true when
    an insert found an existing unique job instead of creating one.
    """

    worker: str
    args: Any
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 20
    tags: tuple[str, ...] = ()
    meta: Mapping[str, Any] = attrs.field(factory=dict)
    scheduled_at: datetime | None = None
    id: int | None = None
    state: JobState = JobState.AVAILABLE
    attempt: int = 0
    errors: tuple[Mapping[str, Any], ...] = ()
    inserted_at: datetime | None = None
    attempted_at: datetime | None = None
    attempted_by: tuple[str, ...] = ()
    completed_at: datetime | None = None
    discarded_at: datetime | None = None
    cancelled_at: datetime | None = None
    conflict: bool = False
    # The args' JSON text, encoded once by Worker.new() and reused at insert, with the args
    # object it encodes: a copy with other args (attrs.evolve) doesn't reuse it.
    _args_json: tuple[Any, str] | None = attrs.field(
        default=None, repr=False, eq=False, alias="_args_json"
    )
    # The unique key and conflict rules, computed by Worker.new() before any encryption.
    _unique: Claim | None = attrs.field(default=None, repr=False, eq=False, alias="_unique")

    @property
    def saved(self) -> bool:
        """Whether the job has been written to the database."""
        return self.id is not None


_FIELD_VALUES = operator.attrgetter(*(field.name for field in attrs.fields(Job)))
_FIELD_ARGUMENTS = tuple(str(field.alias) for field in attrs.fields(Job))


def evolve(job: Job, **changes: Any) -> Job:
    """``job`` with ``changes`` applied: ``attrs.evolve`` in half the time, for hot paths."""
    values: dict[str, Any] = dict(zip(_FIELD_ARGUMENTS, _FIELD_VALUES(job), strict=True))
    values.update(changes)
    return Job(**values)


def as_inserted(
    job: Job,
    id_: int | None,
    state: JobState,
    inserted_at: datetime | None,
    scheduled_at: datetime | None,
    attempted_at: datetime | None,
    *,
    data: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
) -> Job:
    """``job`` as its insert saved it; ``attempted_at`` is set when it was claimed on insert.

    ``data`` replaces its args and meta (as a fetch would decode them).
    """
    args, meta = (job.args, job.meta) if data is None else data
    return Job(
        worker=job.worker,
        args=args,
        queue=job.queue,
        priority=job.priority,
        max_attempts=job.max_attempts,
        tags=job.tags,
        meta=meta,
        id=id_,
        state=state,
        inserted_at=inserted_at,
        scheduled_at=scheduled_at,
        attempt=0 if attempted_at is None else 1,
        attempted_at=attempted_at,
        attempted_by=() if attempted_at is None else job.attempted_by,
    )


def _cancel_reason(reason: object) -> str:
    return "cancelled" if reason is None else str(reason)


def _discard_reason(reason: object) -> str:
    return "discarded" if reason is None else str(reason)


@final
@attrs.frozen
class Cancel:
    """Return ``Cancel(reason)`` to cancel the job; a relay raises ``RelayCancelled``.

    ``reason`` is kept as text: ``Cancel(exc)`` stores ``str(exc)``; None is the default.
    """

    reason: str = attrs.field(default="cancelled", converter=_cancel_reason)


@final
@attrs.frozen
class Discard:
    """Return ``Discard(reason)`` to discard the job; a relay raises ``RelayDiscard``.

    ``reason`` is kept as text: ``Discard(exc)`` stores ``str(exc)``; None is the default.
    """

    reason: str = attrs.field(default="discarded", converter=_discard_reason)


@final
@attrs.frozen
class Snooze:
    """Return ``Snooze(seconds)`` to run the job again later without counting a failed attempt."""

    seconds: float

    def __attrs_post_init__(self) -> None:
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, int | float):
            raise TypeError(f"Snooze(seconds) expects a number, got {self.seconds!r}")
        if not math.isfinite(self.seconds) or self.seconds < 0:
            raise ValueError(f"Snooze(seconds) expects a finite number >= 0, got {self.seconds!r}")


def utc_datetime(value: datetime, field: str) -> datetime:
    """Return ``value`` in UTC; naive datetimes are ambiguous and rejected."""
    if not isinstance(value, datetime):
        raise TypeError(f"expected {field} to be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"expected {field} to be timezone-aware, got naive {value.isoformat()}; "
            "pass e.g. datetime.now(UTC) + timedelta(...)"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(
            f"expected {field} to fall within the years 1 to 9999 in UTC, got {value.isoformat()}"
        ) from None


def as_str_tuple(value: Sequence[str], field: str) -> tuple[str, ...]:
    """Validate a sequence of non-empty strings (tags)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"expected {field} to be a list of strings, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item or "\x00" in item:
            raise ValueError(
                f"expected every item of {field} to be a non-empty str without NUL, got {item!r}"
            )
    return tuple(value)
