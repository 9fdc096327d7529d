"""The inline testing mode: each job runs once, at insert, and its relay answers at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import trio

import trioban
from trioban import Config, JobState, NotRecorded, RelayDiscard, Workflow
from trioban.testing import drain_queue

from .workers import (
    Address,
    OrderArgs,
    Receipt,
    Size,
    echo,
    flaky,
    flow_step,
    place_order,
    record_text,
    sleeper,
    steer,
)


@pytest.fixture
async def inline(dsn: str) -> AsyncIterator[trioban.Oban]:
    async with trioban.open(Config(dsn=dsn, testing="inline")) as oban:
        yield oban


async def test_a_failure_ends_its_relay_even_with_retries(inline: trioban.Oban) -> None:
    """One attempt runs: no retry would ever answer a relay waiting for the final outcome."""
    with trio.fail_after(2):  # the relay's own timeout is 30 s
        with pytest.raises(RelayDiscard, match="failing attempt 1"):
            await inline.relay(flaky.new({"succeed_on": 2}), with_retries=True)
        relay = await inline.dispatch(steer.new({"kind": "raise"}))
        with pytest.raises(RelayDiscard, match="boom from the worker"):
            await relay.result(with_retries=True)
        # The job itself is reported as the attempt left it.
        assert (await inline.insert(flaky.new({"succeed_on": 2}))).state is JobState.RETRYABLE
    assert len(inline._relays) == 0


async def test_a_snooze_ends_its_relay(inline: trioban.Oban) -> None:
    with trio.fail_after(2):
        for with_retries in (False, True):
            job = steer.new({"kind": "snooze"})
            with pytest.raises(RelayDiscard, match="snoozed; the inline testing mode runs"):
                await inline.relay(job, with_retries=with_retries)
        assert (await inline.insert(steer.new({"kind": "snooze"}))).state is JobState.SCHEDULED


async def test_final_outcomes_are_relayed_as_they_are(inline: trioban.Oban) -> None:
    with trio.fail_after(2):
        result = await inline.relay(steer.new({"kind": "ok"}), with_retries=True)
        assert result == {"kind": "ok", "attempt": 1}
        with pytest.raises(trioban.RelayCancelled, match="told to cancel"):
            await inline.relay(steer.new({"kind": "cancel"}), with_retries=True)
        with pytest.raises(RelayDiscard, match="told to discard"):
            await inline.relay(steer.new({"kind": "discard"}))


async def test_an_inline_relay_can_be_awaited_again(inline: trioban.Oban) -> None:
    """Nothing is stored to read the outcome back from: the relay keeps it for later awaits."""
    with trio.fail_after(2):  # the relay's own timeout is 30 s
        ok = await inline.dispatch(steer.new({"kind": "ok"}))
        failed = await inline.dispatch(steer.new({"kind": "discard"}))
        for _ in range(2):
            assert await ok.result(timeout=1) == {"kind": "ok", "attempt": 1}
            with pytest.raises(RelayDiscard, match="told to discard"):
                await failed.result(timeout=1)
        [again, discarded] = await inline.await_many([ok, failed], timeout=1)
        assert again.unwrap() == {"kind": "ok", "attempt": 1}
        with pytest.raises(RelayDiscard, match="told to discard"):
            discarded.unwrap()
    assert len(inline._relays) == 0


async def test_relay_workflow_inline_is_refused(inline: trioban.Oban) -> None:
    """Inline runs each job once, at insert: it can't wait on a step's deps, so it refuses."""
    wf = Workflow("inline-run").add("a", flow_step.new({"value": 1}))
    with pytest.raises(trioban.TriobanError, match="testing='manual'"):
        await inline.relay_workflow(wf)
    with pytest.raises(trioban.TriobanError, match="testing='manual'"):
        await inline.append_workflow("inline-run", lambda more: more.add("b", flow_step.new({})))


async def test_a_failed_attempt_is_recorded_on_the_job_as_a_node_records_it(
    inline: trioban.Oban, dsn: str
) -> None:
    """Nothing is raised or logged (nor is it on a node): the job carries the error, as Oban's
    inline engine puts it on the job."""
    with trio.fail_after(5):
        failed = await inline.insert(steer.new({"kind": "raise"}))
        async with trioban.open(Config(dsn=dsn, testing="manual")) as manual:
            saved = await manual.insert(steer.new({"kind": "raise"}))
            await drain_queue(manual, "default")
            stored = await manual.get_job(saved.id or 0)
        cancelled = await inline.insert(steer.new({"kind": "cancel"}))
        done = await inline.insert(steer.new({"kind": "ok"}))
    assert stored is not None
    assert (failed.id, failed.state, failed.attempt) == (None, JobState.RETRYABLE, 1)
    [error], [on_node] = failed.errors, stored.errors
    assert {key: type(value) for key, value in error.items()} == {
        key: type(value) for key, value in on_node.items()
    }
    assert error["attempt"] == on_node["attempt"] == 1
    first_line = "RuntimeError: boom from the worker"
    assert error["error"].splitlines()[0] == on_node["error"].splitlines()[0] == first_line
    assert [entry["error"] for entry in cancelled.errors] == ["told to cancel"]
    assert done.errors == ()


async def test_fetch_recorded_reads_the_result_an_inline_job_carries(
    inline: trioban.Oban,
) -> None:
    order = OrderArgs(1, Size.SMALL, datetime(2024, 1, 2, tzinfo=UTC), Address("Paris"))
    with trio.fail_after(5):
        placed = await inline.insert(place_order.new(order))
        assert placed.id is None
        receipt = Receipt(order_id=1, summary="1x small to Paris on 2024-01-02", total=9.5)
        assert await inline.fetch_recorded(placed) == receipt
        text = await inline.insert(record_text.new({"text": "hi"}))
        assert await inline.fetch_recorded(text) == "hi"
        with pytest.raises(NotRecorded, match=r"unsaved job has no .* completed but recorded"):
            await inline.fetch_recorded(await inline.insert(echo.new({"value": 1})))
        with pytest.raises(NotRecorded, match="it is retryable"):
            await inline.fetch_recorded(await inline.insert(steer.new({"kind": "raise"})))
        with pytest.raises(NotRecorded, match=r"\(never inserted\) has no recorded result"):
            await inline.fetch_recorded(record_text.new({"text": "hi"}))


async def test_a_relay_timeout_does_not_cut_off_the_job_it_runs(inline: trioban.Oban) -> None:
    """The job runs inside the insert: a relay's timeout stops only waiting, never the job."""
    with trio.fail_after(2):
        assert await inline.relay(sleeper.new({"seconds": 0.2}), timeout=0.01) == "slept"


async def test_a_snoozed_or_retried_job_is_returned_as_a_node_writes_it(
    inline: trioban.Oban, dsn: str
) -> None:
    """A snooze grants an attempt (max_attempts one more) and moves scheduled_at, as a retry's
    backoff moves it."""
    with trio.fail_after(5):
        before = datetime.now(UTC)
        snoozed = await inline.insert(steer.new({"kind": "snooze"}))
        retried = await inline.insert(steer.new({"kind": "raise"}))
        async with trioban.open(Config(dsn=dsn, testing="manual")) as manual:
            saved = await manual.insert(steer.new({"kind": "snooze"}))
            await drain_queue(manual, "default")
            stored = await manual.get_job(saved.id or 0)
    assert stored is not None
    assert stored.max_attempts == saved.max_attempts + 1
    assert (snoozed.state, snoozed.attempt, snoozed.max_attempts) == (
        stored.state,
        stored.attempt,
        stored.max_attempts,
    )
    assert snoozed.scheduled_at is not None
    assert retried.scheduled_at is not None
    assert snoozed.scheduled_at >= before
    assert retried.scheduled_at > before
    assert retried.max_attempts == saved.max_attempts
