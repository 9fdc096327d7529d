"""``trioban.open()``: the instance that owns every task, and its public methods."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, final

import attrs
import outcome
import trio

from . import (
    _aio,
    _codec,
    _embedded,
    _heartbeat,
    _lifeline,
    _pg,
    _pruner,
    _schema,
    _settle,
    _stager,
    _store,
)
from ._acker import Acker
from ._batch import Batch
from ._config import Config
from ._cron import CronEntry, Scheduler, minute_of
from ._errors import InternalError, NotRecorded, RelayTimeout, TriobanError
from ._executor import run_here
from ._inserter import Inserter
from ._job import Job, JobState, evolve, utc_datetime
from ._leader import CHANNEL as LEADER_CHANNEL
from ._leader import Leadership, while_leading
from ._notifier import Notifier, check_channel
from ._producer import Producer, QueueInfo
from ._relay import META_REF, META_RESULT, Registry, Relay, new_ref
from ._relay import await_many as _await_many
from ._sql import query
from ._worker import CURRENT, asyncio_queues, lookup, scheduled
from ._workflow import NAME, WORKFLOW_ID, Workflow

log = logging.getLogger("trioban")

SIGNAL = "signal"
PRUNE_INTERVAL: Final = 30.0
"""Seconds between pruner runs (sooner when ``prune_max_age`` is shorter)."""


@final
class Oban:
    """A running trioban instance, handed out by ``trioban.open()``."""

    def __init__(self, conf: Config, pool: _pg.Pool, work_pool: _pg.Pool) -> None:
        self.config = conf
        self._pool = pool  # inserts, queries, callers' transactions: durable commits
        self._work_pool = work_pool  # claims, acks, polls: see _relaxed()
        self._notifier = Notifier(conf.dsn or "", conf.prefix, conf.node)
        self._relays = Registry(work_pool, lambda p, ids: _store.relay_states(p, conf.prefix, ids))
        self._inserter = Inserter(pool, conf.prefix, writers=max(1, conf.pool_size // 2))
        settle = partial(_settle.after_acks, work_pool, conf.prefix)
        self._acker = Acker(work_pool, conf.prefix, settle, self._relays)
        self._producers: dict[str, Producer] = {}
        self._woken_by_inserts = False  # subscribed to the insert channel (runs a queue)
        self._queues: trio.Nursery | None = None  # where producers run, set by open()
        # Identifies this instance's own signals (several instances may share a node name).
        self._origin = uuid.uuid4().hex
        peer = f"{conf.node}/{self._origin[:8]}"
        interval = conf.heartbeat_interval
        self._leadership = Leadership(work_pool, conf.prefix, conf.name, peer, interval)
        self._scheduler = Scheduler(cron_entries(conf), self._leadership, self.insert_all, _builder)

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

        A ``Workflow`` or a ``Batch`` is inserted whole (its jobs, checked and tagged).
        All or none of the jobs are inserted. Cancelled before it starts, nothing is; cancelled
        while the statement is in flight, the jobs may or may not have been inserted (as with
        any cancelled write), never some of them.
        """
        batch = _check_jobs(jobs)
        _check_conn(conn)
        if self.config.testing == "inline":
            return [await self._run_inline(job) for job in batch]
        if any(job._unique is not None for job in batch):
            if conn is not None:
                return await _store.insert_with_unique(conn, self.config.prefix, batch)
            async with self._pool.connection() as pooled:
                return await _store.insert_with_unique(pooled, self.config.prefix, batch)
        if conn is not None:
            return await _store.insert(conn, self.config.prefix, batch)
        if not batch:
            await trio.lowlevel.checkpoint()
            return []
        batch, claims = self._claim_here(batch)
        if not claims:
            return await self._inserter.insert(batch)

        def settle(result: outcome.Outcome[list[Job]] | None) -> None:
            # Called by the inserter's writer, so claimed jobs run even if we are cancelled.
            saved = result.value if isinstance(result, outcome.Value) else None
            for producer, indexes in claims.items():
                if saved is None:
                    producer.release(len(indexes))
                else:
                    producer.adopt([saved[i] for i in indexes])

        return await self._inserter.insert(batch, settle)

    def _claim_here(self, jobs: list[Job]) -> tuple[list[Job], dict[Producer, list[int]]]:
        """Claim on insert: jobs for a queue this node runs, with free slots and nothing
        waiting, are inserted already claimed by its producer and run at once, skipping the
        notification and fetch round trips."""
        claims: dict[Producer, list[int]] = {}
        if not self._producers:
            return jobs, claims
        claimed = list(jobs)
        for index, job in enumerate(jobs):
            producer = self._producers.get(job.queue)
            if producer is None or job.state is not JobState.AVAILABLE or job.scheduled_at:
                continue
            if producer.reserve(1):
                attempted_by = (self.config.node, producer.uuid)
                claimed[index] = evolve(job, attempted_by=attempted_by)
                claims.setdefault(producer, []).append(index)
        return claimed, claims

    async def _run_inline(self, job: Job) -> Job:
        """The inline testing mode: run ``job`` here now; deliver its outcome to its relay."""
        ran, ack = await run_here(job)
        notice = _codec.loads(ack.json).get("notice")
        if notice is not None:
            self._relays.deliver(_codec.decode_payload(notice))
        return attrs.evolve(ran, id=None, state=JobState(ack.state), meta=job.meta)

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
        return await _store.get_job(self._pool, self.config.prefix, _check_id(job_id))

    async def fetch_recorded(self, job: Job | int) -> Any:
        """The recorded result of a completed job (``@worker(recorded=True)``).

        Structured with the worker's ``result`` class when it declares one. Raises
        ``NotRecorded`` when the job doesn't exist, hasn't completed or recorded nothing.
        """
        job_id = _check_id(job.id if isinstance(job, Job) else job)  # type: ignore[arg-type]
        found = await self.get_job(job_id)
        if found is None:
            raise NotRecorded(f"there is no job {job_id} (pruned, or never inserted)")
        if found.state is not JobState.COMPLETED or META_RESULT not in found.meta:
            raise NotRecorded(
                f"job {job_id} has no recorded result: it is {found.state.value}"
                + ("" if found.state is not JobState.COMPLETED else " but recorded nothing")
            )
        worker = lookup(found.worker)
        data = found.meta[META_RESULT]
        return data if worker is None else worker.load_result(data)

    async def retry_job(self, job_id: int) -> bool:
        """Make a finished or waiting job available now; False if it was available/executing."""
        return await _store.retry_job(self._pool, self.config.prefix, _check_id(job_id))

    async def cancel_job(self, job_id: int, reason: str = "cancelled") -> bool:
        """Cancel a job; one executing on any node is stopped through its cancel scope.

        Returns False when the job was already finished (or doesn't exist).
        """
        return bool(await self.cancel_all_jobs([job_id], reason=reason))

    async def cancel_all_jobs(self, job_ids: Iterable[int], *, reason: str = "cancelled") -> int:
        """Cancel several jobs (see ``cancel_job``); returns how many were cancelled."""
        ids = [_check_id(job_id) for job_id in job_ids]
        touched = await _store.cancel_jobs(self._pool, self.config.prefix, ids, reason)
        executing = [job_id for job_id, state in touched if state == "executing"]
        if executing:
            message = {"action": "pkill", "job_ids": executing, "reason": reason}
            self._apply_signal(message)  # here at once; other nodes through the notifier
            await self._signal(message)
        return len(touched)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_pg.Connection]:
        """A pooled connection inside a transaction, for ``insert(job, conn=...)``.

        The transaction commits when the block exits normally and rolls back on an exception.
        """
        async with self._pool.connection() as conn, conn.transaction():
            yield conn

    # -- workflows and batches --------------------------------------------------------------

    async def insert_workflow(
        self, workflow: Workflow, *, conn: _pg.Connection | None = None
    ) -> list[Job]:
        """Insert a workflow's jobs (checked: known deps, no cycles) in one statement."""
        _check_type(workflow, Workflow, "a trioban.Workflow")
        return await self.insert_all(workflow, conn=conn)

    async def append_workflow(
        self, workflow_id: str, extend: Callable[[Workflow], object]
    ) -> list[Job]:
        """Add steps to a workflow already inserted: ``extend(wf)`` calls ``wf.add(...)``.

        New steps may depend on existing ones; one whose deps already finished is released
        at once.
        """
        steps = await self.workflow_status(workflow_id)
        if not steps:
            raise ValueError(f"there is no workflow {workflow_id!r} to append to")
        appended = Workflow._appending(workflow_id, steps, {})
        extend(appended)
        saved = await self.insert_all(appended)
        await _settle.release(self._pool, self.config.prefix, [workflow_id])
        return saved

    async def workflow_status(self, workflow_id: str) -> dict[str, JobState]:
        """Each step of a workflow and its state, in insertion order ({} if unknown)."""
        rows = await self._workflow_rows(workflow_id, None)
        return {name: JobState(state) for name, state, _, _ in rows}

    async def workflow_results(self, job: Job) -> dict[str, Any]:
        """The results of ``job``'s deps by step name (from inside a workflow step).

        Structured with each dep worker's ``result`` class; a dep that didn't complete (it was
        cancelled or discarded and ignored) maps to None.
        """
        _check_type(job, Job, "a Job")
        workflow_id, deps = job.meta.get(WORKFLOW_ID), job.meta.get("deps")
        if workflow_id is None or not isinstance(deps, list):
            raise ValueError(f"job {job.id} is not a step of a workflow")
        results: dict[str, Any] = dict.fromkeys(deps)
        for name, state, worker_name, result in await self._workflow_rows(workflow_id, deps):
            worker = lookup(worker_name)
            if state == "completed" and result is not None:
                results[name] = result if worker is None else worker.load_result(result)
        return results

    async def relay_workflow(
        self,
        workflow: Workflow,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 (mirrors relay())
    ) -> Any:
        """Insert a workflow and await its final step's result.

        With several final steps (nothing depends on them), returns a dict of their results by
        name. Raises like ``relay``: ``RelayTimeout``, or the first failure of a final step.
        """
        _check_type(workflow, Workflow, "a trioban.Workflow")
        deadline = trio.current_time() + _check_timeout(timeout)
        jobs, sinks = workflow.build(), set(workflow.sinks())
        _, relays = await self._dispatch_some(jobs, [job.meta[NAME] in sinks for job in jobs])
        waiting = [relay for relay in relays if relay is not None]
        remaining = max(0.0, deadline - trio.current_time())
        outcomes = await _await_many(waiting, remaining)
        results = {
            relay.job.meta[NAME]: result.unwrap()
            for relay, result in zip(waiting, outcomes, strict=True)
        }
        return next(iter(results.values())) if len(results) == 1 else results

    async def batch_status(self, batch_id: str) -> dict[str, int]:
        """How many of a batch's jobs are in each state, and ``total`` (callbacks excluded)."""
        if not isinstance(batch_id, str) or not batch_id:
            raise TypeError(f"expected a batch id (a non-empty str), got {batch_id!r}")
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                query("batch_states", self.config.prefix), {"batch_id": batch_id}
            )
            counts = {state.value: 0 for state in JobState}
            for state, count in await cur.fetchall():
                counts[state] = int(count)
        return {**counts, "total": sum(counts.values())}

    async def _workflow_rows(
        self, workflow_id: str, names: list[str] | None
    ) -> list[tuple[Any, ...]]:
        if not isinstance(workflow_id, str) or not workflow_id:
            raise TypeError(f"expected a workflow id (a non-empty str), got {workflow_id!r}")
        params = {"workflow_id": workflow_id, "names": names}
        async with self._pool.connection() as conn:
            cur = await conn.execute(query("workflow_jobs", self.config.prefix), params)
            return await cur.fetchall()

    # -- relay ------------------------------------------------------------------------------

    async def dispatch(self, job: Job) -> Relay:
        """Insert ``job`` and return a ``Relay`` whose ``result()`` awaits its outcome."""
        (checked,) = _check_jobs([job])
        _, (relay,) = await self._dispatch_some([checked], [True])
        assert relay is not None
        return relay

    async def _dispatch_some(
        self, jobs: list[Job], relayed: list[bool]
    ) -> tuple[list[Job], list[Relay | None]]:
        """Insert ``jobs`` in one statement with a relay for each one flagged in ``relayed``."""
        refs = [new_ref() if flag else None for flag in relayed]
        # Registered before the insert: a job that finishes at once can't be missed.
        waiters = [None if ref is None else self._relays.register(ref) for ref in refs]
        try:
            tagged = [
                job if ref is None else evolve(job, meta={**job.meta, META_REF: ref})
                for job, ref in zip(jobs, refs, strict=True)
            ]
            saved = await self.insert_all(tagged)
        except BaseException:
            for ref in refs:
                if ref is not None:
                    self._relays.discard(ref)
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
            relays.append(Relay(self._relays, ref, job, load, stored=stored))
        return saved, relays

    async def relay(
        self,
        job: Job,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 (the API contract takes a timeout)
        with_retries: bool = False,
    ) -> Any:
        """Insert ``job`` and await its result (see ``Relay.result``).

        A timeout raises ``RelayTimeout`` and stops only the waiting; the job goes on.
        """
        with trio.move_on_after(_check_timeout(timeout)) as scope:
            relay = await self.dispatch(job)
        if scope.cancelled_caught:
            raise RelayTimeout(f"timed out inserting the job within {timeout}s")
        remaining = max(0.0, scope.deadline - trio.current_time())
        return await relay.result(timeout=remaining, with_retries=with_retries)

    async def await_many(
        self,
        relays: Sequence[Relay],
        timeout: float = 5.0,  # noqa: ASYNC109 (the API contract takes a timeout)
    ) -> list[outcome.Outcome[Any]]:
        """Await several relays under one deadline: one ``outcome.Outcome`` each, in order.

        Unfinished relays at the deadline get ``outcome.Error(RelayTimeout())``; a job's
        failure is an ``outcome.Error``, never an exception from this call.
        """
        for relay in relays:
            if not isinstance(relay, Relay):
                raise TypeError(f"await_many expects Relay objects, got {relay!r}")
        return await _await_many(relays, _check_timeout(timeout))

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
        """
        check_channel(channel)
        _check_conn(conn)
        items = [payload] if isinstance(payload, Mapping) else list(payload)
        texts = [_encode_message(item) for item in items]
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
        if isinstance(channels, str):
            raise TypeError("listen() expects a list of channel names, e.g. ['gossip']")
        return self._notifier.listen(channels)

    def notifier_status(self) -> str:
        """``"connected"`` or ``"disconnected"`` (reconnecting in the background)."""
        return "connected" if self._notifier.connected else "disconnected"

    # -- queues -----------------------------------------------------------------------------

    def check_queue(self, queue: str) -> QueueInfo:
        """This node's view of ``queue``: limit, paused, running job ids."""
        return self._producer(queue).info()

    async def check_all_queues(self) -> list[QueueInfo]:
        """Every queue on every live node, as of each node's last heartbeat.

        Ordered by queue, then node; up to ``heartbeat_interval`` seconds old.
        """
        params = {"after": self.config.rescue_after}
        async with self._pool.connection() as conn:
            cur = await conn.execute(query("live_producers", self.config.prefix), params)
            rows = await cur.fetchall()
        return [
            QueueInfo(
                queue=queue,
                node=node,
                limit=int(meta.get("limit", 0)),
                paused=bool(meta.get("paused", False)),
                running=tuple(meta.get("running", ())),
            )
            for node, queue, meta in rows
        ]

    @property
    def is_leader(self) -> bool:
        """Whether this instance leads its cluster now (it runs the lifeline and pruner)."""
        return self._leadership.is_leader

    async def pause_queue(
        self, queue: str, *, local_only: bool = False, node: str | None = None
    ) -> None:
        """Stop fetching new jobs of ``queue`` (running jobs finish) on every node, or one."""
        await self._queue_action("pause", queue, local_only, node)

    async def resume_queue(
        self, queue: str, *, local_only: bool = False, node: str | None = None
    ) -> None:
        """Resume fetching jobs of ``queue`` on every node, or one."""
        await self._queue_action("resume", queue, local_only, node)

    async def scale_queue(
        self, queue: str, *, limit: int, local_only: bool = False, node: str | None = None
    ) -> None:
        """Change the concurrency limit of ``queue`` on every node running it, or one."""
        await self._queue_action("scale", queue, local_only, node, limit=_check_limit(limit))

    async def start_queue(
        self, queue: str, *, limit: int, local_only: bool = False, node: str | None = None
    ) -> None:
        """Start running ``queue`` with ``limit`` on every node (or one) not running it yet."""
        if queue not in self._producers and node in (None, self.config.node):
            await self._start_producer(queue, _check_limit(limit))
        await self._queue_action("start", queue, local_only, node, limit=limit)

    async def stop_queue(
        self, queue: str, *, local_only: bool = False, node: str | None = None
    ) -> None:
        """Stop running ``queue`` on every node (or one): running jobs get the shutdown grace."""
        await self._queue_action("stop", queue, local_only, node)

    async def install(self) -> None:
        """Create or upgrade the schema under this instance's prefix (idempotent)."""
        async with self._pool.connection() as conn:
            await _schema.install(conn, self.config.prefix)

    def _producer(self, queue: str) -> Producer:
        producer = self._producers.get(queue)
        if producer is None:
            known = ", ".join(sorted(self._producers)) or "none (an insert-only instance)"
            raise ValueError(f"queue {queue!r} does not run on this node; its queues: {known}")
        return producer

    async def _queue_action(
        self, action: str, queue: str, local_only: bool, node: str | None, **extra: Any
    ) -> None:
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"expected queue to be a non-empty str, got {queue!r}")
        if node is not None and (not isinstance(node, str) or not node):
            raise ValueError(f"expected node to be a node name or None, got {node!r}")
        message = {"action": action, "queue": queue, "node": node, **extra}
        self._apply_signal(message)
        if not local_only:
            await self._signal(message)
        else:
            await trio.lowlevel.checkpoint()

    async def _signal(self, message: dict[str, Any]) -> None:
        await self.notify(SIGNAL, {**message, "origin": self._origin})

    def _on_signal(self, message: Any) -> None:
        if isinstance(message, dict) and message.get("origin") != self._origin:
            self._apply_signal(message)

    def _apply_signal(self, message: dict[str, Any]) -> None:
        action = message.get("action")
        if message.get("node") not in (None, self.config.node):
            return
        if action == "pkill":
            for job_id in message.get("job_ids", ()):
                for producer in self._producers.values():
                    producer.cancel_job(job_id, str(message.get("reason", "cancelled")))
            return
        queue = str(message.get("queue"))
        raw = message.get("limit")
        limit = raw if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0 else None
        target = self._producers.get(queue)
        if action == "start" and target is None and limit and self._queues is not None:
            self._queues.start_soon(self._run_producer, self._new_producer(queue, limit))
        if target is None:
            return
        if action == "pause":
            target.pause()
        elif action == "resume":
            target.resume()
        elif action == "scale" and limit:
            target.scale(limit)
        elif action == "stop" and self._queues is not None:
            del self._producers[queue]
            self._queues.start_soon(_stop_queues, [target], self.config.shutdown_grace)

    def _new_producer(self, queue: str, limit: int) -> Producer:
        producer = Producer(
            pool=self._work_pool,
            acker=self._acker,
            prefix=self.config.prefix,
            node=self.config.node,
            queue=queue,
            limit=limit,
        )
        if not self._producers and not self._woken_by_inserts:
            # Only a node running queues listens for inserts: an insert-only node would
            # otherwise be sent back a notification for each of its own inserts.
            self._notifier.subscribe("insert", self._on_insert)
            self._woken_by_inserts = True
        self._producers[queue] = producer
        return producer

    def _on_insert(self, payload: Any) -> None:
        queue = payload.get("queue") if isinstance(payload, dict) else None
        producer = self._producers.get(str(queue))
        if producer is not None:
            producer.wake()

    async def _start_producer(self, queue: str, limit: int) -> None:
        if self._queues is None:
            raise TriobanError("the instance is not running")
        await self._queues.start(self._run_producer, self._new_producer(queue, limit))

    async def _run_producer(
        self, producer: Producer, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            if self._notifier.connected:  # no insert after its first fetch goes unnoticed
                await self._notifier.wait_listening(["insert"])
            await producer.run(task_status=task_status)
        finally:
            if self._producers.get(producer.queue) is producer:
                del self._producers[producer.queue]

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


def _check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise ValueError(f"expected limit to be an int between 1 and 10000, got {limit!r}")
    return limit


def _check_jobs(jobs: Iterable[Job] | Workflow | Batch) -> list[Job]:
    if isinstance(jobs, Job):
        raise TypeError("insert_all expects a list of jobs; use insert(job) for one")
    batch = jobs.build() if isinstance(jobs, Workflow | Batch) else list(jobs)
    for job in batch:
        if not isinstance(job, Job):
            raise TypeError(f"expected a Job built by Worker.new(), got {job!r}")
        if job.id is not None:
            raise ValueError(f"job {job.id} is already saved; build a new one with Worker.new()")
    return batch


def _check_conn(conn: object) -> None:
    if conn is not None and not isinstance(conn, _pg.Connection):
        raise TypeError(
            "expected conn to be a connection from `async with oban.transaction() as conn`, "
            f"got a {type(conn).__module__}.{type(conn).__qualname__}"
        )


def _check_type(value: object, kind: type, what: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"expected {what}, got {value!r}")


def _check_id(job_id: int) -> int:
    if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 1:
        raise TypeError(f"expected a job id (a positive int), got {job_id!r}")
    return job_id


def _check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
        raise ValueError(f"expected timeout to be a number of seconds >= 0, got {timeout!r}")
    return float(timeout)


def _encode_message(item: Mapping[str, Any]) -> str:
    if not isinstance(item, Mapping):
        raise TypeError(f"expected a notifier payload to be a dict, got {type(item).__name__}")
    text = _codec.encode_payload(item)
    if len(text.encode()) >= _codec.NOTIFY_LIMIT:
        raise ValueError(
            f"notifier payload is {len(text.encode())} bytes even compressed; PostgreSQL's "
            f"limit is {_codec.NOTIFY_LIMIT}: store the data in a table and send its key"
        )
    return text


@asynccontextmanager
async def open(conf: Config) -> AsyncIterator[Oban]:
    """Start a trioban instance: schema verified, notifier, queues and services running.

    The block is entered once every service is ready. Leaving it stops the queues from
    fetching, gives running jobs ``conf.shutdown_grace`` seconds, cancels the rest (they stay
    ``executing`` for the lifeline to rescue), writes every pending ack and closes connections.
    An exception raised inside the block comes out unchanged; a failure of one of trioban's own
    tasks comes out as a ``TriobanError``.
    """
    if not isinstance(conf, Config):
        raise TypeError(f"trioban.open() expects a trioban.Config, got {conf!r}")
    if conf.dsn is None:
        async with _embedded_dsn() as dsn, open(conf.evolve(dsn=dsn)) as oban:
            yield oban
        return
    body_error: BaseException | None = None
    try:
        async with (
            _pg.open_pool(conf.dsn, size=conf.pool_size) as pool,
            _pg.open_pool(_relaxed(conf.dsn), size=len(conf.queues) + 2) as work_pool,
        ):
            await _prepare_schema(pool, conf)
            async with _running(conf, pool, work_pool) as oban:
                try:
                    yield oban
                except BaseException as exc:
                    body_error = exc
                    raise
    except BaseExceptionGroup as group:
        collapsed = _collapse(group, body_error)
        if collapsed is group:
            raise
        # The user's own exception keeps its cause; ours points at the group.
        raise collapsed from (group if collapsed is not body_error else collapsed.__cause__)


@asynccontextmanager
async def _embedded_dsn() -> AsyncIterator[str]:
    """The embedded server's DSN (``Config(dsn=None)``), started off the event loop."""
    server = _embedded.embedded_server()
    dsn = await trio.to_thread.run_sync(server.__enter__)
    try:
        yield dsn
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.__exit__, None, None, None)


