"""The job statements as functions: insert, fetch, ack, stage, read, retry, cancel."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import attrs
import psycopg

from . import _bulk, _codec
from ._batch import BATCH_ID, JOB_KEYS
from ._errors import InternalError
from ._job import AUTO_STATES, Job, JobState, as_inserted
from ._sql import channel, prepared, query, text_array
from ._validate import RESERVED_META
from ._worker import args_json
from ._workflow import STEP_KEYS, WORKFLOW_ID

if TYPE_CHECKING:
    from ._pg import Connection, Pool

log = logging.getLogger("trioban.store")


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else _aware(value)


@functools.lru_cache(maxsize=4096)
def _aware(value: datetime) -> datetime:
    # Memoised: rows of one statement share timestamps, and replace() costs a microsecond.
    return value.replace(tzinfo=UTC)


_STATES: dict[str, JobState] = {state.value: state for state in JobState}


def job_from_row(row: Sequence[Any]) -> Job:
    """A ``Job`` from a row selected with the ``{job}`` column list."""
    (id_, state, queue, worker, args, meta, tags, errors, attempt, max_attempts, priority,
     inserted_at, scheduled_at, attempted_at, attempted_by, completed_at, discarded_at,
     cancelled_at) = row  # fmt: skip
    return Job(
        id=id_,
        state=_STATES[state],
        queue=queue,
        worker=worker,
        args=args,
        meta=meta or {},
        tags=tuple(tags or ()),
        errors=tuple(errors or ()),
        attempt=attempt,
        max_attempts=max_attempts,
        priority=priority,
        inserted_at=_utc(inserted_at),
        scheduled_at=_utc(scheduled_at),
        attempted_at=_utc(attempted_at),
        attempted_by=tuple(attempted_by or ()),
        completed_at=_utc(completed_at),
        discarded_at=_utc(discarded_at),
        cancelled_at=_utc(cancelled_at),
    )


def _row_json(job: Job) -> str:
    """One job as a JSON object for the insert statement, reusing its encoded args."""
    state = "null" if job.state in AUTO_STATES else f'"{job.state.value}"'
    at = job.scheduled_at
    scheduled = "null" if at is None else f'"{at.astimezone(UTC).replace(tzinfo=None).isoformat()}"'
    return (
        f'{{"state":{state},"queue":{_codec.dumps(job.queue)},"worker":{_codec.dumps(job.worker)},'
        f'"args":{args_json(job)},"meta":{_codec.dumps(job.meta) if job.meta else "{}"},'
        f'"tags":{_codec.dumps(job.tags) if job.tags else "[]"},'
        f'"max_attempts":{job.max_attempts},"priority":{job.priority},"scheduled_at":{scheduled}'
        + (f',"attempted_by":{_codec.dumps(job.attempted_by)}}}' if job.attempted_by else "}")
    )


async def insert(conn: Connection, prefix: str, jobs: Sequence[Job]) -> list[Job]:
    """Insert ``jobs`` with one statement, which also notifies their queues."""
    if not jobs:
        return []
    if len(jobs) >= _bulk.MIN_ROWS:
        async with conn.transaction():
            saved = await _bulk.copy(conn, prefix, jobs)
            await _notify_inserted(conn, prefix, saved)
        return saved
    if len(jobs) == 1:
        one = {"job": _row_json(jobs[0]), "channel": channel(prefix, "insert")}
        rows = await conn.run(prepared("insert_job", prefix), one)
    else:
        params = {
            "jobs": "[" + ",".join(map(_row_json, jobs)) + "]",
            "queues": text_array(list({job.queue for job in jobs})),
            "channel": channel(prefix, "insert"),
        }
        rows = await conn.run(prepared("insert_jobs", prefix), params)
    return [_saved(job, *row) for job, row in zip(jobs, rows, strict=True)]


_UNIQUE_ROUNDS = 5
_DEADLOCK_ROUNDS = 3


async def insert_with_unique(conn: Connection, prefix: str, jobs: Sequence[Job]) -> list[Job]:
    """Insert a batch holding unique jobs in one transaction; results in the order given.

    Plain jobs go in with one statement. Each unique job is inserted unless a job holds its
    key; the unique index serialises concurrent inserts of the same key, and the holder is
    then read under a row lock. A holder outside the period or the states gives up its key
    and the insert is retried; otherwise it comes back with ``conflict=True`` (``replace``
    applied).

    Holders are locked in key order, other writers (the acker) lock rows in theirs: when
    PostgreSQL breaks a deadlock by failing this transaction (a savepoint inside a caller's
    one), it is run again, up to ``_DEADLOCK_ROUNDS`` times in all.
    """
    for _ in range(_DEADLOCK_ROUNDS - 1):
        try:
            async with conn.transaction():
                return await _insert_with_unique(conn, prefix, jobs)
        except psycopg.errors.DeadlockDetected:
            log.info("a unique insert was chosen to break a deadlock; running it again")
    async with conn.transaction():
        return await _insert_with_unique(conn, prefix, jobs)


async def _insert_with_unique(conn: Connection, prefix: str, jobs: Sequence[Job]) -> list[Job]:
    plain = iter(await insert(conn, prefix, [job for job in jobs if job._unique is None]))
    results = [next(plain) if job._unique is None else job for job in jobs]
    # In key order: every transaction then waits on the keys in the same order, so two
    # calls sharing keys queue up instead of deadlocking.
    keyed = [i for i, job in enumerate(jobs) if job._unique is not None]
    keyed.sort(key=lambda i: jobs[i]._unique.key)  # type: ignore[union-attr]
    latest: dict[int | None, Job] = {}
    for i in keyed:
        unique = await _insert_unique(conn, prefix, jobs[i])
        results[i] = latest[unique.id] = unique
    # A key given twice: each copy comes back as the row ended (with the later replace).
    for i in keyed:
        results[i] = attrs.evolve(latest[results[i].id], conflict=results[i].conflict)
    await _notify_inserted(conn, prefix, list(latest.values()))
    return results


async def _notify_inserted(conn: Connection, prefix: str, saved: Sequence[Job]) -> None:
    """Notify the queues of the ``saved`` jobs that are available, in ``conn``'s transaction."""
    woken = sorted({job.queue for job in saved if job.state is JobState.AVAILABLE})
    if woken:
        payloads = [_codec.dumps({"queue": queue}) for queue in woken]
        await notify(conn, prefix, "insert", payloads)


