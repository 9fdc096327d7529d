"""Batches: callback args of encrypted and structured workers, pruning whole batches, and
unique jobs in batches."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

import trioban
from trioban import Batch, Unique
from trioban import _settle as settle
from trioban._batch import BATCH_ID
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


async def test_a_sweep_looks_back_to_before_its_previous_cycle(oban: trioban.Oban) -> None:
    """The node that acked a batch's last job died before its callbacks, and no sweep ran for
    longer than the window (the cluster or PostgreSQL was down): a leader's first cycle looks
    at every batch, and each later one back to the window before the previous one began."""
    batch = Batch([echo.new({})], callback=MailBatch)
    (job,) = await oban.insert_all(batch)
    await _finish(oban, "completed", [job.id or 0], ago=2 * settle.SWEEP_WINDOW)
    sweep = settle.Sweep(oban._pool, "public")
    assert await sweep() == 3  # attempted, exhausted, completed
    later = Batch([echo.new({})], callback=MailBatch)
    (job,) = await oban.insert_all(later)
    await _finish(oban, "completed", [job.id or 0], ago=settle.SWEEP_WINDOW - 60)
    assert await sweep() == 3


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


# -- unique jobs -----------------------------------------------------------------------------

FOREVER = Unique(period=None)


async def _jobs(oban: trioban.Oban) -> list[tuple[object, ...]]:
    return await _rows(
        oban, "SELECT id, priority, meta->>'batch_id', meta->>'v' FROM oban_jobs ORDER BY id"
    )


async def test_a_batch_of_duplicates_only_is_refused_like_an_empty_one(oban: trioban.Oban) -> None:
    """Each of its jobs duplicates one outside it: none would carry the batch, so its
    callbacks could never run. It is refused whole, the replace of the existing jobs too."""
    with pytest.raises(ValueError, match="no jobs"):
        await oban.insert_all(Batch(callback=MailBatch))
    held = await oban.insert_all([MailBatch.new({"n": n}, unique=FOREVER) for n in (1, 2)])
    before = await _jobs(oban)
    replacing = Unique(period=None, replace={"available": ["priority"]})
    batch = Batch(
        [MailBatch.new({"n": n}, unique=replacing, priority=9) for n in (1, 2)], callback=MailBatch
    )
    ids = ", ".join(str(job.id) for job in held)
    with pytest.raises(ValueError, match=rf"batch {batch.batch_id} would have no jobs.*ids {ids}"):
        await oban.insert_all(batch)
    assert await _jobs(oban) == before  # priority 2 still, and in no batch


async def test_the_inline_mode_refuses_a_batch_with_or_without_unique_jobs(dsn: str) -> None:
    conf = trioban.Config(dsn=dsn, queues={}, testing="inline")
    async with trioban.open(conf) as inline:
        for unique in (False, FOREVER):
            batch = Batch([MailBatch.new({}, unique=unique)], callback=MailBatch)
            with pytest.raises(trioban.TriobanError, match="inline testing mode"):
                await inline.insert_all(batch)


async def test_a_refused_batch_leaves_the_callers_transaction_going(oban: trioban.Oban) -> None:
    await oban.insert_all([MailBatch.new({}, unique=FOREVER)])
    batch = Batch([MailBatch.new({}, unique=FOREVER)], callback=MailBatch)
    async with oban.transaction() as conn:
        with pytest.raises(ValueError, match="would have no jobs"):
            await oban.insert_all(batch, conn=conn)
        await oban.insert(echo.new({}), conn=conn)
    assert len(await _jobs(oban)) == 2


async def test_a_batch_inserted_again_is_not_refused(oban: trioban.Oban) -> None:
    """Its jobs duplicate its own jobs, which carry its id: the batch is there."""

    def nightly() -> Batch:
        return Batch([MailBatch.new({}, unique=FOREVER)], callback=MailBatch, batch_id="nightly")

    (job,) = await oban.insert_all(nightly())
    (again,) = await oban.insert_all(nightly())
    assert (again.id, again.conflict, again.meta[BATCH_ID]) == (job.id, True, "nightly")


async def test_a_duplicate_of_a_job_outside_the_batch_is_not_in_it(oban: trioban.Oban) -> None:
    """The batch is the jobs it inserted: its status and callbacks leave the duplicate out."""
    (outside,) = await oban.insert_all([MailBatch.new({"n": 1}, unique=FOREVER)])
    batch = Batch([MailBatch.new({"n": n}, unique=FOREVER) for n in (1, 2)], callback=MailBatch)
    duplicate, inserted = await oban.insert_all(batch)
    assert (duplicate.id, duplicate.conflict, inserted.conflict) == (outside.id, True, False)
    assert BATCH_ID not in duplicate.meta
    status = await oban.batch_status(batch.batch_id)
    assert (status["available"], status["total"]) == (1, 1)
    await _finish(oban, "completed", [inserted.id or 0], ago=0)
    assert await _settle(oban, batch) == 3  # the outside job still waits
    assert await _callbacks(oban, batch) == [
        "handle_attempted",
        "handle_completed",
        "handle_exhausted",
    ]


async def test_a_duplicate_does_not_move_a_job_to_its_batch(oban: trioban.Oban) -> None:
    """Replacing the meta of a job of another batch keeps the job in that batch: moving it
    would change which callbacks that batch fires, or leave it no jobs."""
    replacing = Unique(period=None, replace={"available": ["meta"]})

    def batch(*extra: int, v: int) -> Batch:
        jobs = [MailBatch.new({"n": 1}, unique=replacing, meta={"v": v})]
        return Batch(jobs + [MailBatch.new({"n": n}) for n in extra], callback=MailBatch)

    first, second, third = batch(2, v=1), batch(3, v=2), batch(v=3)
    held, _ = await oban.insert_all(first)
    duplicate, _ = await oban.insert_all(second)
    assert (duplicate.id, duplicate.conflict) == (held.id, True)
    assert duplicate.meta == {**held.meta, "v": 2}  # replaced, but for its batch keys
    totals = [(await oban.batch_status(b.batch_id))["total"] for b in (first, second)]
    assert totals == [2, 1]
    with pytest.raises(ValueError, match="would have no jobs"):
        await oban.insert_all(third)  # its only job is the first batch's
    assert (held.id, 2, first.batch_id, "2") in await _jobs(oban)
