"""Telemetry events for jobs and services, and the standard-logging handler."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import trio

import trioban
from trioban import telemetry

from .workers import echo, steer

Event = tuple[str, Mapping[str, float], Mapping[str, Any]]


@pytest.fixture
def events() -> Iterator[list[Event]]:
    seen: list[Event] = []
    telemetry.attach(
        "test", ["job.start", "job.stop", "job.exception", "acker.write", "producer.fetch"],
        lambda event, measurements, metadata: seen.append((event, measurements, metadata)),
    )  # fmt: skip
    yield seen
    telemetry.detach("test")


async def test_job_events_carry_durations_and_outcomes(dsn: str, events: list[Event]) -> None:
    conf = trioban.Config(dsn=dsn, queues={"default": 2})
    with trio.fail_after(10):
        async with trioban.open(conf.evolve(queues={})) as inserter:
            waiting = await inserter.insert(echo.new({"value": 0}))  # fetched as the queue starts
        async with trioban.open(conf) as oban:
            ok = await oban.dispatch(echo.new({"value": 1}))
            await ok.result()
            failing = await oban.dispatch(steer.new({"kind": "raise"}, max_attempts=1))
            with pytest.raises(trioban.RelayDiscard):
                await failing.result()
    by_job: dict[int | None, list[str]] = {}
    for event, measurements, metadata in events:
        if event.startswith("job."):
            by_job.setdefault(metadata["job"].id, []).append(event)
            assert measurements["queue_time"] >= 0
    assert by_job == {
        waiting.id: ["job.start", "job.stop"],
        ok.job.id: ["job.start", "job.stop"],
        failing.job.id: ["job.start", "job.exception"],
    }
    stop = next(e for e in events if e[0] == "job.stop")
    assert stop[2]["state"] == "completed"
    assert 0 <= stop[1]["duration"] < 5
    failure = next(e for e in events if e[0] == "job.exception")
    assert failure[2]["state"] == "discarded"
    assert "boom" in failure[2]["error"]
    writes = [e for e in events if e[0] == "acker.write"]
    assert sum(m["count"] for _, m, _ in writes) == 3
    fetches = [m["count"] for event, m, _ in events if event == "producer.fetch"]
    assert fetches[0] == 1


class _Unusual(BaseException):
    """A library's own BaseException subclass."""


@pytest.mark.parametrize("error", [RuntimeError("handler bug"), SystemExit(2), _Unusual()])
def test_a_failing_handler_is_detached(
    caplog: pytest.LogCaptureFixture, error: BaseException
) -> None:
    """A BaseException too: it stopped the instance, leaving the job it was told of behind."""
    calls: list[str] = []

    def broken(event: str, measurements: Mapping[str, float], metadata: Mapping[str, Any]) -> None:
        calls.append(event)
        raise error

    telemetry.attach("broken", ["stager.stage"], broken)
    with caplog.at_level(logging.ERROR, "trioban.telemetry"):
        telemetry.emit("stager.stage", {"count": 1}, {})
        telemetry.emit("stager.stage", {"count": 1}, {})
    assert calls == ["stager.stage"]
    assert "detaching it" in caplog.text
    assert not telemetry.detach("broken")


def test_attach_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="unknown telemetry events"):
        telemetry.attach("x", ["job.begin"], lambda *a: None)
    with pytest.raises(ValueError, match="no events given; choose from"):
        telemetry.attach("x", [], lambda *a: None)
    telemetry.attach("twice", ["job.stop"], lambda *a: None)
    try:
        with pytest.raises(ValueError, match="already attached"):
            telemetry.attach("twice", ["job.start"], lambda *a: None)
    finally:
        assert telemetry.detach("twice")


async def test_default_logger(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    telemetry.attach_default_logger()
    try:
        with caplog.at_level(logging.INFO, "trioban.events"), trio.fail_after(10):
            async with trioban.open(trioban.Config(dsn=dsn, queues={"default": 1})) as oban:
                job = await oban.insert(echo.new({"value": 2}))
                await oban.relay(echo.new({"value": 3}))
    finally:
        telemetry.detach("trioban.logger")
    assert f"job.stop job={job.id} worker=tests.workers.echo queue=default duration=" in caplog.text


class _AsyncCallable:
    async def __call__(
        self, event: str, measurements: Mapping[str, float], metadata: Mapping[str, Any]
    ) -> None:
        pass


async def _async_handler(
    event: str, measurements: Mapping[str, float], metadata: Mapping[str, Any]
) -> None:
    pass


@pytest.mark.parametrize(
    "handler",
    [_async_handler, functools.partial(_async_handler), _AsyncCallable()],
    ids=["function", "partial", "callable"],
)
def test_attach_rejects_async_handlers(handler: Any) -> None:
    # Handlers are called synchronously: an async one would make coroutines nobody awaits.
    with pytest.raises(TypeError, match="called synchronously"):
        telemetry.attach("async", ["job.stop"], handler)
    assert not telemetry.detach("async")
    with pytest.raises(TypeError, match="callable"):
        telemetry.attach("not-callable", ["job.stop"], "print")  # type: ignore[arg-type]


def test_a_handler_returning_a_coroutine_is_detached(caplog: pytest.LogCaptureFixture) -> None:
    # An async handler attach can't recognise (a lambda calling it): closed, not left pending.
    handler: Any = lambda *event: _async_handler(*event)  # noqa: E731
    telemetry.attach("disguised", ["stager.stage"], handler)
    with caplog.at_level(logging.ERROR, "trioban.telemetry"):
        telemetry.emit("stager.stage", {"count": 1}, {})
    assert "returned a coroutine; detaching it" in caplog.text
    assert not telemetry.detach("disguised")


async def test_leadership_changes_are_emitted_both_ways(dsn: str) -> None:
    """Won at open, given up at close: a leader closing reported nothing before."""
    changes: list[tuple[str, bool]] = []
    telemetry.attach(
        "leader",
        ["leader.change"],
        lambda _, __, meta: changes.append((meta["peer"], meta["leader"])),
    )
    try:
        with trio.fail_after(10):
            async with trioban.open(trioban.Config(dsn=dsn, queues={})) as oban:
                assert oban.is_leader
                peer = oban._leadership.peer
    finally:
        telemetry.detach("leader")
    assert changes == [(peer, True), (peer, False)]
