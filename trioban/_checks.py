"""Checks of the arguments of ``Oban``'s methods: each error says what was expected."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from psycopg.pq import TransactionStatus

from . import _codec, _pg
from ._batch import BATCH_ID, Batch
from ._errors import TriobanError
from ._job import Job
from ._relay import check_timeout as check_timeout  # relays check theirs too
from ._validate import check_json_object, valid_queue_limit
from ._validate import check_queue as check_queue  # the queue methods check theirs too
from ._workflow import WORKFLOW_ID, Workflow


def check_limit(limit: object) -> int:
    if not valid_queue_limit(limit):
        raise ValueError(f"expected limit to be an int between 1 and 10000, got {limit!r}")
    return limit


def check_jobs(jobs: Iterable[Job] | Workflow | Batch) -> list[Job]:
    if isinstance(jobs, Job):
        raise TypeError("insert_all expects a list of jobs; use insert(job) for one")
    if isinstance(jobs, Workflow | Batch):
        batch = jobs.build()
    elif isinstance(jobs, Iterable) and not isinstance(jobs, str | bytes | Mapping):
        batch = list(jobs)
    else:
        raise TypeError(f"insert_all expects a list of jobs, got {type(jobs).__name__}")
    for job in batch:
        if not isinstance(job, Job):
            raise TypeError(f"expected a Job built by Worker.new(), got {job!r}")
        if job.id is not None:
            raise ValueError(f"job {job.id} is already saved; build a new one with Worker.new()")
    return batch


def check_inline(jobs: Iterable[Job]) -> None:
    """Refuse workflow steps and batch jobs in the inline testing mode: it runs each job once,
    as it is inserted, so it could neither hold a step until its deps finish nor run a
    batch's callbacks."""
    for job in jobs:
        group = "workflow" if WORKFLOW_ID in job.meta else "batch" if BATCH_ID in job.meta else ""
        if group:
            raise inline_refusal(group)


def inline_refusal(group: str) -> TriobanError:
    """The error refusing a ``group`` ("workflow" or "batch") in the inline testing mode."""
    return TriobanError(
        f"the inline testing mode (Config(testing='inline')) can't run a {group}: it runs each "
        "job once, as it is inserted, ignoring deps and callbacks; use testing='manual' and "
        "run the jobs with trioban.testing.drain_queue(oban, queue, with_recursion=True)"
    )


def check_conn(conn: object) -> None:
    if conn is None:
        return
    if not isinstance(conn, _pg.Connection):
        raise TypeError(
            "expected conn to be a connection from `async with oban.transaction() as conn`, "
            f"got a {type(conn).__module__}.{type(conn).__qualname__}"
        )
    if conn.info.transaction_status == TransactionStatus.IDLE:
        # Back in its pool: another task may be using it, or nobody would commit.
        raise ValueError(
            "conn is not in a transaction: its `async with oban.transaction() as conn` block "
            "has ended; insert inside that block"
        )


def check_type(value: object, kind: type, what: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"expected {what}, got {value!r}")


def check_key(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"expected {what} (a non-empty str), got {value!r}")
    return value


MAX_JOB_ID: Final = 2**63 - 1
"""The largest job id (the column is a bigint)."""


def check_id(job_id: int) -> int:
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise TypeError(f"expected a job id (a positive int), got {job_id!r}")
    if not 1 <= job_id <= MAX_JOB_ID:
        # Never a job's id: a caller's bug, not a missing job (the same for every method).
        raise ValueError(f"expected a job id between 1 and 2**63 - 1, got {job_id!r}")
    return job_id


def encode_message(item: Mapping[str, Any]) -> str:
    """A notifier payload, checked as args are (str keys, JSON values), encoded to send."""
    if not isinstance(item, Mapping):
        raise TypeError(f"expected a notifier payload to be a dict, got {type(item).__name__}")
    text = _codec.pack_payload(check_json_object(item, "the notifier payload")[1])
    if len(text.encode()) >= _codec.NOTIFY_LIMIT:
        raise ValueError(
            f"notifier payload is {len(text.encode())} bytes even compressed; PostgreSQL's "
            f"limit is {_codec.NOTIFY_LIMIT}: store the data in a table and send its key"
        )
    return text
