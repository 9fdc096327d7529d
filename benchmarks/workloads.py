"""The workloads W1-W6 of PERFORMANCE.md. Each takes a DSN of an empty database."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import trio

import trioban
from trioban import Config

from .noop import noop

ROOT = Path(__file__).resolve().parent.parent


def _conf(dsn: str, **settings: object) -> Config:
    return Config(dsn=dsn, **settings)  # type: ignore[arg-type]


async def w1_bulk_insert(dsn: str) -> dict[str, float]:
    """Bulk insert 10,000 no-op jobs in one call, job building included."""
    async with trioban.open(_conf(dsn, queues={})) as oban:
        await oban.insert_all([noop.new({"i": i}) for i in range(100)])  # warm up
        start = trio.current_time()
        await oban.insert_all([noop.new({"i": i}) for i in range(10_000)])
        elapsed = trio.current_time() - start
    return {"jobs_per_s": 10_000 / elapsed}


async def w2_single_inserts(dsn: str) -> dict[str, float]:
    """2,000 sequential single inserts."""
    async with trioban.open(_conf(dsn, queues={})) as oban:
        for i in range(50):
            await oban.insert(noop.new({"i": i}))
        start = trio.current_time()
        for i in range(2_000):
            await oban.insert(noop.new({"i": i}))
        elapsed = trio.current_time() - start
    return {"jobs_per_s": 2_000 / elapsed}


async def _completed(oban: trioban.Oban) -> int:
    async with oban.transaction() as conn:
        cur = await conn.execute("SELECT count(*) FROM oban_jobs WHERE state = 'completed'")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def w3_drain(dsn: str) -> dict[str, float]:
    """Drain 10,000 pre-inserted no-op jobs, one queue, concurrency 20."""
    async with trioban.open(_conf(dsn, queues={})) as oban:
        for _ in range(10):
            await oban.insert_all([noop.new({}) for _ in range(1_000)])
    start = trio.current_time()
    async with trioban.open(_conf(dsn, queues={"bench": 20})) as oban:
        # Watch the node's own count of written outcomes, then confirm in the database:
        # counting rows every few milliseconds would load the server the drain runs on.
        while oban._acker.written < 10_000:
            await trio.sleep(0.005)
        while await _completed(oban) < 10_000:
            await trio.sleep(0.005)
        elapsed = trio.current_time() - start
    return {"jobs_per_s": 10_000 / elapsed}


def _percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1]


async def w4_sequential_relays(dsn: str) -> dict[str, float]:
    """300 sequential relays of a no-op job, the worker already running."""
    async with trioban.open(_conf(dsn, queues={"bench": 20})) as oban:
        for _ in range(20):
            await oban.relay(noop.new({}), timeout=5)
        samples = []
        for _ in range(300):
            start = trio.current_time()
            await oban.relay(noop.new({}), timeout=5)
            samples.append((trio.current_time() - start) * 1000)
    return {"p50_ms": statistics.median(samples), "p99_ms": _percentile(samples, 99)}


async def w5_concurrent_relays(dsn: str) -> dict[str, float]:
    """1,000 concurrent relays (dispatch + await), wall time."""
    async with trioban.open(_conf(dsn, queues={"bench": 20})) as oban:
        await oban.relay(noop.new({}), timeout=5)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(1_000):
                nursery.start_soon(lambda: oban.relay(noop.new({}), timeout=30))
        elapsed = trio.current_time() - start
    return {"wall_s": elapsed}


async def w6_relay_via_node_process(dsn: str) -> dict[str, float]:
    """Relays from an insert-only caller, run by a node in a second process: p50."""
    async with trioban.open(_conf(dsn, queues={})) as oban:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "benchmarks.noop", dsn],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            with trio.fail_after(30):
                while b"ready" not in await proc.stdout.receive_some():
                    pass
            for _ in range(20):
                await oban.relay(noop.new({}), timeout=5)
            samples = []
            for _ in range(300):
                start = trio.current_time()
                await oban.relay(noop.new({}), timeout=5)
                samples.append((trio.current_time() - start) * 1000)
        finally:
            assert proc.stdin is not None
            await proc.stdin.aclose()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
    return {"p50_ms": statistics.median(samples), "p99_ms": _percentile(samples, 99)}
