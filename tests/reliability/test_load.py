"""Exactly-once under load: 3 node processes drain 30,000 jobs (100,000 with TRIOBAN_HEAVY)."""

from __future__ import annotations

import trio

import trioban

from ..helpers import eventually
from ..nodes import node_processes
from ..workers import count_run
from .conftest import size
from .helpers import count, create_runs


async def test_three_nodes_run_each_job_exactly_once(dsn: str) -> None:
    jobs = size(30_000, 100_000)
    async with trioban.open(trioban.Config(dsn=dsn)) as oban:
        await create_runs(oban)
        for start in range(0, jobs, 5_000):
            await oban.insert_all([count_run.new({"i": i}) for i in range(start, start + 5_000)])
        with trio.fail_after(300):
            async with node_processes(dsn, "default:20", 3):

                async def drained() -> bool:
                    return await count(oban, "SELECT count(*) FROM runs") >= jobs

                await eventually(drained, interval=0.2)
        runs = await count(oban, "SELECT count(*) FROM runs")
        distinct = await count(oban, "SELECT count(DISTINCT job_id) FROM runs")
        nodes = await count(oban, "SELECT count(DISTINCT node) FROM runs")
        completed = await count(oban, "SELECT count(*) FROM oban_jobs WHERE state = 'completed'")
    assert (runs, distinct, completed) == (jobs, jobs, jobs), f"{runs - distinct} ran twice"
    assert nodes == 3
