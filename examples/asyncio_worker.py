"""An asyncio-flavored worker: code written for asyncio (here asyncio streams) runs as a job
in a Trio service, under trio-asyncio, with timeouts and cancellation still working.

    python examples/asyncio_worker.py postgresql://localhost/app   (or set TRIOBAN_DSN)
"""

from __future__ import annotations

import asyncio
import os
import sys

import trio

import trioban
from trioban import Job, worker


@worker(queue="legacy", flavor="asyncio", timeout=5)
async def fetch_banner(job: Job) -> str:
    """asyncio-only code: open a TCP connection with asyncio streams and read a line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", job.args["port"])
    try:
        return (await reader.readline()).decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()


async def banner_server(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.send_all(b"hello from a trio server\n")


async def main(dsn: str) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, banner_server, 0)
        port = listeners[0].socket.getsockname()[1]
        async with trioban.open(trioban.Config(dsn=dsn, queues={"legacy": 2})) as oban:
            print("asyncio worker read:", await oban.relay(fetch_banner.new({"port": port})))
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else os.environ["TRIOBAN_DSN"])
