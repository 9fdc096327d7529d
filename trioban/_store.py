"""The job statements as functions: insert, fetch, ack, stage, read, retry, cancel."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from . import _codec
from ._job import Job, JobState
from ._sql import channel, query
from ._worker import args_json

if TYPE_CHECKING:
    from ._executor import Ack
    from ._pg import Connection, Pool


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC)


def job_from_row(row: Sequence[Any]) -> Job:
    """A ``Job`` from a row selected with the ``{job}`` column list."""
    (id_, state, queue, worker, args, meta, tags, errors, attempt, max_attempts, priority,
     inserted_at, scheduled_at, attempted_at, attempted_by, completed_at, discarded_at,
     cancelled_at) = row  # fmt: skip
    return Job(
        id=id_,
        state=JobState(state),
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
    state = "null" if job.state in _AUTO_STATES else f'"{job.state.value}"'
    at = job.scheduled_at
    scheduled = "null" if at is None else f'"{at.astimezone(UTC).replace(tzinfo=None).isoformat()}"'
    return (
        f'{{"state":{state},"queue":{_codec.dumps(job.queue)},"worker":{_codec.dumps(job.worker)},'
        f'"args":{args_json(job)},"meta":{_codec.dumps(job.meta) if job.meta else "{}"},'
        f'"tags":{_codec.dumps(job.tags) if job.tags else "[]"},'
        f'"max_attempts":{job.max_attempts},"priority":{job.priority},"scheduled_at":{scheduled}}}'
    )


async def insert(conn: Connection, prefix: str, jobs: Sequence[Job]) -> list[Job]:
    """Insert ``jobs`` with one statement, which also notifies their queues."""
    if not jobs:
        return []
    params = {
        "jobs": "[" + ",".join(map(_row_json, jobs)) + "]",
        "queues": list({job.queue for job in jobs}),
        "channel": channel(prefix, "insert"),
    }
    cur = await conn.execute(query("insert_jobs", prefix), params)
    rows = await cur.fetchall()
    return [
        _saved(job, id_, state, inserted_at, scheduled_at)
        for job, (id_, state, inserted_at, scheduled_at) in zip(jobs, rows, strict=True)
    ]


_AUTO_STATES = frozenset({JobState.AVAILABLE, JobState.SCHEDULED})


def _saved(job: Job, id_: int, state: str, inserted: datetime, scheduled: datetime) -> Job:
    saved = Job(
        worker=job.worker,
        args=job.args,
        queue=job.queue,
        priority=job.priority,
        max_attempts=job.max_attempts,
        tags=job.tags,
        meta=job.meta,
        id=id_,
        state=JobState(state),
        inserted_at=_utc(inserted),
        scheduled_at=_utc(scheduled),
    )
    return saved


async def fetch(
    pool: Pool, prefix: str, queue: str, demand: int, node: str, producer: str
) -> list[Job]:
    """Claim up to ``demand`` available jobs of ``queue``."""
    params = {"queue": queue, "demand": demand, "node": node, "producer": producer}
    async with pool.connection() as conn:
        cur = await conn.execute(query("fetch_jobs", prefix), params)
        rows = await cur.fetchall()
    return [job_from_row(row) for row in rows]


async def ack(pool: Pool, prefix: str, acks: Sequence[Ack]) -> int:
    """Write a batch of outcomes in one statement; returns how many rows the fence let in."""
    params = {
        "acks": "[" + ",".join(a.json for a in acks) + "]",
        "relay_channel": channel(prefix, "relay"),
    }
    async with pool.connection() as conn:
        cur = await conn.execute(query("ack_jobs", prefix), params)
        return len(await cur.fetchall())


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


async def retry_job(pool: Pool, prefix: str, job_id: int) -> bool:
    """Make a job available again; False if it is already available or executing."""
    params = {"id": job_id, "channel": channel(prefix, "insert")}
    async with pool.connection() as conn:
        cur = await conn.execute(query("retry_job", prefix), params)
        row = await cur.fetchone()
    return bool(row and row[0])


async def cancel_jobs(
    pool: Pool, prefix: str, ids: list[int], reason: str
) -> list[tuple[int, str]]:
    """Cancel unfinished jobs; returns ``(id, state before)`` of each job it cancelled."""
    params = {"ids": ids, "reason": reason, "relay_channel": channel(prefix, "relay")}
    async with pool.connection() as conn:
        cur = await conn.execute(query("cancel_jobs", prefix), params)
        return [(int(id_), str(state)) for id_, state in await cur.fetchall()]


async def notify(conn: Connection, prefix: str, name: str, payloads: Sequence[str]) -> None:
    """Publish ``payloads`` on notifier channel ``name`` in one round trip."""
    params = {"channel": channel(prefix, name), "payloads": list(payloads)}
    await conn.execute(query("notify", prefix), params)
