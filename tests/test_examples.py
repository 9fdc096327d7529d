"""Every script in examples/ runs against the test database and prints what it promises."""

from __future__ import annotations

import sys

import trio

from tests.nodes import ROOT


async def run_example(name: str, dsn: str) -> str:
    result = await trio.run_process(
        [sys.executable, str(ROOT / "examples" / name), dsn],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_order_service(dsn: str) -> None:
    with trio.fail_after(60):
        lines = sorted((await run_example("order_service.py", dsn)).splitlines())
    assert lines == [
        "accepted {'order': 1, 'total': 92}",
        "accepted {'order': 4, 'total': 87}",
        "rejected mouse-02 is out of stock",
        "rejected order 3 looks fraudulent",
    ]
