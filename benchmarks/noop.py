"""The benchmark's no-op worker, and a node process for W6."""

from __future__ import annotations

import sys

import trio

import trioban
from trioban import Job, worker


@worker(queue="bench")
async def noop(job: Job) -> None:
    return None


async def _node(dsn: str) -> None:
    conf = trioban.Config(dsn=dsn, queues={"bench": 20}, install=False)
    async with trioban.open(conf):
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


if __name__ == "__main__":
    trio.run(_node, sys.argv[1])