@asynccontextmanager
async def _running(conf: Config, pool: _pg.Pool, work_pool: _pg.Pool) -> AsyncIterator[Oban]:
    oban = Oban._create(conf, pool, work_pool)
    if conf.testing == "disabled":  # testing modes run no queue: tests drain them
        for queue, limit in conf.queues.items():
            oban._new_producer(queue, limit)
    _subscribe(oban)
    # Set before any task starts, so jobs inherit it (a job may relay or insert in turn).
    token = CURRENT.set(oban)
    try:
        async with (
            _aio.loop_if(bool(asyncio_queues() & set(conf.queues))),
            _services(oban) as running,
        ):
            yield running
    finally:
        CURRENT.reset(token)


@asynccontextmanager
async def _services(oban: Oban) -> AsyncIterator[Oban]:
    conf, producers = oban.config, oban._producers
    async with trio.open_nursery() as services:
        await services.start(oban._notifier.run)
        await services.start(oban._relays.run)
        await services.start(oban._inserter.run)
        await services.start(
            _heartbeat.run, oban._work_pool, conf.prefix, conf.heartbeat_interval, producers
        )
        await services.start(oban._leadership.run)
        if conf.testing == "disabled":
            await _start_maintenance(services, oban)
        async with trio.open_nursery() as acking:
            await acking.start(oban._acker.run)
            async with trio.open_nursery() as queues:
                oban._queues = queues
                for producer in list(producers.values()):
                    await queues.start(oban._run_producer, producer)
                if producers:
                    await services.start(
                        _stager.run, oban._work_pool, conf.prefix, conf.stage_interval, producers
                    )
                try:
                    yield oban
                finally:
                    oban._queues = None
                    await _stop_queues(producers.values(), conf.shutdown_grace)  # noqa: ASYNC102
            oban._acker.close()
        services.cancel_scope.cancel()


