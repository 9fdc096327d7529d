"""``trioban.open()``: cancelled while it starts, exceptions out of its block, and the instance
its jobs see."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio

import trioban
from trioban import Config, InternalError
from trioban._acker import Acker
from trioban._open import _collapse

from .workers import whoami


class PaymentFailed(Exception):
    pass


def _watch_ackers(monkeypatch: pytest.MonkeyPatch, on_start: Any = None) -> list[Acker]:
    """Record every acker as its task starts (calling ``on_start()`` first), so a test can
    free one left waiting, shielded, instead of hanging."""
    ackers: list[Acker] = []
    original = Acker.run

    async def run(self: Acker, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        ackers.append(self)
        if on_start is not None:
            on_start()
        await original(self, task_status=task_status)

    monkeypatch.setattr(Acker, "run", run)
    return ackers


async def _exits_within(seconds: float, ackers: list[Acker], fn: Any) -> None:
    """Run ``fn()``; fail if it hasn't returned after ``seconds`` (closing the ackers, which
    a cancelled startup left waiting, so that the test ends)."""
    done = trio.Event()
    hung = False

    async def watchdog() -> None:
        nonlocal hung
        with trio.move_on_after(seconds):
            await done.wait()
            return
        hung = True
        for acker in ackers:
            acker.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog)
        try:
            await fn()
        finally:
            done.set()
    assert not hung, f"open() did not exit within {seconds}s of being cancelled"


async def test_cancelled_as_the_acker_starts_open_exits(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = Config(dsn=dsn, queues={"default": 1}, shutdown_grace=0.1)
    outer = trio.CancelScope()
    # The outer deadline expires just as the acker's task first runs.
    ackers = _watch_ackers(monkeypatch, outer.cancel)

    async def start() -> None:
        with outer:
            async with trioban.open(conf):
                pytest.fail("the block was entered though open() was cancelled")

    await _exits_within(5, ackers, start)
    assert outer.cancelled_caught
    assert ackers


async def test_cancelled_at_any_point_of_its_startup_open_exits(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = Config(dsn=dsn, queues={"default": 1}, shutdown_grace=0.1)
    ackers = _watch_ackers(monkeypatch)
    began = time.monotonic()
    async with trioban.open(conf):
        pass
    startup = time.monotonic() - began
    for step in range(25):
        deadline = startup * step / 20

        async def start(deadline: float = deadline) -> None:
            with trio.move_on_after(deadline):
                async with trioban.open(conf):
                    await trio.sleep(0.01)

        await _exits_within(5, ackers, start)


async def test_a_group_from_the_users_own_nursery_comes_out_unchanged(dsn: str) -> None:
    async def charge() -> None:
        raise PaymentFailed("card declined")

    conf = Config(dsn=dsn, queues={"default": 1}, shutdown_grace=0.1)
    raised: BaseExceptionGroup[BaseException] | None = None
    with trio.fail_after(10), pytest.raises(ExceptionGroup) as info:
        async with trioban.open(conf):
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(charge)
            except BaseExceptionGroup as group:
                raised = group
                raise
    # The very group raised: `except* PaymentFailed` catches it.
    assert info.value is raised
    assert [type(exc) for exc in info.value.exceptions] == [PaymentFailed]


def test_a_failure_of_ours_beside_the_users_group_is_an_internal_error() -> None:
    body = ExceptionGroup("the user's", [PaymentFailed("card declined")])
    ours = RuntimeError("a service broke")
    assert _collapse(BaseExceptionGroup("", [BaseExceptionGroup("", [body])]), body) is body
    # A cancel scope on the way out may have copied the body's group.
    copied = body.derive(body.exceptions)
    assert _collapse(BaseExceptionGroup("", [copied, trio.Cancelled._create()]), body) is body
    collapsed = _collapse(BaseExceptionGroup("", [body, ours]), body)
    assert isinstance(collapsed, InternalError)
    assert "a service broke" in str(collapsed)


async def test_a_job_claimed_on_insert_sees_the_instance_that_runs_it(dsn: str) -> None:
    queues = {"other": 2}
    with trio.fail_after(15):
        async with trioban.open(Config(dsn=dsn, queues=queues, node="A")) as a:
            assert await a.relay(whoami.new({}), timeout=5) == "A"
            async with trioban.open(Config(dsn=dsn, queues={}, node="B")):
                # Inserted from B's block, claimed on insert by A: it runs on A.
                assert await a.relay(whoami.new({}), timeout=5) == "A"

        # From a task spawned before the instance opened (a web server's request handler).
        async with trio.open_nursery() as nursery:
            opened, receive = trio.open_memory_channel[trioban.Oban](1)
            seen, answered = trio.open_memory_channel[str](1)

            async def handler() -> None:
                oban = await receive.receive()
                await seen.send(await oban.relay(whoami.new({}), timeout=5))

            nursery.start_soon(handler)
            async with trioban.open(Config(dsn=dsn, queues=queues, node="C")) as c:
                await opened.send(c)
                assert await answered.receive() == "C"


async def test_a_queue_started_later_runs_its_jobs_as_its_own_instances(dsn: str) -> None:
    with trio.fail_after(15):
        async with (
            trioban.open(Config(dsn=dsn, queues={}, node="A")) as a,
            trioban.open(Config(dsn=dsn, queues={}, node="B")) as b,
        ):
            await a.start_queue("other", limit=1, local_only=True)  # from B's block
            assert await b.relay(whoami.new({}), timeout=5) == "A"  # fetched by A
            assert await a.relay(whoami.new({}), timeout=5) == "A"  # claimed on insert

        # Started by a task spawned before the instance opened.
        async with trio.open_nursery() as nursery:
            send, receive = trio.open_memory_channel[trioban.Oban](1)
            started = trio.Event()

            async def admin() -> None:
                oban = await receive.receive()
                await oban.start_queue("other", limit=1, local_only=True)
                started.set()

            nursery.start_soon(admin)
            async with trioban.open(Config(dsn=dsn, queues={}, node="C")) as c:
                await send.send(c)
                await started.wait()
                async with trioban.open(Config(dsn=dsn, queues={}, node="E")) as e:
                    assert await e.relay(whoami.new({}), timeout=5) == "C"
