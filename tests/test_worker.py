"""Worker.new() and @worker validate at the boundary, naming the field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

import attrs
import pytest

import trioban
from trioban import Job, JobState, worker
from trioban._job import evolve

from .workers import echo


@worker(queue="math", max_attempts=3, priority=2, tags=["calc"])
async def double(job: Job) -> int:
    return int(job.args["n"]) * 2


@worker(queue="default")
class _Calculator:
    async def process(self, job: Job) -> dict[str, Any]:
        return {"result": job.args["a"] + job.args["b"]}


# mypy ignores what a class decorator returns (python/mypy#3135); at runtime this is the Worker.
Calculator = cast(trioban.Worker, _Calculator)


def test_function_worker_builds_jobs_with_its_defaults() -> None:
    job = double.new({"n": 2})
    assert job.worker == f"{__name__}.double"
    assert (job.queue, job.max_attempts, job.priority, job.tags) == ("math", 3, 2, ("calc",))
    assert job.args == {"n": 2}
    assert job.id is None
    assert job.state is trioban.JobState.AVAILABLE


def test_class_worker_and_option_overrides() -> None:
    job = Calculator.new(
        {"a": 1, "b": 2}, queue="other", priority=9, max_attempts=1, tags=["x"], meta={"k": 1}
    )
    assert job.worker == f"{__name__}._Calculator"
    assert (job.queue, job.priority, job.max_attempts, job.tags) == ("other", 9, 1, ("x",))
    assert job.meta == {"k": 1}


async def test_worker_perform_runs_function_and_class() -> None:
    assert await double.perform(double.new({"n": 21})) == 42
    assert await Calculator.perform(Calculator.new({"a": 1, "b": 2})) == {"result": 3}


def test_schedule_in_and_scheduled_at() -> None:
    before = datetime.now(UTC)
    job = double.new({"n": 1}, schedule_in=60)
    assert job.scheduled_at is not None
    assert job.scheduled_at - before >= timedelta(seconds=60)
    assert job.state is trioban.JobState.SCHEDULED
    at = datetime(2030, 1, 1, tzinfo=UTC)
    assert double.new({}, scheduled_at=at).scheduled_at == at
    assert double.new({}, schedule_in=timedelta(minutes=1)).scheduled_at is not None


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"args": [1, 2]}, TypeError, "args to be a dict"),
        ({"args": {1: "x"}}, TypeError, "keys of args"),
        ({"args": {"x": object()}}, TypeError, "args to be JSON-serialisable"),
        ({"args": {"x": float("nan")}}, ValueError, "args to be JSON-serialisable"),
        ({"args": {}, "priority": 10}, ValueError, "priority to be between 0 and 9"),
        ({"args": {}, "priority": True}, TypeError, "priority to be an int"),
        ({"args": {}, "max_attempts": 0}, ValueError, "max_attempts to be between 1 and"),
        ({"args": {}, "max_attempts": 2**31}, ValueError, "max_attempts to be between 1 and"),
        ({"args": {}, "queue": ""}, ValueError, "queue to be a name of 1 to 127"),
        ({"args": {}, "tags": "abc"}, TypeError, "tags to be a list"),
        ({"args": {}, "tags": [""]}, ValueError, "every item of tags"),
        ({"args": {}, "meta": {"x": {1, 2}}}, TypeError, "meta to be JSON-serialisable"),
        ({"args": {}, "schedule_in": -1}, ValueError, "schedule_in"),
        ({"args": {}, "scheduled_at": datetime(2030, 1, 1)}, ValueError, "timezone-aware"),
        (
            {"args": {}, "schedule_in": 1, "scheduled_at": datetime.now(UTC)},
            ValueError,
            "not both",
        ),
    ],
)
def test_new_rejects_bad_input(kwargs: dict[str, Any], error: type[Exception], words: str) -> None:
    args = kwargs.pop("args")
    with pytest.raises(error, match=words):
        double.new(args, **kwargs)


def test_decorator_validates_options_and_targets() -> None:
    with pytest.raises(ValueError, match="priority"):
        worker(priority=11)(_noop)
    with pytest.raises(TypeError, match="async function or a class"):
        worker(lambda job: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="async def process"):

        @worker
        class NoProcess:
            pass

    with pytest.raises(ValueError, match="timeout"):
        worker(timeout=0)(_noop)
    with pytest.raises(TypeError, match="backoff"):
        worker(backoff=5)(_noop)  # type: ignore[call-overload]


async def _noop(job: Job) -> None:
    return None


async def test_relay_without_an_open_instance_says_what_to_do() -> None:
    with pytest.raises(trioban.TriobanError, match="needs an open instance"):
        await double.relay({"n": 1}, timeout=1)


def test_result_values_validate() -> None:
    with pytest.raises(ValueError, match="Snooze"):
        trioban.Snooze(-1)
    with pytest.raises(TypeError, match="Snooze"):
        trioban.Snooze("5")  # type: ignore[arg-type]
    assert trioban.Cancel("why").reason == "why"
    assert trioban.Discard().reason == "discarded"


def test_evolve_matches_attrs_evolve_private_fields_included() -> None:
    job = echo.new({"a": 1}, tags=["x"], meta={"m": 1}, schedule_in=5)
    for changes in (
        {"meta": {"relay": "ref"}},
        {"attempted_by": ("node", "producer"), "state": JobState.EXECUTING},
        {"_unique": None, "args": {"b": 2}},
    ):
        ours, theirs = evolve(job, **changes), attrs.evolve(job, **changes)
        assert ours == theirs
        assert (ours._args_json, ours._unique) == (theirs._args_json, theirs._unique)
    with pytest.raises(TypeError):
        evolve(job, nonsense=1)
