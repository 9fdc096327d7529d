"""An ETL workflow: extract once, transform four shards in parallel (fan-out), load the
totals (fan-in). Each step reads its deps' results with ``oban.workflow_results``.

    python examples/etl_workflow.py postgresql://localhost/app   (or set TRIOBAN_DSN)
"""

from __future__ import annotations

import os
import sys
from typing import Any

import trio

import trioban
from trioban import Job, Workflow, worker

SHARDS = 4


@worker(queue="etl")
async def extract(job: Job) -> dict[str, Any]:
    return {"rows": list(range(1, 101))}  # a query against the source, say


@worker(queue="etl")
async def transform(job: Job) -> dict[str, Any]:
    oban = trioban.current_instance()
    rows = (await oban.workflow_results(job))["extract"]["rows"]
    mine = rows[job.args["shard"] :: job.args["of"]]
    return {"shard": job.args["shard"], "sum": sum(x * x for x in mine)}


@worker(queue="etl")
async def load(job: Job) -> dict[str, Any]:
    parts = await trioban.current_instance().workflow_results(job)
    return {"sum_of_squares": sum(part["sum"] for part in parts.values()), "parts": len(parts)}


async def main(dsn: str) -> None:
    workflow = Workflow().add("extract", extract.new({}))
    for shard in range(SHARDS):
        workflow.add(f"transform{shard}", transform.new({"shard": shard, "of": SHARDS}),
                     deps=["extract"])  # fmt: skip
    workflow.add("load", load.new({}), deps=[f"transform{s}" for s in range(SHARDS)])
    async with trioban.open(trioban.Config(dsn=dsn, queues={"etl": 5})) as oban:
        result = await oban.relay_workflow(workflow, timeout=30)
        print("loaded", result)
        print("steps", {name: state.value for name, state in
                        (await oban.workflow_status(workflow.workflow_id)).items()})  # fmt: skip


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else os.environ["TRIOBAN_DSN"])
