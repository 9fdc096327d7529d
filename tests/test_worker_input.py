"""What ``Worker.new()`` and ``@worker`` accept, and what a job's code sees of its args."""

from __future__ import annotations

import enum
import importlib
import math
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio

import trioban
from trioban import Batch, Job, JobState, Unique, Workflow, _batch, _instance, _settle, worker
from trioban._codec import dumps, loads, loads_stored
from trioban._cron import CronEntry, slot_job
from trioban._job import as_inserted, evolve
from trioban._notice import META_REF, META_RESULT
from trioban._queues import as_fetched
from trioban._registry import _registry, lookup
from trioban._unique import MAX_PERIOD
from trioban._validate import RESERVED_META
from trioban._workflow import STEP_KEYS

from .nodes import ROOT
from .workers import Address, MailBatch, OrderArgs, Size, place_order, secret_echo

seen: list[Job] = []


@worker(queue="input")
async def keep(job: Job) -> int:
    """Keeps the job it ran; changes its args, as a job's code may."""
    seen.append(job)
    job.args["items"].append("changed by the job")
    return len(job.args["items"])


@worker(queue="input", unique=Unique())
async def unique_keep(job: Job) -> None:
    return None


def _conf(dsn: str) -> trioban.Config:
    return trioban.Config(dsn=dsn, queues={"input": 2, "default": 2}, stage_interval=0.1)


# Values JSON (and jsonb) reshape: tuples, big floats, -0.0, key order (jsonb's: by length).
RESHAPED: dict[str, Any] = {
    "items": ["a"],
    "pair": (1, 2),
    "big": 1e20,
    "small": 1.5e-7,
    "zero": -0.0,
    "nested": {"bb": [{"ccc": 1e16, "a": 1.0}], "a": None},
    "é": "ü",
    "k": True,
}


async def test_a_job_claimed_on_insert_sees_its_args_as_a_fetched_job_would(dsn: str) -> None:
    """Not the caller's objects: the args and meta decoded from the JSON inserted, as a fetch
    would give them (a dict, lists, jsonb's numbers and key order), not shared with the caller."""
    seen.clear()
    items = RESHAPED["items"]
    with trio.fail_after(10):
        async with trioban.open(_conf(dsn)) as oban:
            relay = await oban.dispatch(keep.new(RESHAPED, meta={"pair": (1, 2), "big": 1e20}))
            assert relay.job.state is JobState.EXECUTING  # claimed on insert: it runs here
            assert await relay.result(timeout=5) == 2
            stored = await oban.get_job(relay.job.id or 0)
    assert stored is not None
    (ran,) = seen
    assert type(ran.args) is dict
    as_stored = {key: value for key, value in stored.meta.items() if key != "result"}
    assert repr(ran.meta) == repr(as_stored)  # the relay's result is stored after it ran
    ran.args["items"].remove("changed by the job")
    assert repr(ran.args) == repr(stored.args)  # types, values and key order
    assert items == ["a"]  # the caller's list is not the job's
    assert dumps(ran.args)  # plain JSON data (json.dumps can't encode a mappingproxy)


async def test_claimed_encrypted_and_structured_jobs_still_decrypt_and_structure(
    dsn: str,
) -> None:
    with trio.fail_after(10):
        async with trioban.open(_conf(dsn)) as oban:
            assert await oban.relay(secret_echo.new({"secret": (1, 2)}), timeout=5) == [1, 2]
            order = OrderArgs(
                order_id=1, size=Size.SMALL, placed_at=datetime.now(UTC), ship_to=Address("Oslo")
            )
            receipt = await oban.relay(place_order.new(order), timeout=5)
            assert receipt.order_id == 1


def test_a_job_claimed_on_insert_keeps_every_field_its_insert_saved() -> None:
    built = keep.new({"items": [1]}, meta={"m": 1}, tags=["t"], priority=3, max_attempts=4)
    at = datetime.now(UTC)
    saved = as_inserted(
        evolve(built, attempted_by=("node", "producer")), 7, JobState.EXECUTING, at, at, at
    )
    fetched = as_fetched(saved, built)
    assert (fetched.args, fetched.meta) == ({"items": [1]}, {"m": 1})
    assert type(fetched.args) is dict
    assert attrs.evolve(fetched, args=saved.args, meta=saved.meta) == saved


