"""A producer: runs one queue on this node within its concurrency limit.

It fetches when started and when woken (an insert notification for its queue, the stager's
tick, a finished job or a released slot while more may be waiting), claims up to its free slots
with ``FOR UPDATE SKIP LOCKED``, and runs each job in its own task and cancel scope inside the
producer's nursery.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from . import _store, telemetry
from ._ack import handed_back
from ._executor import Running, execute
from ._worker import CURRENT

if TYPE_CHECKING:
    from ._acker import Acker
    from ._job import Job
    from ._pg import Pool
    from ._worker import Relayer

log = logging.getLogger("trioban.producer")

OVERTAKEN_KEPT: Final = 1_000
"""Cancel signals kept for runs not started here (yet): a cancel that waited on a fetch's row
lock can reach the producer before that fetch's result does."""

FETCH_TIMEOUT: Final = 10.0
"""Seconds a fetch may take. Once sent, a fetch is shielded: the server may already have
committed its claim, so neither a stop nor a shutdown cuts it off, only this bound (the jobs
such a fetch may have claimed then wait, executing, for the lifeline)."""


@attrs.frozen
class QueueInfo:
    """A queue's state on one node, as ``check_queue`` reports it."""

    queue: str
    node: str
    limit: int
    paused: bool
    running: tuple[int, ...]