async def _insert_unique(conn: Connection, prefix: str, job: Job) -> Job:
    claim = job._unique
    assert claim is not None
    for _ in range(_UNIQUE_ROUNDS):
        params = {"job": _row_json(job), "uniq_key": claim.key}
        cur = await conn.execute(query("insert_unique_job", prefix), params)
        row = await cur.fetchone()
        if row is not None:
            return job_from_row(row)
        lock: dict[str, Any] = {"uniq_key": claim.key, "period": claim.period}
        cur = await conn.execute(query("lock_unique_job", prefix), lock)
        found = await cur.fetchone()
        if found is None:
            continue  # the holder was deleted meanwhile: try again
        holder, expired = job_from_row(found[:-1]), bool(found[-1])
        if expired or holder.state.value not in claim.states:
            await conn.execute(query("release_unique_key", prefix), {"id": holder.id})
            continue
        return attrs.evolve(await _replace(conn, prefix, holder, job), conflict=True)
    raise InternalError(f"could not settle the unique insert of {job.worker} (key {claim.key})")


async def _replace(conn: Connection, prefix: str, holder: Job, job: Job) -> Job:
    assert job._unique is not None
    fields = job._unique.replace.get(holder.state.value, ())
    if not fields:
        return holder
    new = _codec.loads(_row_json(job))
    changes = {field: new[field] for field in fields}
    # A new meta replaces the user's keys only: the holder (locked, so read as it is) keeps
    # trioban's and the new job's are dropped, its relay ref too (that relay joins the holder
    # by id: _relay.insert_relayed).
    kept = _own_keys(holder.meta)
    params = {
        "changes": _codec.dumps(changes),
        "id": holder.id,
        "kept": text_array(sorted(kept)),
        "dropped": text_array(sorted(kept | _own_keys(job.meta))),
    }
    cur = await conn.execute(query("replace_unique_job", prefix), params)
    row = await cur.fetchone()
    assert row is not None
    return job_from_row(row)


def _own_keys(meta: Mapping[str, Any]) -> set[str]:
    """The keys of ``meta`` trioban set: the reserved ones, and the keys a batch job or a
    workflow step gets beside its ``batch_id`` or ``workflow_id`` (elsewhere, the user's)."""
    keys = set(RESERVED_META)
    if BATCH_ID in meta:
        keys.update(JOB_KEYS)
    if WORKFLOW_ID in meta:
        keys.update(STEP_KEYS)
    return keys


def _saved(
    job: Job,
    id_: int,
    state: str,
    inserted: datetime,
    scheduled: datetime,
    attempted: datetime | None = None,
) -> Job:
    return as_inserted(
        job, id_, _STATES[state], _aware(inserted), _aware(scheduled), _utc(attempted)
    )