@pytest.mark.parametrize(
    "text",
    [
        dumps(RESHAPED),
        dumps({"n": [1e16, 1.7976931348623157e308, 5e-324, -1e22, 123456789.125, 2**70]}),
        dumps({"b": 1, "a": 2, "ab": 3, "aa": 4, "é": 5, "z": 6, "": 7, "\U0001f600": 8}),
        '{"x":1.0e3,"y":1.50e1,"z":1E+2,"w":-0e0,"a":1,"a":2}',
    ],
)
def test_loads_stored_reads_json_back_as_jsonb_does(dsn: str, text: str) -> None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT %s::jsonb::text", [text]).fetchone()
    assert row is not None
    assert repr(loads_stored(text)) == repr(loads(row[0]))


async def _noop(job: Job) -> None:
    return None


async def _other(job: Job) -> None:
    return None


class _Mailer:
    async def process(self, job: Job) -> None:
        return None


@pytest.fixture
def registry() -> Iterator[None]:
    """Forget the workers a test registers."""
    before = dict(_registry)
    yield
    _registry.clear()
    _registry.update(before)


@pytest.mark.usefixtures("registry")
def test_one_target_registered_twice_with_other_options_is_an_error() -> None:
    bulk = worker(queue="bulk")(_Mailer)
    with pytest.raises(ValueError, match=r"other options \(queue='bulk', then 'urgent'; timeout"):
        worker(queue="urgent", timeout=0.5)(_Mailer)
    assert lookup(bulk.name) is bulk
    with pytest.raises(ValueError, match="a wrapper"):
        worker(queue="a")(_noop), worker(queue="b")(_noop)
    # The same options again are the same worker.
    same = worker(queue="bulk")(_Mailer)
    assert lookup(bulk.name) is same
    key = b"k" * 32
    worker(encrypted=trioban.Encrypted(key=key), unique=Unique(period=5))(_other)
    worker(encrypted=trioban.Encrypted(key=key), unique=Unique(period=5))(_other)


