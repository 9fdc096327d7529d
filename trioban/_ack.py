"""Acks: a job's outcome as the acker writes it back, and the functions that build one."""

from __future__ import annotations

import logging
import math
import numbers
import traceback
from datetime import UTC, datetime
from typing import Any, Final

import attrs

from . import _codec
from ._backoff import default_backoff
from ._batch import BATCH_ID, CALLBACK
from ._job import Job
from ._notice import META_REF, META_RESULT, REASON_LIMIT, Notice
from ._registry import lookup
from ._validate import MAX_ATTEMPTS
from ._worker import Worker
from ._workflow import WORKFLOW_ID

log = logging.getLogger("trioban.executor")  # what it logs is about running a job

_TRACEBACK_LIMIT: Final = 8000
_FINAL_STATES: Final = frozenset({"completed", "cancelled", "discarded"})
MAX_DELAY: Final = 100 * 365.25 * 86400.0
"""The longest snooze or retry delay, in seconds (100 years): longer ones are cut to it, so
``now() + delay`` stays a valid timestamp."""


@attrs.frozen
class Ack:
    """A job's outcome, as the acker writes it back (in batches): one JSON object."""

    id: int
    state: str
    json: str
    workflow: str | None = None  # the job's workflow, settled once the ack is written
    batch: str | None = None  # the job's batch (not for callback jobs)
    error: str | None = None  # the failure's text, when the job failed (for telemetry)
    result: Any = None  # the JSON-ready result, when it is stored or relayed
    relay: tuple[str, Notice] | None = None  # a relayed job's ref and outcome
    attempt: int = 0  # the attempt acked, and its fence: for a replacement (``unwritable``)
    attempted_at: datetime | None = None

    @property
    def final(self) -> bool:
        """Whether the job is finished (completed, cancelled or discarded)."""
        return self.state in _FINAL_STATES


def _error(attempt: int, text: str) -> str:
    at = datetime.now(UTC).replace(tzinfo=None).isoformat()
    return _codec.dumps({"at": at, "attempt": attempt, "error": _shorten(text, _TRACEBACK_LIMIT)})


def _shorten(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters: its start (where a failure's ``Type: message``
    is) and its end (the innermost frames), with the middle cut out."""
    if len(text) <= limit:
        return text
    kept = limit - len(f"\n[... {len(text)} characters cut ...]\n")  # at least the marker's
    head, tail = kept - kept // 2, kept // 2
    return f"{text[:head]}\n[... {len(text) - kept} characters cut ...]\n{text[len(text) - tail :]}"


def _clean(text: str) -> str:
    """``text`` as PostgreSQL can store it: NUL and characters UTF-8 can't encode (lone
    surrogates, as from a filename decoded with ``surrogateescape``) as backslash escapes."""
    text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def exception_text(exc: BaseException) -> str:
    """``Type: message`` and then the traceback: a shortened text (a relay's reason, a deep
    traceback) keeps the message."""
    summary = "".join(traceback.format_exception_only(exc)).rstrip()
    return summary + "\n\n" + "".join(traceback.format_exception(exc)).rstrip()


def _retry_in(worker: Worker, attempt: int) -> float:
    """Seconds until the retry: the worker's backoff, at most MAX_DELAY. A backoff that raises
    or returns something other than a number >= 0 is logged and the default one used."""
    try:
        seconds = worker.backoff(attempt)
        number = isinstance(seconds, numbers.Real) and not isinstance(seconds, bool)
        if number and math.isfinite(seconds) and seconds >= 0:
            return min(float(seconds), MAX_DELAY)
        problem = f"returned {seconds!r}, not a finite number of seconds >= 0"
    except Exception as exc:
        problem = f"raised {exc!r}"
    log.error(
        "backoff of worker %s %s for attempt %d; used the default", worker.name, problem, attempt
    )
    return default_backoff(attempt)


def failed(job: Job, text: str, *, worker: Worker | None = None, final: bool = False) -> Ack:
    """The ack of a failed attempt: retried after ``worker``'s backoff (the default one without
    a worker), or discarded when ``final`` or out of attempts."""
    text = _clean(text)
    if final or job.attempt >= job.max_attempts:
        ack = ended(job, "discarded", text)
    else:
        schedule_in = (
            default_backoff(job.attempt) if worker is None else _retry_in(worker, job.attempt)
        )
        error = _error(job.attempt, text)
        ack = build_ack(job, "retryable", schedule_in=schedule_in, error=error, reason=text)
    return attrs.evolve(ack, error=text)


def ended(job: Job, state: str, reason: str) -> Ack:
    reason = _clean(reason)
    return build_ack(job, state, error=_error(job.attempt, reason), reason=reason)


def failure(job: Job, error: BaseException | str) -> Ack:
    """The ack of ``job`` failing with ``error`` (an exception, or a reason) outside a normal
    run: retryable or discarded by its attempts, as a raised exception makes it."""
    text = error if isinstance(error, str) else exception_text(error)
    worker = lookup(job.worker)
    return failed(job, text, worker=worker, final=worker is None)


def granted(job: Job) -> int:
    """The attempt given back to a job whose attempt didn't count (unless the column is full)."""
    return 1 if job.max_attempts < MAX_ATTEMPTS else 0