async def fetch(
    pool: Pool, prefix: str, queue: str, demand: int, node: str, producer: str
) -> list[Job]:
    """Claim up to ``demand`` available jobs of ``queue``."""
    params = {"queue": queue, "demand": demand, "node": node, "producer": producer}
    async with pool.connection() as conn:
        rows = await conn.run(prepared("fetch_jobs", prefix), params)
    return [job_from_row(row) for row in rows]


async def claim_one_of(
    pool: Pool, prefix: str, ids: Sequence[int], node: str, producer: str
) -> Job | None:
    """Claim the next of the jobs ``ids`` that is still available, if any."""
    params = {"ids": ids, "node": node, "producer": producer}
    async with pool.connection() as conn:
        cur = await conn.execute(query("claim_one_of", prefix), params)
        row = await cur.fetchone()
    return None if row is None else job_from_row(row)


async def ack(pool: Pool, prefix: str, acks: Sequence[str]) -> set[int]:
    """Write a batch of outcomes (each an ack's JSON) in one statement; returns the ids the
    fence let in. Relay notices in the acks are published."""
    params = {"acks": "[" + ",".join(acks) + "]", "relay_channel": channel(prefix, "relay")}
    async with pool.connection() as conn:
        return {row[0] for row in await conn.run(prepared("ack_jobs", prefix), params)}


async def stage(pool: Pool, prefix: str, limit: int) -> int:
    """Make due scheduled and retryable jobs available; returns how many."""
    params = {"limit": limit, "channel": channel(prefix, "insert")}
    async with pool.connection() as conn:
        cur = await conn.execute(query("stage_jobs", prefix), params)
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def get_job(pool: Pool, prefix: str, job_id: int) -> Job | None:
    """The job with ``job_id``, or None."""
    async with pool.connection() as conn:
        cur = await conn.execute(query("get_job", prefix), {"id": job_id})
        row = await cur.fetchone()
    return None if row is None else job_from_row(row)


async def relay_states(pool: Pool, prefix: str, ids: list[int]) -> list[tuple[Any, ...]]:
    """``(id, state, errors, meta)`` of the given jobs."""
    async with pool.connection() as conn:
        cur = await conn.execute(query("get_relay_states", prefix), {"ids": ids})
        return await cur.fetchall()


async def workflow_rows(
    conn: Connection, prefix: str, workflow_id: str, names: list[str] | None
) -> list[tuple[Any, ...]]:
    """``(name, state, worker, result)`` of a workflow's steps (those in ``names``, if given)."""
    params = {"workflow_id": workflow_id, "names": names}
    cur = await conn.execute(query("workflow_jobs", prefix), params)
    return await cur.fetchall()


async def workflow_steps(conn: Connection, prefix: str, workflow_id: str) -> dict[str, JobState]:
    """Each step of a workflow and its state, in insertion order."""
    rows = await workflow_rows(conn, prefix, workflow_id, None)
    return {name: JobState(state) for name, state, _, _ in rows}


async def batch_counts(pool: Pool, prefix: str, batch_id: str) -> dict[str, int]:
    """How many of a batch's jobs are in each state they are in."""
    async with pool.connection() as conn:
        cur = await conn.execute(query("batch_states", prefix), {"batch_id": batch_id})
        return {state: int(count) for state, count in await cur.fetchall()}


async def retry_job(pool: Pool, prefix: str, job_id: int) -> tuple[bool, str | None]:
    """Make a job available again (a workflow step with deps: waiting for them); returns
    whether it was retried (not if already available, executing or waiting for its deps)
    and, for a step now waiting, its workflow (to release)."""
    params = {"id": job_id, "channel": channel(prefix, "insert")}
    async with pool.connection() as conn:
        cur = await conn.execute(query("retry_job", prefix), params)
        row = await cur.fetchone()
    return row is not None, None if row is None or row[0] is None else str(row[0])


async def cancel_jobs(
    pool: Pool, prefix: str, ids: list[int], reason: str
) -> list[tuple[int, str, datetime | None]]:
    """Cancel unfinished jobs; returns ``(id, state before, attempted_at)`` of each job it
    cancelled."""
    params = {"ids": ids, "reason": reason, "relay_channel": channel(prefix, "relay")}
    async with pool.connection() as conn:
        cur = await conn.execute(query("cancel_jobs", prefix), params)
        rows = await cur.fetchall()
    return [(int(id_), str(state), _utc(at)) for id_, state, at in rows]


async def notify(conn: Connection, prefix: str, name: str, payloads: Sequence[str]) -> None:
    """Publish ``payloads`` on notifier channel ``name`` in one round trip."""
    params = {"channel": channel(prefix, name), "payloads": list(payloads)}
    await conn.execute(query("notify", prefix), params)