@pytest.mark.usefixtures("registry")
def test_a_reloaded_module_registers_its_workers_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "reloaded_workers.py").write_text(
        "from trioban import worker\n\n"
        "class Mailer:\n    async def process(self, job): ...\n\n"
        "mail = worker(queue='mail')(Mailer)\n\n"
        "@worker(queue='mail')\nasync def greet(job): ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("reloaded_workers")
    try:
        (tmp_path / "reloaded_workers.py").write_text(
            (tmp_path / "reloaded_workers.py").read_text().replace("'mail'", "'post'")
        )
        importlib.reload(module)
        mail = lookup("reloaded_workers.Mailer")
        assert mail is not None
        assert mail is module.mail
        assert mail.queue == module.greet.queue == "post"
    finally:
        del sys.modules["reloaded_workers"]


def test_a_worker_of_a_module_run_with_python_m_is_named_after_the_module(
    tmp_path: Path,
) -> None:
    """Not ``__main__.greet``, which nodes importing the module could not resolve; a script
    run by path keeps ``__main__``."""
    (tmp_path / "mainpkg").mkdir()
    (tmp_path / "mainpkg" / "__init__.py").write_text("")
    (tmp_path / "mainpkg" / "app.py").write_text(
        "from trioban import worker\n\n"
        "@worker\nasync def greet(job): ...\n\n"
        "if __name__ == '__main__':\n    print(greet.name)\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": ""}

    def run(*argv: str) -> str:
        done = subprocess.run(
            [sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run("-m", "mainpkg.app") == "mainpkg.app.greet"
    assert run("mainpkg/app.py") == "__main__.greet"


def test_a_worker_name_longer_than_the_column_allows_is_rejected_at_declaration() -> None:
    async def f(job: Job) -> None: ...

    f.__qualname__ = "x" * (128 - len(__name__) - 1)
    with pytest.raises(ValueError, match=r"must be 1 to 127 characters;.* has 128"):
        worker(f)


@pytest.mark.parametrize("queue", ["x y", "", "q\n", "q" * 128])
def test_a_worker_queue_no_node_could_run_is_rejected_at_declaration(queue: str) -> None:
    # Config.queues refuses these names, so jobs enqueued there would wait forever.
    with pytest.raises(ValueError, match="queue to be a name of 1 to 127 printable chars"):
        worker(queue=queue)(_noop)


@pytest.mark.usefixtures("registry")
async def test_the_longest_names_and_periods_accepted_are_stored(dsn: str) -> None:
    async def f(job: Job) -> None: ...

    f.__qualname__ = "x" * (127 - len(__name__) - 1)
    longest = worker(queue="nowhere", unique=Unique(period=MAX_PERIOD))(f)
    with trio.fail_after(10):
        async with trioban.open(trioban.Config(dsn=dsn, queues={})) as oban:
            first = await oban.insert(longest.new({}))
            again = await oban.insert(longest.new({}))
    assert again.conflict
    assert again.id == first.id
    assert first.worker == longest.name


@pytest.mark.parametrize("period", [MAX_PERIOD + 1, 1e12, 1e300, 10**400])
def test_unique_period_is_at_most_100_years(period: float) -> None:
    with pytest.raises(ValueError, match=r"at most 100 years .* period=None blocks"):
        Unique(period=period)


def _nested(levels: int, leaf: object = 0) -> object:
    """``leaf`` inside ``levels - 1`` lists (``levels`` deep in args, an object itself)."""
    value = leaf
    for _ in range(levels - 1):
        value = [value]
    return value


class _Color(enum.StrEnum):
    RED = "red"


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"args": {"s": "\ud800"}}, ValueError, "args .* lone surrogate '\\\\ud800'"),
        ({"args": {"\udcff": 1}}, ValueError, "args .* lone surrogate"),
        ({"args": {"a": [{"s": "é\udcff"}]}}, ValueError, "args .* lone surrogate"),
        ({"meta": {"s": "\ud800"}}, ValueError, "meta .* lone surrogate"),
        ({"tags": ["ok", "\ud800"]}, ValueError, "tags .* lone surrogate"),
        ({"tags": ["ok", "a\x00b"]}, ValueError, "tags .* without NUL"),
        ({"queue": "q\ud800"}, ValueError, "queue .* printable chars"),
        ({"queue": "x y"}, ValueError, "queue to be a name .* without spaces, got 'x y'"),
        ({"queue": "tab\there"}, ValueError, "queue .* without spaces"),
        ({"args": {"a": {1: 2}}}, TypeError, r"keys of args\['a'\] to be str, got 1"),
        ({"args": {"a": {1: 2, "1": 3}}}, TypeError, r"keys of args\['a'\] to be str"),
        ({"args": {"a": [0, {None: 2}]}}, TypeError, r"keys of args\['a'\]\[1\] .* got None"),
        ({"args": {"a": ({(1, 2): 2},)}}, TypeError, r"keys of args\['a'\]\[0\] .* got \(1, 2\)"),
        ({"meta": {"m": {"n": {1.5: 1}}}}, TypeError, r"keys of meta\['m'\]\['n'\] .* got 1.5"),
        ({"meta": []}, TypeError, "meta to be a dict"),
        ({"meta": 0}, TypeError, "meta to be a dict"),
        ({"meta": ""}, TypeError, "meta to be a dict"),
        ({"schedule_in": 1e12}, ValueError, "schedule_in to fall before the year 10000"),
        ({"schedule_in": 1e300}, ValueError, "schedule_in to fall before the year 10000"),
        ({"schedule_in": 10**400}, ValueError, "schedule_in"),
        (
            {"scheduled_at": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))},
            ValueError,
            "scheduled_at",
        ),
        (
            {"scheduled_at": datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))},
            ValueError,
            "scheduled_at",
        ),
        ({"args": {"a": _nested(257)}}, ValueError, "args to nest .* at most 256 levels"),
        ({"args": {"a": _nested(5000)}}, ValueError, "args to nest .* at most 256 levels"),
        ({"meta": {"a": _nested(300, {})}}, ValueError, "meta to nest .* at most 256 levels"),
    ],
)
def test_new_rejects_what_postgresql_or_json_would_mangle(
    kwargs: dict[str, Any], error: type[Exception], words: str
) -> None:
    args = kwargs.pop("args", {})
    with pytest.raises(error, match=words):
        keep.new(args, **kwargs)