async def _start_maintenance(services: trio.Nursery, oban: Oban) -> None:
    """The leader's periodic work (lifeline, workflow sweep, pruner) and the cron scheduler."""
    conf, pool, leadership = oban.config, oban._work_pool, oban._leadership
    await services.start(
        while_leading,
        leadership,
        conf.heartbeat_interval,
        "lifeline",
        partial(_lifeline.rescue, pool, conf.prefix, conf.rescue_after),
    )
    await services.start(
        while_leading,
        leadership,
        conf.heartbeat_interval,
        "workflow sweep",
        partial(_settle.sweep, pool, conf.prefix),
    )
    if conf.prune_max_age is not None:
        await services.start(
            while_leading,
            leadership,
            min(PRUNE_INTERVAL, conf.prune_max_age),
            "pruner",
            partial(_pruner.prune, pool, conf.prefix, conf.prune_max_age, conf.prune_limit),
        )
    if oban._scheduler.entries:
        await services.start(oban._scheduler.run)


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
    return None if found is None else found.new


def _subscribe(oban: Oban) -> None:
    notifier, relays, producers = oban._notifier, oban._relays, oban._producers

    def on_reconnect() -> None:
        relays.poll_soon()
        for producer in producers.values():
            producer.wake()

    notifier.subscribe("relay", relays.deliver)
    notifier.subscribe(SIGNAL, oban._on_signal)
    notifier.subscribe(LEADER_CHANNEL, oban._leadership.elect_soon)
    notifier.on_reconnect(on_reconnect)


