"""``Oban``: a running instance's public methods (``trioban.open()`` hands it out).

Jobs, relays and the notifier are here; the workflow and batch methods come from
``_workflow_methods``, the queue-control ones from ``_queue_methods``.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, final

import attrs
import outcome
import trio

from . import _pg, _schema, _settle, _store
from ._acker import Acker
from ._batch import Batch
from ._checks import (
    check_conn,
    check_id,
    check_inline,
    check_jobs,
    check_timeout,
    encode_message,
)
from ._config import Config
from ._cron import CronEntry, Scheduler, minute_of
from ._errors import NotRecorded, RelayTimeout, TriobanError
from ._executor import resolve
from ._inline import run_inline
from ._inserter import Inserter
from ._job import Job, JobState, utc_datetime
from ._leader import Leadership
from ._notice import META_RESULT
from ._notifier import Notifier, check_channel
from ._queue_methods import QueueMethods
from ._queues import SIGNAL, Queues, settle_claims
from ._registry import lookup, scheduled
from ._relay import Registry, Relay, insert_relayed
from ._relay import await_many as _await_many
from ._validate import CRON_META, check_flag, check_text
from ._worker import CURRENT, Worker
from ._workflow import Workflow
from ._workflow_methods import WorkflowMethods

log = logging.getLogger("trioban")

PKILL_CHUNK: Final = 100
"""Executing jobs named per cancel signal, each with its claim's time (a notification holds
at most 8,000 bytes)."""


@final
class Oban(WorkflowMethods, QueueMethods):
    """A running trioban instance, handed out by ``trioban.open()``."""

    def __init__(self, conf: Config, pool: _pg.Pool, work_pool: _pg.Pool) -> None:
        self.config = conf
        self._pool = pool  # inserts, queries, callers' transactions: durable commits
        self._work_pool = work_pool  # claims, acks, polls: see _open._relaxed()
        self._notifier = Notifier(conf.dsn or "", conf.prefix, conf.node)
        self._relays = Registry(work_pool, lambda p, ids: _store.relay_states(p, conf.prefix, ids))
        self._inserter = Inserter(pool, conf.prefix, writers=max(1, conf.pool_size // 2))
        # Jobs inserted in each open oban.transaction(): their producers are woken on commit.
        self._uncommitted: dict[_pg.Connection, list[Job]] = {}
        settle = partial(_settle.after_acks, work_pool, conf.prefix)
        self._acker = Acker(work_pool, conf.prefix, settle, self._relays)
        self._queues = Queues(
            work_pool, self._acker, self._notifier, conf.prefix, conf.node, instance=self
        )
        # Identifies this instance's own signals (several instances may share a node name).
        self._origin = uuid.uuid4().hex
        peer = f"{conf.node}/{self._origin[:8]}"
        interval = conf.heartbeat_interval
        self._leadership = Leadership(work_pool, conf.prefix, conf.name, peer, interval)
        self._scheduler = Scheduler(
            cron_entries(conf),
            self._leadership,
            self.insert_all,
            _builder,
            transient=_pg.transient,
        )

    def __repr__(self) -> str:
        return f"<trioban.Oban node={self.config.node!r} prefix={self.config.prefix!r}>"

    # -- jobs -------------------------------------------------------------------------------

    async def insert(self, job: Job, *, conn: _pg.Connection | None = None) -> Job:
        """Insert one job and return it saved (with ``id`` and ``state``).

        Pass ``conn`` (from ``oban.transaction()``) to insert inside that transaction: the job
        and its notification exist only if the transaction commits.
        """
        (saved,) = await self.insert_all([job], conn=conn)
        return saved

    async def insert_all(
        self, jobs: Iterable[Job] | Workflow | Batch, *, conn: _pg.Connection | None = None
    ) -> list[Job]:
        """Insert many jobs with one statement; returns them saved, in the order given.

        A ``Workflow`` or a ``Batch`` is inserted whole (its jobs, checked and tagged); the
        inline testing mode refuses them (``TriobanError``).
        All or none of the jobs are inserted. Cancelled before it starts, nothing is; cancelled
        while the statement is in flight, the jobs may or may not have been inserted (as with
        any cancelled write), never some of them.
        """
        batch = check_jobs(jobs)
        check_conn(conn)
        if self.config.testing == "inline":
            check_inline(batch)
            return [await run_inline(job, self._relays) for job in batch]
        if isinstance(jobs, Workflow) and not jobs._existing:  # not append_workflow's steps
            return await self._insert_new_workflow(jobs.workflow_id, batch, conn=conn)
        if isinstance(jobs, Batch):
            return await self._insert_new_batch(jobs.batch_id, batch, conn=conn)
        prefix = self.config.prefix
        unique = any(job._unique is not None for job in batch)
        if conn is not None:
            write = _store.insert_with_unique if unique else _store.insert
            saved = await write(conn, prefix, batch)
            # In a caller's transaction: its producers are woken once it commits.
            if (uncommitted := self._uncommitted.get(conn)) is not None:
                uncommitted.extend(saved)
            return saved
        if unique:
            async with self._pool.connection() as pooled:
                saved = await _store.insert_with_unique(pooled, prefix, batch)
        elif not batch:
            await trio.lowlevel.checkpoint()
            return []
        else:
            batch, claims = self._queues.claim(batch)
            # The inserter's writer settles claims, so claimed jobs run even if we're cancelled.
            saved = await self._inserter.insert(batch, settle_claims(claims) if claims else None)
        self._queues.wake_for(saved)
        return saved

    async def run_cron(self, at: datetime | None = None) -> int:
        """Enqueue the cron slots due in the minute of ``at`` (default: now), as the scheduler
        does each minute; a slot already enqueued (by any node) is not enqueued again.

        Returns how many jobs were new. Handy in tests and to catch up after downtime.
        """
        if at is not None:
            at = utc_datetime(at, "at")
        return await self._scheduler.enqueue(minute_of(at or datetime.now(UTC)), guard=False)

    async def get_job(self, job_id: int) -> Job | None:
        """The job with ``job_id``, or None if there is none."""
        return await _store.get_job(self._pool, self.config.prefix, check_id(job_id))

    async def fetch_recorded(self, job: Job | int) -> Any:
        """The recorded result of a completed job (``@worker(recorded=True)``).

        Structured with the worker's ``result`` class when it declares one (``ValueError``,
        naming the fields, when the stored result no longer fits it). Raises ``NotRecorded``
        when the job doesn't exist, hasn't completed or recorded nothing. An unsaved job is
        read as given: one the inline testing mode ran carries its result.
        """
        if isinstance(job, Job) and job.id is None:
            never = "" if job.attempt else " (never inserted)"
            return await _recorded(job, f"the unsaved job{never}")
        job_id = check_id(job.id if isinstance(job, Job) else job)  # type: ignore[arg-type]
        found = await self.get_job(job_id)
        if found is None:
            raise NotRecorded(f"there is no job {job_id} (pruned, or never inserted)")
        return await _recorded(found, f"job {job_id}")

    async def retry_job(self, job_id: int) -> bool:
        """Make a finished or waiting job available now. A workflow step with deps waits for
        them again: it runs once they are done, or is cancelled again if one of them failed.

        False if it was available or executing, or is a workflow step waiting on its deps.
        """
        prefix = self.config.prefix
        retried, waiting_in = await _store.retry_job(self._pool, prefix, check_id(job_id))
        if waiting_in is not None:
            try:
                await _settle.release(self._pool, prefix, [waiting_in])
            except Exception as exc:
                # The step waits for its deps; the leader's sweep releases it later.
                log.warning("releasing a retried workflow step failed (%s)", exc)
        return retried

    async def cancel_job(self, job_id: int, reason: str = "cancelled") -> bool:
        """Cancel a job; one executing on any node is stopped through its cancel scope.

        Returns False when the job was already finished (or doesn't exist).
        """
        return bool(await self.cancel_all_jobs([job_id], reason=reason))

    async def cancel_all_jobs(self, job_ids: Iterable[int], *, reason: str = "cancelled") -> int:
        """Cancel several jobs (see ``cancel_job``); returns how many were cancelled."""
        if isinstance(job_ids, str | bytes) or not isinstance(job_ids, Iterable):
            raise TypeError(f"expected a list of job ids, got {job_ids!r}")
        ids = [check_id(job_id) for job_id in job_ids]
        check_text(reason, "the cancel reason")
        touched = await _store.cancel_jobs(self._pool, self.config.prefix, ids, reason)
        executing = [(job_id, at) for job_id, state, at in touched if state == "executing"]
        chunks = [executing[i : i + PKILL_CHUNK] for i in range(0, len(executing), PKILL_CHUNK)]
        messages = [_pkill(chunk, reason) for chunk in chunks]
        for message in messages:
            self._queues.apply(message)  # here at once; other nodes through the notifier
        if messages:
            await self.notify(SIGNAL, [{**m, "origin": self._origin} for m in messages])
        if touched:
            await self._settle_cancelled([job_id for job_id, _, _ in touched])
        return len(touched)

    async def _settle_cancelled(self, job_ids: list[int]) -> None:
        """Release or cancel the dependents of cancelled workflow steps and check their
        batches' callbacks now: a job cancelled while waiting is never acked."""
        try:
            await _settle.settle_jobs(self._pool, self.config.prefix, job_ids)
        except Exception as exc:
            # The jobs are cancelled; the leader's sweep settles their workflows later.
            log.warning("settling workflows/batches after a cancel failed (%s)", exc)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_pg.Connection]:
        """A pooled connection inside a transaction, for ``insert(job, conn=...)``.

        The transaction commits when the block exits normally and rolls back on an exception
        (or when the block is cancelled).
        """
        async with self._pool.connection() as conn:
            inserted: list[Job] = []
            self._uncommitted[conn] = inserted
            try:
                async with conn.transaction():
                    yield conn
            finally:
                del self._uncommitted[conn]
            # Committed: this node's producers learn of the jobs now, not when the insert
            # notification comes back, so a job inserted next can't be claimed ahead of them.
            self._queues.wake_for(inserted)

    # -- relay ------------------------------------------------------------------------------

    async def dispatch(self, job: Job) -> Relay:
        """Insert ``job`` and return a ``Relay`` whose ``result()`` awaits its outcome."""
        (checked,) = check_jobs([job])
        _, (relay,) = await insert_relayed(self._relays, self.insert_all, [checked], [True])
        assert relay is not None
        return relay

    async def relay(
        self,
        job: Job,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 (the API contract takes a timeout)
        with_retries: bool = False,
    ) -> Any:
        """Insert ``job`` and await its result (see ``Relay.result``).

        A timeout raises ``RelayTimeout`` and stops only the waiting; the job goes on. In the
        inline testing mode the job runs inside the insert, to its end whatever the timeout.
        """
        relay: Relay | None = None
        limit, with_retries = check_timeout(timeout), check_flag(with_retries, "with_retries")
        if self.config.testing == "inline":  # running the job is the insert: don't cut it off
            limit = math.inf
        with trio.move_on_after(limit):  # one deadline for both steps
            relay = await self.dispatch(job)
            return await relay._wait(with_retries)
        if relay is None:
            raise RelayTimeout(f"timed out inserting the job within {timeout}s")
        raise RelayTimeout(f"no result for job {relay.job.id} within {timeout}s")

    async def await_many(
        self,
        relays: Iterable[Relay],
        timeout: float = 5.0,  # noqa: ASYNC109 (the API contract takes a timeout)
    ) -> list[outcome.Outcome[Any]]:
        """Await several relays (any iterable of them) under one deadline: one
        ``outcome.Outcome`` each, in order.

        Unfinished relays at the deadline get ``outcome.Error(RelayTimeout())``; a job's
        failure is an ``outcome.Error``, never an exception from this call.
        """
        if isinstance(relays, Relay):
            raise TypeError("await_many expects a list of Relay objects; use result() for one")
        waiting = list(relays)
        for relay in waiting:
            if not isinstance(relay, Relay):
                raise TypeError(f"await_many expects Relay objects, got {relay!r}")
        return await _await_many(waiting, check_timeout(timeout))

    # -- notifier ---------------------------------------------------------------------------

    async def notify(
        self,
        channel: str,
        payload: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        conn: _pg.Connection | None = None,
    ) -> None:
        """Publish a JSON object (or a list of them, in one round trip) on ``channel``.

        Listeners on every node sharing the database and prefix receive it once the sending
        transaction commits: with ``conn`` (from ``oban.transaction()``), only if it commits.
        A payload over PostgreSQL's 8,000-byte limit, even compressed, raises ValueError.
        Identical payloads sent on one channel in one call (or one transaction) are delivered
        once: PostgreSQL merges duplicate notifications (Oban documents the same).
        """
        check_channel(channel)
        check_conn(conn)
        if isinstance(payload, Mapping):
            items: Sequence[Mapping[str, Any]] = [payload]
        elif isinstance(payload, Sequence) and not isinstance(payload, str | bytes):
            items = payload
        else:
            raise TypeError(
                "expected the notifier payload to be a JSON object (a dict) or a list of them, "
                f"got {type(payload).__name__}"
            )
        texts = [encode_message(item) for item in items]
        if conn is not None:
            await _store.notify(conn, self.config.prefix, channel, texts)
            return
        async with self._pool.connection() as pooled:
            await _store.notify(pooled, self.config.prefix, channel, texts)

    def listen(
        self, channels: Iterable[str]
    ) -> Any:  # an async context manager of a trio.MemoryReceiveChannel[tuple[str, Any]]
        """``async with oban.listen(["gossip"]) as messages: async for channel, payload in ...``.

        The block is entered once the LISTEN is in place. The receive channel is bounded; a
        consumer that falls more than ``trioban.LISTEN_BUFFER`` messages behind loses new ones
        (a warning is logged).
        """
        if isinstance(channels, str) or not isinstance(channels, Iterable):
            raise TypeError("listen() expects a list of channel names, e.g. ['gossip']")
        return self._notifier.listen(channels)

    def notifier_status(self) -> str:
        """``"connected"`` or ``"disconnected"`` (reconnecting in the background)."""
        return "connected" if self._notifier.connected else "disconnected"

    # -- schema -----------------------------------------------------------------------------

    async def install(self) -> None:
        """Create or upgrade the schema under this instance's prefix (idempotent)."""
        async with self._pool.connection() as conn:
            await _schema.install(conn, self.config.prefix)

    @classmethod
    def _create(cls, conf: Config, pool: _pg.Pool, work_pool: _pg.Pool) -> Oban:
        return cls(conf, pool, work_pool)