def test_args_nested_to_the_limit_are_accepted() -> None:
    assert keep.new({"a": _nested(255)}).args["a"] == _nested(255)


def test_nested_mixed_keys_with_a_unique_worker_name_the_field() -> None:
    with pytest.raises(TypeError, match=r"keys of args\['a'\] to be str, got 1"):
        unique_keep.new({"a": {1: 2, "b": 3}})


def test_new_accepts_nested_str_keys_and_braces_in_text() -> None:
    job = keep.new(
        {"a": [{"b": {"c": "{x}"}}], "e": {_Color.RED: math.pi}, "s": "{"},
        meta={},
        tags=["é"],
    )
    assert job.args["a"] == [{"b": {"c": "{x}"}}]
    assert not job.meta


def _meta_keys_trioban_writes() -> set[str]:
    """Every meta key trioban adds to a job: a relay's, a workflow step's (with every option),
    a batch job's, a batch callback's and a cron slot's."""
    steps = Workflow(ignore_cancelled=True, ignore_discarded=True).add("a", keep.new({}))
    steps.add("b", keep.new({}), deps=["a"], ignore_cancelled=True, ignore_discarded=True)
    batched = Batch([keep.new({})], callback=MailBatch).build()
    callback = _settle._callback_job("b", "handle_completed", dict(batched[0].meta))
    entry = CronEntry("* * * * *", keep.name)
    build = _instance._builder(keep.name)
    assert build is not None
    slot = slot_job(entry, datetime(2024, 1, 1, tzinfo=UTC), build)
    jobs = [*steps.build(), *batched, callback, slot]
    return {key for job in jobs for key in job.meta} | {META_REF, META_RESULT}


def test_meta_keys_trioban_writes_are_reserved() -> None:
    """A caller's "result" was taken for a recorded result (fetch_recorded returned it) and
    replaced by a relayed one; a "callback" chose the handler a class worker ran. The keys a
    workflow or batch adds to its jobs are refused where a job joins one."""
    written = _meta_keys_trioban_writes()
    assert written <= RESERVED_META | set(STEP_KEYS) | set(_batch.JOB_KEYS)
    for key in sorted(RESERVED_META):
        with pytest.raises(ValueError, match=f"meta key '{key}' is reserved"):
            keep.new({}, meta={"mine": 1, key: "the caller's"})
    # Read only beside workflow_id or batch_id: free for a job that is neither.
    assert keep.new({}, meta={"name": "nightly", "results": 2}).meta["name"] == "nightly"
    for key in STEP_KEYS:
        with pytest.raises(ValueError, match=f"step 'a': meta key '{key}' is set by the workflow"):
            Workflow().add("a", keep.new({}, meta={key: 1}))
    for key in _batch.JOB_KEYS:
        with pytest.raises(ValueError, match=f"meta key '{key}' is set by the batch"):
            Batch([keep.new({}, meta={key: 1})])


def test_a_cron_slot_gets_the_reserved_cron_keys_and_checks_the_entry_meta() -> None:
    build = _instance._builder(keep.name)
    assert build is not None
    minute = datetime(2024, 1, 1, tzinfo=UTC)
    entry = CronEntry("* * * * *", keep.name, options={"meta": {"team": "ops"}, "priority": 2})
    job = slot_job(entry, minute, build)
    assert dict(job.meta) == {"team": "ops", "cron": True, "cron_expr": "* * * * *"}
    assert job.priority == 2
    entry = CronEntry("* * * * *", keep.name, options={"meta": {"result": 1}})
    with pytest.raises(ValueError, match="meta key 'result' is reserved"):
        slot_job(entry, minute, build)
