"""Small helpers for tests that wait on effects in other tasks or processes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

import trioban


async def eventually(check: Callable[[], Awaitable[bool]], *, interval: float = 0.02) -> None:
    """Wait until ``check()`` is true. For effects in other processes or sent over the notifier,
    which no in-process event signals; callers bound it with ``trio.fail_after``."""
    while True:
        if await check():
            return
        await trio.sleep(interval)


async def waiting_on_a_lock(oban: trioban.Oban, statement: str) -> int:
    """How many statements matching the LIKE pattern ``statement`` wait on a lock."""
    async with oban.transaction() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE %s",
            (statement,),
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def reaches(oban: trioban.Oban, job_id: int | None, state: trioban.JobState) -> trioban.Job:
    """Wait until job ``job_id`` is in ``state``; return it (bound it with ``trio.fail_after``)."""
    assert job_id is not None
    while True:
        job = await oban.get_job(job_id)
        if job is not None and job.state is state:
            return job
        await trio.sleep(0.02)