def current_instance() -> Oban:
    """The innermost open instance: inside ``trioban.open()``'s block or one of its jobs."""
    try:
        instance = CURRENT.get()
    except LookupError:
        raise TriobanError(
            "no open trioban instance here: call this inside `async with trioban.open(conf)` "
            "or from a job that instance runs"
        ) from None
    assert isinstance(instance, Oban)
    return instance


async def _recorded(job: Job, what: str) -> Any:
    """The recorded result of ``job`` (called ``what`` in errors), structured by its worker."""
    if job.state is not JobState.COMPLETED or META_RESULT not in job.meta:
        raise NotRecorded(
            f"{what} has no recorded result: it is {job.state.value}"
            + ("" if job.state is not JobState.COMPLETED else " but recorded nothing")
        )
    worker = await resolve(job.worker)  # its module may not be imported here yet
    data = job.meta[META_RESULT]
    return data if worker is None else worker.load_result(data)


def cron_entries(conf: Config) -> list[CronEntry]:
    """The crontab of ``conf`` plus ``@worker(cron=...)`` workers of the queues it runs."""
    declared = [
        CronEntry(found.cron, found.name)
        for found in scheduled()
        if found.cron is not None and found.queue in conf.queues
    ]
    return [*conf.crontab, *declared]


def _builder(name: str) -> Callable[..., Job] | None:
    found = lookup(name)
    return None if found is None else partial(_cron_job, found)


def _cron_job(found: Worker, args: Any, *, meta: Mapping[str, Any], **options: Any) -> Job:
    """A cron slot's job: built by the worker's ``new()``, which checks the crontab entry's
    meta as any caller's, then given the cron keys (reserved: ``new()`` refuses them)."""
    job = found.new(args, meta={k: v for k, v in meta.items() if k not in CRON_META}, **options)
    cron = {k: v for k, v in meta.items() if k in CRON_META}
    return attrs.evolve(job, meta={**job.meta, **cron})


def _pkill(runs: list[tuple[int, datetime | None]], reason: str) -> dict[str, Any]:
    """The signal cancelling these runs (job id, claimed at), its reason cut to fit in a
    notification. The claim times stop a run whose fetch the signal overtook."""
    return {
        "action": "pkill",
        "job_ids": [job_id for job_id, _ in runs],
        "claims": [at and at.isoformat() for _, at in runs],
        "reason": reason[:500],
    }
