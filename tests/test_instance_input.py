"""``Oban``'s methods check their arguments before they act, with errors naming the argument;
and ``oban.transaction()`` ends cleanly however its block ends."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import trioban
from trioban import Config

from .workers import echo

MAX_ID = 2**63 - 1


@pytest.fixture
async def oban(dsn: str) -> AsyncIterator[trioban.Oban]:
    conf = Config(dsn=dsn, queues={"default": 2}, node="A", shutdown_grace=0.2, pool_size=2)
    async with trioban.open(conf) as instance:
        yield instance


async def _count_jobs(oban: trioban.Oban) -> int:
    async with oban.transaction() as conn:
        cur = await conn.execute("SELECT count(*) FROM oban_jobs")
        row = await cur.fetchone()
    return int(row[0]) if row else -1


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"queue": 123, "limit": 1}, ValueError, "expected queue"),
        ({"queue": "", "limit": 1}, ValueError, "expected queue"),
        ({"queue": "x y", "limit": 1}, ValueError, "without spaces"),  # as Config(queues=...)
        ({"queue": "default", "limit": 0}, ValueError, "expected limit"),  # already runs here
        ({"queue": "zz", "limit": "abc", "node": "B"}, ValueError, "expected limit"),
        ({"queue": "zz", "limit": 1, "node": ""}, ValueError, "expected node"),
        ({"queue": "zz", "limit": 1, "local_only": "yes"}, TypeError, "local_only"),
        ({"queue": "zz", "limit": 1, "local_only": True, "node": "B"}, ValueError, "this node"),
    ],
)
async def test_start_queue_checks_everything_before_it_starts_or_signals(
    oban: trioban.Oban, kwargs: dict[str, Any], error: type[Exception], words: str
) -> None:
    with trio.fail_after(5):
        async with oban.listen(["signal"]) as signals:
            with pytest.raises(error, match=words):
                await oban.start_queue(**kwargs)
            await oban.pause_queue("marker", node="B")  # the first signal sent after
            _, first = await signals.receive()
    assert first["queue"] == "marker"
    assert list(oban._queues.producers) == ["default"]
    assert oban.check_queue("default").limit == 2


async def test_the_other_queue_methods_check_their_arguments(oban: trioban.Oban) -> None:
    for bad in (123, "", "x y", "tab\there"):
        for action in (oban.pause_queue, oban.resume_queue, oban.stop_queue):
            with pytest.raises(ValueError, match="expected queue"):
                await action(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="expected queue"):
            await oban.scale_queue(bad, limit=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected limit"):
        await oban.scale_queue("default", limit=0)
    for action in (oban.pause_queue, oban.resume_queue, oban.stop_queue):
        with pytest.raises(ValueError, match=r"local_only=True acts on this node \('"):
            await action("default", local_only=True, node="another")
    await oban.pause_queue("default", local_only=True, node=oban.config.node)  # this one: fine
    assert oban.check_queue("default").paused
    await oban.resume_queue("default", local_only=True)
    assert oban.check_queue("default").limit == 2
    assert not oban.check_queue("default").paused


async def test_timeouts_must_be_numbers_of_seconds(oban: trioban.Oban) -> None:
    bad: list[tuple[Any, type[Exception]]] = [
        (float("nan"), ValueError),
        (-1, ValueError),
        ("5", TypeError),
        (None, TypeError),
        (True, TypeError),
    ]
    with trio.fail_after(5):
        relay = await oban.dispatch(echo.new({"value": 1}))
        for timeout, error in bad:
            with pytest.raises(error, match="timeout"):
                await oban.relay(echo.new({"value": 2}), timeout=timeout)
            with pytest.raises(error, match="timeout"):
                await relay.result(timeout=timeout)
            with pytest.raises(error, match="timeout"):
                await oban.await_many([relay], timeout=timeout)
        assert await _count_jobs(oban) == 1  # no relay inserted its job
        assert await relay.result(timeout=float("inf")) == 1
        assert await relay.result(timeout=10**400) == 1  # an int too large for a float


async def test_await_many_takes_any_iterable_of_relays(oban: trioban.Oban) -> None:
    with trio.fail_after(5):
        relays = [await oban.dispatch(echo.new({"value": i})) for i in range(3)]
        outcomes = await oban.await_many(relay for relay in relays)
        assert [o.unwrap() for o in outcomes] == [0, 1, 2]
        assert [o.unwrap() for o in await oban.await_many(tuple(relays))] == [0, 1, 2]
        with pytest.raises(TypeError, match="use result"):
            await oban.await_many(relays[0])  # type: ignore[arg-type]


async def test_notify_takes_a_json_object_or_a_list_of_them(oban: trioban.Oban) -> None:
    for payload in (1, "text", b"bytes", None):
        with pytest.raises(TypeError, match="JSON object"):
            await oban.notify("gossip", payload)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dict, got int"):
        await oban.notify("gossip", [1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list of channel names"):
        oban.listen(None)  # type: ignore[arg-type]
    with trio.fail_after(5):
        async with oban.listen(["gossip"]) as messages:
            await oban.notify("gossip", ({"n": 1}, {"n": 2}))  # any sequence
            assert [await messages.receive() for _ in range(2)] == [
                ("gossip", {"n": 1}),
                ("gossip", {"n": 2}),
            ]


async def test_identical_payloads_in_one_notify_are_delivered_once(oban: trioban.Oban) -> None:
    """As notify()'s docstring says: PostgreSQL merges duplicate notifications of one
    transaction; separate calls deliver each."""
    with trio.fail_after(5):
        async with oban.listen(["gossip"]) as messages:
            await oban.notify("gossip", [{"n": 1}, {"n": 1}, {"n": 2}])
            await oban.notify("gossip", {"n": 2})
            await oban.notify("gossip", {"n": "end"})  # delivered in commit order, after
            received = [await messages.receive() for _ in range(4)]
    assert [payload for _, payload in received] == [{"n": 1}, {"n": 2}, {"n": 2}, {"n": "end"}]


async def test_job_ids_outside_bigint_are_refused_alike(oban: trioban.Oban) -> None:
    """No method reaches PostgreSQL with an id its bigint column can't hold."""
    for job_id in (MAX_ID + 1, 2**70, 0, -1):
        for method in (oban.get_job, oban.retry_job, oban.cancel_job, oban.fetch_recorded):
            with pytest.raises(ValueError, match=r"job id between 1 and 2\*\*63 - 1"):
                await method(job_id)
        with pytest.raises(ValueError, match="job id between"):
            await oban.cancel_all_jobs([1, job_id])
    for not_ids in ("12", None, 5):
        with pytest.raises(TypeError, match="list of job ids"):
            await oban.cancel_all_jobs(not_ids)  # type: ignore[arg-type]
    # The largest id is one, of a job that doesn't exist.
    assert await oban.get_job(MAX_ID) is None
    assert await oban.retry_job(MAX_ID) is False
    assert await oban.cancel_job(MAX_ID) is False
    assert await oban.cancel_all_jobs([MAX_ID]) == 0


