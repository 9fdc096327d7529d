"""An order service: check inventory, fraud and shipping in parallel, as relays.

Each check is a job in its own queue; the service inserts the three jobs and awaits all
three results. The jobs may run on any node connected to the same database; here the same
process runs the queues too.

    python examples/order_service.py postgresql://localhost/app   (or set TRIOBAN_DSN)
"""

from __future__ import annotations

import os
import sys
from typing import Any

import trio

import trioban
from trioban import Job, worker

STOCK = {"kbd-01": 3, "mouse-02": 0}


@worker(queue="inventory")
async def check_inventory(job: Job) -> dict[str, Any]:
    await trio.sleep(0.05)  # a call to the stock service
    return {"available": STOCK.get(job.args["sku"], 0) > 0}


@worker(queue="fraud", timeout=10)
async def check_fraud(job: Job) -> dict[str, Any]:
    await trio.sleep(0.1)  # a call to the risk model
    return {"risk_score": 0.95 if job.args["user_id"] == 666 else 0.1}


@worker(queue="shipping")
async def quote_shipping(job: Job) -> dict[str, Any]:
    await trio.sleep(0.05)  # a call to the carrier
    return {"cost": 12 if job.args["address"].endswith("FR") else 7}


class OrderRejectedError(Exception):
    pass


async def process_order(oban: trioban.Oban, order: dict[str, Any]) -> dict[str, Any]:
    """Run the three checks in parallel; the slowest bounds the latency."""
    relays = [
        await oban.dispatch(check_inventory.new({"sku": order["sku"]})),
        await oban.dispatch(check_fraud.new({"user_id": order["user_id"]})),
        await oban.dispatch(quote_shipping.new({"address": order["address"]})),
    ]
    inventory, fraud, shipping = [o.unwrap() for o in await oban.await_many(relays, timeout=10)]
    if not inventory["available"]:
        raise OrderRejectedError(f"{order['sku']} is out of stock")
    if fraud["risk_score"] > 0.8:
        raise OrderRejectedError(f"order {order['id']} looks fraudulent")
    return {"order": order["id"], "total": order["subtotal"] + shipping["cost"]}


ORDERS = [
    {"id": 1, "sku": "kbd-01", "user_id": 7, "address": "1 rue de Paris, FR", "subtotal": 80},
    {"id": 2, "sku": "mouse-02", "user_id": 8, "address": "2 Main St, US", "subtotal": 25},
    {"id": 3, "sku": "kbd-01", "user_id": 666, "address": "3 Elm St, US", "subtotal": 80},
    {"id": 4, "sku": "kbd-01", "user_id": 9, "address": "4 Oak St, US", "subtotal": 80},
]


async def main(dsn: str) -> None:
    conf = trioban.Config(dsn=dsn, queues={"inventory": 10, "fraud": 5, "shipping": 10})
    async with trioban.open(conf) as oban:

        async def handle(order: dict[str, Any]) -> None:
            try:
                print("accepted", await process_order(oban, order))
            except OrderRejectedError as exc:
                print("rejected", exc)

        async with trio.open_nursery() as nursery:
            for order in ORDERS:
                nursery.start_soon(handle, order)


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else os.environ["TRIOBAN_DSN"])