def handed_back(job: Job) -> Ack:
    """The ack that makes a job claimed but never started available again. Like a snooze it
    grants an attempt, so the claim costs the job none; its relay (if any) waits on."""
    return attrs.evolve(build_ack(job, "available", extra_attempts=granted(job)), relay=None)


def unwritable(ack: Ack, reason: str) -> Ack:
    """A plain ``discarded`` ack in place of ``ack``, which PostgreSQL refused: the job ends
    saying why, rather than staying ``executing`` to be rescued and run again forever."""
    assert ack.attempted_at is not None
    text = _clean(f"the outcome of this attempt ({ack.state}) could not be written: {reason}")
    error = _error(ack.attempt, text)
    relay = (
        None
        if ack.relay is None
        else (ack.relay[0], Notice("discarded", None, _shorten(text, REASON_LIMIT)))
    )
    return attrs.evolve(
        ack,
        state="discarded",
        json=_text(ack.id, ack.attempted_at, "discarded", error=error),
        error=text,
        result=None,
        relay=relay,
    )


def build_ack(
    job: Job,
    state: str,
    *,
    schedule_in: float | None = None,
    error: str | None = None,
    meta: str | None = None,
    extra_attempts: int = 0,
    result: Any = None,
    reason: str = "",
) -> Ack:
    ref = job.meta.get(META_REF)
    relay = None
    if ref is not None and state != "scheduled":
        # Published by the acker unless the relay waits here (then handed over in-process).
        # The result as JSON holds it (tuples as lists, keys as str), as the notifier gives it.
        relayed = _codec.loads(meta).get(META_RESULT) if meta is not None else None
        relay = (str(ref), Notice(state, relayed, _shorten(reason, REASON_LIMIT)))
    assert job.attempted_at is not None
    job_id = _job_id(job)
    workflow = job.meta.get(WORKFLOW_ID)
    batch = None if CALLBACK in job.meta else job.meta.get(BATCH_ID)
    return Ack(
        id=job_id,
        state=state,
        json=_text(job_id, job.attempted_at, state, schedule_in, extra_attempts, error, meta),
        workflow=None if workflow is None else str(workflow),
        batch=None if batch is None else str(batch),
        result=result,
        relay=relay,
        attempt=job.attempt,
        attempted_at=job.attempted_at,
    )


def _text(
    job_id: int,
    attempted_at: datetime,
    state: str,
    schedule_in: float | None = None,
    extra_attempts: int = 0,
    error: str | None = None,
    meta: str | None = None,
) -> str:
    # Written out by hand (the hot path of every job): ints, a state name and an ISO time need
    # no escaping; error and meta are JSON texts already.
    return (
        f'{{"id":{job_id:d},'
        # The fence: the ack applies only to the attempt that produced it.
        f'"attempted_at":"{attempted_at.replace(tzinfo=None).isoformat()}",'
        f'"state":"{state}",'
        f'"schedule_in":{"null" if schedule_in is None else _codec.dumps(schedule_in)},'
        f'"extra_attempts":{extra_attempts:d},'
        f'"error":{error or "null"},"meta":{meta or "null"}}}'
    )


def _job_id(job: Job) -> int:
    assert job.id is not None
    return job.id
