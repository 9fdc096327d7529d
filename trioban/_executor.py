"""Run one job in its own cancel scope and turn what happened into an ack."""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import re
import time
import traceback
from datetime import UTC, datetime
from typing import Any, Final

import attrs
import trio

from . import _codec, telemetry
from ._backoff import default_backoff
from ._batch import BATCH_ID, CALLBACK
from ._crypto import DecryptionError
from ._job import Cancel, Discard, Job, JobState, Snooze
from ._notice import META_REF, META_RESULT, REASON_LIMIT, Notice
from ._registry import lookup
from ._validate import MAX_ATTEMPTS
from ._worker import Worker, args_json
from ._workflow import NAME, WORKFLOW_ID

log = logging.getLogger("trioban.executor")

_TRACEBACK_LIMIT: Final = 8000
_FINAL_STATES: Final = frozenset({"completed", "cancelled", "discarded"})
MAX_DELAY: Final = 100 * 365.25 * 86400.0
"""The longest snooze or retry delay, in seconds (100 years): longer ones are cut to it, so
``now() + delay`` stays a valid timestamp."""
# A NUL in JSON text: ``\u0000`` whose backslash is not itself escaped. jsonb refuses it.
_ESCAPED_NUL: Final = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


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


@attrs.define
class Running:
    """A job being executed, with the scope that cancels it."""

    # The claim the ack answers to. A claim lost in a PostgreSQL crash can make this node
    # fetch a job it is still running; the producer then swaps in the new claim here, and the
    # one run acks it (its fence must match the latest attempted_at).
    job: Job
    scope: trio.CancelScope
    cancel_reason: str | None = None
    reraise: bool = False  # testing: let the worker's exception out instead of recording it


async def resolve(name: str) -> Worker | None:
    """The worker called ``name``, importing its module if it isn't registered yet; None if
    that module doesn't exist or doesn't register it.

    Raises what importing the module raised (a module that fails to import, as in a rolling
    deploy or a configuration error, may import on a later attempt).
    """
    found = lookup(name)
    if found is not None or "." not in name:
        return found
    module = name.rsplit(".", 1)[0]
    try:
        await trio.to_thread.run_sync(importlib.import_module, module)
    except Exception as exc:
        log.warning("cannot import %s for worker %s: %r", module, name, exc)
        if not _is_missing(module, exc):
            raise
    return lookup(name)


def _is_missing(module: str, exc: Exception) -> bool:
    """Whether ``exc`` says ``module`` (or a package above it) doesn't exist, rather than that
    something it imports is missing."""
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    return missing is not None and (module == missing or module.startswith(f"{missing}."))


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


def _exception_text(exc: BaseException) -> str:
    """``Type: message`` and then the traceback: a shortened text (a relay's reason, a deep
    traceback) keeps the message."""
    summary = "".join(traceback.format_exception_only(exc)).rstrip()
    return summary + "\n\n" + "".join(traceback.format_exception(exc)).rstrip()


async def execute(running: Running) -> Ack:
    """Run ``running.job`` and return its ack. Cancelled propagates (shutdown: no ack).

    Emits the ``job.start`` and ``job.stop``/``job.exception`` telemetry events.
    """
    job = running.job
    started = time.perf_counter()
    queued = _queue_time(job)
    if telemetry.enabled("job.start"):
        telemetry.emit("job.start", {"queue_time": queued}, {"job": job})
    ack = await _run(running)
    event = "job.stop" if ack.error is None else "job.exception"
    if telemetry.enabled(event):
        measurements = {"duration": time.perf_counter() - started, "queue_time": queued}
        metadata: dict[str, Any] = {"job": job, "state": ack.state}
        if ack.error is not None:
            metadata["error"] = ack.error
        telemetry.emit(event, measurements, metadata)
    return ack


async def run_here(job: Job, *, reraise: bool = False) -> tuple[Job, Ack]:
    """Execute an unsaved job in this process, as a node would after claiming it.

    The args make the same JSON round trip as through the database. Returns the job as it
    ran (attempt, attempted_at set) and its ack. For testing and the inline mode.
    """
    claimed = attrs.evolve(
        job,
        args=_codec.loads(args_json(job)),
        id=job.id or 0,
        state=JobState.EXECUTING,
        attempt=job.attempt + 1,
        attempted_at=datetime.now(UTC),
    )
    return claimed, await execute(Running(claimed, trio.CancelScope(), reraise=reraise))


def _queue_time(job: Job) -> float:
    if job.attempted_at is None or job.scheduled_at is None:
        return 0.0
    return max(0.0, (job.attempted_at - job.scheduled_at).total_seconds())


async def _run(running: Running) -> Ack:
    job = running.job
    try:
        worker = await resolve(job.worker)
    except Exception as exc:
        # Retried (with the default backoff): a fixed deployment or configuration runs it.
        module = job.worker.rsplit(".", 1)[0]
        text = f"cannot import module {module!r} of worker {job.worker!r} on this node: "
        return _failed(job, text + _exception_text(exc))
    if worker is None:
        reason = (
            f"unknown worker {job.worker!r}: no imported module registers it; import the "
            f"module defining it on every node that runs queue {job.queue!r}"
        )
        return _failed(job, reason, final=True)
    try:
        prepared = worker.prepare(job)
    except DecryptionError as exc:
        # Perhaps a key this node lacks: retried, so a fixed deployment still runs it.
        return _failed(job, str(exc), worker=worker)
    except ValueError as exc:
        return _failed(job, f"{exc}; the job was inserted with args its worker rejects", final=True)
    except Exception as exc:  # not expected: fail the job, not the node
        return _failed(job, _exception_text(exc), worker=worker)
    if worker.timeout is not None:
        running.scope.deadline = trio.current_time() + worker.timeout
    try:
        with running.scope:
            result = await worker.perform(prepared)
    except Exception as exc:
        if running.reraise:
            raise
        job = running.job  # the latest claim (see Running.job)
        return _failed(job, _exception_text(exc), worker=worker)
    job = running.job
    if running.scope.cancelled_caught:
        if running.cancel_reason is not None:
            return _ended(job, "cancelled", running.cancel_reason)
        text = f"TimeoutError: job exceeded its worker's timeout of {worker.timeout}s"
        return _failed(job, text, worker=worker)
    try:
        return _outcome(job, worker, result)
    except Exception as exc:  # a return value the ack can't be made of fails the job, not the node
        text = f"cannot record what {worker.name} returned ({type(result).__name__}): "
        return _failed(job, text + _exception_text(exc), worker=worker)


