"""The acker: writes job outcomes in batches, one statement per batch.

Batching is natural: while one batch is being written, the next accumulates. While PostgreSQL
can't take it for now (unreachable, failing over, overloaded: ``_pg.transient``), a batch is
retried with backoff. A batch refused for any other reason (an ack the statement can't store)
is written one ack at a time, and an ack refused on its own is replaced by a plain
``discarded`` one saying so: one bad ack never holds up the others, and its job isn't rescued
and run again forever.

The acker is shielded from the instance's cancellation, so the outcome of a finished job is
written even when ``open()`` exits with an exception or is cancelled. Shutdown bounds it
(``stop_after``, ``close``): at its deadline it stops, logs the jobs whose acks it didn't write
(they stay ``executing`` for the lifeline) and lets go of job tasks waiting to queue an ack.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final

import trio

from . import _codec, _store, telemetry
from ._ack import unwritable
from ._notice import build_notice
from ._pg import transient

if TYPE_CHECKING:
    from ._ack import Ack
    from ._pg import Pool
    from ._relay import Registry

log = logging.getLogger("trioban.acker")

BUFFER: Final = 10_000
"""Acks waiting to be written before job tasks wait for the acker (~2 MB at most)."""
BATCH: Final = 1_000
WRITE_TIMEOUT: Final = 10.0
DRAIN_TIMEOUT: Final = 10.0
"""Seconds the acker gets at shutdown, after the jobs' ``shutdown_grace``, to write what is
left (a database outage would otherwise hold shutdown forever)."""
_RETRY_MAX: Final = 2.0


class Acker:
    """Owns the ack channel; ``send`` is called by job tasks, ``run`` writes."""

    def __init__(
        self,
        pool: Pool,
        prefix: str,
        after_write: Callable[[Sequence[Ack]], Awaitable[None]],
        relays: Registry,
    ) -> None:
        self._pool = pool
        self._prefix = prefix
        self._after_write = after_write  # settles workflows and batches of written acks
        self._relays = relays  # this instance's relays: their outcomes skip the notifier
        self._send, self._receive = trio.open_memory_channel["Ack"](BUFFER)
        # Shielded for the acker's whole life; shutdown (always reached, in a finally) sets the
        # deadline that ends it.
        self._scope = trio.CancelScope(shield=True)
        # Jobs whose acks are queued or being written: still this node's (set, not counter:
        # a job has one ack in flight at a time).
        self._unwritten: set[int] = set()
        self.written = 0

    def unwritten(self) -> set[int]:
        """Ids of the jobs whose acks are queued or being written, not yet committed."""
        return set(self._unwritten)

    async def send(self, ack: Ack) -> None:
        """Queue ``ack`` for writing (shielded: a finished job's outcome isn't dropped on
        cancellation; only once the acker has stopped, and then it is logged)."""
        self._unwritten.add(ack.id)
        try:
            try:
                self._send.send_nowait(ack)  # the common case: room in the buffer, no scope
            except trio.WouldBlock:
                # Waits for room; the acker's deadline at shutdown ends the wait.
                with trio.CancelScope(shield=True):
                    await self._send.send(ack)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if ack.id in self._unwritten:  # not yet reported by _give_up
                self._unwritten.discard(ack.id)
                log.error(
                    "job %d finished after the acker stopped: its outcome is not written and "
                    "it stays executing for the lifeline",
                    ack.id,
                )

    def send_nowait(self, ack: Ack) -> None:
        """Queue ``ack`` if the buffer has room; otherwise log that its job is left
        ``executing`` for the lifeline (for callers that can't wait)."""
        try:
            self._send.send_nowait(ack)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            log.warning("job %d: no room to queue its ack; left for the lifeline", ack.id)
        else:
            self._unwritten.add(ack.id)

    def stop_after(self, grace: float) -> None:
        """Shutdown has begun and jobs get ``grace`` seconds: the acker stops ``DRAIN_TIMEOUT``
        seconds after that, written or not."""
        self._stop_by(trio.current_time() + grace + DRAIN_TIMEOUT)

    def close(self) -> None:
        """No more acks: ``run`` writes what is queued (for ``DRAIN_TIMEOUT`` at most), then
        returns."""
        self._send.close()
        self._stop_by(trio.current_time() + DRAIN_TIMEOUT)

    def _stop_by(self, deadline: float) -> None:
        self._scope.deadline = min(self._scope.deadline, deadline)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until ``close()`` and the queue is empty, or the deadline passes."""
        try:
            with self._scope:
                task_status.started()
                async for first in self._receive:
                    batch = [first]
                    while len(batch) < BATCH:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    written = await self._write(batch)
                    self._unwritten.difference_update(ack.id for ack in batch)
                    await self._settle(written)
        finally:
            self._give_up()

    def _give_up(self) -> None:
        # Job tasks still waiting to queue an ack get BrokenResourceError; the buffer goes.
        self._receive.close()
        if self._unwritten:
            ids = sorted(self._unwritten)
            self._unwritten.clear()
            log.error(
                "the acker stopped with %d job outcomes unwritten (shutdown deadline); those "
                "jobs stay executing for the lifeline to rescue: %s",
                len(ids),
                ids,
            )

    async def _settle(self, batch: list[Ack]) -> None:
        settling = [ack for ack in batch if ack.workflow or ack.batch]
        if not settling:
            return
        try:
            await self._after_write(settling)
        except Exception as exc:
            # The leader's sweep settles workflows later; the acks themselves are written.
            log.warning("settling workflows/batches after acks failed (%s)", exc)

    async def _write(self, batch: list[Ack]) -> list[Ack]:
        """Write ``batch``; returns the acks written (a refused one replaced, or left out)."""
        try:
            await self._write_batch(batch)
        except Exception as exc:
            if len(batch) == 1:
                return await self._write_instead(batch[0], exc)
            log.warning("writing %d acks failed (%s); writing them one by one", len(batch), exc)
            written: list[Ack] = []
            for ack in batch:
                written += await self._write([ack])
            return written
        return batch

    async def _write_instead(self, ack: Ack, exc: Exception) -> list[Ack]:
        """Write a plain ``discarded`` ack for the job of ``ack``, which PostgreSQL refused."""
        log.error("job %d: its outcome (%s) can't be written (%r)", ack.id, ack.state, exc)
        replacement = unwritable(ack, f"{type(exc).__name__}: {exc}")
        try:
            await self._write_batch([replacement])
        except Exception as again:
            log.error("job %d: not written as discarded either (%r)", ack.id, again)
            return []
        return [replacement]

    async def _write_batch(self, batch: list[Ack]) -> None:
        """Write ``batch`` in one statement, retrying while PostgreSQL can't be reached; an
        error of any other kind is raised."""
        # Outcomes of relays waiting here are handed over once written, not published.
        local = [ack for ack in batch if ack.relay and self._relays.waiting(ack.relay[0])]
        here = {ack.id for ack in local}
        texts = [ack_json(ack, publish=ack.id not in here) for ack in batch]
        delay = 0.05
        while True:
            # The acker's own scope shields the attempt from the instance's cancellation.
            with trio.move_on_after(WRITE_TIMEOUT):
                started = time.perf_counter()
                try:
                    written = await _store.ack(self._pool, self._prefix, texts)
                except Exception as exc:
                    if not transient(exc):
                        raise
                    log.warning("writing %d acks failed (%s); retrying", len(batch), exc)
                else:
                    self.written += len(batch)
                    elapsed = time.perf_counter() - started
                    telemetry.emit("acker.write", {"duration": elapsed, "count": len(batch)}, {})
                    self._hand_over(local, written)
                    return
            await trio.sleep(delay)
            delay = min(_RETRY_MAX, delay * 2)

    def _hand_over(self, local: list[Ack], written: set[int]) -> None:
        for ack in local:
            if ack.id in written and ack.relay is not None:  # a stale ack hands over nothing
                self._relays.offer(*ack.relay, job_id=ack.id)


def ack_json(ack: Ack, *, publish: bool) -> str:
    """The ack as the ack statement takes it; with ``publish``, a relayed job's ack carries the
    notice the statement publishes."""
    if ack.relay is None or not publish:
        return ack.json
    ref, notice = ack.relay
    text = build_notice(ref, ack.id, notice.state, result=notice.result, reason=notice.reason)
    return f'{ack.json[:-1]},"notice":{_codec.dumps(text)}}}'
