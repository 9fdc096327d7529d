"""Relay: await a job's result from any node.

A waiter is registered under a fresh ref before the job is inserted (the ref travels in the
job's meta), so a job that finishes in microseconds can't be missed. The executing node stores
the result with the job and publishes a notice in the same statement as its ack; the notifier
routes it here by ref. When that node is this one, its acker hands the notice over instead,
once the ack is written. A poller re-reads the rows of pending relays at an interval, and at
once after the notifier reconnects, so a missed notice only delays a result.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, final

import outcome
import trio

from ._errors import RelayCancelled, RelayDiscard, RelayError, RelayTimeout
from ._job import Job, evolve
from ._notice import FINAL, META_REF, Notice, notice_from_row
from ._registry import lookup
from ._validate import check_flag

if TYPE_CHECKING:
    from ._pg import Pool

log = logging.getLogger("trioban.relay")

POLL_INTERVAL: Final = 1.0
"""Seconds between polls of pending relays' rows (the fallback for missed notices)."""

_CLOSED: Final = "closed"
"""The state of the notice every waiter gets when the instance closes: no outcome can come."""
_GONE: Final = "gone"
"""The state of the notice a poll gives a waiter whose job has no row (any more)."""
_ENDS_STORED_WAIT: Final = (*FINAL, _CLOSED, _GONE)
"""The notices a "stored" one gives way to: the outcome read from the row, or no outcome."""


def _keeps(held: Notice | None, new: Notice) -> bool:
    """Whether the notice ``held`` stays rather than give way to ``new``. A final one stays;
    one pointing at the row ("stored") gives way only to the final outcome read from the row,
    not to a stale poll that saw the job still retrying."""
    if held is None or held.state not in FINAL:
        return False
    return not held.stored or new.state not in _ENDS_STORED_WAIT


class _Waiter:
    """A per-ref slot holding the latest notice; a final notice is never overwritten.

    Notices are counted rather than taken, so every task awaiting the relay sees each one.
    """

    __slots__ = ("_event", "awaiting", "job_id", "notice", "offers", "owner")

    def __init__(self) -> None:
        self._event: trio.Event | None = None  # made only while a task waits (memory)
        self.notice: Notice | None = None
        self.offers = 0  # how many notices were offered
        self.awaiting = 0  # tasks awaiting the relay: the last to stop discards the waiter
        self.job_id: int | None = None
        self.owner: _Owner | None = None  # the Relay it serves, weakly

    def offer(self, notice: Notice) -> None:
        if _keeps(self.notice, notice):
            return
        self.notice = notice
        self.offers += 1
        if self._event is not None:
            self._event.set()
            self._event = None

    async def take(self, seen: int) -> tuple[Notice, int]:
        """The latest notice once more than ``seen`` were offered, and how many were.

        One already offered is taken even past a deadline: callers check for cancellation
        before they enter their own timeout's scope (``checkpoint_if_cancelled``).
        """
        if self.offers > seen:
            await trio.lowlevel.cancel_shielded_checkpoint()
        while self.offers <= seen:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()
        if self.notice is None:  # unreachable: an offer sets it
            raise AssertionError("a relay notice was counted but not held")
        return self.notice, self.offers


