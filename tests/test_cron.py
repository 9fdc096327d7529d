"""Cron: crontab parsing, time zones, and exactly one job per slot across nodes."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import psycopg
import pytest
import trio

import trioban
from trioban import ConfigError, _pg
from trioban._cron import CronEntry, Scheduler, minute_of
from trioban._instance import _builder, cron_entries
from trioban._leader import Leadership
from trioban._pruner import prune

from .workers import echo, hourly


def test_crontab_entries_are_parsed_and_checked() -> None:
    conf = trioban.Config(
        crontab=[
            ("*/5 * * * *", echo),
            ("0 3 * * *", "tests.workers.echo", {"args": {"n": 1}, "queue": "other"}),
            ("@hourly", echo, {"timezone": "Asia/Tokyo"}),
        ],
        timezone="Europe/Paris",
    )
    first, second, third = conf.crontab
    assert (first.worker, first.timezone) == ("tests.workers.echo", "Europe/Paris")
    assert (dict(second.args), dict(second.options)) == ({"n": 1}, {"queue": "other"})
    assert third.timezone == "Asia/Tokyo"


@pytest.mark.parametrize(
    ("crontab", "words"),
    [
        ([("61 * * * *", echo)], "cron expression like"),
        # croniter's seconds and year fields: a slot is a minute ("* * * * * 30" never ran).
        ([("* * * * * 30", echo)], "five fields (minute hour day month weekday)"),
        ([("0 3 * * * * 2027", echo)], "five fields"),
        ([("0 3 * *", echo)], "five fields"),
        # croniter's random fields: each node would draw its own minute.
        ([("R * * * *", echo)], "random fields (R)"),
        ([("0 r(1-5) * * *", echo)], "random fields (R)"),
        ([("@reboot", echo)], "nicknames are @annually, @daily"),
        ([("* * * * *", "echo")], "dotted name"),
        ([("* * * * *", echo, {"when": 1})], "unknown options ['when']"),
        ([("* * * * *", echo, {"timezone": "Mars/Base"})], "unknown time zone 'Mars/Base'"),
        # Found when the Config is built, not logged and skipped every minute.
        ([("* * * * *", echo, {"meta": {"result": 1}})], "meta key 'result' is reserved"),
        ([("* * * * *", "app.work\x00er")], "worker name to be text without the NUL"),
        ([("* * * * *", echo, {"meta": [1]})], "meta to be a dict"),
        ([("* * * * *",)], "expected (expression, worker[, options])"),
        ("* * * * *", "list of (expression, worker)"),
    ],
)
def test_bad_crontabs_say_what_is_wrong(crontab: object, words: str) -> None:
    with pytest.raises(ConfigError, match="crontab") as raised:
        trioban.Config(crontab=crontab)  # type: ignore[arg-type]
    assert words in str(raised.value)


def test_crontab_from_env_and_toml(tmp_path: Path) -> None:
    env = {"TRIOBAN_CRONTAB": json.dumps([["0 * * * *", "tests.workers.echo"]])}
    assert [e.expression for e in trioban.Config.from_env(env).crontab] == ["0 * * * *"]
    toml = tmp_path / "trioban.toml"
    toml.write_text(
        '[trioban]\ntimezone = "Europe/Paris"\n'
        'crontab = [["0 3 * * *", "tests.workers.echo", {args = {days = 7}}]]\n'
    )
    (entry,) = trioban.Config.from_toml(toml).crontab
    assert (entry.timezone, dict(entry.args)) == ("Europe/Paris", {"days": 7})
    with pytest.raises(ConfigError, match="JSON list"):
        trioban.Config.from_env({"TRIOBAN_CRONTAB": "[oops"})


def test_expressions_are_read_in_their_time_zone() -> None:
    paris = CronEntry("0 3 * * *", "tests.workers.echo", timezone="Europe/Paris")
    winter = datetime(2026, 1, 10, 2, 0, tzinfo=UTC)  # 03:00 in Paris (UTC+1)
    summer = datetime(2026, 7, 10, 1, 0, tzinfo=UTC)  # 03:00 in Paris (UTC+2)
    assert paris.is_due(winter)
    assert paris.is_due(summer)
    assert not paris.is_due(winter + timedelta(hours=1))
    # The spring-forward day has no 02:30 in Paris: "30 2 * * *" fires once, right after
    # the jump (03:00 local), as cron does; the autumn day's repeated hour fires it once too.
    gap = CronEntry("30 2 * * *", "tests.workers.echo", timezone="Europe/Paris")
    for day in (datetime(2026, 3, 29, tzinfo=UTC), datetime(2026, 10, 25, tzinfo=UTC)):
        due = [day + timedelta(minutes=m) for m in range(24 * 60)]
        keys = {gap.key(minute) for minute in due if gap.is_due(minute)}
        assert len(keys) == 1, day


def test_worker_cron_is_scheduled_by_nodes_running_its_queue() -> None:
    runs_it = trioban.Config(queues={"cron": 1})
    assert [e.worker for e in cron_entries(runs_it)] == [hourly.name]
    assert cron_entries(trioban.Config(queues={"default": 1})) == []
    with pytest.raises(ConfigError, match="cron expression"):
        trioban.worker(cron="every minute")(_noop)
    with pytest.raises(ConfigError, match="five fields"):
        trioban.worker(cron="*/5 * * * * 0")(_noop)


def test_month_and_day_names_and_nicknames_are_accepted() -> None:
    conf = trioban.Config(
        crontab=[("0 9 * mar-oct mon-fri", echo), ("@Daily", echo), ("@midnight", echo)]
    )
    assert len(conf.crontab) == 3


async def _noop(job: trioban.Job) -> None:
    pass


async def test_one_job_per_slot_across_nodes(dsn: str) -> None:
    entry = CronEntry("*/15 * * * *", echo.name, args={"from": "cron"})
    conf = trioban.Config(dsn=dsn)
    slot = datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
    async with trioban.open(conf) as first, trioban.open(conf) as second:
        schedulers = [
            Scheduler([entry], oban._leadership, oban.insert_all, _builder, transient=_pg.transient)
            for oban in (first, second, first)
        ]
        created: list[int] = []

        async def enqueue(scheduler: Scheduler, minute: datetime) -> None:
            created.append(await scheduler.enqueue(minute))

        async with trio.open_nursery() as nursery:
            for scheduler in schedulers:
                nursery.start_soon(enqueue, scheduler, slot)
        assert sorted(created) == [0, 0, 1]
        # Not due at 10:31; due again at 10:45. A clock stepping back is ignored.
        assert await schedulers[0].enqueue(slot + timedelta(minutes=1)) == 0
        assert await schedulers[0].enqueue(slot + timedelta(minutes=15)) == 1
        assert await schedulers[0].enqueue(slot) == 0
        async with first.transaction() as conn:
            cur = await conn.execute(
                "SELECT args, meta->>'cron_expr', queue FROM oban_jobs ORDER BY id"
            )
            rows = await cur.fetchall()
    assert rows == [({"from": "cron"}, "*/15 * * * *", "default")] * 2


def test_minute_of_floors_to_utc() -> None:
    moment = datetime(2026, 1, 1, 12, 0, 59, 999, tzinfo=UTC).astimezone()
    assert minute_of(moment) == datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_wildcard_entries_keep_running_through_a_repeated_hour() -> None:
    """Classic cron: in the hour an autumn clock change repeats, "*/5 * * * *" runs on both
    passes; a fixed-time entry runs once (see above)."""
    autumn = datetime(2026, 10, 25, tzinfo=UTC)  # Paris repeats 02:00-03:00 local
    minutes = [autumn + timedelta(minutes=m) for m in range(24 * 60)]  # 24 real hours
    for expression, slots in (("*/5 * * * *", 24 * 12), ("@hourly", 24), ("0,30 2 * * *", 2)):
        entry = CronEntry(expression, "tests.workers.echo", timezone="Europe/Paris")
        keys = {entry.key(minute) for minute in minutes if entry.is_due(minute)}
        assert len(keys) == slots, expression


async def test_a_slot_is_built_by_its_worker_imported_on_demand(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A node that hasn't imported the worker yet imports it, as running its job would; an
    entry whose worker is nowhere is skipped with an error, never inserted with guesses."""
    module = f"cron_lazy_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(
        "from trioban import worker\n\n"
        "@worker(queue='reports', priority=3, max_attempts=4, tags=['nightly'])\n"
        "async def cleanup(job):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    entries = [
        CronEntry("* * * * *", f"{module}.cleanup"),
        CronEntry("* * * * *", "tests.nowhere.missing"),
    ]
    slot = datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
    async with trioban.open(trioban.Config(dsn=dsn)) as oban:
        scheduler = Scheduler(
            entries, oban._leadership, oban.insert_all, _builder, transient=_pg.transient
        )
        with caplog.at_level(logging.ERROR, logger="trioban.cron"):
            assert await scheduler.enqueue(slot) == 1
        async with oban.transaction() as conn:
            cur = await conn.execute(
                "SELECT worker, queue, priority, max_attempts, tags FROM oban_jobs"
            )
            rows = await cur.fetchall()
    assert rows == [(f"{module}.cleanup", "reports", 3, 4, ["nightly"])]
    assert "tests.nowhere.missing; skipped" in caplog.text


