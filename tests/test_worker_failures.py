"""A worker that fails in an unusual way fails its own job, saying why, and never the node."""

from __future__ import annotations

import asyncio
import textwrap
import uuid
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import trioban
from trioban import Cancel, Discard, Encrypted, Job, JobState, worker
from trioban._job import evolve
from trioban._worker import args_json

from .helpers import reaches
from .test_lifecycle import running
from .workers import echo


@worker(queue="default", max_attempts=1)
async def discards_with_an_exception(job: Job) -> Discard | None:
    try:
        int(job.args["value"])
    except ValueError as exc:
        return Discard(exc)  # natural user code: the reason is an exception, not a str
    return None


@worker(queue="default", max_attempts=1)
async def cancels_without_a_reason(job: Job) -> Cancel:
    return Cancel(None)


@worker(queue="default", max_attempts=1)
async def returns_a_broken_discard(job: Job) -> Discard:
    discard = Discard("why")
    object.__setattr__(discard, "reason", None)  # past the converter: the executor's safety net
    return discard


async def test_cancel_and_discard_keep_any_reason_as_text() -> None:
    assert Cancel(None).reason == "cancelled"
    assert Discard(None).reason == "discarded"
    assert Discard(ValueError("bad value")).reason == "bad value"
    assert Cancel(5).reason == "5"


async def test_a_reason_that_isnt_text_ends_the_job_not_the_node(dsn: str) -> None:
    """The reviewer's case: ``Discard(exc)`` and ``Cancel(None)`` crashed the instance."""
    with trio.fail_after(10):
        async with running(dsn) as oban:
            with pytest.raises(trioban.RelayDiscard) as discarded:
                await oban.relay(discards_with_an_exception.new({"value": "abc"}), timeout=5)
            assert discarded.value.reason == "invalid literal for int() with base 10: 'abc'"
            with pytest.raises(trioban.RelayCancelled) as cancelled:
                await oban.relay(cancels_without_a_reason.new({}), timeout=5)
            assert cancelled.value.reason == "cancelled"
            assert await oban.relay(echo.new({"value": "alive"}), timeout=5) == "alive"


async def test_an_outcome_that_cannot_be_acked_fails_its_job_not_the_node(dsn: str) -> None:
    with trio.fail_after(10):
        async with running(dsn) as oban:
            job = await oban.insert(returns_a_broken_discard.new({}))
            failed = await reaches(oban, job.id, JobState.DISCARDED)
            error = failed.errors[-1]["error"]
            assert "cannot record what tests.test_worker_failures.returns_a_broken_discard" in error
            assert "AttributeError" in error
            assert await oban.relay(echo.new({"value": "alive"}), timeout=5) == "alive"


# -- asyncio-flavored workers ---------------------------------------------------------------


@worker(queue="aio", flavor="asyncio", max_attempts=1)
async def awaits_a_cancelled_task(job: Job) -> None:
    task = asyncio.ensure_future(asyncio.sleep(10))
    await asyncio.sleep(0)
    task.cancel()
    await task  # asyncio.CancelledError escapes, though no one cancelled the job


async def test_an_asyncio_cancelled_error_not_from_trio_is_an_ordinary_failure(dsn: str) -> None:
    with trio.fail_after(15):
        async with running(dsn, queues={"aio": 1, "default": 1}) as oban:
            with pytest.raises(trioban.RelayDiscard, match="asyncio task was cancelled"):
                await oban.relay(awaits_a_cancelled_task.new({}), timeout=5)
            assert await oban.relay(echo.new({"value": "alive"}), timeout=5) == "alive"


# -- encrypted args ---------------------------------------------------------------------------

KEYS: dict[str, bytes] = {}


@worker(
    queue="default",
    encrypted=Encrypted(key=lambda: [KEYS["new"], KEYS["old"]]),
    max_attempts=2,
    backoff=lambda attempt: 0,
)
async def charge(job: Job) -> Any:
    return job.args["amount"]


@pytest.mark.parametrize(
    ("old", "expected"),
    [(None, "KeyError: 'old'"), (b"short", "expected each encryption key to be 32 bytes")],
)
async def test_keys_a_node_cannot_get_are_retried_not_fatal(
    dsn: str, old: bytes | None, expected: str
) -> None:
    """A key callable that raises (an unset variable) or gives a key of the wrong size on the
    node running the job: a DecryptionError, retried like a wrong key."""
    KEYS.update(new=b"n" * 32, old=b"o" * 32)
    job = charge.new({"amount": 5})
    if old is None:
        del KEYS["old"]
    else:
        KEYS["old"] = old
    with trio.fail_after(10):
        async with running(dsn) as oban:
            saved = await oban.insert(job)
            failed = await reaches(oban, saved.id, JobState.DISCARDED)
            assert await oban.relay(echo.new({"value": "alive"}), timeout=5) == "alive"
    assert failed.attempt == 2  # retried
    error = failed.errors[-1]["error"]
    assert "cannot get the encryption keys of worker tests.test_worker_failures.charge" in error
    assert expected in error


