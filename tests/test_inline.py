"""The inline testing mode: each job runs once, at insert, and its relay answers at once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

import trioban
from trioban import Config, JobState, RelayDiscard, Workflow

from .workers import flaky, flow_step, steer


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
