"""Structured args and results, recorded results, encrypted args and unique jobs."""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import hmac
import importlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import attrs
import pytest
import trio

import trioban
from trioban import Encrypted, JobState, Unique, Workflow, _structured
from trioban._batch import JOB_KEYS
from trioban._codec import dumps, loads
from trioban._registry import _registry
from trioban._validate import RESERVED_META
from trioban._workflow import STEP_KEYS

from . import workers
from .helpers import eventually, waiting_on_a_lock
from .nodes import ROOT
from .workers import (
    Address,
    OrderArgs,
    Receipt,
    Size,
    echo,
    lenient_order,
    place_order,
    record_text,
    secret_echo,
    unique_echo,
)

PLACED = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)
ORDER = {
    "order_id": 7,
    "size": "large",
    "placed_at": PLACED.isoformat(),
    "ship_to": {"city": "Lyon"},
    "quantity": 2,
}


def config(dsn: str, **settings: object) -> trioban.Config:
    return trioban.Config(dsn=dsn, queues={"default": 5}, stage_interval=0.1).evolve(**settings)


async def _one(oban: trioban.Oban, statement: str, *params: object) -> object:
    async with oban.transaction() as conn:
        cur = await conn.execute(statement, params)
        row = await cur.fetchone()
    assert row is not None
    return row[0]


async def _final(oban: trioban.Oban, job_id: int | None) -> trioban.Job:
    assert job_id is not None
    found: list[trioban.Job] = []

    async def finished() -> bool:
        job = await oban.get_job(job_id)
        if job is not None and job.state in (JobState.COMPLETED, JobState.DISCARDED):
            found.append(job)
            return True
        return False

    with trio.fail_after(10):
        await eventually(finished)
    return found[-1]


# -- structured args and results -------------------------------------------------------------


def test_new_accepts_an_instance_or_a_dict_and_stores_json() -> None:
    from_dict = place_order.new(ORDER)
    instance = OrderArgs(7, Size.LARGE, PLACED, Address("Lyon"), quantity=2)
    from_instance = place_order.new(instance)
    expected = {
        "order_id": 7,
        "size": "large",
        "placed_at": "2026-11-24T09:30:00+00:00",
        "ship_to": {"city": "Lyon", "zip_code": None},
        "note": None,
        "quantity": 2,
    }
    assert dict(from_dict.args) == dict(from_instance.args) == expected


def test_bad_args_name_every_field() -> None:
    bad = {"order_id": "x", "size": "huge", "ship_to": {}, "extra": 1}
    with pytest.raises(ValueError, match="invalid args for OrderArgs") as raised:
        place_order.new(bad)
    text = str(raised.value)
    for where in ("args.order_id", "args.size", "args.placed_at", "args.ship_to.city", "extra"):
        assert where in text, (where, text)


def test_unknown_keys_are_ignored_when_the_worker_allows_them() -> None:
    job = lenient_order.new({**ORDER, "extra": 1})
    assert "extra" not in job.args  # dropped when structured, never stored
    with pytest.raises(ValueError, match="extra fields found"):
        place_order.new({**ORDER, "extra": 1})


def test_structured_options_are_checked_at_decoration() -> None:
    with pytest.raises(TypeError, match="attrs class or a dataclass"):
        trioban.worker(args=dict)(_noop)
    with pytest.raises(TypeError, match="recorded"):
        trioban.worker(recorded=-1)(_noop)
    with pytest.raises(TypeError, match="Encrypted"):
        trioban.worker(encrypted=b"k" * 32)(_noop)  # type: ignore[call-overload]


async def _noop(job: trioban.Job) -> None:
    pass


@attrs.frozen
class _WithId:
    ref: uuid.UUID


@attrs.frozen
class _Nested:
    name: str
    refs: list[_WithId] | None = None


@dataclasses.dataclass
class _Tree:
    children: list[_Tree]
    ref: uuid.UUID


def test_field_types_the_converter_cant_handle_are_refused_at_decoration() -> None:
    """Before, @worker took such a class and every new() failed, advising a cattrs hook on a
    converter users can't reach."""
    for cls, where in [(_WithId, "args.ref"), (_Nested, "args.refs.ref"), (_Tree, "args.ref")]:
        with pytest.raises(TypeError, match=rf"args class {cls.__name__}: {where} is a UUID"):
            trioban.worker(args=cls)(_noop)
    with pytest.raises(TypeError, match=r"result class _WithId: result.ref is a UUID") as raised:
        trioban.worker(result=_WithId)(_noop)
    assert "keep it as a str" in str(raised.value)
    assert "hook" not in str(raised.value)


@attrs.frozen
class _Booking:
    ref: _Reference  # defined after the worker: not checked when it's declared


@trioban.worker(queue="default", args=_Booking)
async def _book(job: trioban.Job) -> None:
    pass


class _Reference:
    pass


def test_an_unsupported_field_type_found_in_new_is_named_without_cattrs_advice() -> None:
    with pytest.raises(ValueError, match=r"args\.ref is a _Reference, which trioban can't") as e:
        _book.new({"ref": "x"})
    assert "structure hook" not in str(e.value)


