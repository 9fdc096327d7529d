"""Relay: persistent, distributed async/await, against a real PostgreSQL."""

from __future__ import annotations

import gc
import os
import random
import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import outcome
import pytest
import trio

import trioban
import trioban.testing
from trioban import Config, RelayCancelled, RelayDiscard, RelayTimeout, _notice, _pg, _relay
from trioban._codec import NOTIFY_LIMIT, decode_payload
from trioban._notice import Notice
from trioban._relay import _Waiter

from . import workers
from .helpers import eventually, reaches
from .nodes import node_processes
from .workers import (
    big_result,
    echo,
    flaky,
    json_shaped,
    steer,
    unique_echo,
    unique_recorded_echo,
    wait_gate,
    whoami,
)


@asynccontextmanager
async def running(dsn: str, **settings: Any) -> AsyncIterator[trioban.Oban]:
    settings.setdefault("queues", {"default": 20})
    settings.setdefault("stage_interval", 0.1)
    settings.setdefault("shutdown_grace", 0.5)
    async with trioban.open(Config(dsn=dsn, **settings)) as oban:
        yield oban


async def _terminate_notifier(oban: trioban.Oban) -> int:
    """Kill the notifier's connection from the server side, as a restart would."""
    async with oban.transaction() as conn:
        cur = await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [f"trioban-notifier {oban.config.node}"],
        )
        return len(await cur.fetchall())


async def test_relay_returns_the_result_and_api_shapes(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn) as oban:
            assert await oban.relay(echo.new({"value": 42}), timeout=5) == 42
            relay = await oban.dispatch(echo.new({"value": {"a": [1, 2]}}))
            assert isinstance(relay, trioban.Relay)
            assert relay.job.id is not None
            assert isinstance(relay.ref, str)
            assert await relay.result(timeout=5) == {"a": [1, 2]}
            # result() may be called again: the relay keeps the outcome it received.
            assert await relay.result(timeout=5) == {"a": [1, 2]}
            assert await echo.relay({"value": 5}, timeout=5) == 5
            assert len(oban._relays) == 0


async def test_a_job_that_finishes_before_result_is_called_is_not_missed(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn) as oban:
            relays = [await oban.dispatch(echo.new({"value": i})) for i in range(50)]
            await trio.sleep(0.5)  # every job has finished before anyone waits
            assert [await r.result(timeout=5) for r in relays] == list(range(50))


async def test_relay_outcomes(dsn: str) -> None:
    with trio.fail_after(20):
        async with running(dsn) as oban:
            with pytest.raises(RelayCancelled) as cancelled:
                await oban.relay(steer.new({"kind": "cancel"}), timeout=5)
            assert cancelled.value.reason == "told to cancel"
            with pytest.raises(RelayDiscard) as discarded:
                await oban.relay(steer.new({"kind": "discard"}), timeout=5)
            assert discarded.value.reason == "told to discard"
            # An error: at once without with_retries, the final outcome with it.
            with pytest.raises(RelayDiscard, match="failing attempt 1"):
                await oban.relay(flaky.new({"succeed_on": 2}), timeout=5)
            assert await oban.relay(flaky.new({"succeed_on": 2}), with_retries=True) == "ok on 2"
            with pytest.raises(RelayDiscard, match="failing attempt 3"):
                await oban.relay(flaky.new({"succeed_on": 9}), timeout=5, with_retries=True)
            assert await oban.relay(steer.new({"kind": "snooze"}), timeout=5) == {
                "kind": "snooze",
                "attempt": 2,
            }
            assert issubclass(RelayTimeout, trioban.RelayError)


async def test_results_larger_than_notify_limit_arrive_whole(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn) as oban:
            result = await oban.relay(big_result.new({"size": 100_000}), timeout=5)
            assert result == "x" * 100_000


async def test_timeout_stops_the_waiting_not_the_job(dsn: str) -> None:
    gate = workers.gates["timeout"] = trio.Event()
    with trio.fail_after(10):
        async with running(dsn) as oban:
            relay = await oban.dispatch(wait_gate.new({"gate": "timeout"}))
            with pytest.raises(RelayTimeout):
                await relay.result(timeout=0.2)
            assert len(oban._relays) == 0
            with trio.move_on_after(0.2):
                await relay.result(timeout=5)
            assert len(oban._relays) == 0
            gate.set()
            assert await relay.result(timeout=5) == "opened"


