"""Bulk insert with COPY: take a block of ids, then stream the rows.

For a large batch COPY costs the server about half what ``INSERT ... SELECT`` from a JSON
recordset does, and as the rows stream Python builds the next chunk and the saved jobs while
the server writes the previous ones. The ids are drawn from the table's own sequence first,
so the saved jobs are known without reading the rows back. The caller's transaction makes the
insert all or nothing and carries its notifications (``_store.insert``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from . import _codec
from ._job import AUTO_STATES, Job, JobState, as_inserted
from ._sql import query, text_array
from ._worker import args_json

if TYPE_CHECKING:
    from ._pg import Connection

MIN_ROWS: Final = 100
"""Below this many jobs a single INSERT statement is quicker (COPY costs extra round trips)."""

_CHUNK: Final = 1_000  # rows per write: the server ingests one while the next is built
_COPY_ESCAPES: Final = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(value: str) -> str:
    """``value`` escaped for a field of COPY's text format."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value  # the usual case, found by four scans in C


def _state(job: Job, now: datetime) -> JobState:
    if job.attempted_by:
        return JobState.EXECUTING  # claimed on insert by a producer of this node
    if job.state not in AUTO_STATES:
        return job.state
    at = job.scheduled_at
    return JobState.SCHEDULED if at is not None and at > now else JobState.AVAILABLE


def _line(job: Job, id_: int, state: JobState, stamp: str) -> str:
    at = job.scheduled_at
    scheduled = stamp if at is None else at.astimezone(UTC).replace(tzinfo=None).isoformat()
    meta = copy_text(_codec.dumps(job.meta)) if job.meta else "{}"
    tags = copy_text(text_array(job.tags)) if job.tags else "{}"
    if job.attempted_by:  # attempt, attempted_at, attempted_by
        claim = f"1\t{stamp}\t{copy_text(text_array(job.attempted_by))}"
    else:
        claim = "0\t\\N\t\\N"
    return (
        f"{id_}\t{state.value}\t{copy_text(job.queue)}\t{copy_text(job.worker)}\t"
        f"{copy_text(args_json(job))}\t{meta}\t{tags}\t{job.max_attempts}\t{job.priority}\t"
        f"{scheduled}\t{claim}\n"
    )


def _chunks(
    jobs: Sequence[Job], ids: Sequence[int], states: Sequence[JobState], stamp: str
) -> Iterator[bytes]:
    for start in range(0, len(jobs), _CHUNK):
        end = start + _CHUNK
        rows = zip(jobs[start:end], ids[start:end], states[start:end], strict=True)
        yield "".join(_line(job, id_, state, stamp) for job, id_, state in rows).encode()


def _saved(job: Job, id_: int, state: JobState, now: datetime) -> Job:
    at = now if job.scheduled_at is None else job.scheduled_at.astimezone(UTC)
    return as_inserted(job, id_, state, now, at, now if state is JobState.EXECUTING else None)


async def copy(conn: Connection, prefix: str, jobs: Sequence[Job]) -> list[Job]:
    """Write ``jobs`` with COPY, in the caller's transaction; return them saved."""
    cur = await conn.execute(query("reserve_job_ids", prefix), {"count": len(jobs)})
    reserved = await cur.fetchone()
    assert reserved is not None
    ids, naive_now = sorted(reserved[0]), reserved[1]
    now = naive_now.replace(tzinfo=UTC)
    stamp = naive_now.isoformat()
    states = [_state(job, now) for job in jobs]
    async with cur.copy(query("copy_jobs", prefix)) as copy:
        for chunk in _chunks(jobs, ids, states, stamp):
            await copy.write(chunk)
        # Built while the server writes the last rows; the block's end waits for it.
        saved = list(map(_saved, jobs, ids, states, [now] * len(jobs)))
    return saved
