"""asyncio-flavored workers under trio-asyncio: real asyncio I/O, timeouts, remote cancel."""

from __future__ import annotations

import gc
import importlib.abc
import importlib.machinery
import sys
from functools import partial
from types import ModuleType

import pytest
import trio

import trioban
import trioban.testing
from trioban import JobState
from trioban._registry import lookup

from . import workers
from .helpers import eventually
from .workers import aio_fails, aio_fetch, aio_reports, aio_slow, has_asyncio_loop


async def _echo_server(stream: trio.SocketStream) -> None:
    async with stream:
        data = b""
        while not data.endswith(b"\n"):
            chunk = await stream.receive_some()
            if not chunk:
                return
            data += chunk
        await stream.send_all(b"echo " + data)


async def test_asyncio_worker_does_asyncio_io(dsn: str) -> None:
    conf = trioban.Config(dsn=dsn, queues={"aio": 2})
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            serve = partial(trio.serve_tcp, _echo_server, 0, host="127.0.0.1")
            [listener] = await nursery.start(serve)
            port = listener.socket.getsockname()[1]
            async with trioban.open(conf) as oban:
                results = await oban.await_many(
                    [await oban.dispatch(aio_fetch.new({"port": port})) for _ in range(3)]
                )
                assert [r.unwrap() for r in results] == ["echo hello"] * 3
            nursery.cancel_scope.cancel()


async def test_timeout_and_remote_cancel_reach_asyncio_code(dsn: str) -> None:
    workers.aio_cancelled.clear()
    conf = trioban.Config(dsn=dsn, queues={"aio": 2}, stage_interval=0.1)
    with trio.fail_after(20):
        async with trioban.open(conf) as oban:
            with pytest.raises(trioban.RelayDiscard, match=r"timeout of 0\.3s"):
                await oban.relay(aio_slow.new({}))
            job = await oban.insert(aio_slow.new({}, meta={"long": True}))
            assert job.id is not None

            async def running() -> bool:
                found = await oban.get_job(job.id or 0)
                return found is not None and found.state is JobState.EXECUTING

            await eventually(running)
            await oban.cancel_job(job.id, reason="stop")

            async def cancelled() -> bool:
                found = await oban.get_job(job.id or 0)
                return found is not None and found.state is JobState.CANCELLED

            await eventually(cancelled)
    assert len(workers.aio_cancelled) == 2  # the asyncio task saw CancelledError both times


async def test_a_system_exit_in_asyncio_code_fails_its_job_not_the_node(dsn: str) -> None:
    """Raised inside the asyncio task, it would stop the trio-asyncio loop: the instance
    was cancelled, and its shutdown hung."""
    conf = trioban.Config(dsn=dsn, queues={"aio": 2}, shutdown_grace=1)
    with trio.fail_after(20):
        async with trioban.open(conf) as oban:
            with pytest.raises(trioban.RelayDiscard, match="SystemExit: 2"):
                await oban.relay(aio_fails.new({"kind": "exit"}), timeout=10)
            with pytest.raises(trioban.RelayDiscard, match="ValueError: boom"):
                await oban.relay(aio_fails.new({"kind": "raise"}), timeout=10)


async def test_asyncio_job_errors_read_the_same_on_a_loop_of_their_own() -> None:
    """perform_job (and a job whose worker was imported after open()) opens a loop for the
    job alone: its nursery's exception group must not show in the job's error."""
    for kind, words in (("raise", "ValueError: boom"), ("exit", "SystemExit: 2")):
        done = await trioban.testing.perform_job(aio_fails, {"kind": kind})
        assert done.state is JobState.DISCARDED
        assert done.error is not None
        assert done.error.startswith(words)


async def test_the_loop_opens_only_for_queues_with_asyncio_workers(dsn: str) -> None:
    with trio.fail_after(20):
        async with trioban.open(trioban.Config(dsn=dsn, queues={"default": 1})) as oban:
            assert await oban.relay(has_asyncio_loop.new({})) is False
        conf = trioban.Config(dsn=dsn, queues={"default": 1, "aio": 1})
        async with trioban.open(conf) as oban:
            assert await oban.relay(has_asyncio_loop.new({})) is True


def test_flavor_is_checked() -> None:
    with pytest.raises(ValueError, match="'trio' or 'asyncio'"):
        trioban.worker(flavor="gevent")(_noop)


async def _noop(job: trioban.Job) -> None:
    pass


def test_an_asyncio_worker_without_trio_asyncio_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "trio_asyncio", None)  # as if not installed
    with pytest.raises(trioban.TriobanError, match=r'pip install "trioban\[asyncio\]"'):
        trioban.worker(queue="aio", flavor="asyncio")(_noop)
    assert lookup(f"{__name__}._noop") is None


class _FailingImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds trio_asyncio as a module whose import fails, as a release can on a new Python."""

    def find_spec(self, name: str, *_: object) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(name, self) if name == "trio_asyncio" else None

    def exec_module(self, module: ModuleType) -> None:
        raise AttributeError("module 'asyncio' has no attribute 'AbstractChildWatcher'")


def test_an_asyncio_worker_with_a_broken_trio_asyncio_names_the_cause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "trio_asyncio", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_FailingImport(), *sys.meta_path])
    with pytest.raises(trioban.TriobanError) as raised:
        trioban.worker(queue="aio", flavor="asyncio")(_noop)
    message = str(raised.value)
    assert "fails to import on Python {}.{}".format(*sys.version_info) in message
    assert "AttributeError: module 'asyncio' has no attribute 'AbstractChildWatcher'" in message
    assert "make the worker Trio-flavored" in message
    assert lookup(f"{__name__}._noop") is None


async def test_errors_asyncio_hands_its_loop_are_logged_not_raised(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncio logs them (an unclosed aiohttp session, a failed task nobody awaited); raised
    into the loop's nursery, they stopped the instance."""
    conf = trioban.Config(dsn=dsn, queues={"aio": 2})
    with trio.fail_after(10):
        async with trioban.open(conf) as oban:
            assert await oban.relay(aio_reports.new({"kind": "handler"})) == "done"
            assert await oban.relay(aio_reports.new({"kind": "task"})) == "done"

            async def logged() -> bool:
                gc.collect()  # the failed task reports when collected (late on Python 3.13)
                return "background task failed" in caplog.text

            await eventually(logged)
            assert "Unclosed client session" in caplog.text
            assert await oban.relay(aio_reports.new({"kind": "handler"})) == "done"
