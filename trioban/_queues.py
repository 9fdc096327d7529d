"""This node's queues: a producer per queue, run in one nursery, steered by signals.

``Queues`` starts and stops producers, applies queue signals (pause, resume, scale, start,
stop, pkill) whichever node sent them, wakes producers on insert notifications and claims
jobs on insert for queues with free slots.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Final, TypeAlias, final

import outcome
import trio

from . import _codec, _pg
from ._acker import Acker
from ._errors import TriobanError
from ._inserter import Settle
from ._job import Job, JobState, as_inserted, evolve
from ._notifier import Notifier
from ._producer import Producer, Producers
from ._validate import valid_queue_limit, valid_queue_name
from ._worker import Relayer, args_json

log = logging.getLogger("trioban.queues")

SIGNAL: Final = "signal"
"""The notifier channel of queue signals."""

Claims: TypeAlias = dict[Producer, list[tuple[int, Job]]]
"""Jobs claimed on insert, by producer: each one's index in the batch, and the job as built."""


@final
class Queues:
    """The producers of one instance, by queue name."""

    def __init__(
        self,
        work_pool: _pg.Pool,
        acker: Acker,
        notifier: Notifier,
        prefix: str,
        node: str,
        instance: Relayer,
    ) -> None:
        self._work_pool = work_pool
        self._instance = instance  # what current_instance() is in the jobs run here
        self._acker = acker
        self._notifier = notifier
        self._prefix = prefix
        self._node = node
        self.producers = Producers()
        self._woken_by_inserts = False  # subscribed to the insert channel (runs a queue)
        self._nursery: trio.Nursery | None = None  # where producers run, while open
        self._closed = False  # serve() has ended: the instance has closed
        self._grace = 0.0

    def check_open(self) -> None:
        """Raise ``TriobanError`` once the instance has closed (its queues are gone)."""
        if self._closed:
            raise TriobanError(
                "this trioban instance has closed; use its queue methods inside "
                "`async with trioban.open(conf) as oban:`"
            )

    def get(self, queue: str) -> Producer:
        """The producer of ``queue``; ValueError naming the queues here if it doesn't run."""
        self.check_open()
        producer = self.producers.get(queue)
        if producer is None:
            known = ", ".join(sorted(self.producers)) or "none (an insert-only instance)"
            raise ValueError(f"queue {queue!r} does not run on this node; its queues: {known}")
        return producer

    def add(self, queue: str, limit: int) -> Producer:
        """A new producer for ``queue``, registered (started by ``serve`` or ``start``)."""
        producer = Producer(
            pool=self._work_pool,
            acker=self._acker,
            prefix=self._prefix,
            node=self._node,
            queue=queue,
            limit=limit,
            instance=self._instance,
        )
        if not self.producers and not self._woken_by_inserts:
            # Only a node running queues listens for inserts: an insert-only node would
            # otherwise be sent back a notification for each of its own inserts.
            self._notifier.subscribe("insert", self._on_insert)
            self._woken_by_inserts = True
        self.producers[queue] = producer
        return producer

    async def start(self, queue: str, limit: int) -> None:
        """Start running ``queue`` here; the producer has fetched once when this returns."""
        if self._nursery is None:
            raise TriobanError("the instance is not running")
        await self._nursery.start(self._run, self.add(queue, limit))

    @asynccontextmanager
    async def serve(self, grace: float) -> AsyncIterator[None]:
        """Run the registered producers; on exit stop them, giving jobs ``grace`` seconds."""
        self._grace = grace
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for producer in list(self.producers.values()):
                await nursery.start(self._run, producer)
            try:
                yield
            finally:
                self._nursery = None
                self._closed = True
                # Shielded, and bounded by the grace: a cancelled exit too runs the whole stop,
                # and the jobs it cut off (cancelled with it) are reported as left executing.
                with trio.CancelScope(shield=True):
                    await stop(self.producers.values(), grace)

    def claim(self, jobs: list[Job]) -> tuple[list[Job], Claims]:
        """Claim on insert: jobs for a queue this node runs, with free slots and nothing
        waiting, are inserted already claimed by its producer and run at once, skipping the
        notification and fetch round trips. Returns the jobs and each producer's claims (the
        index of each claimed job, and the job)."""
        claims: Claims = {}
        if not self.producers:
            return jobs, claims
        claimed = list(jobs)
        # Free slots go to the most urgent jobs first, as a fetch would give them.
        for index, job in sorted(enumerate(jobs), key=lambda pair: pair[1].priority):
            producer = self.producers.get(job.queue)
            if producer is None or job.state is not JobState.AVAILABLE or job.scheduled_at:
                continue
            if producer.reserve(1):
                claimed[index] = evolve(job, attempted_by=(self._node, producer.uuid))
                claims.setdefault(producer, []).append((index, job))
        return claimed, claims

    def wake_for(self, saved: Sequence[Job]) -> None:
        """Wake the producers of the available jobs this node has just inserted (committed).

        They learn of the jobs at once rather than when the insert notification comes back,
        so a job inserted here next can't be claimed on insert ahead of them.
        """
        if not self.producers:
            return
        for queue in {job.queue for job in saved if job.state is JobState.AVAILABLE}:
            self._wake(queue)

    def apply(self, message: dict[str, Any]) -> None:
        """Apply a queue signal meant for this node (or for every node)."""
        if message.get("node") not in (None, self._node):
            return
        if message.get("action") == "pkill":
            reason = str(message.get("reason", "cancelled"))
            job_ids = message.get("job_ids")
            if not isinstance(job_ids, list):
                log.warning("ignored a cancel signal without a list of job ids: %.200r", message)
                return
            for job_id, claimed_at in zip(job_ids, _claims(message, len(job_ids)), strict=True):
                if type(job_id) is not int:  # from a bug, or a user's own signal: the rest go on
                    log.warning("ignored a job id that isn't an integer: %.200r", job_id)
                    continue
                for producer in self.producers.beating():  # a stopped queue's jobs too
                    producer.cancel_job(job_id, reason, claimed_at)
            return
        queue, limit = message.get("queue"), message.get("limit")
        if not valid_queue_name(queue) or (limit is not None and not valid_queue_limit(limit)):
            # From another node, of another version or a bug: nothing to act on here.
            log.warning("ignored a queue signal with a bad queue or limit: %.200r", message)
            return
        self._steer(str(message.get("action")), queue, limit)

    def wake_all(self) -> None:
        """Make every producer fetch now (after the notifier missed notifications)."""
        for producer in self.producers.values():
            producer.wake()

    def _steer(self, action: str, queue: str, limit: int | None) -> None:
        target = self.producers.get(queue)
        if action == "start" and target is None and limit and self._nursery is not None:
            self._nursery.start_soon(self._run, self.add(queue, limit))
        if target is None:
            return
        if action == "pause":
            target.pause()
        elif action == "resume":
            target.resume()
        elif action == "scale" and limit:
            target.scale(limit)
        elif action == "stop" and self._nursery is not None:
            # No longer this queue's producer (the queue may be started again at once: the
            # new producer waits for this one's jobs, see _run), but it heartbeats for its
            # running jobs until its run returns.
            del self.producers[queue]
            self.producers.draining.add(target)
            target.stop()  # now: no job starts once stop_queue() has returned
            self._nursery.start_soon(stop, [target], self._grace)

    def _on_insert(self, payload: Any) -> None:
        self._wake(str(payload.get("queue") if isinstance(payload, dict) else None))

    def _wake(self, queue: str) -> None:
        producer = self.producers.get(queue)
        if producer is not None:
            producer.wake()

    async def _run(
        self, producer: Producer, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            # A queue started again while its stopped producer's jobs run: they hold its
            # slots until they end (or their grace does), so the limit holds.
            for old in [p for p in self.producers.draining if p.queue == producer.queue]:
                await old.wait_idle()
            if self._notifier.connected:  # no insert after its first fetch goes unnoticed
                await self._notifier.wait_listening(["insert"])
            await producer.run(task_status=task_status)
        finally:
            self.producers.draining.discard(producer)
            if self.producers.get(producer.queue) is producer:
                del self.producers[producer.queue]


def settle_claims(claims: Claims) -> Settle:
    """The inserter's callback for jobs claimed on insert: once the insert's outcome is known,
    each producer runs its saved jobs, or frees their slots if nothing was inserted."""

    def settle(result: outcome.Outcome[list[Job]] | None) -> None:
        saved = result.value if isinstance(result, outcome.Value) else None
        for producer, claimed in claims.items():
            if saved is None:
                producer.release(len(claimed))
            else:
                producer.adopt([as_fetched(saved[index], job) for index, job in claimed])

    return settle


def as_fetched(saved: Job, built: Job) -> Job:
    """``saved`` (as ``as_inserted`` made it) with the args and meta a fetch would give it:
    decoded from the JSON inserted (``built``'s), not the caller's objects, which the caller
    may still change and which may hold what JSON reshapes (tuples, int keys, big floats)."""
    meta_json = _codec.dumps(built.meta) if built.meta else "{}"
    args, meta = _codec.loads_stored(f"[{args_json(built)},{meta_json}]")  # one decode, both
    # Built, not evolve()d, on the relay hot path: evolve copies every field, at twice the cost.
    return as_inserted(
        saved,
        saved.id,
        saved.state,
        saved.inserted_at,
        saved.scheduled_at,
        saved.attempted_at,
        data=(args, meta),
    )


async def stop(producers: Iterable[Producer], grace: float) -> None:
    """Stop fetching, give running jobs ``grace`` seconds, then abandon what still runs."""
    stopping = list(producers)
    for producer in stopping:
        producer.stop()
    with trio.move_on_after(grace):
        for producer in stopping:
            await producer.wait_idle()
    for producer in stopping:
        producer.abandon()


def _claims(message: dict[str, Any], count: int) -> list[datetime | None]:
    """When each job a cancel signal names was claimed; None where the signal doesn't say
    (one from an older release) or says something else."""
    claims = message.get("claims")
    if not isinstance(claims, list) or len(claims) != count:
        return [None] * count
    return [_timestamp(claim) for claim in claims]


def _timestamp(text: object) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        return None
