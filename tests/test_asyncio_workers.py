"""asyncio-flavored workers under trio-asyncio: real asyncio I/O, timeouts, remote cancel."""

from __future__ import annotations

from functools import partial

import pytest
import trio

import trioban
from trioban import JobState

from . import workers
from .helpers import eventually
from .workers import aio_fetch, aio_slow, has_asyncio_loop


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