async def _stop_queues(producers: Iterable[Producer], grace: float) -> None:
    """Stop fetching, give running jobs ``grace`` seconds, then abandon what still runs."""
    stopping = list(producers)
    for producer in stopping:
        producer.stop()
    with trio.move_on_after(grace):
        for producer in stopping:
            await producer.wait_idle()
    for producer in stopping:
        producer.abandon()


def _relaxed(dsn: str) -> str:
    """The DSN for the pool that claims and acks jobs: commits there don't wait for the disk.

    Inserts stay durable on commit. A claim or an ack lost to a PostgreSQL crash at worst runs
    a job again (at-least-once), and this halves the disk flushes on the path of every job.
    """
    return _pg.with_options(dsn, synchronous_commit="off")


async def _prepare_schema(pool: _pg.Pool, conf: Config) -> None:
    async with pool.connection() as conn:
        if conf.install:
            await _schema.install(conn, conf.prefix)
        else:
            await _schema.verify(conn, conf.prefix)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _collapse(
    group: BaseExceptionGroup[BaseException], body: BaseException | None
) -> BaseException:
    """What to raise for an exception group from the instance's nurseries (STYLE rule 8)."""
    leaves = _leaves(group)
    if body is not None and all(leaf is body for leaf in leaves):
        return body
    if all(isinstance(leaf, trio.Cancelled) for leaf in leaves):
        return group
    errors = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
    if len(errors) == 1 and isinstance(errors[0], TriobanError) and body is None:
        return errors[0]
    return InternalError(f"a trioban task failed: {errors[0]!r}")