@attrs.frozen
class _Pin:
    x: int


@attrs.frozen
class _Dot:  # the same fields as _Pin: cattrs can't tell which a {"x": 1} is
    x: int


@attrs.frozen
class _Box:
    width: int


@attrs.frozen
class _Circle:
    kind: Literal["circle"]
    size: int


@attrs.frozen
class _Square:
    kind: Literal["square"]
    size: int


class _Colour(enum.Enum):
    RED = "red"


def _holder(kind: Any) -> type[Any]:
    """An attrs class with one field, ``value``, of type ``kind``."""
    return attrs.make_class("Holder", {"value": attrs.field(type=kind)})


@pytest.mark.parametrize(
    "kind",
    [Size | _Colour, _Pin | _Dot, datetime | date, date | str, bytes | str, Size | str,
     int | _Pin | _Dot, list[date | str]],
)  # fmt: skip
def test_unions_whose_members_json_cant_tell_apart_are_refused_at_decoration(
    kind: object,
) -> None:
    """Before, @worker took them and every job failed (or read a date back as a str)."""
    with pytest.raises(TypeError, match=r"args\.value is .*a union whose members trioban can't"):
        _structured.check_class(_holder(kind), "args")


@pytest.mark.parametrize("kind", [dict[int, str], dict[str, dict[date, int]]])
def test_mappings_whose_keys_json_turns_into_text_are_refused_at_decoration(
    kind: object,
) -> None:
    """An int key comes back a str, which the int field then refuses: every job would fail."""
    with pytest.raises(TypeError, match=r"args\.value is a .*whose keys JSON would turn"):
        _structured.check_class(_holder(kind), "args")
    for keyed_by_text in (dict[str, int], dict[Size, int], dict[Literal["a"], int]):
        _structured.check_class(_holder(keyed_by_text), "args")
    round_trip = _structured.structure({"value": {"large": 1}}, _holder(dict[Size, int]), "args")
    assert round_trip.value == {Size.LARGE: 1}


@pytest.mark.parametrize(
    ("kind", "values"),
    [
        (int | None, [None, 3]),
        (int | str, [1, "1"]),
        (float | str, [1.5, 2, "x"]),
        (Literal["a", "b"], ["a", "b"]),
        (Literal["a"] | date, ["a", date(2026, 11, 24)]),
        (Size | int, [Size.LARGE, 3]),
        (int | _Pin, [3, _Pin(1)]),
        (_Pin | _Box, [_Pin(1), _Box(2)]),
        (_Circle | _Square, [_Circle("circle", 1), _Square("square", 1)]),
        (list[_Pin | None], [[_Pin(1), None]]),
    ],
)
def test_unions_json_tells_apart_read_back_as_they_were(kind: object, values: list[Any]) -> None:
    cls = _structured.check_class(_holder(kind), "args")
    assert cls is not None
    for value in values:
        data = loads(dumps(_structured.unstructure(cls(value), cls, "args")))
        back = _structured.structure(data, cls, "args").value
        assert (back, type(back)) == (value, type(value))


@attrs.frozen
class _Typed:
    count: int
    ratio: float
    name: str
    flag: bool
    tags: list[str]
    ids: set[int]
    key: int | str


@trioban.worker(queue="default", args=_Typed, result=_Typed)
async def _typed(job: trioban.Job) -> None:
    pass


TYPED = {"count": 1, "ratio": 2, "name": "n", "flag": False, "tags": ["a"], "ids": [1], "key": 3}


def test_values_of_the_wrong_json_type_are_refused_not_coerced() -> None:
    """Before, cattrs stored 1.9 as 1, 5 as "5", "abc" as ["a", "b", "c"], True as 1."""
    assert _typed.new(TYPED).args["ratio"] == 2  # an int is a float
    bad = {"count": 1.9, "ratio": True, "name": 5, "flag": 1, "tags": "abc", "ids": {"1": 1}}
    with pytest.raises(ValueError, match="invalid args for _Typed") as raised:
        _typed.new({**bad, "key": True})
    for where, kinds in [
        ("count", "int, got float"),
        ("ratio", "float, got bool"),
        ("name", "str, got int"),
        ("flag", "bool, got int"),
        ("tags", "a list, got str"),
        ("ids", "a list, got dict"),
        ("key", "int | str, got bool"),
    ]:
        assert f"expected {kinds} @ args.{where}" in str(raised.value)
    for count in ("12", True, [1]):
        with pytest.raises(ValueError, match=r"expected int, got \w+ @ args\.count"):
            _typed.new({**TYPED, "count": count})


def test_an_int_for_a_float_is_that_float_and_refusals_never_quote_values() -> None:
    """JSON doesn't tell 3 from 3.0, so the worker gets a float. A refusal names the field and
    what it takes, not the value: the args may be encrypted, and errors are stored in plain."""
    assert type(_structured.structure({"amount": 3, "plan": "a"}, _Price, "args").amount) is float
    with pytest.raises(ValueError, match="invalid args for _Price") as raised:
        _structured.structure({"amount": 2**1100, "plan": "card-4111"}, _Price, "args")
    assert "expected one of ['a', 'b'] @ args.plan" in str(raised.value)
    assert "expected float, got an int too large for it @ args.amount" in str(raised.value)
    assert "4111" not in str(raised.value)