async def test_a_cancelled_transaction_rolls_back_and_keeps_its_connection(
    oban: trioban.Oban, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    connections = []
    with trio.fail_after(5):
        for commit_cancelled in (False, True, False, True):
            with trio.CancelScope() as scope:
                async with oban.transaction() as conn:
                    connections.append(conn)
                    await oban.insert(echo.new({}), conn=conn)
                    scope.cancel()
                    if not commit_cancelled:
                        await trio.lowlevel.checkpoint()  # cancelled in the block
                    # else: the block ends, and the commit is cancelled before it is sent
            assert scope.cancelled_caught
        assert await _count_jobs(oban) == 0
        async with oban.transaction() as conn:
            await oban.insert(echo.new({}), conn=conn)
        assert await _count_jobs(oban) == 1
    assert all(conn is connections[0] for conn in connections)
    assert "rollback" not in caplog.text


async def test_a_transactions_connection_is_refused_once_its_block_has_ended(
    oban: trioban.Oban,
) -> None:
    """Back in the pool, it is idle or in another task's transaction: nothing would commit
    the insert, or another task's rollback would undo it."""
    async with oban.transaction() as conn:
        await oban.insert(echo.new({}), conn=conn)
    with pytest.raises(ValueError, match="conn is not in a transaction: its `async with"):
        await oban.insert(echo.new({}), conn=conn)
    with pytest.raises(ValueError, match="conn is not in a transaction"):
        await oban.notify("gossip", {"late": True}, conn=conn)
    assert await _count_jobs(oban) == 1


async def test_cancel_reasons_postgresql_cant_store_are_refused(oban: trioban.Oban) -> None:
    """A NUL or a lone surrogate in the reason raised psycopg's DataError (or a
    UnicodeEncodeError) from the query, not a ValueError naming the reason."""
    job = await oban.insert(echo.new({}, schedule_in=3600))
    assert job.id is not None
    for reason, words in (("a\x00b", "NUL character"), ("\ud800", "lone surrogate")):
        with pytest.raises(ValueError, match=f"cancel reason .*{words}"):
            await oban.cancel_job(job.id, reason=reason)
        with pytest.raises(ValueError, match=f"cancel reason .*{words}"):
            await oban.cancel_all_jobs([job.id], reason=reason)
    with pytest.raises(TypeError, match="cancel reason to be a str, got 7"):
        await oban.cancel_job(job.id, reason=7)  # type: ignore[arg-type]
    found = await oban.get_job(job.id)
    assert found is not None
    assert found.state is trioban.JobState.SCHEDULED
    assert await oban.cancel_job(job.id, reason="é, then \\x00 as text")


async def test_odd_arguments_get_clear_errors(oban: trioban.Oban) -> None:
    with trio.fail_after(5):
        for flag in ("yes", None, 1):
            with pytest.raises(TypeError, match="with_retries to be True or False"):
                await oban.relay(echo.new({"value": 1}), with_retries=flag)  # type: ignore[arg-type]
        relay = await oban.dispatch(echo.new({"value": 1}))
        with pytest.raises(TypeError, match="with_retries to be True or False"):
            await relay.result(with_retries="yes")  # type: ignore[arg-type]
        for jobs in (None, "jobs", {"a": 1}):
            with pytest.raises(TypeError, match="insert_all expects a list of jobs"):
                await oban.insert_all(jobs)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="expected queue"):
            oban.check_queue(None)  # type: ignore[arg-type]
        assert await relay.result() == 1