def _outcome(job: Job, worker: Worker, result: Any) -> Ack:
    if isinstance(result, Cancel):
        return _ended(job, "cancelled", result.reason)
    if isinstance(result, Discard):
        return _ended(job, "discarded", result.reason)
    if isinstance(result, Snooze):
        # Not counted as an attempt: one more is granted.
        seconds = min(result.seconds, MAX_DELAY)
        return _ack(job, "scheduled", schedule_in=seconds, extra_attempts=_granted(job))
    if job.meta.get(META_REF) is not None or worker.recorded:
        data, meta, problem = _stored_result(worker, result)
        if problem is not None:  # the caller asked for the result: the job fails, saying why
            return _failed(job, f"the result of {worker.name} {problem}", worker=worker)
        return _ack(job, "completed", meta=meta, result=data)
    if WORKFLOW_ID in job.meta:
        return _step_completed(job, worker, result)
    return _ack(job, "completed")


def _step_completed(job: Job, worker: Worker, result: Any) -> Ack:
    """A workflow step's ack, its result kept for the steps downstream (``workflow_results``)
    when it can be stored. Nobody asked to store it, so one that can't be doesn't fail the
    step, as it wouldn't fail the same job outside a workflow: its dependents see None."""
    data, meta, problem = _stored_result(worker, result)
    if problem is None:
        return _ack(job, "completed", meta=meta, result=data)
    log.warning(
        "job %s (%s, step %r of workflow %s) completed; its result, a %s, %s. It is not "
        "stored: its dependents get None for it from workflow_results",
        job.id,
        worker.name,
        job.meta.get(NAME),
        job.meta.get(WORKFLOW_ID),
        type(result).__name__,
        problem,
    )
    return _ack(job, "completed")


def _stored_result(worker: Worker, result: Any) -> tuple[Any, str | None, str | None]:
    """A return value as JSON-ready data and the meta JSON storing it, or why it can't be
    stored (the end of a sentence starting "the result of <worker>")."""
    try:
        data = worker.dump_result(result)
        meta = _codec.dumps({META_RESULT: data})
    except Exception as exc:  # whatever the encoder raises is a reason, not a crash
        return None, None, f"is not JSON-serialisable: {exc}"
    problem, limit = _unstorable(meta), worker.recorded_limit
    if problem is None and limit is not None and len(meta) > limit:
        problem = (
            f"is {len(meta)} bytes of JSON, over its recorded limit of {limit}; "
            "return less or raise the limit with @worker(recorded=<bytes>)"
        )
    return data, meta, problem


def _unstorable(meta: str) -> str | None:
    """Why PostgreSQL would refuse the result JSON ``meta``, or None. It is not altered: the job
    fails with the reason, so a relay's caller learns it."""
    if "\\u0000" in meta and _ESCAPED_NUL.search(meta):
        return "contains a NUL character (\\x00), which PostgreSQL can't store; remove it"
    if not meta.isascii():
        try:
            meta.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (
                f"contains {meta[exc.start]!r}, which UTF-8 can't encode (a lone surrogate, as "
                "from bytes decoded with surrogateescape); return bytes as text some other way"
            )
    return None


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


def _failed(job: Job, text: str, *, worker: Worker | None = None, final: bool = False) -> Ack:
    """The ack of a failed attempt: retried after ``worker``'s backoff (the default one without
    a worker), or discarded when ``final`` or out of attempts."""
    text = _clean(text)
    if final or job.attempt >= job.max_attempts:
        ack = _ended(job, "discarded", text)
    else:
        schedule_in = (
            default_backoff(job.attempt) if worker is None else _retry_in(worker, job.attempt)
        )
        error = _error(job.attempt, text)
        ack = _ack(job, "retryable", schedule_in=schedule_in, error=error, reason=text)
    return attrs.evolve(ack, error=text)


def _ended(job: Job, state: str, reason: str) -> Ack:
    reason = _clean(reason)
    return _ack(job, state, error=_error(job.attempt, reason), reason=reason)


def failure(job: Job, error: BaseException | str) -> Ack:
    """The ack of ``job`` failing with ``error`` (an exception, or a reason) outside a normal
    run: retryable or discarded by its attempts, as a raised exception makes it."""
    text = error if isinstance(error, str) else _exception_text(error)
    worker = lookup(job.worker)
    return _failed(job, text, worker=worker, final=worker is None)


def _granted(job: Job) -> int:
    """The attempt given back to a job whose attempt didn't count (unless the column is full)."""
    return 1 if job.max_attempts < MAX_ATTEMPTS else 0


def handed_back(job: Job) -> Ack:
    """The ack that makes a job claimed but never started available again. Like a snooze it
    grants an attempt, so the claim costs the job none; its relay (if any) waits on."""
    return attrs.evolve(_ack(job, "available", extra_attempts=_granted(job)), relay=None)


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


def _ack(
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
