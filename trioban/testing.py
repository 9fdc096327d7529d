"""Testing helpers for code that uses trioban, with a pytest plugin.

Enable the plugin with one line in your ``conftest.py``::

    pytest_plugins = ["trioban.testing"]

It provides fixtures (with pytest-trio): ``trioban_dsn``, a fresh database with the schema
installed (on a throwaway PostgreSQL, or the server named by ``TRIOBAN_TEST_DSN``), and
``oban``, an instance open on it in the ``manual`` testing mode: jobs are inserted but no
queue runs, so a test decides when they run with ``drain_queue`` (or runs one worker directly
with ``perform_job``) and checks what was enqueued with ``assert_enqueued``.
``Config(testing="inline")`` instead runs each job at insert and relays return at once.
The helpers themselves import without pytest.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import trio

from . import _codec, _settle, _store, _structured
from ._ack import Ack, failure
from ._acker import ack_json
from ._crypto import FIELD as SEALED_FIELD
from ._executor import Running, execute, resolve, run_here
from ._inline import as_written
from ._instance import Oban
from ._job import Job, JobState
from ._registry import lookup
from ._sql import query
from ._validate import check_queue
from ._worker import CURRENT, Worker, WorkerNotFound

if TYPE_CHECKING:
    from ._pg import Pool

# pytest loads the fixtures from there when a project enables this module as a plugin; they
# live apart so these helpers import without pytest.
pytest_plugins: Final = ["trioban._pytest_plugin"]

_CLEANUP_TIMEOUT = 5.0
"""Seconds drain_queue spends, shielded, recording the job it was running when cancelled (or
let a worker's exception out)."""

__all__ = [
    "Performed",
    "all_enqueued",
    "assert_enqueued",
    "drain_queue",
    "perform_job",
    "refute_enqueued",
]


@final
@attrs.frozen
class Performed:
    """What ``perform_job`` saw: the new state, the result (structured), the error text (a
    failure's, or the reason given to ``Cancel`` or ``Discard``) and the job as a node would
    have written it."""

    state: JobState
    result: Any
    error: str | None
    job: Job


async def perform_job(worker: Worker, args: Any = None, **opts: Any) -> Performed:
    """Run ``worker`` for ``args`` here, as a node would: validation, JSON round trip of the
    args, structured args and result, result mapping (``Cancel``, ``Snooze``, ``Discard``,
    exceptions). Nothing is stored. A worker's exception is reported, not raised.

    ``result`` is what a completed job returned: for a worker that records results, as
    ``fetch_recorded`` would give it (through JSON, structured again); otherwise as returned,
    unserialised, since a node keeps nothing of it (a relay's caller gets it through JSON).
    ``error`` is a failure's text, or the reason given to ``Cancel`` or ``Discard``. ``job`` is
    the job as a node's write of the attempt would leave it, but unsaved (no id): its new
    state, the error appended to ``errors``, ``scheduled_at`` moved by a retry or snooze.
    """
    if not isinstance(worker, Worker):
        raise TypeError(f"perform_job expects a worker (from @worker), got {worker!r}")
    # Run as inserted: the worker sees the job's own meta, and its result is serialised only
    # if the worker records it, as on a node.
    running, ack = await run_here(worker.new(args, **opts))
    if ack.result is not None:
        result = worker.load_result(ack.result)
    else:
        result = running.returned if ack.state == "completed" else None
    job = as_written(running.job, ack)
    # A Cancel's or Discard's reason is no failure (ack.error, for telemetry, is None), but a
    # node records it in errors all the same.
    error = ack.error
    if error is None and len(job.errors) > len(running.job.errors):
        error = str(job.errors[-1]["error"])
    return Performed(JobState(ack.state), result, error, job)


async def drain_queue(
    oban: Oban,
    queue: str,
    *,
    with_scheduled: bool = False,
    with_recursion: bool = False,
    with_safety: bool = True,
) -> dict[str, int]:
    """Run the jobs of ``queue`` available when it starts here, one at a time, and count
    their outcomes.

    ``with_scheduled`` runs scheduled (and retryable) jobs too, as if due now;
    ``with_recursion`` also runs the jobs they enqueue, round after round, until none is left
    (with both, a retried job runs again until it ends or runs out of attempts, but a job that
    snoozed stays ``scheduled`` until the next drain, so a drain ends);
    ``with_safety=False`` lets a worker's exception out of ``drain_queue`` instead of recording
    it. Returns counts by new state (``completed``, ``retryable``, ``discarded``,
    ``cancelled``, ``scheduled``). ``queue`` names one queue (a str, else ``TypeError``).
    """
    queue = _queue_name(queue)
    counts = dict.fromkeys(("completed", "retryable", "discarded", "cancelled", "scheduled"), 0)
    # Jobs see this instance as theirs (current_instance(), relays, inserts).
    token = CURRENT.set(oban)
    try:
        await _drain(oban, queue, counts, with_scheduled, with_recursion, with_safety)
    finally:
        CURRENT.reset(token)
    return counts


def _queue_name(queue: object) -> str:
    """``queue``, checked: one queue's name (drain_queue drains one queue)."""
    if isinstance(queue, str):
        return check_queue(queue)
    hint = "drain_queue drains one queue: call it once for each queue to drain"
    if isinstance(queue, Worker):
        hint = f"pass the worker's queue, {queue.queue!r}"
    raise TypeError(f"expected queue to be a queue name (a str), got {queue!r}; {hint}")


async def _drain(
    oban: Oban,
    queue: str,
    counts: dict[str, int],
    with_scheduled: bool,
    with_recursion: bool,
    with_safety: bool,
) -> None:
    prefix, pool = oban.config.prefix, oban._pool
    producer = str(uuid.uuid4())
    # Jobs that snoozed in this drain are not run again in it: made due each round, a job that
    # always snoozes would keep a drain with_scheduled and with_recursion going for ever.
    snoozed: set[int] = set()
    while True:
        if with_scheduled:
            async with pool.connection() as conn:
                params = {"queue": queue, "skip": sorted(snoozed)}
                await conn.execute(query("make_due", prefix), params)
        # A round runs the jobs available now; those they enqueue wait for the next round
        # (recursion), even when they would be claimed first.
        async with pool.connection() as conn:
            cur = await conn.execute(
                query("job_ids", prefix), {"state": "available", "queue": queue}
            )
            due = {row[0] for row in await cur.fetchall()} - snoozed
        ran = await _round(pool, prefix, due, producer, counts, snoozed, with_safety)
        if not ran or not with_recursion:
            return


async def _round(
    pool: Pool,
    prefix: str,
    due: set[int],
    producer: str,
    counts: dict[str, int],
    snoozed: set[int],
    with_safety: bool,
) -> int:
    """Run the jobs ``due`` (ids) that are still available, adding those that snooze to
    ``snoozed``; returns how many ran."""
    ran = 0
    # One claim per job: a worker's exception or a cancelled drain leaves no claimed job
    # behind in 'executing' (the manual mode has no lifeline to rescue it).
    while due:
        job = await _store.claim_one_of(pool, prefix, sorted(due), "drain_queue", producer)
        if job is None:
            break
        due.discard(job.id or 0)
        state = await _run_one(pool, prefix, job, with_safety)
        counts[state] += 1
        if state == "scheduled":  # only a snooze leaves a job scheduled
            snoozed.add(job.id or 0)
        ran += 1
    return ran


async def _run_one(pool: Pool, prefix: str, job: Job, with_safety: bool) -> str:
    """Run one claimed job and record its outcome, even when its exception is let out."""
    try:
        ack = await execute(Running(job, trio.CancelScope(), reraise=not with_safety))
    except BaseException as exc:
        # A worker's exception let out (with_safety=False), or the drain cancelled: record the
        # job's failure (shielded, bounded) so it isn't left 'executing' (the manual mode has
        # no lifeline), then let the exception go on.
        reason = "drain_queue was cancelled" if isinstance(exc, trio.Cancelled) else exc
        with trio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
            await _record(pool, prefix, failure(job, reason))
        raise
    await _record(pool, prefix, ack)
    return ack.state


async def _record(pool: Pool, prefix: str, ack: Ack) -> None:
    await _store.ack(pool, prefix, [ack_json(ack, publish=True)])
    await _settle.after_acks(pool, prefix, [ack])


async def all_enqueued(
    oban: Oban,
    *,
    worker: Worker | str | None = None,
    queue: str | None = None,
    args: Any = None,
    meta: Mapping[str, Any] | None = None,
) -> list[Job]:
    """Jobs waiting to run (available, scheduled, retryable, or a workflow step suspended
    until its deps finish) that match every filter given.

    ``args`` and ``meta`` match partially: the job's must contain the given keys and values
    (nested objects too). ``args`` is matched against the args the worker gets (decrypted for
    a worker with ``encrypted=``); for a worker with ``args=Cls`` given as ``worker=``, it may
    be a ``Cls`` instance. A filter of another type (``worker`` neither a worker nor a name,
    ``queue`` not a str, ``meta`` not a mapping) is a ``TypeError``.
    """
    _check_filters(worker, queue, meta)
    name = worker.name if isinstance(worker, Worker) else worker
    want = None if args is None else await _args_filter(args, worker)
    params = {"worker": name, "queue": queue, "args": "{}", "meta": _codec.dumps(meta or {})}
    statement = query("enqueued_jobs", oban.config.prefix)
    async with oban._pool.connection() as conn:
        cur = await conn.execute(statement, params)
        rows = await cur.fetchall()
    jobs = [_store.job_from_row(row) for row in rows]
    if want is None:
        return jobs
    # Matched here, not by the database: encrypted args are only readable here.
    return [job for job in jobs if _contains(await _worker_args(job), want)]


def _check_filters(worker: object, queue: object, meta: object) -> None:
    """Refuse filters of the wrong type, which would match nothing (so refute_enqueued would
    always pass) or fail in the database."""
    if worker is not None and not isinstance(worker, Worker | str):
        raise TypeError(f"expected worker to be a worker (from @worker) or a name, got {worker!r}")
    if queue is not None and not isinstance(queue, str):
        raise TypeError(f"expected queue to be a queue name (a str), got {queue!r}")
    if meta is not None and not isinstance(meta, Mapping):
        raise TypeError(f"expected meta to be a mapping (matched partially), got {meta!r}")


async def _args_filter(args: Any, worker: Worker | str | None) -> Any:
    """The ``args`` filter as JSON data; a structured instance through its worker."""
    if not isinstance(args, Mapping):
        found = await resolve(worker) if isinstance(worker, str) else worker
        args_type = None if found is None else found.args_type
        if args_type is None or not isinstance(args, args_type):
            raise TypeError(
                f"expected args to be a mapping (matched partially), or an instance of the "
                f"args class of the worker given as worker=, got {args!r}"
                + ("" if found is None else f" for {found.name} (args={args_type!r})")
            )
        args = _structured.unstructure(args, args_type, "args")
    return _codec.loads(_codec.dumps(args))  # as stored: tuples as lists, keys as str


async def _worker_args(job: Job) -> Any:
    """``job``'s args as its worker gets them (before structuring): decrypted if sealed."""
    found = lookup(job.worker)
    if found is None and _is_sealed(job.args):
        found = await resolve(job.worker)
        if found is None:
            raise WorkerNotFound(
                f"cannot match args against job {job.id}: its args are encrypted and its "
                f"worker {job.worker!r} is not importable here to decrypt them"
            )
    if found is None or found.encrypted is None:
        return job.args
    return _codec.loads(found.encrypted.decrypt(job.args, found.name))


def _is_sealed(args: Any) -> bool:
    return isinstance(args, Mapping) and set(args) == {SEALED_FIELD}


def _contains(have: Any, want: Any) -> bool:
    """``have @> want``, PostgreSQL's jsonb containment (as ``meta`` is matched): an object
    holds the given keys with contained values, an array holds each given element within one
    of its own, a scalar is equal (but ``true`` is not ``1``)."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(
            key in have and _contains(have[key], value) for key, value in want.items()
        )
    if isinstance(want, list):
        return isinstance(have, list | tuple) and all(
            any(_contains(item, wanted) for item in have) for wanted in want
        )
    if isinstance(have, Mapping | list | tuple) or isinstance(have, bool) != isinstance(want, bool):
        return False
    return bool(have == want)


async def assert_enqueued(oban: Oban, **filters: Any) -> list[Job]:
    """Assert at least one job waiting to run matches ``filters`` (see ``all_enqueued``)."""
    found = await all_enqueued(oban, **filters)
    if not found:
        raise AssertionError(f"expected a job enqueued matching {filters}, found none")
    return found


async def refute_enqueued(oban: Oban, **filters: Any) -> None:
    """Assert no job waiting to run matches ``filters`` (see ``all_enqueued``)."""
    found = await all_enqueued(oban, **filters)
    if found:
        ids = [job.id for job in found]
        raise AssertionError(f"expected no job enqueued matching {filters}, found {ids}")