def test_a_str_enum_member_given_for_a_str_field_is_stored_as_its_value() -> None:
    """Not converted with str(), which gives "Size.LARGE" for a (str, Enum) member on 3.11."""
    data = _structured.unstructure({"name": _Tone.LOUD}, _Named, "args")
    assert json.loads(json.dumps(data)) == {"name": "loud"}


class _Tone(str, enum.Enum):  # noqa: UP042 (str() of a StrEnum member is its value)
    LOUD = "loud"


@attrs.define
class _Named:
    name: str


def test_a_recursive_class_checks_its_own_fields_too() -> None:
    """Its hook was built while its list's was: it took the unchecked list hook ("" as [])."""
    for data in ({"v": 1, "children": ""}, {"v": 1, "children": [{"v": 2, "children": {}}]}):
        with pytest.raises(ValueError, match=r"expected a list, got (str|dict) @ args\.children"):
            _structured.structure(data, _Node, "args")
    tree = _structured.structure({"v": 1, "children": [{"v": 2}]}, _Node, "args")
    assert tree == _Node(1, [_Node(2)])


def test_a_bad_field_of_a_nested_instance_is_named_where_it_is() -> None:
    """It was named at the outer field: "expected _Stamp, got _Stamp @ result.stamp"."""
    with pytest.raises(ValueError, match=r"expected datetime, got str @ result\.stamp\.at$"):
        _structured.unstructure(_Report(_Stamp("noon")), _Report, "result")  # type: ignore[arg-type]


@attrs.define
class _Stamp:
    at: datetime


@attrs.define
class _Report:
    stamp: _Stamp


@attrs.define
class _Price:
    amount: float
    plan: Literal["a", "b"]


@attrs.define
class _Node:
    v: int
    children: list[_Node] = attrs.Factory(list)


_structured.check_class(_Node, "args")  # as @worker does, before any data


@attrs.define
class _Ledger:
    balances: dict[str, int]


_LEDGER_KEY = b"l" * 32


@trioban.worker(queue="default", args=_Ledger, encrypted=Encrypted(key=_LEDGER_KEY))
async def _ledger(job: trioban.Job) -> None:
    pass


def test_an_encrypted_jobs_refusal_names_none_of_its_keys() -> None:
    """The error is stored with the job in plain text: a dict field's keys, or extra keys, of
    encrypted args are as secret as their values."""
    job = _ledger.new({"balances": {"a": 1}})
    sealed = Encrypted(key=_LEDGER_KEY).encrypt(
        json.dumps({"balances": {"acct-SECRET-99": "x"}, "extra_secret": 1}), _ledger.name
    )
    with pytest.raises(
        ValueError, match=r"expected int, got str @ args\.balances\[\.\.\.\]"
    ) as raised:
        _ledger.prepare(attrs.evolve(job, args=sealed))
    assert "SECRET" not in str(raised.value)
    assert "extra_secret" not in str(raised.value)


def test_results_of_the_wrong_json_type_are_refused_not_coerced() -> None:
    with pytest.raises(ValueError, match=r"expected str, got list @ result\.name"):
        _typed.load_result({**TYPED, "name": ["n"]})
    with pytest.raises(ValueError, match=r"expected int, got str @ result\.count"):
        _typed.dump_result(_Typed(**{**TYPED, "count": "1"}))  # type: ignore[arg-type]


