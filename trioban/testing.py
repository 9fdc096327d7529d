"""Testing helpers for code that uses trioban, with a pytest plugin.

Enable the plugin with one line in your ``conftest.py``::

    pytest_plugins = ["trioban.testing"]

It provides fixtures (with pytest-trio): ``trioban_dsn``, a fresh database with the schema
installed (on a throwaway PostgreSQL, or the server named by ``TRIOBAN_TEST_DSN``), and
``oban``, an instance open on it in the ``manual`` testing mode: jobs are inserted but no
queue runs, so a test decides when they run with ``drain_queue`` (or runs one worker directly
with ``perform_job``) and checks what was enqueued with ``assert_enqueued``.
``Config(testing="inline")`` instead runs each job at insert and relays return at once.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any, final

import attrs
import psycopg
import pytest
import trio
from psycopg import sql

from . import _codec, _settle, _store
from ._acker import ack_json
from ._config import Config
from ._executor import Ack, Running, execute, failure, run_here
from ._instance import Oban
from ._job import Job, JobState
from ._open import open
from ._relay import META_REF
from ._sql import query, schema_sql
from ._worker import CURRENT, Worker

if TYPE_CHECKING:
    from ._pg import Pool

_CLEANUP_TIMEOUT = 5.0
"""Seconds a cancelled drain_queue spends recording the job it was running."""

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
    """What ``perform_job`` saw: the new state, the result (structured), the error text."""

    state: JobState
    result: Any
    error: str | None
    job: Job


async def perform_job(worker: Worker, args: Any = None, **opts: Any) -> Performed:
    """Run ``worker`` for ``args`` here, as a node would: validation, JSON round trip,
    structured args and result, result mapping (``Cancel``, ``Snooze``, ``Discard``,
    exceptions). Nothing is stored. A worker's exception is reported, not raised.
    """
    if not isinstance(worker, Worker):
        raise TypeError(f"perform_job expects a worker (from @worker), got {worker!r}")
    job = worker.new(args, **opts)
    # A relay ref makes the executor serialise the result exactly as for a relay.
    tagged = attrs.evolve(job, meta={**job.meta, META_REF: "perform_job"})
    ran, ack = await run_here(tagged)
    result = None if ack.result is None else worker.load_result(ack.result)
    return Performed(JobState(ack.state), result, ack.error, attrs.evolve(ran, meta=job.meta))


async def drain_queue(
    oban: Oban,
    queue: str,
    *,
    with_scheduled: bool = False,
    with_recursion: bool = False,
    with_safety: bool = True,
) -> dict[str, int]:
    """Run the available jobs of ``queue`` here, one at a time, and count their outcomes.

    ``with_scheduled`` runs scheduled (and retryable) jobs too, as if due now;
    ``with_recursion`` keeps draining while jobs enqueue more; ``with_safety=False`` lets a
    worker's exception out of ``drain_queue`` instead of recording it. Returns counts by new
    state (``completed``, ``retryable``, ``discarded``, ``cancelled``, ``scheduled``).
    """
    counts = dict.fromkeys(("completed", "retryable", "discarded", "cancelled", "scheduled"), 0)
    # Jobs see this instance as theirs (current_instance(), relays, inserts).
    token = CURRENT.set(oban)
    try:
        await _drain(oban, queue, counts, with_scheduled, with_recursion, with_safety)
    finally:
        CURRENT.reset(token)
    return counts


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
    while True:
        if with_scheduled:
            async with pool.connection() as conn:
                await conn.execute(query("make_due", prefix), {"queue": queue})
        # The jobs available now; those they enqueue wait for the next round (recursion).
        async with pool.connection() as conn:
            cur = await conn.execute(
                query("job_ids", prefix), {"state": "available", "queue": queue}
            )
            due = len(await cur.fetchall())
        ran = 0
        # One claim per job: a worker's exception or a cancelled drain leaves no claimed job
        # behind in 'executing' (the manual mode has no lifeline to rescue it).
        while ran < due:
            jobs = await _store.fetch(pool, prefix, queue, 1, "drain_queue", producer)
            if not jobs:
                break
            counts[await _run_one(pool, prefix, jobs[0], with_safety)] += 1
            ran += 1
        if not ran or not with_recursion:
            return


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
    args: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> list[Job]:
    """Jobs waiting to run (available, scheduled, retryable) that match every filter given.

    ``args`` and ``meta`` match partially: the job's must contain the given keys and values
    (nested objects too).
    """
    name = worker.name if isinstance(worker, Worker) else worker
    params = {
        "worker": name,
        "queue": queue,
        "args": _codec.dumps(args or {}),
        "meta": _codec.dumps(meta or {}),
    }
    statement = query("enqueued_jobs", oban.config.prefix)
    async with oban._pool.connection() as conn:
        cur = await conn.execute(statement, params)
        rows = await cur.fetchall()
    return [_store.job_from_row(row) for row in rows]


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


# -- the pytest plugin -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def trioban_server_dsn() -> Iterator[str]:
    """A PostgreSQL server for the session: ``TRIOBAN_TEST_DSN``, else a throwaway one."""
    import os

    from ._devserver import temp_postgres

    existing = os.environ.get("TRIOBAN_TEST_DSN")
    if existing:
        yield existing
        return
    with temp_postgres() as server:
        yield server.dsn()


@pytest.fixture(scope="session")
def _trioban_template(trioban_server_dsn: str) -> str:
    name = f"trioban_tpl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(trioban_server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(_with_db(trioban_server_dsn, name), autocommit=True) as conn:
        conn.execute(schema_sql("public").encode())
    return name


@pytest.fixture
def trioban_dsn(trioban_server_dsn: str, _trioban_template: str) -> Iterator[str]:
    """A fresh database with the trioban schema, dropped after the test."""
    name = f"trioban_t_{uuid.uuid4().hex}"
    with psycopg.connect(trioban_server_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(_trioban_template)
            )
        )
    try:
        yield _with_db(trioban_server_dsn, name)
    finally:
        with psycopg.connect(trioban_server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
async def oban(trioban_dsn: str) -> AsyncIterator[Oban]:
    """An instance on ``trioban_dsn`` in the manual testing mode (no queue runs)."""
    async with open(Config(dsn=trioban_dsn, testing="manual")) as instance:
        yield instance


def _with_db(dsn: str, dbname: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    return make_conninfo("", **{**conninfo_to_dict(dsn), "dbname": dbname})