async def test_a_slot_whose_insert_failed_is_retried_the_next_minute(
    autojump_clock: trio.testing.MockClock,
) -> None:
    entry = CronEntry("* * * * *", echo.name)
    failures = [OSError("the database is down")]
    inserted: list[str] = []

    async def insert_all(jobs: list[trioban.Job]) -> list[trioban.Job]:
        await trio.lowlevel.checkpoint()
        if failures:
            raise failures.pop()
        inserted.extend(job._unique.key for job in jobs if job._unique is not None)
        return jobs

    await _run_leading(entry, insert_all, 150)  # 10:01 fails; 10:02 enqueues it and itself
    first = datetime(2026, 1, 1, 10, 1, tzinfo=UTC)
    assert inserted == [entry.key(first), entry.key(first + timedelta(minutes=1))]


async def test_a_slot_postgres_refuses_is_skipped_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An insert PostgreSQL refuses outright (not "not now") gives its minute up: the minutes
    after it go in on time, rather than wait behind it for the catch-up window."""
    entry = CronEntry("* * * * *", echo.name)
    refused = datetime(2026, 1, 1, 10, 1, tzinfo=UTC)
    inserted: list[tuple[float, str]] = []

    async def insert_all(jobs: list[trioban.Job]) -> list[trioban.Job]:
        await trio.lowlevel.checkpoint()
        if any(job._unique is not None and job._unique.key == entry.key(refused) for job in jobs):
            raise psycopg.errors.CheckViolation("new row violates check constraint")
        inserted.extend((trio.current_time(), job._unique.key) for job in jobs if job._unique)
        return jobs

    await _run_leading(entry, insert_all, 210)  # 10:01 refused, 10:02 and 10:03 go in
    after = [refused + timedelta(minutes=n) for n in (1, 2)]
    assert [key for _, key in inserted] == [entry.key(minute) for minute in after]
    assert [round(at) for at, _ in inserted] == [90, 150]  # each on its own minute


async def _run_leading(
    entry: CronEntry,
    insert_all: Callable[[list[trioban.Job]], Awaitable[list[trioban.Job]]],
    seconds: float,
) -> None:
    """Run a leading node's scheduler of ``entry`` for ``seconds`` from 10:00:30 (mock clock)."""
    start = datetime(2026, 1, 1, 10, 0, 30, tzinfo=UTC).timestamp() - trio.current_time()
    leader = cast(Leadership, SimpleNamespace(is_leader=True))
    scheduler = Scheduler(
        [entry],
        leader,
        insert_all,
        _builder,
        transient=_pg.transient,
        clock=lambda: start + trio.current_time(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


async def test_entries_that_differ_only_in_args_or_options_each_get_their_slot(dsn: str) -> None:
    """Two reports of one worker, one schedule, other args: each slot enqueues both."""
    entries = [
        CronEntry("0 * * * *", echo.name, args={"kind": "sales"}),
        CronEntry("0 * * * *", echo.name, args={"kind": "stock"}),
        CronEntry("0 * * * *", echo.name, args={"kind": "stock"}, options={"queue": "other"}),
    ]
    slot = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    async with trioban.open(trioban.Config(dsn=dsn, queues={})) as oban:
        scheduler = Scheduler(
            entries, oban._leadership, oban.insert_all, _builder, transient=_pg.transient
        )
        assert await scheduler.enqueue(slot) == 3
        assert await scheduler.enqueue(slot, guard=False) == 0  # still once per slot
    # The key doesn't depend on the order args are given in.
    same = CronEntry("0 * * * *", echo.name, args={"b": 2, "a": 1})
    assert same.key(slot) == CronEntry("0 * * * *", echo.name, args={"a": 1, "b": 2}).key(slot)


async def test_entries_that_differ_only_in_time_zone_each_get_their_slot(dsn: str) -> None:
    """A 09:00 digest for Paris and one for New York: their slots fall at other instants but
    read the same local time, and each enqueues its job."""
    paris = CronEntry("0 9 * * *", echo.name, timezone="Europe/Paris")
    new_york = CronEntry("0 9 * * *", echo.name, timezone="America/New_York")
    paris_nine = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
    new_york_nine = datetime(2026, 11, 25, 14, 0, tzinfo=UTC)
    async with trioban.open(trioban.Config(dsn=dsn, queues={})) as oban:
        scheduler = Scheduler(
            [paris, new_york], oban._leadership, oban.insert_all, _builder, transient=_pg.transient
        )
        assert await scheduler.enqueue(paris_nine) == 1
        assert await scheduler.enqueue(new_york_nine) == 1
        assert await scheduler.enqueue(new_york_nine, guard=False) == 0  # still once per slot


def test_an_entry_without_args_or_options_keeps_its_key_across_upgrades() -> None:
    """Nodes of the previous release keyed slots on expression, worker and minute only: a UTC
    entry without args or options keeps that key, so a rolling upgrade runs its slot once."""
    slot = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    text = f"cron\0{'0 * * * *'}\0{echo.name}\0{'2026-11-25T10:00:00'}"
    assert CronEntry("0 * * * *", echo.name).key(slot) == hashlib.sha256(text.encode()).hexdigest()


async def test_a_short_prune_max_age_does_not_let_a_slot_run_twice(dsn: str) -> None:
    """Paris repeats 02:00-03:00 in autumn: "30 2 * * *" runs on the first pass only. Its job
    finished 40 minutes before the second pass; a 30-minute prune_max_age keeps its row (and
    key) anyway, for as long as a slot can come round again."""
    entry = CronEntry("30 2 * * *", echo.name, timezone="Europe/Paris")
    first_pass = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 +02:00
    async with trioban.open(trioban.Config(dsn=dsn, queues={}, prune_max_age=None)) as oban:
        scheduler = Scheduler(
            [entry], oban._leadership, oban.insert_all, _builder, transient=_pg.transient
        )
        assert await scheduler.enqueue(first_pass) == 1
        loose = await oban.insert(echo.new({}))
        await _completed(oban, minutes_ago=40)
        assert await prune(oban._work_pool, "public", 1800, 100) == 1  # the other job only
        assert await oban.get_job(loose.id or 0) is None
        assert await scheduler.enqueue(first_pass + timedelta(hours=1)) == 0  # 02:30 +01:00
        await _completed(oban, minutes_ago=4 * 60)
        assert await prune(oban._work_pool, "public", 1800, 100) == 1  # no longer than that


async def _completed(oban: trioban.Oban, *, minutes_ago: int) -> None:
    """Complete every job, as if ``minutes_ago``."""
    async with oban.transaction() as conn:
        await conn.execute(
            "UPDATE oban_jobs SET state = 'completed', attempt = 1, "
            "completed_at = timezone('UTC', now()) - make_interval(mins => %s)",
            (minutes_ago,),
        )