async def test_a_relay_timeout_says_which_step_ran_out(dsn: str) -> None:
    """``oban.relay`` puts the insert and the wait under one deadline; its error says which
    step the deadline cut short, and nothing is left registered."""
    gate = workers.gates["relay-timeout"] = trio.Event()
    with trio.fail_after(10):
        async with running(dsn) as oban:
            with pytest.raises(RelayTimeout, match="timed out inserting the job within"):
                await oban.relay(wait_gate.new({"gate": "relay-timeout"}), timeout=1e-6)
            with pytest.raises(RelayTimeout, match=r"no result for job \d+ within 0.2s"):
                await oban.relay(wait_gate.new({"gate": "relay-timeout"}), timeout=0.2)
            assert len(oban._relays) == 0
            gate.set()
            assert await oban.relay(wait_gate.new({"gate": "relay-timeout"})) == "opened"


async def _relay_notices(dsn: str, body: Any) -> list[str]:
    """The relay notices published on the server while ``body()`` runs."""
    listener = await _pg.connect(dsn)
    try:
        await listener.execute('LISTEN "public.oban_relay"')
        await body()
        return [n.payload async for n in listener.notifies(timeout=0.3)]
    finally:
        await listener.close()


async def test_outcomes_of_relays_run_on_their_own_node_are_handed_over(dsn: str) -> None:
    """A relay whose job runs on its own node gets the outcome from the acker once it is
    written, without a notification; one run on another node is still notified."""

    async def local() -> None:
        async with running(dsn) as oban:
            assert await oban.relay(echo.new({"value": 1}), timeout=5) == 1
            with pytest.raises(RelayDiscard, match="failing attempt 1"):
                await oban.relay(flaky.new({"succeed_on": 3}, max_attempts=1), timeout=5)
            relays = [await oban.dispatch(echo.new({"value": i})) for i in range(50)]
            outcomes = await oban.await_many(relays, timeout=5)
            assert [o.unwrap() for o in outcomes] == list(range(50))
            assert await oban.relay(big_result.new({"size": 100_000}), timeout=5) == "x" * 100_000
            # What the notifier would give: the result as JSON holds it.
            shaped = await oban.relay(json_shaped.new({}), timeout=5)
            assert shaped == {"pair": [1, 2], "3": "three"}

    async def remote() -> None:
        async with running(dsn, queues={}, node="caller") as caller, running(dsn, node="worker"):
            assert await caller.relay(echo.new({"value": 2}), timeout=5) == 2
            with pytest.raises(RelayDiscard, match="failing attempt 1"):
                await caller.relay(flaky.new({"succeed_on": 3}, max_attempts=1), timeout=5)
            assert await caller.relay(big_result.new({"size": 100_000}), timeout=5) == "x" * 100_000

    async def drained() -> None:
        async with running(dsn, queues={}) as oban:  # drain_queue publishes, like a node
            relay = await oban.dispatch(echo.new({"value": 3}))
            assert (await trioban.testing.drain_queue(oban, "default"))["completed"] == 1
            assert await relay.result(timeout=5) == 3

    with trio.fail_after(30):
        assert await _relay_notices(dsn, local) == []
        completed, discarded, big = map(decode_payload, await _relay_notices(dsn, remote))
        (from_drain,) = map(decode_payload, await _relay_notices(dsn, drained))
    assert (completed["state"], completed["result"]) == ("completed", 2)
    assert discarded["state"] == "discarded"
    assert "failing attempt 1" in discarded["reason"]
    assert big["result"] == "x" * 100_000  # compressed, it fits in a notification
    assert from_drain["result"] == 3


async def test_a_stale_ack_hands_nothing_over(dsn: str) -> None:
    """An ack the fence turns away (the job was claimed again meanwhile) must not reach the
    relay waiting on the same node."""
    gate = workers.gates["stale"] = trio.Event()
    workers.concurrency.update(now=0, max=0, started=0)
    with trio.fail_after(20):
        async with running(dsn) as oban:
            relay = await oban.dispatch(wait_gate.new({"gate": "stale"}))
            await workers.wait_started(1)
            async with oban.transaction() as conn:  # as a rescue and a new claim would
                await conn.execute(
                    "UPDATE oban_jobs SET attempted_at = attempted_at + interval '1 second'"
                    " WHERE id = %s",
                    [relay.job.id],
                )
            written = oban._acker.written

            async def acked() -> bool:
                return oban._acker.written > written

            gate.set()
            await eventually(acked)
            with pytest.raises(RelayTimeout):
                await relay.result(timeout=0.3)
            job = await oban.get_job(relay.job.id or 0)
    assert job is not None
    assert job.state is trioban.JobState.EXECUTING


