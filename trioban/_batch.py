"""Batches: a group of jobs with callbacks when the group reaches a condition.

The callback worker is a class worker with one or more ``handle_*`` methods. After a batch
job is acked, the acking node checks the batch; each condition reached enqueues its callback
once, guarded by a unique key (batch id + callback), so concurrent acks on several nodes still
enqueue it exactly once.

A callback job has the callback worker's queue, max_attempts, priority and tags, and its args
are ``callback_args`` as that worker's own ``new()`` stores them: encrypted for a worker with
``encrypted=``, checked against (and given to the handler as) the worker's ``args=`` class.
They are built once, when the ``Batch`` is made, and travel in each batch job's meta, so any
node can enqueue the callbacks without importing the worker.

Conditions, over the batch's jobs (not its callbacks, nor a unique duplicate of a job outside
the batch: that is never inserted, so never one of them):
  handle_attempted  every job was attempted at least once (or finished without running)
  handle_exhausted  every job finished: completed, cancelled or discarded
  handle_completed  every job completed
  handle_discarded  every job finished and at least one was discarded
  handle_cancelled  every job finished and at least one was cancelled
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any, Final, final

from ._job import Job, evolve
from ._validate import check_json_object, check_own_keys
from ._worker import Worker

BATCH_ID: Final = "batch_id"
CALLBACK: Final = "callback"
CALLBACKS: Final = "batch_callbacks"
CALLBACK_WORKER: Final = "batch_worker"
CALLBACK_QUEUE: Final = "batch_queue"
CALLBACK_ARGS: Final = "batch_args"
CALLBACK_OPTIONS: Final = "batch_options"  # the callback worker's max_attempts, priority, tags
JOB_KEYS: Final = (CALLBACKS, CALLBACK_WORKER, CALLBACK_QUEUE, CALLBACK_ARGS, CALLBACK_OPTIONS)
"""The meta keys a batch job gets from its batch (beside ``BATCH_ID``, which new() refuses)."""
HANDLERS: Final = (
    "handle_attempted",
    "handle_exhausted",
    "handle_completed",
    "handle_discarded",
    "handle_cancelled",
)


@final
class Batch:
    """Jobs grouped under one id, with ``callback``'s ``handle_*`` methods run as jobs.

    ``Batch(callback=MyBatchWorker, callback_args={...}).add(job).add(job)``; insert it with
    ``oban.insert_all(batch)``. ``callback_args`` must suit ``callback.new()`` (a worker with
    ``args=Cls`` takes a ``Cls`` or a dict shaped like one); bad ones raise here.

    The batch is the jobs it inserts: a unique job that duplicates an existing one isn't
    inserted, so isn't in it. A batch left no job that way is refused, like an empty one.
    """

    def __init__(
        self,
        jobs: Iterable[Job] = (),
        *,
        callback: Worker | None = None,
        callback_args: Any = None,
        batch_id: str | None = None,
    ) -> None:
        if batch_id is not None and (not isinstance(batch_id, str) or not batch_id):
            raise TypeError(f"expected batch_id to be a non-empty str, got {batch_id!r}")
        self.batch_id = batch_id or uuid.uuid4().hex
        self.callbacks: tuple[str, ...] = ()
        self.callback = callback
        if callback is not None:
            if not isinstance(callback, Worker) or not isinstance(callback.target, type):
                raise TypeError(
                    f"expected callback to be a class worker (@worker on a class), got {callback!r}"
                )
            self.callbacks = tuple(h for h in HANDLERS if hasattr(callback.target, h))
            if not self.callbacks:
                raise TypeError(f"callback {callback.name} defines none of {', '.join(HANDLERS)}")
            # Stored as the worker stores its own jobs' args (encrypted, structured), so the
            # callback job runs through the worker's prepare() like any other job.
            try:
                built = callback.new(callback_args, unique=False)
            except (TypeError, ValueError) as exc:
                exc.add_note(f"(building the callback_args of a batch for {callback.name})")
                raise
            self._stored_args = built.args
            self._options = {
                "max_attempts": built.max_attempts,
                "priority": built.priority,
                "tags": list(built.tags),
            }
        else:
            self._stored_args = check_json_object(callback_args or {}, "callback_args")[0]
        self.callback_args: Any = {} if callback_args is None else callback_args
        self._jobs: list[Job] = []
        if isinstance(jobs, Job) or not isinstance(jobs, Iterable):
            raise TypeError(f"expected Batch(jobs=) to be a list of unsaved Jobs, got {jobs!r}")
        for job in jobs:
            self.add(job)

    def __repr__(self) -> str:
        return f"<trioban.Batch {self.batch_id} jobs={len(self._jobs)}>"

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> Batch:
        """Add an unsaved job; returns the batch."""
        if not isinstance(job, Job) or job.saved:
            raise TypeError(f"expected an unsaved Job (from Worker.new), got {job!r}")
        check_own_keys(job.meta, JOB_KEYS, f"a job of batch {self.batch_id}", "the batch")
        self._jobs.append(job)
        return self

    def build(self) -> list[Job]:
        """The jobs to insert, each carrying the batch id and its callbacks."""
        if not self._jobs:
            raise ValueError(f"batch {self.batch_id} has no jobs; add some with .add()")
        extra: dict[str, Any] = {BATCH_ID: self.batch_id}
        if self.callback is not None:
            extra |= {
                CALLBACKS: list(self.callbacks),
                CALLBACK_WORKER: self.callback.name,
                CALLBACK_QUEUE: self.callback.queue,
                CALLBACK_ARGS: dict(self._stored_args),
                CALLBACK_OPTIONS: self._options,
            }
        return [evolve(job, meta={**job.meta, **extra}) for job in self._jobs]
