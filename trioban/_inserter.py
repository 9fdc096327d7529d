"""The inserter: concurrent inserts share statements.

Every ``insert``/``insert_all`` outside a caller's transaction is queued here; a few writer tasks
each take everything queued so far and insert it with one statement (one commit, one round
trip), so a thousand tasks inserting at once cost tens of statements, not a thousand. If
PostgreSQL refuses a shared statement, each request is retried alone, so one caller's bad batch
can't fail another's; if it can't be reached, every request fails at once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

import outcome
import trio

from . import _store
from ._errors import TriobanError
from ._pg import transient

if TYPE_CHECKING:
    from ._job import Job
    from ._pg import Pool

log = logging.getLogger("trioban.inserter")

MAX_BATCH: Final = 5_000
"""Jobs per shared statement; a single larger request is inserted on its own."""


Settle = Callable[["outcome.Outcome[list[Job]] | None"], None]


class _Request:
    __slots__ = ("done", "jobs", "result", "settle", "taken")

    def __init__(self, jobs: Sequence[Job], settle: Settle | None) -> None:
        self.jobs = jobs
        self.done = trio.Event()
        self.result: outcome.Outcome[list[Job]] | None = None
        self.settle = settle
        self.taken = False  # by a writer: from then on the insert completes whatever happens

    def finish(self, result: outcome.Outcome[list[Job]]) -> None:
        self.result = result
        if self.settle is not None:
            self.settle(result)
        self.done.set()


class Inserter:
    """Queues insert requests; ``run`` starts the writer tasks."""

    def __init__(self, pool: Pool, prefix: str, writers: int) -> None:
        self._pool = pool
        self._prefix = prefix
        self._writers = writers
        self._queue: deque[_Request] = deque()
        self._idle_writers = trio.lowlevel.ParkingLot()  # writers waiting for requests
        self._inline = False  # a caller is writing its own request
        self._closed = False  # the writers have stopped: nothing queued would be written

    async def insert(self, jobs: Sequence[Job], settle: Settle | None = None) -> list[Job]:
        """Insert ``jobs`` (in a statement shared with concurrent callers); return them saved.

        With nothing queued, the caller writes its own statement; a cancelled caller then
        cancels it on the server (it may have committed already). Otherwise the request
        queues for a writer task: cancelled before a writer takes it, nothing is inserted;
        after, the insert completes without the caller. ``settle(outcome)`` is called once in
        every case (by the writer even when the caller was cancelled), with None when
        nothing is known to be inserted.
        """
        if self._closed:
            if settle is not None:
                settle(None)
            raise _closed_error()
        if not self._queue and not self._inline:
            return await self._write_own(jobs, settle)
        request = _Request(jobs, settle)
        try:
            await trio.lowlevel.checkpoint_if_cancelled()  # already cancelled: don't queue
            self._queue.append(request)
            self._idle_writers.unpark()  # one writer per request: a busy one can't take it
            await request.done.wait()
        except trio.Cancelled:
            # No writer task will finish this request: settle it here (once).
            if not request.taken and request.result is None:
                if request in self._queue:
                    self._queue.remove(request)
                if settle is not None:
                    settle(None)
            raise
        assert request.result is not None
        return request.result.unwrap()

    async def _write_own(self, jobs: Sequence[Job], settle: Settle | None) -> list[Job]:
        # Nothing queued and no caller writing: write from the caller's task (a writer task
        # would cost two trips through the scheduler); inserts arriving meanwhile queue up.
        self._inline = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()  # already cancelled: don't start
            async with self._pool.connection() as conn:
                saved = await _store.insert(conn, self._prefix, jobs)
        except BaseException as exc:
            if settle is not None:
                # Cancelled, nothing is known to be inserted: a claimed job whose insert did
                # commit waits for the lifeline.
                settle(outcome.Error(exc) if isinstance(exc, Exception) else None)
            raise
        finally:
            self._inline = False
        if settle is not None:
            settle(outcome.Value(saved))
        return saved

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writers until cancelled; then the requests still queued fail (nothing of
        them was written), and so does every later insert."""
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self._writers):
                    nursery.start_soon(self._write_loop)
                task_status.started()
        finally:
            self._closed = True
            while self._queue:
                self._queue.popleft().finish(outcome.Error(_closed_error()))

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                await self._idle_writers.park()
                continue
            batch = self._take()
            # Shielded: requests whose callers were cancelled must still get an answer.
            with trio.CancelScope(shield=True):
                await self._write(batch)

    def _take(self) -> list[_Request]:
        batch = [self._queue.popleft()]
        size = len(batch[0].jobs)
        while self._queue and size + len(self._queue[0].jobs) <= MAX_BATCH:
            request = self._queue.popleft()
            batch.append(request)
            size += len(request.jobs)
        for request in batch:
            request.taken = True
        return batch

    async def _write(self, batch: list[_Request]) -> None:
        jobs = [job for request in batch for job in request.jobs]
        try:
            async with self._pool.connection() as conn:
                saved = await _store.insert(conn, self._prefix, jobs)
        except Exception as exc:
            if len(batch) > 1 and not transient(exc):
                log.info("a shared insert failed (%s); inserting its requests one by one", exc)
                for request in batch:
                    await self._write([request])
                return
            # One request, or PostgreSQL unreachable for now: a retry per request would only
            # hold every caller (and shutdown) through its own reconnect attempts.
            for request in batch:
                request.finish(outcome.Error(exc))
            return
        start = 0
        for request in batch:
            end = start + len(request.jobs)
            request.finish(outcome.Value(saved[start:end]))
            start = end


def _closed_error() -> TriobanError:
    return TriobanError(
        "cannot insert: this trioban instance has closed; insert inside "
        "`async with trioban.open(conf) as oban:`"
    )
