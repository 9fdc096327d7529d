"""Workers shared by the engine tests and by the node processes they start."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import enum
from datetime import datetime
from typing import Any

import attrs
import trio

import trioban
from trioban import Cancel, Discard, Encrypted, Job, Snooze, Unique, worker

# In-process probes: tests read these to see what the workers did.
seen: list[Any] = []
gates: dict[str, trio.Event] = {}
concurrency = {"now": 0, "max": 0, "started": 0}
_started = trio.Event()


def _note_start() -> None:
    global _started
    concurrency["started"] += 1
    _started.set()
    _started = trio.Event()


async def wait_started(count: int) -> None:
    """Wait until ``count`` gate or sleeper jobs have started (since the last reset)."""
    while concurrency["started"] < count:
        await _started.wait()


@worker(queue="default")
async def echo(job: Job) -> Any:
    return job.args.get("value")


@worker(queue="default")
async def record(job: Job) -> None:
    seen.append(job.args["tag"])


@worker(queue="default")
async def steer(job: Job) -> Any:
    """Returns what args ask for: a value, Cancel, Discard, Snooze or an exception."""
    kind = job.args["kind"]
    if kind == "cancel":
        return Cancel("told to cancel")
    if kind == "discard":
        return Discard("told to discard")
    if kind == "snooze" and job.attempt == 1:
        return Snooze(0)
    if kind == "raise":
        raise RuntimeError("boom from the worker")
    if kind == "unserialisable":
        return {"x": object()}
    return {"kind": kind, "attempt": job.attempt}


@worker(queue="default", max_attempts=3, backoff=lambda attempt: 0)
async def flaky(job: Job) -> str:
    if job.attempt < job.args["succeed_on"]:
        raise ValueError(f"failing attempt {job.attempt}")
    return f"ok on {job.attempt}"


@worker(queue="default")
async def wait_gate(job: Job) -> str:
    """Runs until the test opens its gate (or the job is cancelled)."""
    concurrency["now"] += 1
    concurrency["max"] = max(concurrency["max"], concurrency["now"])
    _note_start()
    try:
        await gates.setdefault(job.args["gate"], trio.Event()).wait()
    finally:
        concurrency["now"] -= 1
    return "opened"


@worker(queue="default")
async def sleeper(job: Job) -> str:
    _note_start()
    await trio.sleep(job.args["seconds"])
    return "slept"


@worker(queue="default", timeout=0.2, max_attempts=2, backoff=lambda attempt: 0)
async def too_slow(job: Job) -> str:
    await trio.sleep(10)
    return "never"


@worker(queue="default", timeout=0.3, max_attempts=1)
async def breaks_when_cancelled(job: Job) -> None:
    """A job whose cleanup raises when it is cancelled (by its timeout, or cancel_job)."""
    _note_start()
    try:
        await trio.sleep(10)
    finally:
        raise RuntimeError("cleanup failed")


def _retry_soon(attempt: int) -> float:
    return 0.5


# An attempt whose own write fails in a fault test (PostgreSQL restarting) is retried within
# test time, not after the default backoff of about 17 s.
@worker(queue="default", backoff=_retry_soon)
async def count_run(job: Job) -> None:
    """Records each execution in a side table: the multi-node exactly-once proof."""
    if job.args.get("sleep"):
        await trio.sleep(job.args["sleep"])
    oban = trioban.current_instance()
    async with oban.transaction() as conn:
        await conn.execute(
            "INSERT INTO runs (job_id, node) VALUES (%s, %s)", [job.id, oban.config.node]
        )


@worker(queue="default")
async def big_result(job: Job) -> str:
    return "x" * int(job.args["size"])


@worker(queue="default")
async def json_shaped(job: Job) -> Any:
    """Returns what JSON reshapes: a tuple, an int key."""
    return {"pair": (1, 2), 3: "three"}


@worker(queue="other")
async def whoami(job: Job) -> str:
    """Returns the node that ran it."""
    return trioban.current_instance().config.node


@worker(queue="default")
async def long_count(job: Job) -> None:
    """Records its start and end in ``lifeline_runs``; only the first attempt is long."""
    oban = trioban.current_instance()
    sql = "INSERT INTO lifeline_runs (job_id, node, phase) VALUES (%s, %s, %s)"
    async with oban.transaction() as conn:
        await conn.execute(sql, [job.id, oban.config.node, "start"])
    await trio.sleep(job.args["seconds"] if job.attempt == 1 else 0.05)
    async with oban.transaction() as conn:
        await conn.execute(sql, [job.id, oban.config.node, "done"])


# -- Pro worker features ---------------------------------------------------------------------


class Size(enum.Enum):
    SMALL = "small"
    LARGE = "large"


@attrs.frozen
class Address:
    city: str
    zip_code: str | None = None


@attrs.frozen
class OrderArgs:
    order_id: int
    size: Size
    placed_at: datetime
    ship_to: Address
    note: str | None = None
    quantity: int = 1


@dataclasses.dataclass(frozen=True)
class Receipt:
    order_id: int
    summary: str
    total: float


@worker(queue="default", args=OrderArgs, result=Receipt, recorded=True, max_attempts=1)
async def place_order(job: Job) -> Receipt:
    """Uses every structured field; returns a Receipt (or, for order 0, a wrong type)."""
    order: OrderArgs = job.args
    assert isinstance(order, OrderArgs)
    if order.order_id == 0:
        return "not a receipt"  # type: ignore[return-value]
    when = f"{order.placed_at:%Y-%m-%d}"
    summary = f"{order.quantity}x {order.size.value} to {order.ship_to.city} on {when}"
    return Receipt(order_id=order.order_id, summary=summary, total=9.5 * order.quantity)


@worker(queue="default", args=OrderArgs, strict_args=False)
async def lenient_order(job: Job) -> int:
    order: OrderArgs = job.args
    return order.order_id


@worker(queue="default", recorded=64)
async def record_text(job: Job) -> str:
    return str(job.args["text"])


# The keys secret_echo encrypts with, newest first; tests rotate them.
secret_keys: list[bytes] = [b"k" * 32]
secret_runs: list[Any] = []


@worker(
    queue="default",
    encrypted=Encrypted(key=lambda: secret_keys),
    max_attempts=2,
    backoff=lambda attempt: 0,
)
async def secret_echo(job: Job) -> Any:
    secret_runs.append(job.args)
    return job.args["secret"]


@worker(queue="default", unique=Unique(period=None))
async def unique_echo(job: Job) -> Any:
    return job.args.get("value")


@worker(queue="default", unique=Unique(period=None), recorded=True)
async def unique_recorded_echo(job: Job) -> Any:
    return job.args.get("value")


# -- workflows and batches ---------------------------------------------------------------


async def _log(table: str, *values: object) -> None:
    oban = trioban.current_instance()
    marks = ", ".join(["%s"] * (len(values) + 1))
    async with oban.transaction() as conn:
        await conn.execute(
            f"INSERT INTO {table} VALUES ({marks})",
            [*values, oban.config.node],
        )


def _steered(outcome: str) -> Any:
    if outcome == "cancel":
        return Cancel("asked to cancel")
    if outcome == "discard":
        return Discard("asked to discard")
    if outcome == "error":
        raise RuntimeError("asked to fail")
    return None


@worker(queue="default", max_attempts=1)
async def flow_step(job: Job) -> Any:
    """A workflow step: logs its run to flow_runs (if asked), returns its inputs' values."""
    if job.args.get("log"):
        await _log("flow_runs", job.id, job.meta["name"])
    if job.args.get("sleep"):
        await trio.sleep(job.args["sleep"])
    steered = _steered(job.args.get("outcome", "ok"))
    if steered is not None:
        return steered
    inputs = await trioban.current_instance().workflow_results(job)
    total = job.args.get("value", 0) + sum(
        r["total"] for r in inputs.values() if isinstance(r, dict)
    )
    return {"step": job.meta["name"], "total": total, "inputs": sorted(inputs)}


