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


async def test_relay_workflow_inline(inline: trioban.Oban) -> None:
    wf = Workflow("inline-run").add("a", flow_step.new({"value": 1}))
    with trio.fail_after(2):
        result = await inline.relay_workflow(wf)
        assert result == {"step": "a", "total": 1, "inputs": []}
        # Nothing is stored, so the same id may run again.
        again = Workflow("inline-run").add("a", flow_step.new({"value": 2}))
        assert (await inline.relay_workflow(again))["total"] == 2
