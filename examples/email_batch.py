"""An email batch: one job per recipient, and callbacks when the batch is done.

``handle_completed`` runs once if every email went out; ``handle_discarded`` once if some
bounced for good; ``handle_exhausted`` once in either case.

    python examples/email_batch.py postgresql://localhost/app   (or set TRIOBAN_DSN)
"""

from __future__ import annotations

import os
import sys

import trio

import trioban
from trioban import Batch, Discard, Job, worker

RECIPIENTS = ["ada@example.com", "grace@example.com", "bounce@example.com", "alan@example.com"]
done = trio.Event()


class Campaign:
    async def process(self, job: Job) -> object:
        if job.args["to"].startswith("bounce"):
            return Discard("mailbox does not exist")
        await trio.sleep(0.01)  # the SMTP call
        return None

    async def handle_discarded(self, job: Job) -> None:
        oban = trioban.current_instance()
        status = await oban.batch_status(job.meta["batch_id"])
        print(f"campaign {job.args['campaign']}: {status['discarded']} bounced")

    async def handle_exhausted(self, job: Job) -> None:
        print(f"campaign {job.args['campaign']}: every email handled")
        done.set()


# Registered by calling worker(): type checkers don't see what a class decorator returns.
send_campaign = worker(queue="mail", max_attempts=3)(Campaign)


async def main(dsn: str) -> None:
    async with trioban.open(trioban.Config(dsn=dsn, queues={"mail": 10})) as oban:
        batch = Batch(callback=send_campaign, callback_args={"campaign": "welcome"})
        for to in RECIPIENTS:
            batch.add(send_campaign.new({"to": to}))
        await oban.insert_all(batch)
        with trio.fail_after(30):
            await done.wait()
        status = await oban.batch_status(batch.batch_id)
        print("sent", status["completed"], "of", status["total"])


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else os.environ["TRIOBAN_DSN"])
