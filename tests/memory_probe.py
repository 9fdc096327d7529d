"""Measures, in a fresh process, the memory targets of PERFORMANCE.md.

Usage: python -m tests.memory_probe DSN
Prints one JSON line: the resident memory of an idle instance running 5 queues, and what
10,000 pending relays (dispatched, not yet run) add to it.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import trio

import trioban
from tests.workers import echo

RELAYS = 10_000


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def main(dsn: str) -> None:
    queues = {f"queue{i}": 10 for i in range(5)}
    async with trioban.open(trioban.Config(dsn=dsn, queues=queues)) as oban:
        await trio.sleep(1)  # every service started and idle
        gc.collect()
        idle = _rss_mb()
        relays: list[trioban.Relay] = []

        async def dispatch() -> None:
            # A queue no node runs: the relays stay pending.
            relays.append(await oban.dispatch(echo.new({}, queue="nobody")))

        for _ in range(RELAYS // 500):
            async with trio.open_nursery() as nursery:
                for _ in range(500):
                    nursery.start_soon(dispatch)
        gc.collect()
        pending = _rss_mb()
        print(
            json.dumps(
                {"idle_mb": idle, "pending_mb": pending - idle, "waiting": len(oban._relays)}
            )
        )


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
