"""Start trioban nodes as separate processes (see tests/node.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def node_processes(
    dsn: str, queues: str, count: int, *options: str
) -> AsyncIterator[list[trio.Process]]:
    """``count`` node processes running ``queues`` (and tests/node.py ``options``); entered
    once all are ready."""
    procs: list[trio.Process] = []
    try:
        for _ in range(count):
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tests.node", dsn, queues, *options],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            procs.append(proc)
        for proc in procs:
            await _wait_ready(proc)
        yield procs
    finally:
        with trio.CancelScope(shield=True):
            for proc in procs:
                if proc.stdin is not None:
                    await proc.stdin.aclose()
            with trio.move_on_after(20):
                for proc in procs:
                    await proc.wait()
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def _wait_ready(proc: trio.Process) -> None:
    assert proc.stdout is not None
    buffer = b""
    with trio.fail_after(30):
        while b"ready" not in buffer:
            chunk = await proc.stdout.receive_some()
            if not chunk:
                raise RuntimeError(f"node process exited before it was ready: {buffer!r}")
            buffer += chunk