class Mailer:
    """A batch worker: process() steers by args; each handler logs to batch_calls."""

    async def process(self, job: Job) -> Any:
        if job.args.get("sleep"):
            await trio.sleep(job.args["sleep"])
        return _steered(job.args.get("outcome", "ok")) or "sent"

    async def handle_attempted(self, job: Job) -> None:
        await _log("batch_calls", job.meta["batch_id"], "attempted")

    async def handle_exhausted(self, job: Job) -> None:
        await _log("batch_calls", job.meta["batch_id"], "exhausted")

    async def handle_completed(self, job: Job) -> None:
        await _log("batch_calls", job.meta["batch_id"], "completed")

    async def handle_discarded(self, job: Job) -> None:
        await _log("batch_calls", job.meta["batch_id"], "discarded")

    async def handle_cancelled(self, job: Job) -> None:
        await _log("batch_calls", job.meta["batch_id"], "cancelled")


# Type checkers ignore what a class decorator returns: register by calling worker() instead.
MailBatch = worker(queue="default", max_attempts=1, priority=2, tags=["mail"])(Mailer)

# What the callbacks of the two batch workers below received (tests/test_batches.py).
callback_runs: list[tuple[str, Any]] = []


class SecretMailer:
    """A batch worker with encrypted args: its callback jobs must decrypt too."""

    async def process(self, job: Job) -> None:
        pass

    async def handle_completed(self, job: Job) -> None:
        callback_runs.append(("secret", job.args))


