"""``trioban demo``: an order service relaying checks across queues, then an ETL workflow.

Runs on the database and prefix of the command's settings (the embedded PostgreSQL unless
given a DSN), in well under 30 seconds.
"""

from __future__ import annotations

import random
import statistics
from typing import Any, Final

import trio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._config import Config
from ._instance import Oban
from ._job import Job
from ._open import open
from ._registry import worker
from ._workflow import Workflow

ORDERS = 200
QUEUES: Final = {"inventory": 20, "fraud": 20, "shipping": 20, "etl": 4}


@worker(queue="inventory")
async def check_inventory(job: Job) -> dict[str, Any]:
    """Is the SKU in stock? (A call to a stock service, simulated.)"""
    await trio.sleep(random.uniform(0.005, 0.03))  # noqa: S311
    return {"available": not job.args["sku"].endswith("7")}


@worker(queue="fraud")
async def check_fraud(job: Job) -> dict[str, Any]:
    """A risk score for the customer (a model call, simulated)."""
    await trio.sleep(random.uniform(0.01, 0.05))  # noqa: S311
    return {"risk_score": 0.9 if job.args["customer"] % 23 == 0 else 0.1}


@worker(queue="shipping")
async def quote_shipping(job: Job) -> dict[str, Any]:
    """A shipping quote (a carrier API, simulated)."""
    await trio.sleep(random.uniform(0.005, 0.03))  # noqa: S311
    return {"cost": 4.5 if job.args["country"] == "FR" else 9.0}


@worker(queue="etl")
async def etl_step(job: Job) -> Any:
    """One step of the demo workflow: extract, transform a shard, or load the totals."""
    await trio.sleep(0.05)
    step = job.meta["name"]
    if step == "extract":
        return {"rows": 1000}
    if step.startswith("transform"):
        return {"rows": 250, "total": 250 * job.args["shard"]}
    results = await _current().workflow_results(job)
    return {"loaded": sum(r["rows"] for r in results.values()), "shards": len(results)}


def _current() -> Oban:
    from ._instance import current_instance

    return current_instance()


async def _order(oban: Oban, number: int, latencies: list[float]) -> bool:
    started = trio.current_time()
    relays = [
        await oban.dispatch(check_inventory.new({"sku": f"sku-{number}"})),
        await oban.dispatch(check_fraud.new({"customer": number})),
        await oban.dispatch(quote_shipping.new({"country": "FR" if number % 2 else "US"})),
    ]
    stock, fraud, _shipping = [o.unwrap() for o in await oban.await_many(relays, timeout=10)]
    latencies.append(trio.current_time() - started)
    return bool(stock["available"] and fraud["risk_score"] < 0.8)


async def run(config: Config, console: Console | None = None) -> dict[str, Any]:
    """Run the demo on the database and prefix of ``config`` (with the demo's own queues);
    prints progress and a summary, returns the figures."""
    console = console or Console()
    conf = config.evolve(queues=QUEUES, testing="disabled")
    latencies: list[float] = []
    accepted = 0
    console.print("[bold]trioban demo[/]: starting a node (queues inventory, fraud, shipping, etl)")
    async with open(conf) as oban:
        started = trio.current_time()
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("orders (3 relays each)", total=ORDERS)
            limiter = trio.CapacityLimiter(50)

            async def order(number: int) -> None:
                nonlocal accepted
                async with limiter:
                    ok = await _order(oban, number, latencies)
                accepted += ok
                progress.advance(task)

            async with trio.open_nursery() as nursery:
                for number in range(1, ORDERS + 1):
                    nursery.start_soon(order, number)
        orders_elapsed = trio.current_time() - started
        wf = Workflow().add("extract", etl_step.new({}))
        for shard in range(4):
            wf.add(f"transform{shard}", etl_step.new({"shard": shard}), deps=["extract"])
        wf.add("load", etl_step.new({}), deps=[f"transform{s}" for s in range(4)])
        console.print("workflow: extract -> 4 x transform -> load")
        loaded = await oban.relay_workflow(wf, timeout=20)
    figures = {
        "orders": ORDERS,
        "accepted": accepted,
        "rejected": ORDERS - accepted,
        "orders_per_s": round(ORDERS / orders_elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "workflow": loaded,
    }
    table = Table(title="trioban demo")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in figures.items():
        table.add_row(name, str(value))
    console.print(table)
    return figures
