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


async def test_etl_workflow(dsn: str) -> None:
    with trio.fail_after(60):
        output = await run_example("etl_workflow.py", dsn)
    assert "loaded {'sum_of_squares': 338350, 'parts': 4}" in output
    assert "'load': 'completed'" in output


async def test_email_batch(dsn: str) -> None:
    with trio.fail_after(60):
        lines = (await run_example("email_batch.py", dsn)).splitlines()
    assert "campaign welcome: 1 bounced" in lines
    assert "campaign welcome: every email handled" in lines
    assert lines[-1] == "sent 3 of 4"


async def test_cron_job(dsn: str) -> None:
    with trio.fail_after(60):
        output = await run_example("cron_job.py", dsn)
    assert "jobs enqueued for the night: 1" in output
    assert "for: ['sales']" in output


async def test_asyncio_worker(dsn: str) -> None:
    with trio.fail_after(60):
        output = await run_example("asyncio_worker.py", dsn)
    assert output.strip() == "asyncio worker read: hello from a trio server"