SecretMailBatch = worker(
    queue="default", encrypted=Encrypted(key=b"b" * 32), max_attempts=2, backoff=lambda a: 0
)(SecretMailer)


@attrs.frozen
class CampaignArgs:
    campaign: str
    to: str | None = None


class CampaignMailer:
    """A batch worker with structured args: its callback args are a CampaignArgs too."""

    async def process(self, job: Job) -> None:
        pass

    async def handle_completed(self, job: Job) -> None:
        callback_runs.append(("structured", job.args))


CampaignBatch = worker(queue="default", args=CampaignArgs, max_attempts=2)(CampaignMailer)


@worker(queue="cron", cron="0 * * * *")
async def hourly(job: Job) -> None:
    """Scheduled every hour; only nodes running the "cron" queue schedule it."""


# -- asyncio-flavored workers --------------------------------------------------------------


@worker(queue="aio", flavor="asyncio")
async def aio_fetch(job: Job) -> str:
    """asyncio-only I/O: reads a line from a TCP server with asyncio streams."""
    await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection("127.0.0.1", job.args["port"])
    try:
        writer.write(b"hello\n")
        await writer.drain()
        return (await reader.readline()).decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()


@worker(queue="aio", flavor="asyncio", timeout=0.3, max_attempts=1)
async def aio_slow(job: Job) -> str:
    """Sleeps in asyncio far past its timeout (or until cancelled)."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        aio_cancelled.append(job.id)
        raise
    return "too late"


aio_cancelled: list[int | None] = []


@worker(queue="aio", flavor="asyncio", max_attempts=1)
async def aio_fails(job: Job) -> None:
    """Raises what args ask for in asyncio code: a ValueError, or a SystemExit."""
    await asyncio.sleep(0)
    if job.args["kind"] == "exit":
        raise SystemExit(2)  # an argparse error in job code, say
    raise ValueError("boom")


@worker(queue="aio", flavor="asyncio")
async def aio_reports(job: Job) -> str:
    """Hands asyncio's exception handler an error: directly, as aiohttp does for an unclosed
    session, or through a fire-and-forget task that fails after the job returned."""
    loop = asyncio.get_running_loop()
    if job.args["kind"] == "handler":
        loop.call_exception_handler({"message": "Unclosed client session"})
    else:

        async def fail_later() -> None:
            await asyncio.sleep(0.01)
            raise RuntimeError("background task failed")

        asyncio.ensure_future(fail_later())  # noqa: RUF006 (nobody awaits it, on purpose)
    return "done"


@worker(queue="default", timeout=0.2, max_attempts=1)
async def swallows_cancel(job: Job) -> str:
    """Catches its cancellation (as some libraries do) and returns."""
    try:
        await trio.sleep(10)
    except trio.Cancelled:
        return "swallowed"
    return "slept"


@worker(queue="default")
async def has_asyncio_loop(job: Job) -> bool:
    """Whether a trio-asyncio loop is open around this (Trio) job."""
    import trio_asyncio

    return trio_asyncio.current_loop.get() is not None


tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant", default=None)
"""A caller's context (a tenant, a trace span): a job must not see its inserter's."""


@worker(queue="default")
async def read_tenant(job: Job) -> str | None:
    return tenant.get()


class Unusual(BaseException):
    """A library's own BaseException subclass."""


@worker(queue="default", max_attempts=1)
async def exits(job: Job) -> None:
    """Job code raising a BaseException: sys.exit (an argparse error, say), an asyncio
    CancelledError of its own, or an ``Unusual``."""
    kind = job.args.get("kind", "exit")
    raise {"exit": SystemExit(2), "asyncio": asyncio.CancelledError("its own")}.get(
        kind, Unusual("odd")
    )


@worker(queue="default")
async def interrupted(job: Job) -> None:
    """Ctrl-C delivered while this job's code runs."""
    raise KeyboardInterrupt