def test_a_key_source_that_raises_is_a_decryption_error() -> None:
    sealed = Encrypted(key=b"k" * 32).encrypt('{"a": 1}', "w")
    missing = Encrypted(key=lambda: KEYS["nowhere"])
    with pytest.raises(trioban.DecryptionError, match="KeyError: 'nowhere'"):
        missing.decrypt(sealed, "w")


# -- failure text -------------------------------------------------------------------------------

DEPTH = 150  # alternating frames: Python doesn't fold them, so the traceback is long


def _ping(depth: int) -> None:
    if depth == 0:
        raise LookupError("customer_id missing from record 42")
    _pong(depth - 1)


def _pong(depth: int) -> None:
    _ping(depth - 1)


@worker(queue="default", max_attempts=1)
async def fails_deep_down(job: Job) -> None:
    _ping(DEPTH)


async def test_a_deep_traceback_keeps_the_exception_message(dsn: str) -> None:
    """The reviewer's case: truncation from the start lost ``Type: message``, from the stored
    error (8000 characters) and from a relay's reason (2000)."""
    message = "LookupError: customer_id missing from record 42"
    with trio.fail_after(10):
        async with running(dsn) as oban:
            with pytest.raises(trioban.RelayDiscard) as discarded:
                await oban.relay(fails_deep_down.new({}), timeout=5)
            job = await oban.insert(fails_deep_down.new({}))
            failed = await reaches(oban, job.id, JobState.DISCARDED)
    error = failed.errors[-1]["error"]
    assert len(error) <= 8000
    assert error.startswith(message + "\n\nTraceback (most recent call last):")
    assert "characters cut" in error
    assert error.endswith(message)  # the innermost frames are kept too
    assert discarded.value.reason.startswith(message)
    assert len(discarded.value.reason) <= 2000


# -- worker modules that fail to import ---------------------------------------------------------

BROKEN = """
import os
if not os.environ.get({flag!r}):
    raise RuntimeError("settings not configured")
from trioban import worker

@worker(queue="default")
async def work(job):
    return "ran"
"""


def _module(directory: Path, source: str, **values: str) -> str:
    name = f"mod_{uuid.uuid4().hex}"
    (directory / f"{name}.py").write_text(textwrap.dedent(source.format(**values)))
    return name


async def test_a_module_that_fails_to_import_is_retried_with_its_error(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reviewer's case: the job was discarded for good as an unknown worker."""
    monkeypatch.syspath_prepend(str(tmp_path))
    flag = f"TRIOBAN_TEST_{uuid.uuid4().hex}"
    name = _module(tmp_path, BROKEN, flag=flag)
    with trio.fail_after(10):
        async with running(dsn) as oban:
            job = await oban.insert(Job(worker=f"{name}.work", args={}, max_attempts=5))
            failed = await reaches(oban, job.id, JobState.RETRYABLE)
            error = failed.errors[-1]["error"]
            assert f"cannot import module {name!r} of worker '{name}.work'" in error
            assert "RuntimeError: settings not configured" in error
            monkeypatch.setenv(flag, "1")  # the configuration fixed: the retry runs
            async with oban.transaction() as conn:
                await conn.execute(
                    "UPDATE oban_jobs SET scheduled_at = now() WHERE id = %s", (job.id,)
                )
            assert (await reaches(oban, job.id, JobState.COMPLETED)).attempt == 2


@pytest.mark.parametrize(
    ("source", "retried"),
    [("import trioban_no_such_dependency", True), ("VALUE = 1", False)],
)
async def test_only_a_module_that_imports_fine_without_the_worker_is_final(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, retried: bool
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = _module(tmp_path, source)
    state = JobState.RETRYABLE if retried else JobState.DISCARDED
    with trio.fail_after(10):
        async with running(dsn) as oban:
            job = await oban.insert(Job(worker=f"{name}.work", args={}, max_attempts=5))
            failed = await reaches(oban, job.id, state)
    assert failed.attempt == 1
    error = failed.errors[-1]["error"]
    if retried:
        assert "ModuleNotFoundError: No module named 'trioban_no_such_dependency'" in error
    else:
        assert f"unknown worker '{name}.work': no imported module registers it" in error


# -- the args' JSON cache -----------------------------------------------------------------------


@pytest.mark.parametrize("copy", [attrs.evolve, evolve])
async def test_a_copy_with_other_args_is_saved_with_them(dsn: str, copy: Any) -> None:
    """The reviewer's case: the copy reused the cached JSON of the old args."""
    template = echo.new({"value": 1})
    assert args_json(copy(template, args={"value": 2})) == '{"value":2}'
    kept = copy(template, queue="other")
    assert template._args_json is not None
    assert args_json(kept) is template._args_json[1]  # same args: the cache is reused
    with trio.fail_after(10):
        async with running(dsn) as oban:
            assert await oban.relay(copy(template, args={"value": 2}), timeout=5) == 2
