"""The demo runs end to end and its figures are what its workers make them."""

from __future__ import annotations

import io

import trio
from rich.console import Console

from trioban import Config, _demo


async def test_demo_runs_orders_and_a_workflow(dsn: str) -> None:
    output = io.StringIO()
    with trio.fail_after(30):
        figures = await _demo.run(Config(dsn=dsn), Console(file=output, width=100))
    # SKUs ending in 7 are out of stock (20), customers divisible by 23 look fraudulent (8).
    assert (figures["accepted"], figures["rejected"]) == (172, 28)
    assert figures["workflow"] == {"loaded": 1000, "shards": 4}
    assert "orders (3 relays each)" in output.getvalue()
