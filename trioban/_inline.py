"""The inline testing mode (``Config(testing="inline")``): each job runs at insert, here,
and is stored nowhere."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import attrs

from . import _codec
from ._ack import Ack
from ._executor import run_here
from ._job import Job, JobState
from ._notice import META_REF, Notice
from ._relay import Registry


async def run_inline(job: Job, relays: Registry) -> Job:
    """Run ``job`` here now and deliver its outcome to its relay, if it has one.

    The job comes back unsaved (no id), as a node records its attempt: a failure's error in
    ``errors``, a recorded result in ``meta`` (``fetch_recorded`` reads it there).
    """
    running, ack = await run_here(job)
    ref = job.meta.get(META_REF)
    if ref is not None:
        relays.offer(str(ref), _final_notice(ack))
    return as_written(running.job, ack)


def as_written(ran: Job, ack: Ack) -> Job:
    """``ran`` as a node's write of ``ack`` would leave it, but unsaved (no id): the error (a
    failure's, or a ``Cancel``'s or ``Discard``'s reason) appended to ``errors``, the recorded
    result merged into ``meta``, ``scheduled_at`` moved for a retry or snooze, and the attempt a
    snooze grants added to ``max_attempts``."""
    written = _codec.loads(ack.json)
    error, meta, delay = written["error"], written["meta"], written["schedule_in"]
    return attrs.evolve(
        ran,
        id=None,
        state=JobState(ack.state),
        errors=ran.errors if error is None else (*ran.errors, error),
        meta=ran.meta if meta is None else {**ran.meta, **meta},
        scheduled_at=ran.scheduled_at if delay is None else _after(delay),
        max_attempts=ran.max_attempts + written["extra_attempts"],
    )


def _after(seconds: float) -> datetime:
    """Now plus ``seconds`` (at most ``MAX_DELAY``, 100 years: a valid datetime)."""
    return datetime.now(UTC) + timedelta(seconds=seconds)


def _final_notice(ack: Ack) -> Notice:
    """The final outcome of an inline job for its relay: inline runs one attempt only, so a
    failure that would be retried, or a snooze, ends the relay at once (``RelayDiscard``),
    even ``with_retries=True``, instead of leaving it waiting for an attempt that never runs.
    """
    if ack.relay is not None:
        notice = ack.relay[1]
        return notice if ack.final else Notice("discarded", None, notice.reason)
    # Only a snooze leaves a relayed job without a notice.
    return Notice("discarded", None, "the job snoozed; the inline testing mode runs each job once")
