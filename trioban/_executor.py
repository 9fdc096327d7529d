"""Run one job in its own cancel scope and turn what happened into an ack."""

from __future__ import annotations

import importlib
import logging
import time
import traceback
from datetime import UTC, datetime
from typing import Any, Final

import attrs
import trio

from . import _codec, telemetry
from ._batch import BATCH_ID, CALLBACK
from ._crypto import DecryptionError
from ._job import Cancel, Discard, Job, JobState, Snooze
from ._relay import META_REF, META_RESULT, REASON_LIMIT, Notice
from ._worker import Worker, args_json, lookup
from ._workflow import WORKFLOW_ID

log = logging.getLogger("trioban.executor")

_TRACEBACK_LIMIT: Final = 8000
_FINAL_STATES: Final = frozenset({"completed", "cancelled", "discarded"})


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
    """The worker called ``name``, importing its module once if it isn't registered yet."""
    found = lookup(name)
    if found is not None or "." not in name:
        return found
    module = name.rsplit(".", 1)[0]
    try:
        await trio.to_thread.run_sync(importlib.import_module, module)
    except Exception as exc:
        log.warning("cannot import %s for worker %s: %s", module, name, exc)
    return lookup(name)


def _error(job: Job, text: str) -> str:
    at = datetime.now(UTC).replace(tzinfo=None).isoformat()
    return _codec.dumps({"at": at, "attempt": job.attempt, "error": text[:_TRACEBACK_LIMIT]})


def _exception_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


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
    worker = await resolve(job.worker)
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
        return _failed(job, str(exc), backoff=worker.backoff(job.attempt))
    except ValueError as exc:
        return _failed(job, f"{exc}; the job was inserted with args its worker rejects", final=True)
    if worker.timeout is not None:
        running.scope.deadline = trio.current_time() + worker.timeout
    try:
        with running.scope:
            result = await worker.perform(prepared)
    except Exception as exc:
        if running.reraise:
            raise
        job = running.job  # the latest claim (see Running.job)
        return _failed(job, _exception_text(exc), backoff=worker.backoff(job.attempt))
    job = running.job
    if running.scope.cancelled_caught:
        if running.cancel_reason is not None:
            return _ended(job, "cancelled", running.cancel_reason)
        text = f"TimeoutError: job exceeded its worker's timeout of {worker.timeout}s"
        return _failed(job, text, backoff=worker.backoff(job.attempt))
    return _outcome(job, worker, result)


def _outcome(job: Job, worker: Worker, result: Any) -> Ack:
    if isinstance(result, Cancel):
        return _ended(job, "cancelled", result.reason)
    if isinstance(result, Discard):
        return _ended(job, "discarded", result.reason)
    if isinstance(result, Snooze):
        return _ack(job, "scheduled", schedule_in=result.seconds, extra_attempts=1)
    ref = job.meta.get(META_REF)
    # Workflow steps keep their results for the steps downstream (workflow_results).
    if ref is None and not worker.recorded and WORKFLOW_ID not in job.meta:
        return _ack(job, "completed")
    try:
        data = worker.dump_result(result)
        meta = _codec.dumps({META_RESULT: data})
    except Exception as exc:  # a result that won't serialise fails the job, not the node
        text = f"the result of {worker.name} is not JSON-serialisable: {exc}"
        return _failed(job, text, backoff=worker.backoff(job.attempt))
    limit = worker.recorded_limit
    if limit is not None and len(meta) > limit:
        text = (
            f"the result of {worker.name} is {len(meta)} bytes of JSON, over its recorded "
            f"limit of {limit}; return less or raise the limit with @worker(recorded=<bytes>)"
        )
        return _failed(job, text, backoff=worker.backoff(job.attempt))
    return _ack(job, "completed", meta=meta, result=data)


def _failed(job: Job, text: str, *, backoff: float = 0.0, final: bool = False) -> Ack:
    if final or job.attempt >= job.max_attempts:
        ack = _ended(job, "discarded", text)
    else:
        ack = _ack(
            job, "retryable", schedule_in=max(0.0, backoff), error=_error(job, text), reason=text
        )
    return attrs.evolve(ack, error=text)


def _ended(job: Job, state: str, reason: str) -> Ack:
    return _ack(job, state, error=_error(job, reason), reason=reason)


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
        relay = (str(ref), Notice(state, relayed, reason[:REASON_LIMIT]))
    assert job.attempted_at is not None
    job_id = _job_id(job)
    # Written out by hand (the hot path of every job): ints, a state name and an ISO time need
    # no escaping; error and meta are JSON texts already.
    text = (
        f'{{"id":{job_id:d},'
        # The fence: the ack applies only to the attempt that produced it.
        f'"attempted_at":"{job.attempted_at.replace(tzinfo=None).isoformat()}",'
        f'"state":"{state}",'
        f'"schedule_in":{"null" if schedule_in is None else _codec.dumps(schedule_in)},'
        f'"extra_attempts":{extra_attempts:d},'
        f'"error":{error or "null"},"meta":{meta or "null"}}}'
    )
    workflow = job.meta.get(WORKFLOW_ID)
    batch = None if CALLBACK in job.meta else job.meta.get(BATCH_ID)
    return Ack(
        id=job_id,
        state=state,
        json=text,
        workflow=None if workflow is None else str(workflow),
        batch=None if batch is None else str(batch),
        result=result,
        relay=relay,
    )


def _job_id(job: Job) -> int:
    assert job.id is not None
    return job.id