async def test_relay_from_insert_only_instance_runs_on_a_node_process(dsn: str) -> None:
    with trio.fail_after(60):
        async with running(dsn, queues={}) as oban, node_processes(dsn, "other:5", 1):
            node = await oban.relay(whoami.new({}), timeout=10)
            assert node != oban.config.node
            assert node.endswith(tuple("0123456789"))
            assert await oban.relay(whoami.new({}), timeout=10) == node


async def test_relay_survives_a_killed_notifier_connection(dsn: str) -> None:
    gate = workers.gates["killed"] = trio.Event()
    with trio.fail_after(20):
        async with (
            running(dsn, queues={}, node="caller") as caller,
            running(dsn, node="worker") as worker_node,
        ):
            relay = await caller.dispatch(wait_gate.new({"gate": "killed"}))
            assert await _terminate_notifier(caller) == 1
            gate.set()  # the job finishes while the caller's notifier is down
            assert await relay.result(timeout=10) == "opened"
            assert worker_node.notifier_status() == "connected"
            # The caller's notifier reconnects by itself, and relays keep working.
            assert await caller.relay(echo.new({"value": 1}), timeout=10) == 1
            assert caller.notifier_status() == "connected"


async def test_missed_notice_is_found_by_polling(dsn: str) -> None:
    with trio.fail_after(20):
        async with running(dsn, queues={}) as caller:
            # Stop the caller hearing relay notices at all: only the poller can deliver.
            caller._notifier.unsubscribe("relay", caller._relays.deliver)
            relay = await caller.dispatch(echo.new({"value": "polled"}))
            async with running(dsn):
                assert await relay.result(timeout=10) == "polled"


async def test_500_concurrent_relays_from_one_nursery(dsn: str) -> None:
    results: dict[int, Any] = {}

    async def one(i: int, oban: trioban.Oban) -> None:
        results[i] = await oban.relay(echo.new({"value": i}), timeout=20)

    with trio.fail_after(30):
        async with running(dsn) as oban:
            async with trio.open_nursery() as nursery:
                for i in range(500):
                    nursery.start_soon(one, i, oban)
            assert len(oban._relays) == 0
    assert results == {i: i for i in range(500)}


async def test_await_many_returns_outcomes_in_order(dsn: str) -> None:
    with trio.fail_after(30):
        async with running(dsn) as oban:
            relays = [await oban.dispatch(echo.new({"value": i})) for i in range(1000)]
            relays.append(await oban.dispatch(steer.new({"kind": "discard"})))
            start = trio.current_time()
            outcomes = await oban.await_many(relays, timeout=20)
            assert trio.current_time() - start < 10  # done when the last result is in
            assert [o.unwrap() for o in outcomes[:-1]] == list(range(1000))
            assert isinstance(outcomes[-1], outcome.Error)
            assert isinstance(outcomes[-1].error, RelayDiscard)
            assert len(oban._relays) == 0


async def test_await_many_returns_partial_results_at_the_deadline(dsn: str) -> None:
    workers.gates["never"] = trio.Event()
    with trio.fail_after(10):
        async with running(dsn) as oban:
            relays = []
            for i in range(6):
                job = wait_gate.new({"gate": "never"}) if i % 2 else echo.new({"value": i})
                relays.append(await oban.dispatch(job))
            outcomes = await oban.await_many(relays, timeout=1)
            assert [o.unwrap() for o in outcomes[::2]] == [0, 2, 4]
            for late in outcomes[1::2]:
                assert isinstance(late, outcome.Error)
                assert isinstance(late.error, RelayTimeout)
            assert len(oban._relays) == 0
            with pytest.raises(TypeError, match="Relay objects"):
                await oban.await_many([1], timeout=1)  # type: ignore[list-item]
            with pytest.raises(ValueError, match="timeout"):
                await oban.await_many(relays, timeout=-1)


