"""Relay notices: the outcome of a relayed job, as published on the ``relay`` channel and as
read back from its row. The executing node builds them (``build_notice``); relays read them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from . import _codec

META_REF: Final = "relay"
"""The key of ``job.meta`` holding a relayed job's ref."""
META_RESULT: Final = "result"
"""The key of ``job.meta`` holding a relayed job's result."""

REASON_LIMIT: Final = 2000
"""The most of a failure's reason a notice carries (less when that is too large for NOTIFY)."""
FINAL: Final = frozenset({"completed", "cancelled", "discarded"})
"""The states a relayed job ends in."""


@attrs.frozen
class Notice:
    """A job's outcome as a relay sees it."""

    state: str
    result: Any = None
    reason: str = ""
    stored: bool = False  # the result was too large to publish: read it from the job row


def build_notice(ref: str, job_id: int, state: str, result: Any = None, reason: str = "") -> str:
    """The notification text for a relayed job's outcome, small enough for NOTIFY.

    A result too large is left in the job row, for the relay's poll to read. A failure's reason
    is cut to fit instead: once the job is retried, its row no longer says the attempt failed.
    """
    body: dict[str, Any] = {"ref": ref, "id": job_id, "state": state}
    if state == "completed":
        body["result"] = result
        text = _codec.encode_payload(body)
        if _fits(text):
            return text
        return _codec.dumps({"ref": ref, "id": job_id, "state": state, "stored": True})
    reason = reason[:REASON_LIMIT]
    while True:  # ends: with no reason left, the notice fits
        if reason:
            body["reason"] = reason
        text = _codec.encode_payload(body)
        if _fits(text):
            return text
        reason = reason[: len(reason) // 2]


def _fits(text: str) -> bool:
    return len(text.encode()) < _codec.NOTIFY_LIMIT


def last_error(errors: Sequence[Mapping[str, Any]] | None) -> str:
    """The text of a job's most recent error."""
    if not errors:
        return ""
    return str(errors[-1].get("error", ""))


def notice_from_row(state: str, errors: Sequence[Any] | None, meta: Mapping[str, Any]) -> Notice:
    """The notice a job row amounts to (used by the poller and for stored results)."""
    return Notice(state=state, result=(meta or {}).get(META_RESULT), reason=last_error(errors))
