"""A trioban node in its own process, for multi-node tests.

Usage: python -m tests.node DSN QUEUE:LIMIT[,QUEUE:LIMIT] [--seconds N] [--heartbeat S]
       [--rescue-after S]
Runs until its stdin closes (or N seconds pass), printing "ready" once started.
"""

from __future__ import annotations

import argparse
import sys

import trio

import trioban
from tests import workers  # noqa: F401 (registers the workers)
from trioban._config import parse_queues


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("queues")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--rescue-after", type=float, default=60.0)
    opts = parser.parse_args()
    conf = trioban.Config(
        dsn=opts.dsn,
        queues=parse_queues(opts.queues, "queues"),
        stage_interval=0.2,
        heartbeat_interval=opts.heartbeat,
        rescue_after=opts.rescue_after,
    )
    async with trioban.open(conf) as oban, trio.open_nursery() as nursery:
        await nursery.start(_echo_gossip, oban)
        print("ready", oban.config.node, flush=True)
        with trio.move_on_after(opts.seconds):
            # Runs until the parent closes our stdin.
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()


async def _echo_gossip(
    oban: trioban.Oban, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer {"ping": x} on gossip with {"pong": x, "node": <this node>}."""
    async with oban.listen(["gossip"]) as messages:
        task_status.started()
        async for _channel, payload in messages:
            if "ping" in payload:
                await oban.notify("gossip", {"pong": payload["ping"], "node": oban.config.node})


if __name__ == "__main__":
    trio.run(main)