async def test_an_outcome_already_here_is_returned_even_at_timeout_zero(dsn: str) -> None:
    """A deadline already past ends only a wait still needed: an outcome the relay holds comes
    back from ``result`` and ``await_many`` at once. A cancelled
    scope of the caller's own still cancels the call, as for any Trio call."""
    workers.gates["zero"] = trio.Event()
    with trio.fail_after(10):
        async with running(dsn) as oban:
            first, second = [await oban.dispatch(echo.new({"value": i})) for i in (1, 2)]
            pending = await oban.dispatch(wait_gate.new({"gate": "zero"}))

            async def arrived() -> bool:
                waiters = oban._relays._waiters
                return all(waiters[r.ref].notice is not None for r in (first, second))

            await eventually(arrived)
            with trio.CancelScope() as scope:
                scope.cancel()
                await first.result(timeout=0)
            assert scope.cancelled_caught
            with trio.CancelScope() as scope:
                scope.cancel()
                await oban.await_many([first], timeout=0)
            assert scope.cancelled_caught
            assert await first.result(timeout=0) == 1
            value, late = await oban.await_many([second, pending], timeout=0)
            assert value.unwrap() == 2
            assert isinstance(late, outcome.Error)
            assert isinstance(late.error, RelayTimeout)
            # Awaited again, a stored job's relay reads its row (a retry may have run it again).
            assert await first.result(timeout=5) == 1
            outcomes = await oban.await_many([first, second], timeout=5)
            assert [o.unwrap() for o in outcomes] == [1, 2]
            with pytest.raises(RelayTimeout):
                await pending.result(timeout=0)
            assert len(oban._relays) == 0


async def test_relaying_inside_a_transaction_that_holds_the_only_connection(dsn: str) -> None:
    """``relay`` and ``dispatch`` take no ``conn=``: the pool's error must say to call them
    outside the transaction, and tell calls that take one to pass it."""
    outside = "outside the transaction, or raise `pool_size`"
    with trio.fail_after(10):
        async with running(dsn, pool_size=1) as oban:
            async with oban.transaction():
                with pytest.raises(trioban.TriobanError, match=outside):
                    await oban.relay(echo.new({"value": 1}), timeout=5)
                with pytest.raises(trioban.TriobanError, match=outside):
                    await oban.dispatch(echo.new({"value": 1}))
                with pytest.raises(trioban.TriobanError, match="as `conn=` to the calls that"):
                    await oban.insert(echo.new({"value": 1}))
            assert len(oban._relays) == 0
            assert await oban.relay(echo.new({"value": 2}), timeout=5) == 2


