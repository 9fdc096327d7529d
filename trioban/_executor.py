"""Run one job in its own cancel scope and turn what happened into an ack."""

from __future__ import annotations

import importlib
import logging
import re
import time
from datetime import UTC, datetime
from typing import Any, Final

import attrs
import trio

from . import _codec, telemetry
from ._ack import MAX_DELAY, Ack, build_ack, ended, exception_text, failed, granted
from ._crypto import DecryptionError
from ._errors import stops_the_node
from ._job import Cancel, Discard, Job, JobState, Snooze
from ._notice import META_REF, META_RESULT
from ._registry import lookup
from ._validate import MAX_NESTING, nests_too_deep
from ._worker import Worker, args_json
from ._workflow import NAME, WORKFLOW_ID

log = logging.getLogger("trioban.executor")


# A NUL in JSON text: ``\u0000`` whose backslash is not itself escaped. jsonb refuses it.
_ESCAPED_NUL: Final = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


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
    returned: Any = None  # what the worker returned (testing: perform_job reports it)


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
    except BaseException as exc:
        if stops_the_node(exc):
            raise
        log.warning("cannot import %s for worker %s: %r", module, name, exc)
        if not _is_missing(module, exc):
            raise
    return lookup(name)


def _is_missing(module: str, exc: BaseException) -> bool:
    """Whether ``exc`` says ``module`` (or a package above it) doesn't exist, rather than that
    something it imports is missing."""
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    return missing is not None and (module == missing or module.startswith(f"{missing}."))


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


async def run_here(job: Job, *, reraise: bool = False) -> tuple[Running, Ack]:
    """Execute an unsaved job in this process, as a node would after claiming it.

    The args make the same JSON round trip as through the database. Returns the run (its
    ``job`` as it ran, attempt and attempted_at set; what the worker ``returned``) and its ack.
    For testing and the inline mode.
    """
    claimed = attrs.evolve(
        job,
        args=_codec.loads(args_json(job)),
        id=job.id or 0,
        state=JobState.EXECUTING,
        attempt=job.attempt + 1,
        attempted_at=datetime.now(UTC),
    )
    running = Running(claimed, trio.CancelScope(), reraise=reraise)
    return running, await execute(running)


def _queue_time(job: Job) -> float:
    if job.attempted_at is None or job.scheduled_at is None:
        return 0.0
    return max(0.0, (job.attempted_at - job.scheduled_at).total_seconds())


async def _run(running: Running) -> Ack:
    job = running.job
    try:
        worker = await resolve(job.worker)
    except BaseException as exc:
        if stops_the_node(exc):
            raise
        # Retried (with the default backoff): a fixed deployment or configuration runs it.
        module = job.worker.rsplit(".", 1)[0]
        text = f"cannot import module {module!r} of worker {job.worker!r} on this node: "
        return failed(job, text + exception_text(exc))
    if worker is None:
        reason = (
            f"unknown worker {job.worker!r}: no imported module registers it; import the "
            f"module defining it on every node that runs queue {job.queue!r}"
        )
        return failed(job, reason, final=True)
    try:
        prepared = worker.prepare(job)
    except DecryptionError as exc:
        # Perhaps a key this node lacks: retried, so a fixed deployment still runs it.
        return failed(job, str(exc), worker=worker)
    except ValueError as exc:
        return failed(job, f"{exc}; the job was inserted with args its worker rejects", final=True)
    except Exception as exc:  # not expected: fail the job, not the node
        return failed(job, exception_text(exc), worker=worker)
    if running.scope.cancel_called and running.cancel_reason is not None:
        return ended(running.job, "cancelled", running.cancel_reason)  # before it ran a line
    if worker.timeout is not None:
        running.scope.deadline = trio.current_time() + worker.timeout
    try:
        with running.scope:
            result = running.returned = await worker.perform(prepared)
    except BaseException as exc:
        if running.reraise or stops_the_node(exc):
            raise
        job = running.job  # the latest claim (see Running.job)
        if running.scope.cancel_called:  # it raised as it was being cancelled
            if running.cancel_reason is not None:  # by cancel_job: cancelled it is
                return ended(job, "cancelled", running.cancel_reason)
            return failed(job, f"{_timed_out(worker)}, then {exception_text(exc)}", worker=worker)
        return failed(job, exception_text(exc), worker=worker)
    job = running.job
    # cancel_called, not cancelled_caught: code that swallowed the Cancelled (asyncio code
    # catching its CancelledError, say) and returned still timed out, or was cancelled.
    if running.scope.cancel_called:
        if running.cancel_reason is not None:
            return ended(job, "cancelled", running.cancel_reason)
        return failed(job, _timed_out(worker), worker=worker)
    try:
        return _outcome(job, worker, result)
    except Exception as exc:  # a return value the ack can't be made of fails the job, not the node
        text = f"cannot record what {worker.name} returned ({type(result).__name__}): "
        return failed(job, text + exception_text(exc), worker=worker)


