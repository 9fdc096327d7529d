"""Unique jobs: the constraint a worker or a job declares, and the key it hashes to.

The key is computed from the job as built (before any encryption) and stored in the
``uniq_key`` column, guarded by a unique index: the database, not a read-then-write check,
decides which of several concurrent inserts wins. Period and states are applied when an insert
meets an existing job: one outside the period or the states gives up its key (under a row lock),
and the insert is tried again.

The key is a SHA-256 of the fields it covers; for an encrypted worker's job keyed on its args,
an HMAC under a secret derived from the encryption key, so nobody reading the table can confirm
guesses of the args the encryption hides.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, final

import attrs

from . import _codec
from ._job import JobState

_INCOMPLETE: Final = ("available", "scheduled", "executing", "retryable", "suspended")
STATE_GROUPS: Final[Mapping[str, tuple[str, ...]]] = {
    "all": tuple(state.value for state in JobState),
    "incomplete": _INCOMPLETE,
    "scheduled": ("scheduled",),
    "successful": (*_INCOMPLETE, "completed"),
}
FIELDS: Final = frozenset({"worker", "queue", "args", "meta"})
REPLACEABLE: Final = frozenset(
    {"args", "max_attempts", "meta", "priority", "queue", "scheduled_at", "tags"}
)
MAX_PERIOD: Final = 100 * 365.25 * 86400.0
"""The longest ``Unique(period=)``, in seconds (100 years); ``None`` is forever."""


@final
@attrs.frozen
class Claim:
    """What an insert needs of a unique job: its key and the rules to apply on a conflict."""

    key: str
    period: float | None
    states: tuple[str, ...]
    replace: Mapping[str, tuple[str, ...]]


def _period(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected Unique(period=) to be seconds or None (forever), got {value!r}")
    if (isinstance(value, float) and not math.isfinite(value)) or value <= 0:
        raise ValueError(f"expected Unique(period=) to be a finite number > 0, got {value}")
    if value > MAX_PERIOD:
        # PostgreSQL can't subtract much longer periods from now(): the insert would fail.
        raise ValueError(
            f"expected Unique(period=) to be at most 100 years ({MAX_PERIOD:.0f} seconds), "
            f"got {value}; period=None blocks duplicates forever"
        )
    return float(value)


def _names(value: Any, field: str, allowed: frozenset[str] | None = None) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"expected Unique({field}=) to be a list of names, got {value!r}")
    for name in value:
        if not isinstance(name, str) or not name:
            raise TypeError(f"expected Unique({field}=) to hold non-empty strings, got {name!r}")
        if allowed is not None and name not in allowed:
            raise ValueError(
                f"unknown name {name!r} in Unique({field}=); choose from {sorted(allowed)}"
            )
    return tuple(value)


def _fields(value: Any) -> tuple[str, ...]:
    return _names(value, "fields", FIELDS)


def _keys(value: Any) -> tuple[str, ...]:
    return _names(value, "keys")


def _meta_keys(value: Any) -> tuple[str, ...]:
    return _names(value, "meta_keys")


def _states(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        if value not in STATE_GROUPS:
            raise ValueError(
                f"unknown state group {value!r} in Unique(states=); choose from "
                f"{sorted(STATE_GROUPS)} or list states"
            )
        return STATE_GROUPS[value]
    states = _names(value, "states", frozenset(STATE_GROUPS["all"]))
    if not states:
        raise ValueError("expected Unique(states=) to name at least one state")
    return states


def _replace(value: Any) -> Mapping[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise TypeError(
            "expected Unique(replace=) to map a state of the existing job to the fields to "
            f"replace, e.g. {{'scheduled': ['scheduled_at']}}, got {value!r}"
        )
    checked: dict[str, tuple[str, ...]] = {}
    for state, fields in value.items():
        _names([state], "replace", frozenset(STATE_GROUPS["all"]))
        checked[state] = _names(fields, "replace", REPLACEABLE)
    return checked


@final
@attrs.frozen(kw_only=True)
class Unique:
    """A uniqueness constraint: ``@worker(unique=Unique(...))`` or ``Worker.new(unique=...)``.

    Attributes:
        period: seconds a job blocks its duplicates after it was inserted (at most 100
            years); ``None``: forever.
        fields: which of ``worker``, ``queue``, ``args``, ``meta`` make jobs duplicates.
        keys: only these args keys count (implies ``args``; default: all of the args when
            ``fields`` has ``args``).
        meta_keys: these meta keys count (implies ``meta``; default: all of meta when
            ``fields`` has ``meta``).
        states: states of an existing job that block a new one: a group (``"successful"``,
            ``"incomplete"``, ``"scheduled"``, ``"all"``) or a list of states.
        replace: on a conflict, fields of the existing job to overwrite with the new one's,
            by the existing job's state, e.g. ``{"scheduled": ["scheduled_at"]}``.

    A conflicting insert returns the existing job with ``conflict=True``.
    """

    period: float | None = attrs.field(default=60.0, converter=_period)
    fields: tuple[str, ...] = attrs.field(default=("worker", "queue", "args"), converter=_fields)
    keys: tuple[str, ...] = attrs.field(default=(), converter=_keys)
    meta_keys: tuple[str, ...] = attrs.field(default=(), converter=_meta_keys)
    states: tuple[str, ...] = attrs.field(default="successful", converter=_states)
    replace: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict, converter=_replace)

    def __attrs_post_init__(self) -> None:
        if not self.fields and not self.keys and not self.meta_keys:
            raise ValueError("expected Unique(fields=) to name at least one field")

    def claim(
        self,
        *,
        worker: str,
        queue: str,
        args: Mapping[str, Any],
        meta: Mapping[str, Any],
        secret: bytes | None = None,
    ) -> Claim:
        """The key of a job with these values under this constraint; keyed with ``secret`` (an
        encrypted worker's) when it covers the args. Without args it hashes only what the table
        shows anyway, so it stays unkeyed and survives a key rotation."""
        basis: dict[str, Any] = {}
        if "worker" in self.fields:
            basis["worker"] = worker
        if "queue" in self.fields:
            basis["queue"] = queue
        if "args" in self.fields or self.keys:
            basis["args"] = _pick(args, self.keys)
        if "meta" in self.fields or self.meta_keys:
            basis["meta"] = _pick(meta, self.meta_keys)
        text = _codec.canonical_dumps(basis).encode()
        if secret is not None and "args" in basis:
            key = hmac.new(secret, text, hashlib.sha256).hexdigest()
        else:
            key = hashlib.sha256(text).hexdigest()
        return Claim(key=key, period=self.period, states=self.states, replace=self.replace)


def _pick(values: Mapping[str, Any], keys: tuple[str, ...]) -> Mapping[str, Any]:
    return {key: values.get(key) for key in keys} if keys else values
