"""A cron job: a nightly report at 03:00 Paris time, enqueued once per night however many
nodes run this crontab (each slot has a unique key).

Waiting for 03:00 makes a poor example: ``run_cron(at)`` enqueues what the scheduler would
at a given minute. Two nodes go through one night minute by minute; one job comes out.

    python examples/cron_job.py postgresql://localhost/app   (or set TRIOBAN_DSN)
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta

import trio

import trioban
from trioban import Job, worker


@worker(queue="reports")
async def nightly_report(job: Job) -> str:
    return f"report for {job.args['team']}"


CRONTAB = [("0 3 * * *", nightly_report, {"args": {"team": "sales"}})]


async def main(dsn: str) -> None:
    conf = trioban.Config(dsn=dsn, queues={"reports": 1}, crontab=CRONTAB, timezone="Europe/Paris")
    async with trioban.open(conf) as first, trioban.open(conf.evolve(queues={})) as second:
        night = datetime(2026, 1, 10, 0, 0, tzinfo=UTC)
        created = 0
        # Both nodes go through every minute of the night; 02:00 UTC is 03:00 in Paris.
        for minute in range(6 * 60):
            for node in (first, second):
                created += await node.run_cron(night + timedelta(minutes=minute))
        print("jobs enqueued for the night:", created)
        async with first.transaction() as conn:
            cur = await conn.execute(
                "SELECT args->>'team' FROM oban_jobs WHERE worker = %s", [nightly_report.name]
            )
            print("for:", [row[0] for row in await cur.fetchall()])


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else os.environ["TRIOBAN_DSN"])