def test_an_args_instance_is_checked_as_a_mapping_is() -> None:
    """Before, an instance was stored as it was: a bad one failed at run time, or new() raised
    an AttributeError from deep in cattrs."""
    bad_id = OrderArgs("12x", Size.LARGE, PLACED, Address("Lyon"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected int, got str @ args\.order_id"):
        place_order.new(bad_id)
    no_address = OrderArgs(7, Size.LARGE, PLACED, "Lyon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected Address, got str @ args\.ship_to"):
        place_order.new(no_address)


def test_args_of_another_class_say_what_was_expected() -> None:
    expected = r"expected args to be an instance of OrderArgs or a mapping of its fields, got "
    with pytest.raises(TypeError, match=expected + "Address"):
        place_order.new(Address("Lyon"))
    with pytest.raises(TypeError, match=expected + "list"):
        place_order.new([1])


async def test_worker_gets_an_instance_and_relay_returns_the_result_class(dsn: str) -> None:
    with trio.fail_after(10):
        async with trioban.open(config(dsn)) as oban:
            receipt = await oban.relay(place_order.new(ORDER))
            assert receipt == Receipt(7, "2x large to Lyon on 2026-11-24", 19.0)
            relay = await oban.dispatch(place_order.new({**ORDER, "order_id": 8}))
            [result] = await oban.await_many([relay])
            assert result.unwrap() == Receipt(8, "2x large to Lyon on 2026-11-24", 19.0)
            # Stored as JSON; read back structured.
            assert await oban.fetch_recorded(relay.job) == Receipt(
                8, "2x large to Lyon on 2026-11-24", 19.0
            )
            stored = await _one(
                oban, "SELECT meta->'result' FROM oban_jobs WHERE id = %s", relay.job.id
            )
            assert stored == {
                "order_id": 8,
                "summary": "2x large to Lyon on 2026-11-24",
                "total": 19.0,
            }


async def test_a_result_of_the_wrong_type_fails_the_job(dsn: str) -> None:
    with trio.fail_after(10):
        async with trioban.open(config(dsn)) as oban:
            with pytest.raises(trioban.RelayDiscard, match=r"result of tests\.workers\.place_"):
                await oban.relay(place_order.new({**ORDER, "order_id": 0}))


async def test_bad_args_from_another_process_discard_the_job(dsn: str) -> None:
    with trio.fail_after(10):
        async with trioban.open(config(dsn)) as oban:
            job_id = await _one(
                oban,
                "INSERT INTO oban_jobs (worker, args) VALUES (%s, %s) RETURNING id",
                place_order.name,
                '{"order_id": "seven"}',
            )
            assert isinstance(job_id, int)
            job = await _final(oban, job_id)
    assert job.state is JobState.DISCARDED
    error = job.errors[-1]["error"]
    assert "invalid args for OrderArgs" in error
    assert "args.order_id" in error
    assert "args.placed_at" in error


# -- recorded results -------------------------------------------------------------------------


async def test_results_are_structured_where_the_worker_module_isnt_imported_yet(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fetch_recorded and workflow_results import a result's worker module, as the executor
    does: a service that only reads results never imported it."""
    late = importlib.import_module("tests.late_workers")
    wf = Workflow().add("total", late.total.new({"n": 3}))
    wf.add("after", echo.new({"value": 1}), deps=["total"])
    async with trioban.open(config(dsn, queues={"default": 2, "late": 2})) as oban:
        total_step, after_step = await oban.insert_workflow(wf)
        await _final(oban, after_step.id)
        # This process forgets the worker, as one that never imported its module.
        monkeypatch.delitem(sys.modules, "tests.late_workers")
        monkeypatch.delitem(_registry, late.total.name)
        recorded = await oban.fetch_recorded(total_step)
        results = await oban.workflow_results(after_step)
    assert (type(recorded).__name__, recorded.value) == ("Total", 3)
    assert results["total"] == recorded
    assert sys.modules["tests.late_workers"] is not late  # imported again, by the reads


async def test_recorded_results_and_their_errors(dsn: str) -> None:
    with trio.fail_after(10):
        async with trioban.open(config(dsn)) as oban:
            small = await oban.insert(record_text.new({"text": "hello"}))
            too_big = await oban.insert(record_text.new({"text": "x" * 100}))
            later = await oban.insert(record_text.new({"text": "later"}, schedule_in=3600))
            plain = await oban.insert(echo.new({"value": 1}))
            for job in (small, too_big, plain):
                await _final(oban, job.id)
            assert await oban.fetch_recorded(small) == "hello"
            assert await oban.fetch_recorded(small.id or 0) == "hello"
            discarded = await oban.get_job(too_big.id or 0)
            assert discarded is not None
            assert (
                "is 102 bytes of JSON, over its recorded limit of 64"
                in discarded.errors[-1]["error"]
            )
            # For good: run again, it would repeat its work for the same result.
            assert (discarded.state, discarded.attempt) == (JobState.DISCARDED, 1)
            with pytest.raises(trioban.NotRecorded, match="it is scheduled"):
                await oban.fetch_recorded(later)
            with pytest.raises(trioban.NotRecorded, match="recorded nothing"):
                await oban.fetch_recorded(plain)
            with pytest.raises(trioban.NotRecorded, match="there is no job"):
                await oban.fetch_recorded(10**9)


async def test_the_recorded_limit_counts_utf8_bytes(dsn: str) -> None:
    """record_text records at most 64 bytes: 30 euro signs are 32 characters of JSON but 92
    bytes (counted as characters before, so they passed)."""
    with trio.fail_after(10):
        async with trioban.open(config(dsn)) as oban:
            euros = await oban.insert(record_text.new({"text": "€" * 30}, max_attempts=1))
            accents = await oban.insert(record_text.new({"text": "é" * 31}))  # 64 bytes
            assert (await _final(oban, euros.id)).state is JobState.DISCARDED
            assert (await _final(oban, accents.id)).state is JobState.COMPLETED
            discarded = await oban.get_job(euros.id or 0)
            assert discarded is not None
            error = discarded.errors[-1]["error"]
            assert "is 92 bytes of JSON, over its recorded limit of 64" in error
            assert await oban.fetch_recorded(accents) == "é" * 31


# -- encrypted args ---------------------------------------------------------------------------


@pytest.fixture
def secrets() -> Iterator[list[bytes]]:
    """secret_echo's keys, restored after the test."""
    saved = list(workers.secret_keys)
    workers.secret_runs.clear()
    yield workers.secret_keys
    workers.secret_keys[:] = saved


async def test_encrypted_args_are_unreadable_at_rest(dsn: str, secrets: list[bytes]) -> None:
    job = secret_echo.new({"secret": "hunter2"})
    assert set(job.args) == {"encrypted"}
    with trio.fail_after(10):
        async with trioban.open(config(dsn)) as oban:
            relay = await oban.dispatch(job)
            assert await relay.result() == "hunter2"
            stored = await _one(
                oban, "SELECT args::text FROM oban_jobs WHERE id = %s", relay.job.id
            )
    assert isinstance(stored, str)
    assert "hunter2" not in stored
    assert "secret" not in stored
    assert workers.secret_runs == [{"secret": "hunter2"}]


async def test_key_rotation_and_wrong_keys(dsn: str, secrets: list[bytes]) -> None:
    old, new, stranger = b"o" * 32, b"n" * 32, b"s" * 32
    with trio.fail_after(15):
        async with trioban.open(config(dsn, queues={})) as inserter:
            secrets[:] = [old]
            sealed_with_old = await inserter.insert(secret_echo.new({"secret": "old"}))
            secrets[:] = [new, old]  # rotated: the new key encrypts, both decrypt
            sealed_with_new = await inserter.insert(secret_echo.new({"secret": "new"}))
            tampered = await inserter.insert(secret_echo.new({"secret": "tampered"}))
            await _one(
                inserter,
                "UPDATE oban_jobs SET args = jsonb_set(args, '{encrypted}', to_jsonb("
                "overlay(args->>'encrypted' placing 'AAAA' from 20 for 4))) WHERE id = %s "
                "RETURNING id",
                tampered.id,
            )
            async with trioban.open(config(dsn)) as runner:
                assert (await _final(runner, sealed_with_old.id)).state is JobState.COMPLETED
                assert (await _final(runner, sealed_with_new.id)).state is JobState.COMPLETED
                failed = await _final(runner, tampered.id)
                secrets[:] = [stranger]
                foreign = await inserter.insert(secret_echo.new({"secret": "foreign"}))
                secrets[:] = [new]
                wrong_key = await _final(runner, foreign.id)
    assert sorted(run["secret"] for run in workers.secret_runs) == ["new", "old"]
    for job in (failed, wrong_key):
        assert job.state is JobState.DISCARDED
        assert job.attempt == 2  # retried (a node may lack a key), never run on garbage
        assert (
            "cannot decrypt the args of this tests.workers.secret_echo job"
            in (job.errors[-1]["error"])
        )


def test_encryption_keys_are_checked() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        trioban.Encrypted(key=b"short")
    with pytest.raises(TypeError, match="32 bytes"):
        trioban.Encrypted(key=[])
    assert "k" * 8 not in repr(trioban.Encrypted(key=b"k" * 32))


_RAW = bytes(range(32))


@pytest.mark.parametrize(
    ("key", "advice"),
    [
        (base64.b64encode(_RAW).decode(), r"base64.b64decode\(...\)"),
        (base64.b64encode(_RAW), r"base64.b64decode\(...\)"),
        (base64.urlsafe_b64encode(b"\xff" * 32).decode(), r"base64.urlsafe_b64decode\(...\)"),
        (base64.b64encode(_RAW).decode().rstrip("="), r"base64.b64decode\(...\) after app"),
        (_RAW.hex() + "\n", r"bytes.fromhex\(...\)"),
        ([_RAW, _RAW.hex()], r"bytes.fromhex\(...\)"),
    ],
)
def test_an_encoded_key_is_told_to_be_decoded(key: object, advice: str) -> None:
    """Before, a base64 or hex key got "32 bytes ... os.urandom(32)", no word of decoding."""
    with pytest.raises((TypeError, ValueError), match=rf"decode it first \({advice}"):
        trioban.Encrypted(key=key)  # type: ignore[arg-type]


def test_a_key_callable_failing_in_new_names_the_worker(secrets: list[bytes]) -> None:
    """Before, new() let the callable's bare KeyError (or the check's ValueError) through."""
    secrets[:] = []
    with pytest.raises(trioban.TriobanError, match=r"worker tests\.workers\.secret_echo") as e:
        secret_echo.new({"secret": "x"})
    assert "callable must return a 32-byte key or a list of them" in str(e.value)
    secrets[:] = [base64.b64encode(_RAW)]
    with pytest.raises(trioban.TriobanError, match=r"decode it first \(base64.b64decode"):
        secret_echo.new({"secret": "x"})
    missing = trioban.Encrypted(key=lambda: {}["APP_JOB_KEY"])  # type: ignore[index]
    with pytest.raises(trioban.TriobanError, match=r"worker w \(KeyError: 'APP_JOB_KEY'\)"):
        missing.encrypt("{}", "w")


@pytest.mark.parametrize("token", ["", "AAAA", "A" * 36])
def test_malformed_ciphertext_is_a_decryption_error(token: str) -> None:
    """Too short to hold a nonce and a tag: the documented error (retried by the executor),
    not the cipher's ValueError (which would discard the job as bad args)."""
    sealed = trioban.Encrypted(key=b"k" * 32)
    with pytest.raises(trioban.DecryptionError):
        sealed.decrypt({"encrypted": token}, "tests.workers.secret_echo")


# -- unique jobs ------------------------------------------------------------------------------


async def test_a_duplicate_returns_the_existing_job(dsn: str) -> None:
    async with trioban.open(config(dsn, queues={})) as oban:
        first = await oban.insert(unique_echo.new({"value": 1}))
        again = await oban.insert(unique_echo.new({"value": 1}))
        other = await oban.insert(unique_echo.new({"value": 2}))
        assert not first.conflict
        assert again.conflict
        assert again.id == first.id
        assert other.id != first.id
        assert not other.conflict
        # Per-job override: no constraint at all.
        free = await oban.insert(unique_echo.new({"value": 1}, unique=False))
        assert free.id not in (first.id, other.id)
        # In one batch, duplicates of each other and of existing jobs, in order.
        batch = await oban.insert_all(
            [
                unique_echo.new({"value": 3}),
                echo.new({"value": "plain"}),
                unique_echo.new({"value": 3}),
                unique_echo.new({"value": 1}),
            ]
        )
        assert [job.conflict for job in batch] == [False, False, True, True]
        assert batch[2].id == batch[0].id
        assert batch[3].id == first.id
        assert batch[1].worker == echo.name
        # Inside the caller's transaction: the key is taken only if it commits.
        with pytest.raises(RuntimeError, match="roll back"):
            async with oban.transaction() as conn:
                await oban.insert(unique_echo.new({"value": 9}), conn=conn)
                raise RuntimeError("roll back")
        async with oban.transaction() as conn:
            kept = await oban.insert(unique_echo.new({"value": 9}), conn=conn)
        assert not kept.conflict
        assert (await oban.insert(unique_echo.new({"value": 9}))).id == kept.id


async def test_keys_meta_keys_fields_and_period(dsn: str) -> None:
    by_account = Unique(keys=["account"], period=0.5)
    by_meta = Unique(fields=[], meta_keys=["tenant"])
    across_queues = Unique(fields=["worker", "args"])
    async with trioban.open(config(dsn, queues={})) as oban:
        a = await oban.insert(echo.new({"account": 1, "n": 1}, unique=by_account))
        b = await oban.insert(echo.new({"account": 1, "n": 2}, unique=by_account))
        assert b.id == a.id
        assert b.conflict
        await trio.sleep(0.6)  # the database's clock decides the period
        c = await oban.insert(echo.new({"account": 1, "n": 3}, unique=by_account))
        assert not c.conflict
        m1 = await oban.insert(echo.new({"x": 1}, meta={"tenant": "t", "y": 1}, unique=by_meta))
        m2 = await oban.insert(echo.new({"x": 2}, meta={"tenant": "t", "y": 2}, unique=by_meta))
        assert m2.id == m1.id
        q1 = await oban.insert(echo.new({"z": 1}, queue="q1", unique=across_queues))
        q2 = await oban.insert(echo.new({"z": 1}, queue="q2", unique=across_queues))
        assert q2.id == q1.id
        # keys imply args, as meta_keys imply meta: each user has a job of their own.
        by_user = Unique(fields=["worker"], keys=["user"])
        u1 = await oban.insert(echo.new({"user": 1, "n": 1}, unique=by_user))
        u2 = await oban.insert(echo.new({"user": 2, "n": 1}, unique=by_user))
        u1_again = await oban.insert(echo.new({"user": 1, "n": 2}, unique=by_user))
        assert not u2.conflict
        assert u1_again.conflict
        assert u1_again.id == u1.id


async def test_states_decide_what_blocks(dsn: str) -> None:
    incomplete = Unique(states="incomplete", period=None)
    async with trioban.open(config(dsn)) as oban:
        first = await oban.insert(echo.new({"v": 1}, unique=incomplete))
        assert (await _final(oban, first.id)).state is JobState.COMPLETED
        # Completed is not "incomplete": a new job may be inserted.
        second = await oban.insert(echo.new({"v": 1}, unique=incomplete))
        assert not second.conflict
        assert second.id != first.id
        # The default ("successful") counts completed jobs.
        done = await oban.relay(unique_echo.new({"value": "once"}))
        assert done == "once"
        repeat = await oban.insert(unique_echo.new({"value": "once"}))
        assert repeat.conflict
        assert repeat.state is JobState.COMPLETED


async def test_replace_updates_the_existing_job(dsn: str) -> None:
    rescheduling = Unique(replace={"scheduled": ["scheduled_at", "priority"]})
    soon = datetime.now(UTC) + timedelta(hours=1)
    later = soon + timedelta(hours=1)
    async with trioban.open(config(dsn, queues={})) as oban:
        first = await oban.insert(echo.new({"r": 1}, scheduled_at=soon, unique=rescheduling))
        moved = await oban.insert(
            echo.new({"r": 1}, scheduled_at=later, priority=3, unique=rescheduling)
        )
        assert moved.conflict
        assert moved.id == first.id
        assert moved.scheduled_at == later.replace(microsecond=later.microsecond)
        assert moved.priority == 3
        now = await oban.insert(echo.new({"r": 1}, schedule_in=0, unique=rescheduling))
        assert now.conflict
        assert now.state is JobState.AVAILABLE


async def test_a_key_given_twice_in_one_call_returns_the_row_as_it_ended(dsn: str) -> None:
    rescheduling = Unique(period=None, replace={"scheduled": ["scheduled_at"]})
    soon = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    later = soon + timedelta(hours=1)
    async with trioban.open(config(dsn, queues={})) as oban:
        first, again = await oban.insert_all(
            [echo.new({"twice": 1}, scheduled_at=t, unique=rescheduling) for t in (soon, later)]
        )
        stored = await oban.get_job(first.id or 0)
    assert (first.conflict, again.conflict, first.id) == (False, True, again.id)
    assert stored is not None
    assert first.scheduled_at == again.scheduled_at == stored.scheduled_at == later


async def test_a_replaced_meta_keeps_the_relay_of_the_existing_job(dsn: str) -> None:
    """A replace of meta leaves the existing job's relay ref: a duplicate that isn't relayed
    would wipe it (the result then unstored, the relay given None), and a relayed one joins
    the existing job by id rather than take its ref."""
    replacing = Unique(period=None, replace={"scheduled": ["meta", "scheduled_at"]})
    later = datetime.now(UTC) + timedelta(hours=1)

    def dup(n: int, at: datetime) -> trioban.Job:
        return echo.new({"value": "v"}, meta={"n": n}, scheduled_at=at, unique=replacing)

    async with trioban.open(config(dsn)) as oban:
        first = await oban.dispatch(dup(1, later))
        joined = await oban.dispatch(dup(2, later))
        assert (joined.job.id, joined.job.meta) == (first.job.id, {"n": 2, "relay": first.ref})
        plain = await oban.insert(dup(3, datetime.now(UTC)))  # due: it runs now
        assert (plain.conflict, plain.meta) == (True, {"n": 3, "relay": first.ref})
        assert await first.result(timeout=10) == "v"
        assert await joined.result(timeout=10) == "v"


async def test_a_replaced_meta_keeps_a_recorded_result(dsn: str) -> None:
    keeping = Unique(period=None, replace={"completed": ["meta"]})
    async with trioban.open(config(dsn)) as oban:
        first = await oban.insert(record_text.new({"text": "kept"}, meta={"n": 1}, unique=keeping))
        assert (await _final(oban, first.id)).state is JobState.COMPLETED
        again = await oban.insert(record_text.new({"text": "kept"}, meta={"n": 2}, unique=keeping))
        assert (again.conflict, again.meta) == (True, {"n": 2, "result": "kept"})
        assert await oban.fetch_recorded(again) == "kept"
        assert await oban.relay(record_text.new({"text": "kept"}, unique=keeping)) == "kept"


async def test_a_replaced_meta_replaces_only_user_keys(dsn: str) -> None:
    """Every key trioban keeps in a job's meta stays as the existing job has it, none taken
    from the new meta; the step keys and a batch job's keys only beside a workflow_id or a
    batch_id: elsewhere "name" or "deps" are the user's. (No unique job is a workflow step or
    a cron slot today: the keys are set by hand, so a later change can't lose them.)"""
    replacing = Unique(period=None, replace={"available": ["meta"]})
    own = {key: f"kept {key}" for key in (*RESERVED_META, *JOB_KEYS, *STEP_KEYS)}
    users = {key: f"new {key}" for key in (*JOB_KEYS, *STEP_KEYS)}
    async with trioban.open(config(dsn, queues={})) as oban:
        held = await oban.insert(echo.new({"k": 1}, meta={"u": 1, **users}, unique=replacing))
        again = await oban.insert(echo.new({"k": 1}, meta={"u": 2, "name": "b"}, unique=replacing))
        assert (again.conflict, again.meta) == (True, {"u": 2, "name": "b"})
        async with oban.transaction() as conn:
            forged = "UPDATE oban_jobs SET meta = %s::jsonb WHERE id = %s"
            await conn.execute(forged, (json.dumps(own), held.id))
        again = await oban.insert(echo.new({"k": 1}, meta={"u": 3, **users}, unique=replacing))
        assert again.meta == {**own, "u": 3}


async def test_overlapping_unique_batches_inserted_at_once_both_succeed(dsn: str) -> None:
    """Keys are taken in one order by every call: no deadlock between two batches."""
    once = Unique(period=None)
    saved: dict[str, list[trioban.Job]] = {}
    async with trioban.open(config(dsn, queues={})) as oban:

        async def insert(name: str, order: list[dict[str, str]]) -> None:
            saved[name] = await oban.insert_all([echo.new(a, unique=once) for a in order])

        for round_ in range(3):
            args = [{"overlap": f"{round_}-{i}"} for i in range(20)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(insert, "forward", args)
                nursery.start_soon(insert, "backward", args[::-1])
            forward, backward = saved["forward"], saved["backward"][::-1]
            assert [job.id for job in forward] == [job.id for job in backward]
            assert [job.args for job in forward] == args  # in each caller's own order
            assert all(a.conflict != b.conflict for a, b in zip(forward, backward, strict=True))


@pytest.mark.parametrize("in_transaction", [False, True])
async def test_a_unique_insert_that_a_deadlock_fails_runs_again(
    dsn: str, in_transaction: bool
) -> None:
    """Holders are locked in key order; a writer locking them in the other order (as the acker
    may) closes a cycle, and PostgreSQL fails the insert's transaction (or savepoint, in the
    caller's transaction) to break it."""
    once = Unique(period=None)
    async with trioban.open(config(dsn, queues={})) as oban:
        jobs = sorted((echo.new({"n": n}, unique=once) for n in range(2)), key=_unique_key)
        first, second = await oban.insert_all(jobs)
        again: list[trioban.Job] = []

        async def insert_again() -> None:
            if not in_transaction:
                again.extend(await oban.insert_all(jobs))
                return
            async with oban.transaction() as conn:
                await conn.execute("SELECT 1")  # the transaction has begun before the savepoint
                again.extend(await oban.insert_all(jobs, conn=conn))

        async def holds_first_waits_for_second() -> bool:
            return await waiting_on_a_lock(oban, "%oban_jobs%") == 1

        touch = "UPDATE oban_jobs SET priority = 1 WHERE id = %s"
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery, oban.transaction() as other:
                await other.execute(touch, [second.id])
                nursery.start_soon(insert_again)
                await eventually(holds_first_waits_for_second)
                await other.execute(touch, [first.id])  # waits for the insert: a cycle
        assert [(job.id, job.conflict) for job in again] == [(first.id, True), (second.id, True)]


def _unique_key(job: trioban.Job) -> str:
    assert job._unique is not None
    return job._unique.key


def _key_text(worker: str, args: object) -> bytes:
    basis = {"worker": worker, "queue": "default", "args": args}
    return json.dumps(basis, sort_keys=True, separators=(",", ":")).encode()


async def test_unique_keys_of_encrypted_args_are_keyed_hashes(
    dsn: str, secrets: list[bytes]
) -> None:
    """uniq_key held a plain SHA-256 of the args the encryption hides: anyone reading the table
    could confirm a guess (a 4-digit PIN in milliseconds). It is an HMAC under a secret derived
    from the current key; plain workers' keys are unchanged (existing jobs stay unique)."""
    old, new = b"o" * 32, b"n" * 32
    by_args = Unique(period=None)
    by_meta = Unique(fields=[], meta_keys=["tenant"])
    secrets[:] = [old]
    async with trioban.open(config(dsn, queues={})) as oban:
        first = await oban.insert(secret_echo.new({"pin": "7319"}, unique=by_args))
        again = await oban.insert(secret_echo.new({"pin": "7319"}, unique=by_args))
        tenant = await oban.insert(secret_echo.new({}, unique=by_meta, meta={"tenant": 1}))
        plain = await oban.insert(echo.new({"pin": "7319"}, unique=by_args))
        secrets[:] = [new, old]  # rotated
        rotated = await oban.insert(secret_echo.new({"pin": "7319"}, unique=by_args))
        same_tenant = await oban.insert(secret_echo.new({}, unique=by_meta, meta={"tenant": 1}))
        stored, plain_key = [
            await _one(oban, "SELECT uniq_key FROM oban_jobs WHERE id = %s", job.id)
            for job in (first, plain)
        ]
    assert again.conflict
    assert again.id == first.id
    text = _key_text(secret_echo.name, {"pin": "7319"})
    assert stored != hashlib.sha256(text).hexdigest()
    secret = hmac.new(old, b"trioban unique key", hashlib.sha256).digest()
    assert stored == hmac.new(secret, text, hashlib.sha256).hexdigest()
    assert plain_key == hashlib.sha256(_key_text(echo.name, {"pin": "7319"})).hexdigest()
    # Documented: a rotation changes keys over args, not keys over meta only (nothing hidden).
    assert not rotated.conflict
    assert same_tenant.conflict
    assert same_tenant.id == tenant.id


def test_bad_unique_options_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="unknown name 'args_' in Unique"):
        Unique(fields=["args_"])
    with pytest.raises(ValueError, match="unknown state group 'done'"):
        Unique(states="done")
    with pytest.raises(ValueError, match="unknown name 'id' in Unique"):
        Unique(replace={"scheduled": ["id"]})
    with pytest.raises(ValueError, match="finite number > 0"):
        Unique(period=0)
    with pytest.raises(TypeError, match=r"trioban.Unique\(...\)"):
        echo.new({}, unique={"period": 5})  # type: ignore[arg-type]


async def test_concurrent_inserts_from_three_processes_create_one_job(dsn: str) -> None:
    """20 concurrent inserts of one unique job in each of 3 processes: exactly one job."""
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 (plain pipes: released together below)
            [sys.executable, "-m", "tests.unique_inserter", dsn, "20"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        with trio.fail_after(60):
            for proc in procs:
                assert proc.stdout is not None
                line = await trio.to_thread.run_sync(proc.stdout.readline)
                assert line.strip() == "ready", line
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            created = 0
            for proc in procs:
                out, _ = await trio.to_thread.run_sync(proc.communicate)
                assert proc.returncode == 0
                created += int(out.strip())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    async with trioban.open(config(dsn, queues={})) as oban:
        count = await _one(
            oban, "SELECT count(*) FROM oban_jobs WHERE worker = %s", unique_echo.name
        )
    assert (created, count) == (1, 1)
