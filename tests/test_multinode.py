"""Several node processes on one database: every job runs exactly once."""

from __future__ import annotations

import pytest
import trio

import trioban
from trioban import Config

from .nodes import node_processes
from .workers import count_run

JOBS = 5000


@pytest.mark.slow
async def test_three_node_processes_drain_5000_jobs_exactly_once(dsn: str) -> None:
    with trio.fail_after(120):
        async with trioban.open(Config(dsn=dsn, queues={})) as oban:
            async with oban.transaction() as conn:
                await conn.execute("CREATE TABLE runs (job_id bigint NOT NULL, node text)")
            async with node_processes(dsn, "default:10", 3):
                for start in range(0, JOBS, 1000):
                    await oban.insert_all(
                        [count_run.new({"i": i}) for i in range(start, start + 1000)]
                    )
                while True:
                    async with oban.transaction() as conn:
                        cur = await conn.execute(
                            "SELECT count(*) FILTER (WHERE state = 'completed'), count(*) "
                            "FROM oban_jobs"
                        )
                        done, total = await cur.fetchone() or (0, 0)
                    if done == JOBS:
                        break
                    await trio.sleep(0.2)
            async with oban.transaction() as conn:
                cur = await conn.execute(
                    "SELECT count(*), count(DISTINCT job_id), count(DISTINCT node) FROM runs"
                )
                runs, distinct, nodes = await cur.fetchone() or (0, 0, 0)
    assert total == JOBS
    assert runs == JOBS, f"{runs - distinct} jobs ran more than once"
    assert distinct == JOBS
    assert nodes == 3, "every node should have taken part"
