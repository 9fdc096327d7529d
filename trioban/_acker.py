"""The acker: writes job outcomes in batches, one statement per batch.

Each write runs in a shielded, time-bounded scope, so cancellation can't tear a batch in half;
a failed write is retried with backoff until it succeeds or the instance is torn down.
Batching is natural: while one batch is being written, the next accumulates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final

import trio

from . import _codec, _store, telemetry
from ._relay import build_notice

if TYPE_CHECKING:
    from ._executor import Ack
    from ._pg import Pool
    from ._relay import Registry

log = logging.getLogger("trioban.acker")

BUFFER: Final = 10_000
"""Acks waiting to be written before job tasks wait for the acker (~2 MB at most)."""
BATCH: Final = 1_000
WRITE_TIMEOUT: Final = 10.0
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
        self.written = 0

    async def send(self, ack: Ack) -> None:
        """Queue ``ack`` for writing (shielded: a finished job's outcome is never dropped)."""
        try:
            self._send.send_nowait(ack)  # the common case: room in the buffer, no scope needed
        except trio.WouldBlock:
            with trio.CancelScope(shield=True):
                await self._send.send(ack)

    def close(self) -> None:
        """No more acks: ``run`` writes what is queued, then returns."""
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until ``close()`` and the queue is empty."""
        task_status.started()
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._write(batch)
                await self._settle(batch)

    async def _settle(self, batch: list[Ack]) -> None:
        settling = [ack for ack in batch if ack.workflow or ack.batch]
        if not settling:
            return
        try:
            await self._after_write(settling)
        except Exception as exc:
            # The leader's sweep settles workflows later; the acks themselves are written.
            log.warning("settling workflows/batches after acks failed (%s)", exc)

    async def _write(self, batch: list[Ack]) -> None:
        # Outcomes of relays waiting here are handed over once written, not published.
        local = [ack for ack in batch if ack.relay and self._relays.waiting(ack.relay[0])]
        here = {ack.id for ack in local}
        texts = [ack_json(ack, publish=ack.id not in here) for ack in batch]
        delay = 0.05
        while True:
            # Each attempt is shielded and bounded; the pause between attempts is not, so a
            # shutdown during an outage ends here and the jobs stay `executing` for rescue.
            with trio.move_on_after(WRITE_TIMEOUT, shield=True):
                started = time.perf_counter()
                try:
                    written = await _store.ack(self._pool, self._prefix, texts)
                except Exception as exc:
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
                self._relays.offer(*ack.relay)


def ack_json(ack: Ack, *, publish: bool) -> str:
    """The ack as the ack statement takes it; with ``publish``, a relayed job's ack carries the
    notice the statement publishes."""
    if ack.relay is None or not publish:
        return ack.json
    ref, notice = ack.relay
    text = build_notice(ref, ack.id, notice.state, result=notice.result, reason=notice.reason)
    return f'{ack.json[:-1]},"notice":{_codec.dumps(text)}}}'
