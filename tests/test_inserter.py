"""Inserts from concurrent callers share statements; one bad request fails only itself."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import psycopg
import pytest
import trio

import trioban
from trioban import Config, _pg
from trioban._inserter import Inserter

from .helpers import eventually, waiting_on_a_lock
from .workers import echo

POISON_TRIGGER = """
CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.args ? 'poison' THEN RAISE EXCEPTION 'poisoned job refused'; END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER refuse_poison BEFORE INSERT ON oban_jobs
  FOR EACH ROW EXECUTE FUNCTION refuse_poison();
"""


# Poisoned rows wait for advisory lock 42 (held by the test) before failing.
SLOW_POISON_TRIGGER = """
CREATE FUNCTION refuse_poison_slowly() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.args ? 'poison' THEN
    PERFORM pg_advisory_xact_lock(42);
    RAISE EXCEPTION 'poisoned job refused';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER refuse_poison_slowly BEFORE INSERT ON oban_jobs
  FOR EACH ROW EXECUTE FUNCTION refuse_poison_slowly();
"""


async def _inserted_at_groups(oban: trioban.Oban) -> list[int]:
    async with oban.transaction() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM oban_jobs GROUP BY inserted_at ORDER BY inserted_at"
        )
        return [int(row[0]) for row in await cur.fetchall()]


async def test_concurrent_inserts_share_statements(dsn: str) -> None:
    """200 callers inserting at once: far fewer statements than callers (the rows of one
    statement share its transaction's inserted_at), and every caller gets its own job."""
    saved: list[trioban.Job] = []

    async def insert(value: int) -> None:
        saved.append(await oban.insert(echo.new({"value": value})))

    with trio.fail_after(20):
        async with trioban.open(Config(dsn=dsn, queues={})) as oban:
            async with trio.open_nursery() as nursery:
                for value in range(200):
                    nursery.start_soon(insert, value)
            groups = await _inserted_at_groups(oban)
    assert sorted(job.args["value"] for job in saved) == list(range(200))
    assert len({job.id for job in saved}) == 200
    assert sum(groups) == 200
    assert len(groups) <= 5, groups


async def test_a_failing_request_fails_alone(dsn: str) -> None:
    """A statement shared by several callers fails on one bad row: each request is retried on
    its own, so only the bad one's caller sees the error."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(POISON_TRIGGER)
    results: dict[str, object] = {}

    async def insert(name: str, args: Mapping[str, object]) -> None:
        try:
            results[name] = await oban.insert(echo.new(args))
        except psycopg.Error as exc:
            results[name] = exc

    with trio.fail_after(20):
        async with trioban.open(Config(dsn=dsn, queues={})) as oban:
            async with trio.open_nursery() as nursery:
                for value in range(20):
                    nursery.start_soon(insert, f"good{value}", {"value": value})
                nursery.start_soon(insert, "bad", {"value": -1, "poison": True})
            groups = await _inserted_at_groups(oban)
    assert isinstance(results.pop("bad"), psycopg.errors.RaiseException)
    assert all(isinstance(job, trioban.Job) and job.id for job in results.values())
    assert len(results) == 20
    assert sum(groups) == 20


async def test_a_failed_claimed_insert_gives_its_slot_back(dsn: str) -> None:
    """A job claimed on insert whose statement fails holds no slot: the next insert is
    claimed in its place and runs."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(POISON_TRIGGER)
    conf = Config(dsn=dsn, queues={"default": 1}, stage_interval=60)
    with trio.fail_after(20):
        async with trioban.open(conf) as oban:
            await oban.relay(echo.new({"value": 0}))
            producer = oban._queues.producers["default"]

            async def claimable() -> bool:
                return producer.claimable

            await eventually(claimable)
            with pytest.raises(psycopg.errors.RaiseException, match="poisoned"):
                await oban.insert(echo.new({"value": -1, "poison": True}))
            assert producer._reserved == 0
            claimed = await oban.insert(echo.new({"value": 1}))
            assert claimed.state is trioban.JobState.EXECUTING
            assert await oban.relay(echo.new({"value": 2})) == 2


async def test_every_writer_task_takes_requests(dsn: str) -> None:
    """While every statement is slow (waiting on a lock held here), each new request is
    taken by an idle writer task: the caller writing its own plus one statement per writer
    are in flight at once."""
    writers = 4  # pool_size // 2
    in_flight = 0

    async def all_waiting() -> bool:
        return await waiting_on_a_lock(oban, "%INSERT INTO%oban_jobs%") == in_flight

    with trio.fail_after(20):
        async with trioban.open(Config(dsn=dsn, queues={}, pool_size=2 * writers)) as oban:
            with psycopg.connect(dsn) as lock:
                # In a thread: a task of this process may hold a lock the LOCK waits for.
                exclusive = "LOCK TABLE oban_jobs IN EXCLUSIVE MODE"
                await trio.to_thread.run_sync(lock.execute, exclusive)
                async with trio.open_nursery() as nursery:
                    for value in range(1 + writers):
                        nursery.start_soon(oban.insert, echo.new({"value": value}))
                        in_flight += 1
                        with trio.move_on_after(3):
                            await eventually(all_waiting)
                        assert await waiting_on_a_lock(oban, "%INSERT INTO%oban_jobs%") == in_flight
                    lock.commit()
            assert sum(await _inserted_at_groups(oban)) == 1 + writers


async def test_a_released_slot_fetches_the_job_waiting_for_it(dsn: str) -> None:
    """A job inserted while the queue's only slot is reserved for a claimed insert runs as
    soon as that insert fails and gives the slot back, not at the stager's next tick."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SLOW_POISON_TRIGGER)
    conf = Config(dsn=dsn, queues={"default": 1}, stage_interval=60)

    async def poisoned() -> None:
        with pytest.raises(psycopg.errors.RaiseException, match="poisoned"):
            await oban.insert(echo.new({"value": -1, "poison": True}))

    with trio.fail_after(20):
        async with trioban.open(conf) as oban, trio.open_nursery() as nursery:
            await oban.relay(echo.new({"value": 0}))
            producer = oban._queues.producers["default"]

            async def claimable() -> bool:
                return producer.claimable

            async def reserved() -> bool:
                return producer._reserved == 1

            await eventually(claimable)
            with psycopg.connect(dsn, autocommit=True) as lock:
                lock.execute("SELECT pg_advisory_lock(42)")
                nursery.start_soon(poisoned)
                await eventually(reserved)
                wakes = producer._wakes
                waiting = await oban.insert(echo.new({"value": 1}))
                assert waiting.state is trioban.JobState.AVAILABLE  # no slot to claim it

                async def woken_twice() -> bool:  # by this insert, then by its notification
                    return producer._wakes >= wakes + 2

                await eventually(woken_twice)
                lock.execute("SELECT pg_advisory_unlock(42)")

            async def completed() -> bool:
                job = await oban.get_job(waiting.id or 0)
                return job is not None and job.state is trioban.JobState.COMPLETED

            with trio.fail_after(3):
                await eventually(completed)


async def test_requests_of_a_statement_fail_together_while_postgres_is_unreachable(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Unreachable is no single caller's fault: a shared statement's requests all get the
    error, instead of each retrying alone through its own reconnect attempts (which held the
    callers, and shutdown, for seconds per request)."""
    caplog.set_level(logging.INFO, "trioban.inserter")
    errors: list[Exception] = []
    async with _pg.open_pool("postgresql://127.0.0.1:1/nowhere", size=2) as pool:
        inserter = Inserter(pool, "public", writers=2)

        async def insert(n: int) -> None:
            try:
                await inserter.insert([echo.new({"value": n})])
            except _pg.DatabaseUnavailable as exc:
                errors.append(exc)

        async with trio.open_nursery() as writers:
            await writers.start(inserter.run)
            async with trio.open_nursery() as callers:
                for n in range(8):
                    callers.start_soon(insert, n)
            writers.cancel_scope.cancel()
    assert len(errors) == 8
    assert "one by one" not in caplog.text
