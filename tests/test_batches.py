"""Batches: callback args of encrypted and structured workers, and pruning whole batches."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

import trioban
from trioban import Batch
from trioban import _settle as settle
from trioban._pruner import prune
from trioban._settle import run_callbacks

from . import workers
from .helpers import eventually
from .workers import CampaignArgs, CampaignBatch, MailBatch, SecretMailBatch, echo

DAY = 86_400.0


async def _rows(oban: trioban.Oban, statement: str, *params: object) -> list[tuple[object, ...]]:
    async with oban.transaction() as conn:
        cur = await conn.execute(statement, params)
        return await cur.fetchall() if cur.description else []


# -- callback args ---------------------------------------------------------------------------


async def _callback_ran(expected: int) -> None:
    async def ran() -> bool:
        return len(workers.callback_runs) >= expected

    with trio.fail_after(10):
        await eventually(ran)


async def test_an_encrypted_worker_gets_its_callback_args(dsn: str) -> None:
    workers.callback_runs.clear()
    batch = Batch(callback=SecretMailBatch, callback_args={"campaign": "welcome"})
    batch.add(SecretMailBatch.new({"to": "x@example.com"}))
    conf = trioban.Config(dsn=dsn, queues={"default": 2}, stage_interval=0.1)
    async with trioban.open(conf) as oban:
        await oban.insert_all(batch)
        await _callback_ran(1)
        stored = await _rows(oban, "SELECT meta::text, args::text FROM oban_jobs")
    assert workers.callback_runs == [("secret", {"campaign": "welcome"})]
    assert "welcome" not in str(stored)  # encrypted at rest, in the batch jobs' meta too


async def test_a_structured_worker_gets_its_callback_args_as_its_class(dsn: str) -> None:
    workers.callback_runs.clear()
    with pytest.raises(ValueError, match="campaign") as raised:
        Batch(callback=CampaignBatch, callback_args={"subject": "hi"})
    assert "callback_args" in str(raised.value.__notes__)
    batch = Batch(callback=CampaignBatch, callback_args=CampaignArgs(campaign="welcome"))
    batch.add(CampaignBatch.new({"campaign": "welcome", "to": "x@example.com"}))
    conf = trioban.Config(dsn=dsn, queues={"default": 2}, stage_interval=0.1)
    async with trioban.open(conf) as oban:
        await oban.insert_all(batch)
        await _callback_ran(1)
    assert workers.callback_runs == [("structured", CampaignArgs(campaign="welcome"))]


# -- pruning ---------------------------------------------------------------------------------


@pytest.fixture
async def oban(dsn: str) -> AsyncIterator[trioban.Oban]:
    """An instance that runs nothing, and whose own pruner is off: the tests move jobs
    between states and prune themselves."""
    conf = trioban.Config(dsn=dsn, queues={}, prune_max_age=None)
    async with trioban.open(conf) as instance:
        yield instance


async def _finish(oban: trioban.Oban, state: str, ids: list[int], *, ago: float = 2 * DAY) -> None:
    """Finish jobs ``ago`` seconds ago, as if they ran then."""
    await _rows(
        oban,
        f"UPDATE oban_jobs SET state = '{state}', attempt = 1, "
        f"{state}_at = timezone('UTC', now()) - make_interval(secs => %s) "
        "WHERE id = ANY(%s)",
        ago,
        ids,
    )


async def _callback_ids(oban: trioban.Oban, *, but: str = "") -> list[int]:
    rows = await _rows(
        oban, "SELECT id FROM oban_jobs WHERE meta ? 'callback' AND meta->>'callback' <> %s", but
    )
    return [int(str(job_id)) for (job_id,) in rows]


async def _settle(oban: trioban.Oban, batch: Batch) -> int:
    return await run_callbacks(oban._pool, "public", [batch.batch_id])


async def _callbacks(oban: trioban.Oban, batch: Batch) -> list[object]:
    rows = await _rows(
        oban,
        "SELECT meta->>'callback' FROM oban_jobs WHERE meta->>'batch_id' = %s "
        "AND meta ? 'callback' ORDER BY 1",
        batch.batch_id,
    )
    return [name for (name,) in rows]


async def test_a_discarded_job_is_kept_until_its_batch_is_done(oban: trioban.Oban) -> None:
    batch = Batch([MailBatch.new({}), MailBatch.new({})], callback=MailBatch)
    failed, running = [job.id or 0 for job in await oban.insert_all(batch)]
    (loose,) = [job.id or 0 for job in await oban.insert_all([echo.new({})])]
    await _finish(oban, "discarded", [failed])
    await _finish(oban, "completed", [loose])
    assert await prune(oban._pool, "public", DAY, 100) == 1  # the loose job only
    await _finish(oban, "completed", [running], ago=0)
    await _settle(oban, batch)
    # The discarded job still counts: not "every job completed".
    assert await _callbacks(oban, batch) == [
        "handle_attempted",
        "handle_discarded",
        "handle_exhausted",
    ]


async def test_the_sweep_pages_through_every_recently_finished_batch(
    oban: trioban.Oban, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches whose acking node died before checking them: the leader's sweep reaches each
    one, a page per tick, however many finished in its window."""
    monkeypatch.setattr(settle, "SWEEP_BATCHES", 20)
    batches = [Batch([echo.new({})], callback=MailBatch, batch_id=f"b{i:02d}") for i in range(45)]
    saved = await oban.insert_all([job for batch in batches for job in batch.build()])
    await _finish(oban, "completed", [job.id or 0 for job in saved], ago=0)
    sweep = settle.Sweep(oban._pool, "public")
    # Three callbacks a batch (attempted, exhausted, completed); then a new cycle finds none.
    assert [await sweep() for _ in range(4)] == [60, 60, 15, 0]


