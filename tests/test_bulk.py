"""Bulk inserts of MIN_ROWS jobs or more go through COPY: the same rows as the INSERT statement,
all or nothing, notifications only on commit, cancellable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import trio

import trioban
from trioban import Config, JobState, _bulk, _pg

from .helpers import eventually
from .test_inserter import POISON_TRIGGER
from .workers import echo, unique_echo

HOSTILE = "tab\there, line\nbreak, cr\r, back\\slash \\N \\t, \"quote\", 'single', ünï✓, {b,r}"
FUTURE = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
PAST = FUTURE - timedelta(hours=2)
ROW = "state, queue, worker, args, meta, tags, max_attempts, priority, scheduled_at, attempt"


def _jobs(count: int, mark: str) -> list[trioban.Job]:
    """Jobs covering every column COPY writes, with text COPY and arrays must escape."""
    jobs = []
    for i in range(count):
        options: dict[str, Any] = {
            "queue": ("odd\\queue\\N,'q'" if i % 3 == 0 else "default"),
            "priority": i % 10,
            "max_attempts": 1 + i % 7,
            "tags": [HOSTILE, "a,b", "NULL", f"t{i}"] if i % 2 else None,
            "meta": {"m": HOSTILE, "n": [i, None, 1.5]} if i % 4 == 1 else None,
        }
        if i % 5 == 2:
            options["scheduled_at"] = FUTURE
        if i % 5 == 3:
            options["scheduled_at"] = PAST
        args = {"i": i, "mark": mark, "s": HOSTILE, "nested": {"x": [HOSTILE, {"y": i}]}}
        jobs.append(echo.new(args, **options))
    return jobs


async def _rows(oban: trioban.Oban, mark: str) -> list[tuple[Any, ...]]:
    async with oban.transaction() as conn:
        cur = await conn.execute(
            f"SELECT {ROW} FROM oban_jobs"  # a constant column list
            " WHERE args->>'mark' = %s ORDER BY (args->>'i')::int",
            [mark],
        )
        rows = await cur.fetchall()
    # Unscheduled jobs take their insert's time, which differs between inserts.
    given = {FUTURE.replace(tzinfo=None), PAST.replace(tzinfo=None)}
    return [(*row[:8], row[8] if row[8] in given else "now", row[9]) for row in rows]


async def test_copy_stores_what_the_statement_stores(dsn: str) -> None:
    count = _bulk.MIN_ROWS + 50
    with trio.fail_after(30):
        async with trioban.open(Config(dsn=dsn, queues={})) as oban:
            one_by_one = [await oban.insert(job) for job in _jobs(10, "single")]
            by_statement = await oban.insert_all(_jobs(_bulk.MIN_ROWS - 1, "statement"))
            by_copy = await oban.insert_all(_jobs(count, "copy"))
            reloaded = [await oban.get_job(job.id or 0) for job in by_copy]
            statement_rows = await _rows(oban, "statement")
            copy_rows = await _rows(oban, "copy")
            single_rows = await _rows(oban, "single")
    assert [job.args["i"] for job in by_copy] == list(range(count))
    assert by_copy == reloaded  # the saved jobs are the rows as stored
    strip = [row[:3] + row[4:] for row in copy_rows]  # args differ by their mark only
    assert [row[:3] + row[4:] for row in statement_rows] == strip[: _bulk.MIN_ROWS - 1]
    assert [row[:3] + row[4:] for row in single_rows] == strip[:10]
    assert copy_rows[0][3]["s"] == HOSTILE
    assert copy_rows[1][5] == [HOSTILE, "a,b", "NULL", "t1"]
    states = {job.state for job in by_copy}
    assert states == {JobState.AVAILABLE, JobState.SCHEDULED}
    ids = [job.id or 0 for job in one_by_one + by_statement + by_copy]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


async def test_copy_notifies_only_queues_given_available_jobs(dsn: str) -> None:
    listener = await _pg.connect(dsn)
    try:
        await listener.execute('LISTEN "public.oban_insert"')
        with trio.fail_after(20):
            async with trioban.open(Config(dsn=dsn, queues={})) as oban:
                jobs = [echo.new({"i": i}, queue="now") for i in range(_bulk.MIN_ROWS)]
                jobs += [echo.new({}, queue="later", schedule_in=600) for _ in range(20)]
                await oban.insert_all(jobs)
                with pytest.raises(RuntimeError):
                    async with oban.transaction() as conn:
                        rolled = [echo.new({}, queue="rolled") for _ in range(150)]
                        await oban.insert_all(rolled, conn=conn)
                        raise RuntimeError
            notes = [n.payload async for n in listener.notifies(timeout=0.5)]
    finally:
        await listener.close()
    assert notes == ['{"queue":"now"}']


async def test_copy_is_all_or_nothing(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(POISON_TRIGGER)
    jobs = [echo.new({"i": i}) for i in range(_bulk.MIN_ROWS * 2)]
    jobs[-1] = echo.new({"poison": True})
    with trio.fail_after(20):
        async with trioban.open(Config(dsn=dsn, queues={})) as oban:
            with pytest.raises(psycopg.errors.RaiseException, match="poisoned"):
                await oban.insert_all(jobs)
            saved = await oban.insert_all(jobs[:-1])
            async with oban.transaction() as conn:
                cur = await conn.execute("SELECT count(*) FROM oban_jobs")
                assert await cur.fetchone() == (len(saved),)


async def test_cancelled_copy_inserts_nothing_and_frees_its_connection(dsn: str) -> None:
    locker = await _pg.connect(dsn)
    try:
        with trio.fail_after(20):
            async with trioban.open(Config(dsn=dsn, queues={})) as oban:
                async with locker.transaction():
                    await locker.execute("LOCK TABLE oban_jobs IN EXCLUSIVE MODE")
                    with trio.move_on_after(0.5) as scope:
                        await oban.insert_all([echo.new({}) for _ in range(_bulk.MIN_ROWS)])
                    assert scope.cancelled_caught  # the COPY waited for the lock
                saved = await oban.insert_all([echo.new({}) for _ in range(_bulk.MIN_ROWS)])
                async with oban.transaction() as conn:
                    cur = await conn.execute("SELECT count(*) FROM oban_jobs")
                    assert await cur.fetchone() == (len(saved),)
                    assert oban._pool.statistics().in_use == 1
    finally:
        await locker.close()


async def test_copied_jobs_claimed_on_insert_run_once(dsn: str) -> None:
    count = _bulk.MIN_ROWS * 2
    with trio.fail_after(30):
        # No stager ticks: each wakes the producer, which then fetches before claiming again.
        settings: dict[str, Any] = {"queues": {"default": 5}, "stage_interval": 60}
        async with trioban.open(Config(dsn=dsn, **settings)) as oban:
            producer = oban._queues.producers["default"]

            async def drained() -> bool:  # the producer's first fetch came back short
                return producer.claimable

            await eventually(drained)
            saved = await oban.insert_all([echo.new({"i": i}) for i in range(count)])

            async def all_done() -> bool:
                async with oban.transaction() as conn:
                    cur = await conn.execute(
                        "SELECT count(*) FILTER (WHERE state = 'completed' AND attempt = 1),"
                        " count(*) FROM oban_jobs"
                    )
                    return await cur.fetchone() == (count, count)

            await eventually(all_done)
    claimed = [job for job in saved if job.state is JobState.EXECUTING]
    assert len(claimed) == 5  # one per free slot
    assert all(job.attempt == 1 and job.attempted_by for job in claimed)


async def test_unique_jobs_amid_a_copied_batch(dsn: str) -> None:
    """Plain jobs of a batch holding unique ones go through COPY inside the same transaction;
    the unique ones keep their places and their conflicts."""
    plain = [echo.new({"i": i}) for i in range(_bulk.MIN_ROWS + 20)]
    with trio.fail_after(20):
        async with trioban.open(Config(dsn=dsn, queues={})) as oban:
            first = await oban.insert(unique_echo.new({"value": "u"}))
            batch = [unique_echo.new({"value": "u"}), *plain, unique_echo.new({"value": "v"})]
            saved = await oban.insert_all(batch)
            async with oban.transaction() as conn:
                cur = await conn.execute("SELECT count(*) FROM oban_jobs")
                assert await cur.fetchone() == (len(plain) + 2,)
    assert saved[0].conflict
    assert saved[0].id == first.id
    assert not saved[-1].conflict
    assert [job.args["i"] for job in saved[1:-1]] == list(range(len(plain)))
    ids = [job.id or 0 for job in saved[1:]]
    assert ids == sorted(ids)