class _Owner(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to a Relay that knows its ref (lighter than weakref.finalize)."""

    __slots__ = ("key",)
    key: str  # the relay's ref


class Registry:
    """Waiters by ref, fed by the notifier and by the poller."""

    def __init__(self, pool: Pool, get_state: Callable[[Pool, list[int]], Any]) -> None:
        self._pool = pool
        self._get_state = get_state
        self._waiters: dict[str, _Waiter] = {}
        # Refs of relays that joined an existing unique job, by job id: its notices carry
        # the ref of the relay that inserted it.
        self._joiners: dict[int, set[str]] = {}
        self._poll_now = trio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._waiters)

    def register(self, ref: str) -> _Waiter:
        waiter = self._waiters.get(ref)
        if waiter is None:
            waiter = self._waiters[ref] = _Waiter()
            if self._closed:
                waiter.offer(Notice(_CLOSED))
        return waiter

    def discard(self, ref: str) -> None:
        waiter = self._waiters.pop(ref, None)
        if waiter is not None and (joined := self._joiners.get(waiter.job_id or 0)):
            joined.discard(ref)
            if not joined:
                del self._joiners[waiter.job_id or 0]

    def join(self, ref: str, job_id: int) -> None:
        """``ref``'s relay follows the existing unique job ``job_id``: route its notices there
        too, and read its row now (it may have finished before anyone joined)."""
        self._joiners.setdefault(job_id, set()).add(ref)
        self.poll_soon()

    def own(self, ref: str, relay: Relay) -> None:
        """Drop ``ref``'s waiter when ``relay`` is collected: one never awaited can't leak."""
        waiter = self._waiters.get(ref)
        if waiter is not None:
            waiter.owner = _Owner(relay, self._forget)
            waiter.owner.key = ref

    def _forget(self, owner: _Owner) -> None:
        self.discard(owner.key)

    def waiting(self, ref: str) -> bool:
        """Whether a relay of this instance waits on ``ref``."""
        return ref in self._waiters

    def offer(self, ref: str, notice: Notice, job_id: int | None = None) -> None:
        """Hand ``notice`` to the relay waiting on ``ref``, if any (a job run on this node),
        and to relays that joined job ``job_id``."""
        refs = self._joiners.get(job_id or 0, ())
        for waiter in (self._waiters.get(key) for key in (ref, *refs)):
            if waiter is not None:
                waiter.offer(notice)

    def deliver(self, payload: Any) -> None:
        """Notifier handler for the relay channel."""
        if not isinstance(payload, dict):
            return
        ref, job_id = payload.get("ref"), payload.get("id")
        if ref not in self._waiters and job_id not in self._joiners:
            return
        notice = Notice(
            state=str(payload.get("state")),
            result=payload.get("result"),
            reason=str(payload.get("reason", "")),
            stored=bool(payload.get("stored")),
        )
        self.offer(str(ref), notice, job_id if isinstance(job_id, int) else None)

    def poll_soon(self) -> None:
        """Poll pending relays at once (after a reconnect, or for a stored result)."""
        self._poll_now.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll the rows of pending relays until cancelled."""
        task_status.started()
        try:
            while True:
                with trio.move_on_after(POLL_INTERVAL):
                    await self._poll_now.wait()
                self._poll_now = trio.Event()
                try:
                    await self._poll()
                except Exception:
                    log.warning("relay poll failed; retrying", exc_info=True)
        finally:
            self._close()

    def _close(self) -> None:
        """The instance is closing: relays still waiting, or awaited from now on, can get no
        outcome (a final one already received is kept)."""
        self._closed = True
        # A copy: a Relay collected meanwhile (a weakref callback) discards its waiter.
        for waiter in list(self._waiters.values()):
            waiter.offer(Notice(_CLOSED))

    async def _poll(self) -> None:
        # Relays share a job id when they joined one unique job: each gets the outcome.
        pending: dict[int, list[_Waiter]] = {}
        for waiter in list(self._waiters.values()):  # a copy: see _close
            if waiter.job_id is not None:
                pending.setdefault(waiter.job_id, []).append(waiter)
        if not pending:
            return
        rows = await self._get_state(self._pool, list(pending))
        for job_id, state, errors, meta in rows:
            waiters = pending.pop(job_id)
            if state in FINAL or state == "retryable":
                notice = notice_from_row(state, errors, meta)
                for waiter in waiters:
                    waiter.offer(notice)
        for waiters in pending.values():  # no row: deleted (pruned) since
            for waiter in waiters:
                waiter.offer(Notice(_GONE))

    async def wait(self, waiter: _Waiter, job_id: int | None, with_retries: bool) -> Notice:
        """Wait for the notice that ends the relay's wait: a final outcome, or (without
        ``with_retries``) a failed attempt. ``RelayError`` if the instance has closed.

        ``job_id`` None (a job run inline, never stored) is never polled.
        """
        waiter.job_id = job_id
        seen = 0
        while True:
            notice, seen = await waiter.take(seen)
            if notice.state == _CLOSED or (notice.stored and self._closed):
                raise RelayError(
                    f"the trioban instance that dispatched job {job_id} has closed, so its "
                    "outcome can't reach this relay; await relays inside the `async with "
                    "trioban.open(conf)` block (the job itself goes on)"
                )
            if notice.state == _GONE:
                raise RelayError(
                    f"there is no job {job_id} any more (pruned or deleted), so its outcome "
                    "can't be read; await relays before the pruner's max age passes"
                )
            if notice.stored:
                self.poll_soon()  # the row holds the result; the poller reads it
                continue
            if notice.state in FINAL or (notice.state == "retryable" and not with_retries):
                return notice


@final
class Relay:
    """A dispatched job whose result can be awaited: returned by ``oban.dispatch()``."""

    __slots__ = ("__weakref__", "_final", "_load", "_registry", "_stored", "job", "ref")

    def __init__(
        self,
        registry: Registry,
        ref: str,
        job: Job,
        load: Callable[[Any], Any] | None = None,
        *,
        stored: bool = True,
    ) -> None:
        self.ref = ref
        self.job = job
        self._registry = registry
        self._load = load  # the worker's structured result type, when it has one
        # False when the relay joined an existing unique job that won't store its result.
        self._stored = stored
        # An inline job's final outcome, returned at once by later awaits: its row is never
        # stored, so nothing else could give it again.
        self._final: Notice | None = None
        registry.own(ref, self)

    def __repr__(self) -> str:
        return f"<trioban.Relay ref={self.ref} job={self.job.id}>"

    async def result(
        self,
        timeout: float = 30.0,  # noqa: ASYNC109 (the API contract takes a timeout)
        with_retries: bool = False,
    ) -> Any:
        """Wait for the job's result.

        Raises ``RelayTimeout`` when ``timeout`` seconds pass, ``RelayCancelled`` or
        ``RelayDiscard`` when the job ends so. A timeout, or the caller's own cancel scope,
        stops only the waiting: the job goes on, and ``result()`` may be called again. An
        outcome already received is returned even with ``timeout=0``; a later call reads the
        job's row again (a retried job gives its new outcome), which ``timeout=0`` cuts short.
        A relay of a unique job that joined an existing job follows that job; if that job
        completes without storing its result, ``RelayError`` says so. So it does, at once,
        when the instance that dispatched the relay closes before its outcome arrives.
        """
        seconds, with_retries = check_timeout(timeout), check_flag(with_retries, "with_retries")
        # The caller's cancellation only: an outcome already here beats our own deadline.
        await trio.lowlevel.checkpoint_if_cancelled()
        with trio.move_on_after(seconds):
            return await self._wait(with_retries)
        raise RelayTimeout(f"no result for job {self.job.id} within {timeout}s")

    async def _wait(self, with_retries: bool) -> Any:
        # result() without a deadline of its own: the caller's cancel scope bounds it. An
        # outcome already here is returned without a cancellable checkpoint (see take()).
        if self._final is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return self._value(self._final)
        registry = self._registry
        waiter = registry.register(self.ref)
        if waiter.notice is None and waiter.job_id is None:
            registry.poll_soon()  # a second call: the outcome may already be in the row
        waiter.awaiting += 1  # other tasks may await this relay at the same time
        try:
            notice = await registry.wait(waiter, self.job.id, with_retries)
        finally:
            waiter.awaiting -= 1
            if not waiter.awaiting:
                registry.discard(self.ref)
        if notice.state in FINAL and self.job.id is None:
            self._final = notice  # a stored job's row answers later awaits (after a retry too)
        return self._value(notice)

    def _value(self, notice: Notice) -> Any:
        """The relay's value for the notice that ended its wait, or its ``RelayError``."""
        if notice.state == "cancelled":
            raise RelayCancelled(notice.reason or "cancelled")
        if notice.state != "completed":
            raise RelayDiscard(notice.reason or notice.state)
        if not self._stored:
            raise RelayError(
                f"job {self.job.id} completed, but its result was not stored: this "
                "relay joined that existing unique job, whose worker doesn't record "
                "results; declare the worker with recorded=True to relay unique jobs"
            )
        return self._loaded(notice.result)

    def _loaded(self, value: Any) -> Any:
        if self._load is None:
            return value
        try:
            return self._load(value)
        except ValueError as exc:
            text = f"job {self.job.id} completed, but its result doesn't load: {exc}"
            raise RelayError(text) from None


async def insert_relayed(
    registry: Registry,
    insert_all: Callable[[list[Job]], Awaitable[list[Job]]],
    jobs: list[Job],
    relayed: list[bool],
) -> tuple[list[Job], list[Relay | None]]:
    """Insert ``jobs`` in one statement with a relay for each one flagged in ``relayed``."""
    refs = [new_ref() if flag else None for flag in relayed]
    # Registered before the insert: a job that finishes at once can't be missed.
    waiters = [None if ref is None else registry.register(ref) for ref in refs]
    try:
        tagged = [
            job if ref is None else evolve(job, meta={**job.meta, META_REF: ref})
            for job, ref in zip(jobs, refs, strict=True)
        ]
        saved = await insert_all(tagged)
    except BaseException:
        for ref in refs:
            if ref is not None:
                registry.discard(ref)
        raise
    relays: list[Relay | None] = []
    for job, ref, waiter in zip(saved, refs, waiters, strict=True):
        if ref is None or waiter is None:
            relays.append(None)
            continue
        waiter.job_id = job.id  # None for a job run inline: nothing to poll
        found = lookup(job.worker)
        load = found.load_result if found is not None and found.result_type else None
        # A conflict returned an existing unique job: its result is stored only if it was
        # itself relayed or its worker records results.
        recorded = found is not None and found.recorded
        stored = not job.conflict or META_REF in job.meta or recorded
        if job.conflict and job.id is not None:
            registry.join(ref, job.id)
        relays.append(Relay(registry, ref, job, load, stored=stored))
    return saved, relays


def check_timeout(timeout: float) -> float:
    """``timeout`` as seconds for a cancel scope; ``inf`` waits for ever, NaN is refused."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"expected timeout to be a number of seconds, got {timeout!r}")
    try:
        seconds = float(timeout)
    except OverflowError:  # an int too large for a float
        seconds = math.inf if timeout > 0 else -math.inf
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"expected timeout to be a number of seconds >= 0, got {timeout!r}")
    return seconds


def new_ref() -> str:
    """A fresh relay ref: 128 random bits as hex (``uuid4().hex`` costs six times as much)."""
    return os.urandom(16).hex()


async def await_many(
    relays: Sequence[Relay],
    timeout: float,  # noqa: ASYNC109 (the API contract takes a timeout)
) -> list[outcome.Outcome[Any]]:
    """Await several relays under one deadline; one outcome per relay, in the order given."""
    results: list[outcome.Outcome[Any] | None] = [None] * len(relays)

    async def collect(index: int, relay: Relay) -> None:
        try:
            results[index] = outcome.Value(await relay._wait(with_retries=False))
        except RelayError as exc:
            results[index] = outcome.Error(exc)

    # The caller's cancellation only: outcomes already here are returned even at timeout=0,
    # as the collecting tasks take them without a cancellable checkpoint.
    await trio.lowlevel.checkpoint_if_cancelled()
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for index, relay in enumerate(relays):
                nursery.start_soon(collect, index, relay)
    expired = f"no result within {timeout}s"
    return [outcome.Error(RelayTimeout(expired)) if r is None else r for r in results]