def test_a_failure_notice_carries_its_reason_cut_to_fit_never_a_pointer() -> None:
    """A reason too large for NOTIFY even compressed is cut, not left in the row for a poll:
    by then the job may be running again, and its row no longer says that attempt failed, so a
    relay without ``with_retries`` wouldn't raise ``RelayDiscard`` at once."""
    rng = random.Random(7)
    reason = "".join(chr(rng.randrange(0x10000, 0x110000)) for _ in range(_notice.REASON_LIMIT))
    for state in ("retryable", "discarded", "cancelled"):
        text = _notice.build_notice("r" * 32, 7, state, reason=reason)
        assert len(text.encode()) < NOTIFY_LIMIT
        body = decode_payload(text)
        assert "stored" not in body
        assert body["state"] == state
        assert body["reason"]
        assert reason.startswith(body["reason"])
    # A result too large is still read from the row (a completed row stays completed).
    assert decode_payload(_notice.build_notice("r" * 32, 7, "completed", result=reason))["stored"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def test_10000_abandoned_relays_leak_nothing(dsn: str) -> None:
    workers.gates["leak"] = trio.Event()

    async def abandon(oban: trioban.Oban, count: int, by_timeout: bool) -> None:
        for _ in range(count):
            relay = await oban.dispatch(wait_gate.new({"gate": "leak"}))
            if by_timeout:
                with pytest.raises(RelayTimeout):
                    await relay.result(timeout=0)
            else:
                with trio.move_on_after(0):
                    await relay.result(timeout=30)

    with trio.fail_after(120):
        async with running(dsn, queues={}) as oban:
            await abandon(oban, 200, True)  # warm up
            gc.collect()
            baseline = _rss_mb()
            async with trio.open_nursery() as nursery:
                for task in range(10):
                    nursery.start_soon(abandon, oban, 1000, task % 2 == 0)
            gc.collect()
            assert len(oban._relays) == 0
            assert not [o for o in gc.get_objects() if isinstance(o, _Waiter)]
            assert _rss_mb() - baseline < 20


async def test_a_relay_never_awaited_drops_its_waiter_when_collected(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn, queues={}) as oban:
            kept = await oban.dispatch(echo.new({}, queue="nobody"))
            for _ in range(100):
                await oban.dispatch(echo.new({}, queue="nobody"))  # dropped at once
            gc.collect()
            assert len(oban._relays) == 1
            assert oban._relays.waiting(kept.ref)
            del kept
            gc.collect()
            assert len(oban._relays) == 0


async def test_a_relay_that_joins_an_existing_unique_job(dsn: str) -> None:
    """A relayed unique job that conflicts follows the existing job: its result when that job
    stored one (relayed itself, or a recorded worker), else a RelayError saying why."""
    with trio.fail_after(20):
        async with running(dsn, queues={}) as inserter:
            plain = await inserter.insert(unique_echo.new({"value": "plain"}))
            kept = await inserter.insert(unique_recorded_echo.new({"value": "kept"}))
            async with running(dsn) as oban:
                assert await oban.relay(unique_echo.new({"value": "relayed"})) == "relayed"
                again = await oban.dispatch(unique_echo.new({"value": "relayed"}))
                assert again.job.conflict
                assert await again.result(timeout=5) == "relayed"
                joined = await oban.dispatch(unique_recorded_echo.new({"value": "kept"}))
                assert joined.job.id == kept.id
                assert await joined.result(timeout=5) == "kept"
                unstored = await oban.dispatch(unique_echo.new({"value": "plain"}))
                assert unstored.job.id == plain.id
                with pytest.raises(trioban.RelayError, match="recorded=True"):
                    await unstored.result(timeout=5)


async def test_relays_that_share_a_unique_job_all_get_its_result(dsn: str) -> None:
    """Relays that joined a unique job share its id; a result too large to publish is read
    from the row by the poller. Each one gets the result, even with one of them held and never
    awaited."""
    value = os.urandom(10_000).hex()  # too large for a notice, even compressed
    with trio.fail_after(20):
        async with running(dsn, queues={}) as caller:
            first = await caller.dispatch(unique_echo.new({"value": value}))
            joined = await caller.dispatch(unique_echo.new({"value": value}))
            held = await caller.dispatch(unique_echo.new({"value": value}))  # not awaited
            assert joined.job.conflict
            assert held.job.conflict
            assert first.job.id == joined.job.id == held.job.id
            async with running(dsn):
                outcomes = await caller.await_many([first, joined], timeout=3)
            assert [o.unwrap() for o in outcomes] == [value, value]
            assert await held.result(timeout=3) == value


async def test_relays_that_joined_a_unique_job_get_its_notice_without_a_poll(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notice of a unique job reaches the relays that joined it, from the notifier (the
    job ran on another node) or from the acker (it ran here), not a later poll of the row."""
    monkeypatch.setattr(_relay, "POLL_INTERVAL", 60.0)  # a poll would come too late
    unique = trioban.Unique(period=None)
    gate = workers.gates["joined"] = trio.Event()
    workers.concurrency.update(now=0, max=0, started=0)
    with trio.fail_after(20):
        async with running(dsn, queues={}) as caller:
            first = await caller.dispatch(unique_echo.new({"value": "elsewhere"}))
            joined = await caller.dispatch(unique_echo.new({"value": "elsewhere"}))
            assert joined.job.conflict
            async with running(dsn) as oban:
                outcomes = await caller.await_many([first, joined], timeout=3)
                assert [o.unwrap() for o in outcomes] == ["elsewhere"] * 2
                first = await oban.dispatch(wait_gate.new({"gate": "joined"}, unique=unique))
                await workers.wait_started(1)
                joined = await oban.dispatch(wait_gate.new({"gate": "joined"}, unique=unique))
                assert joined.job.conflict
                gate.set()
                outcomes = await oban.await_many([first, joined], timeout=3)
                assert [o.unwrap() for o in outcomes] == ["opened"] * 2
            assert len(caller._relays._joiners) == 0  # nothing left behind


async def test_a_relay_whose_instance_closed_says_so_at_once(dsn: str) -> None:
    """Relays awaited while or after their instance closes raise RelayError at once instead
    of waiting out their timeout; an outcome that arrived before the close is kept."""
    errors: list[str] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as outer, running(dsn) as oban:
            done = await oban.dispatch(echo.new({"value": "kept"}))
            await reaches(oban, done.job.id, trioban.JobState.COMPLETED)  # not awaited
            stuck = await oban.dispatch(echo.new({}, queue="nobody"))

            async def await_stuck(task_status: trio.TaskStatus[None]) -> None:
                task_status.started()
                with pytest.raises(trioban.RelayError, match="has closed") as raised:
                    await stuck.result(timeout=60)
                errors.append(str(raised.value))

            await outer.start(await_stuck)
        assert len(errors) == 1
        with pytest.raises(trioban.RelayError, match="has closed"):
            await stuck.result(timeout=60)
        assert await done.result(timeout=60) == "kept"
        [late] = await oban.await_many([stuck], timeout=60)
        with pytest.raises(trioban.RelayError, match="has closed"):
            late.unwrap()
        with pytest.raises(trioban.TriobanError, match="instance has closed"):
            await oban.get_job(done.job.id or 0)


async def test_a_relay_awaited_by_several_tasks_at_once(dsn: str) -> None:
    """Every task awaiting one relay gets its outcome, one giving up doesn't end the others'
    wait, and ``await_many`` may be given the same relay twice."""
    gate = workers.gates["shared"] = trio.Event()
    results: list[Any] = []
    with trio.fail_after(10):
        async with running(dsn) as oban:
            relay = await oban.dispatch(wait_gate.new({"gate": "shared"}))

            async def await_result() -> None:
                results.append(await relay.result(timeout=5))

            async def await_twice() -> None:
                outcomes = await oban.await_many([relay, relay], timeout=5)
                results.extend(o.unwrap() for o in outcomes)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(await_result)
                nursery.start_soon(await_twice)
                with pytest.raises(RelayTimeout):
                    await relay.result(timeout=0.2)  # gives up while the others wait
                gate.set()
            assert results == ["opened"] * 3
            assert len(oban._relays) == 0


def test_a_stored_notice_gives_way_only_to_the_final_outcome_from_the_row() -> None:
    """A poll that read the row while the job was still retrying can land after the notice
    that its result is stored: that stale notice must not replace it."""
    waiter = _Waiter()
    waiter.offer(Notice("completed", stored=True))
    waiter.offer(Notice("retryable", reason="a stale poll"))
    assert waiter.notice == Notice("completed", stored=True)
    waiter.offer(Notice("completed", result={"big": True}))
    assert waiter.notice == Notice("completed", result={"big": True})
    waiter.offer(Notice("discarded", reason="late"))  # a final outcome read from the row stays
    assert waiter.notice == Notice("completed", result={"big": True})


async def test_closing_wakes_a_relay_whose_stored_result_is_still_being_read() -> None:
    """The notice that a result is in the job row gives way to the instance's close: a relay
    whose poll of that row hasn't come back raises at once rather than wait out its timeout."""

    async def poll_that_hangs(pool: object, ids: list[int]) -> list[tuple[Any, ...]]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    registry = _relay.Registry(None, poll_that_hangs)  # type: ignore[arg-type]
    waiter = registry.register("ref")
    running_registry = trio.CancelScope()  # cancelled: the instance closes

    async def run_registry() -> None:
        with running_registry:
            await registry.run()

    async def close_soon() -> None:
        await trio.sleep(0.1)  # the relay is waiting on the poll by then
        running_registry.cancel()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_registry)
            waiter.offer(Notice("completed", stored=True))
            nursery.start_soon(close_soon)
            with pytest.raises(trioban.RelayError, match="has closed"):
                await registry.wait(waiter, 1, with_retries=False)


async def test_a_relay_whose_job_row_is_gone_raises_at_once(dsn: str) -> None:
    """A second result() reads the row: once it is pruned, that read can't find it."""
    with trio.fail_after(10):
        async with running(dsn) as oban:
            relay = await oban.dispatch(echo.new({"value": 7}))
            assert await relay.result(timeout=5) == 7
            async with oban.transaction() as conn:
                await conn.execute("DELETE FROM oban_jobs WHERE id = %s", (relay.job.id,))
            with trio.fail_after(2), pytest.raises(trioban.RelayError, match="no job"):
                await relay.result(timeout=5)