async def test_callback_jobs_have_the_callback_workers_options(oban: trioban.Oban) -> None:
    batch = Batch([echo.new({})], callback=MailBatch)
    (job,) = await oban.insert_all(batch)
    await _finish(oban, "completed", [job.id or 0])
    assert await _settle(oban, batch) == 3  # attempted, exhausted, completed
    rows = await _rows(
        oban, "SELECT queue, max_attempts, priority, tags FROM oban_jobs WHERE meta ? 'callback'"
    )
    assert rows == [("default", 1, 2, ["mail"])] * 3


async def test_a_callback_is_kept_while_its_batch_runs(oban: trioban.Oban) -> None:
    batch = Batch([MailBatch.new({}), MailBatch.new({})], callback=MailBatch)
    done, retrying = [job.id or 0 for job in await oban.insert_all(batch)]
    await _finish(oban, "completed", [done])
    await _rows(
        oban, "UPDATE oban_jobs SET state = 'retryable', attempt = 1 WHERE id = %s", retrying
    )
    assert await _settle(oban, batch) == 1  # handle_attempted
    await _finish(oban, "completed", await _callback_ids(oban))
    assert await prune(oban._pool, "public", DAY, 100) == 0
    # A later ack of the retried job must not enqueue handle_attempted a second time.
    assert await _settle(oban, batch) == 0


async def test_a_finished_batch_is_pruned_whole(oban: trioban.Oban) -> None:
    batches = [Batch([MailBatch.new({}) for _ in range(3)], callback=MailBatch) for _ in range(2)]
    for batch in batches:
        await _finish(oban, "completed", [job.id or 0 for job in await oban.insert_all(batch)])
        await _settle(oban, batch)  # 3 callback jobs each, not yet run
    await _finish(oban, "completed", await _callback_ids(oban, but="handle_exhausted"))
    assert await prune(oban._pool, "public", DAY, 1) == 0  # each has a callback still to run
    await _finish(oban, "completed", await _callback_ids(oban))
    # Whole batches, 6 rows each, though the limit is 1: one batch per run.
    assert await prune(oban._pool, "public", DAY, 1) == 6
    assert await prune(oban._pool, "public", DAY, 1) == 6
    assert await _rows(oban, "SELECT id FROM oban_jobs") == []
