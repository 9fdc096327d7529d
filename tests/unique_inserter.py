"""Insert one unique job many times at once from this process, for the race test.

Usage: python -m tests.unique_inserter DSN COUNT
Prints "ready", waits for a line on stdin (the start signal), inserts COUNT copies of the same
unique job concurrently, and prints the number of inserts that created a job.
"""

from __future__ import annotations

import sys

import trio

import trioban
from tests.workers import unique_echo


async def main(dsn: str, count: int) -> None:
    async with trioban.open(trioban.Config(dsn=dsn, pool_size=count)) as oban:
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        created: list[bool] = []

        async def insert() -> None:
            job = await oban.insert(unique_echo.new({"value": "race"}))
            created.append(not job.conflict)

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(insert)
        print(sum(created), flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