async def test_queue_methods_after_the_instance_closed_say_so(dsn: str) -> None:
    async with trioban.open(Config(dsn=dsn, queues={"default": 1})) as oban:
        pass
    with pytest.raises(trioban.TriobanError, match="has closed"):
        oban.check_queue("default")
    for local_only in (True, False):
        with pytest.raises(trioban.TriobanError, match="has closed"):
            await oban.pause_queue("default", local_only=local_only)


async def test_a_rollback_keeps_the_statements_trioban_prepared(dsn: str) -> None:
    """psycopg prepares a query it runs often by itself, and then deallocates every prepared
    statement at a rollback: the insert's too, which failed the next insert in a transaction."""
    with trio.fail_after(10):
        async with trioban.open(Config(dsn=dsn, queues={}, pool_size=1)) as oban:
            saved = await oban.insert(echo.new({"value": 0}))  # prepares the insert statement
            assert saved.id is not None
            for _ in range(8):
                await oban.get_job(saved.id)
            with pytest.raises(RuntimeError, match="rolled back"):
                async with oban.transaction():
                    raise RuntimeError("rolled back")
            async with oban.transaction() as conn:
                await conn.execute("SELECT 1")  # in a transaction: no second try possible
                again = await oban.insert(echo.new({"value": 1}), conn=conn)
            assert again.id is not None