def _timed_out(worker: Worker) -> str:
    return f"TimeoutError: job exceeded its worker's timeout of {worker.timeout}s"


def _outcome(job: Job, worker: Worker, result: Any) -> Ack:
    if isinstance(result, Cancel):
        return ended(job, "cancelled", result.reason)
    if isinstance(result, Discard):
        return ended(job, "discarded", result.reason)
    if isinstance(result, Snooze):
        # Not counted as an attempt: one more is granted.
        seconds = min(result.seconds, MAX_DELAY)
        return build_ack(job, "scheduled", schedule_in=seconds, extra_attempts=granted(job))
    if job.meta.get(META_REF) is not None or worker.recorded:
        data, meta, problem = _stored_result(worker, result)
        if problem is not None:  # the caller asked for the result: the job fails, saying why,
            # for good: it did its work, and a run again would repeat it for the same result
            return failed(job, f"the result of {worker.name} {problem}", final=True)
        return build_ack(job, "completed", meta=meta, result=data)
    if WORKFLOW_ID in job.meta:
        return _step_completed(job, worker, result)
    return build_ack(job, "completed")


def _step_completed(job: Job, worker: Worker, result: Any) -> Ack:
    """A workflow step's ack, its result kept for the steps downstream (``workflow_results``)
    when it can be stored. Nobody asked to store it, so one that can't be doesn't fail the
    step, as it wouldn't fail the same job outside a workflow: its dependents see None."""
    data, meta, problem = _stored_result(worker, result)
    if problem is None:
        return build_ack(job, "completed", meta=meta, result=data)
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
    return build_ack(job, "completed")


_RESULT_WRAPPER: Final = len(_codec.dumps({META_RESULT: None})) - len("null")


def _stored_result(worker: Worker, result: Any) -> tuple[Any, str | None, str | None]:
    """A return value as JSON-ready data and the meta JSON storing it, or why it can't be
    stored (the end of a sentence starting "the result of <worker>")."""
    try:
        data = worker.dump_result(result)
    except Exception as exc:  # whatever the converter raises is a reason, not a crash
        return None, None, f"doesn't fit its result class: {exc}"
    try:
        meta = _codec.dumps({META_RESULT: data})
    except Exception as exc:  # whatever the encoder raises is a reason, not a crash
        return None, None, f"is not JSON-serialisable: {exc}"
    problem, limit = _unstorable(meta), worker.recorded_limit
    if problem is None and nests_too_deep(data, meta):
        problem = (
            f"nests lists and objects more than {MAX_NESTING} levels deep, which reading it "
            "back can't take; return a flatter value"
        )
    if problem is None and limit is not None:
        # The result's own JSON, in bytes as stored (UTF-8), without the meta key around it.
        size = (len(meta) if meta.isascii() else len(meta.encode())) - _RESULT_WRAPPER
        if size > limit:
            problem = (
                f"is {size} bytes of JSON, over its recorded limit of {limit}; "
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