class Producer:
    """The runner of one queue on this node."""

    def __init__(
        self,
        *,
        pool: Pool,
        acker: Acker,
        prefix: str,
        node: str,
        queue: str,
        limit: int,
        instance: Relayer | None = None,
    ) -> None:
        self.queue = queue
        self.limit = limit
        self.paused = False
        self.uuid = str(uuid.uuid4())
        self.running: dict[int, Running] = {}
        self._pool = pool
        self._acker = acker
        self._prefix = prefix
        self._node = node
        self._instance = instance  # what ``current_instance()`` is in this queue's jobs
        self._wakeup = trio.Event()
        # Set once no job runs and no fetch is in flight; replaced only when set, so a
        # ``wait_idle`` waiting on it is woken however many jobs start meanwhile.
        self._idle = trio.Event()
        self._fetching = False
        self._more = True  # jobs may be waiting: a wakeup or a freed slot should fetch
        self._wakes = 0  # counts wakeups, so one that lands during a fetch isn't lost
        self._stopping = False
        self._jobs: trio.Nursery | None = None
        self._context = contextvars.Context()  # run()'s, where its jobs start
        self._cut_off: list[int] = []  # jobs cancelled from outside, unacked: left executing
        self._reserved = 0  # slots promised to jobs being inserted here (claim on insert)
        # Reasons of cancel signals for runs (job id, claimed at) not running here, oldest first.
        self._overtaken: dict[tuple[int, datetime], str] = {}

    def info(self) -> QueueInfo:
        """This queue's limit, pause state and running job ids."""
        running = tuple(sorted(self.running))
        return QueueInfo(self.queue, self._node, self.limit, self.paused, running)

    def wake(self, _payload: Any = None) -> None:
        """Fetch soon (an insert notification, a stager tick)."""
        self._more = True
        self._wakes += 1
        self._wakeup.set()

    def stop(self) -> None:
        """Stop fetching; running jobs go on."""
        self._stopping = True
        self._wakeup.set()

    async def wait_idle(self) -> None:
        """Wait until no job of this producer is running and no fetch is in flight."""
        while self.running or self._fetching:
            await self._idle.wait()
        await trio.lowlevel.checkpoint()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.wake()

    def scale(self, limit: int) -> None:
        self.limit = limit
        self.wake()

    def cancel_job(self, job_id: int, reason: str, claimed_at: datetime | None = None) -> bool:
        """Cancel a running job through its scope; False if it isn't running here.

        The run claimed at ``claimed_at`` that isn't running yet is cancelled as it starts:
        its fetch may still be on its way.
        """
        running = self.running.get(job_id)
        if running is None:
            if claimed_at is not None:
                self._overtaken[(job_id, claimed_at)] = reason
                if len(self._overtaken) > OVERTAKEN_KEPT:
                    del self._overtaken[next(iter(self._overtaken))]
            return False
        running.cancel_reason = reason
        running.scope.cancel()
        return True

    def reserve(self, count: int) -> int:
        """Slots for up to ``count`` jobs this node is inserting, to claim as they are inserted.

        Only while the queue looks drained (the last fetch found fewer jobs than it asked
        for), so a job claimed this way never jumps ahead of jobs already waiting.
        """
        if not self.claimable:
            return 0
        granted = max(0, min(count, self.limit - len(self.running) - self._reserved))
        self._reserved += granted
        return granted

    @property
    def claimable(self) -> bool:
        """Whether jobs inserted here may be claimed now: running, not paused, queue drained."""
        return not (self.paused or self._stopping or self._more or self._jobs is None)

    def release(self, count: int) -> None:
        """Give back reserved slots (the insert failed); fetch if jobs may be waiting for them."""
        self._reserved -= count
        if self._more and not self._stopping:
            self._wakeup.set()

    def adopt(self, jobs: list[Job]) -> None:
        """Run jobs claimed for this producer as they were inserted (reserved slots)."""
        self._reserved -= len(jobs)
        if self._jobs is None or self._stopping:
            # Inserted claimed as the queue stopped: never started, so handed back.
            for job in jobs:
                self._acker.send_nowait(handed_back(job))
            return
        for job in jobs:
            self._start(self._jobs, job)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch and run jobs until ``stop()``, then return once no job is running.

        Started once the jobs already waiting are fetched. ``abandon()`` cancels the jobs still
        running; they stay ``executing`` for the lifeline.
        """
        # Jobs start in this task's context, even those claimed on insert (started from the
        # inserting task): a caller's context (a tenant, a trace span) never reaches them.
        self._context = contextvars.copy_context()
        try:
            async with trio.open_nursery() as jobs:
                self._jobs = jobs
                await self._fetch(jobs)  # nothing else wakes a queue started at run time
                task_status.started()
                while not self._stopping:
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    await self._fetch(jobs)
                await self.wait_idle()
        finally:
            self._stopping = True  # jobs claimed on insert from now on are handed back
            self._jobs = None
            if self._cut_off:  # past the grace (abandon), or the instance's exit was cancelled
                ids = sorted(self._cut_off)
                log.warning(
                    "queue %s: %d jobs left executing for rescue: %s", self.queue, len(ids), ids
                )

    def abandon(self) -> None:
        """Cancel every running job (after a stop's grace period); they are not acked, and
        ``run`` logs them as it returns."""
        if self._jobs is not None:
            self._jobs.cancel_scope.cancel()

    async def _fetch(self, jobs: trio.Nursery) -> None:
        demand = self.limit - len(self.running) - self._reserved
        if self._stopping or self.paused or demand <= 0 or not self._more:
            return
        wakes = self._wakes
        self._fetching = True
        self._busy()
        try:
            fetched = await self._claim(demand)
            if fetched is None:
                return
            self._more = len(fetched) == demand or self._wakes != wakes
            if self._stopping:
                # stop() came while the claim was in flight. Nothing starts once stopping
                # (the grace may already be over): the jobs go back to available with their
                # attempt given back, rather than wait, executing, for the lifeline. (One still
                # running here, whose claim a crash lost, keeps running under the new claim.)
                for job in fetched:
                    if job.id in self.running:
                        self._start(jobs, job)
                    else:
                        await self._acker.send(handed_back(job))
                return
            for job in fetched:
                self._start(jobs, job)
        finally:
            self._fetching = False
            self._maybe_idle()

    async def _claim(self, demand: int) -> list[Job] | None:
        """Up to ``demand`` jobs claimed for this producer; None if the fetch failed."""
        started = time.perf_counter()
        with trio.move_on_after(FETCH_TIMEOUT, shield=True):  # see FETCH_TIMEOUT
            try:
                fetched = await _store.fetch(
                    self._pool, self._prefix, self.queue, demand, self._node, self.uuid
                )
            except Exception as exc:
                log.warning(
                    "queue %s: fetch failed (%s); the stager's tick will retry", self.queue, exc
                )
                return None
            if telemetry.enabled("producer.fetch"):
                measurements = {"duration": time.perf_counter() - started, "count": len(fetched)}
                telemetry.emit(
                    "producer.fetch", measurements, {"queue": self.queue, "node": self._node}
                )
            return fetched
        log.warning("queue %s: fetch cut off after %gs; retrying", self.queue, FETCH_TIMEOUT)
        return None

    def _start(self, jobs: trio.Nursery, job: Job) -> None:
        assert job.id is not None
        already = self.running.get(job.id)
        if already is not None:
            # Still running here, claimed again after a crash lost the first claim.
            already.job = job
            return
        running = Running(job, trio.CancelScope())
        if job.attempted_at is not None:
            reason = self._overtaken.pop((job.id, job.attempted_at), None)
            if reason is not None:  # cancelled before its fetch came back: it never runs
                running.cancel_reason = reason
                running.scope.cancel()
        try:
            self._context.run(jobs.start_soon, self._execute, running)
        except RuntimeError:
            # The nursery has closed (a cancelled exit) before run() could say it stopped:
            # the job never started, so it is handed back.
            self._acker.send_nowait(handed_back(job))
            return
        self.running[job.id] = running
        self._busy()

    async def _execute(self, running: Running) -> None:
        if self._instance is not None:
            # Jobs start in a copy of run()'s context, its starter's: open()'s, or a
            # start_queue() caller's, which may be another instance's job. A job sees the
            # instance that runs it.
            CURRENT.set(self._instance)
        job_id = running.job.id
        assert job_id is not None
        try:
            ack = await execute(running)
            await self._acker.send(ack)
        except trio.Cancelled:
            self._cut_off.append(job_id)  # not by its own scope: the job ends unacked
            raise
        finally:
            del self.running[job_id]
            self._maybe_idle()
        if self._more and not self._stopping:
            self._wakeup.set()

    def _busy(self) -> None:
        if self._idle.is_set():
            self._idle = trio.Event()

    def _maybe_idle(self) -> None:
        if not self.running and not self._fetching:
            self._idle.set()


class Producers(dict[str, Producer]):
    """This node's producers by queue, and the stopped ones whose jobs still run (``draining``).

    The heartbeat beats both: a stopped producer vouches for its jobs until its ``run``
    returns, so the lifeline doesn't rescue (and another node run again) a job still running
    in its grace period.
    """

    def __init__(self) -> None:
        super().__init__()
        self.draining: set[Producer] = set()

    def beating(self) -> list[Producer]:
        """The producers that heartbeat: every one running here, stopped or not."""
        return [*self.values(), *self.draining]
