"""Hostile input, generated: clear errors or correct handling, never a crash or a bad job."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trioban
from trioban import ConfigError, _bulk
from trioban._codec import PayloadError, decode_payload, encode_payload
from trioban._notifier import check_channel
from trioban._sql import quoted_prefix

from ..workers import echo

scalars = (
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
    # jsonb keeps numbers as numeric: a float beyond 2**53 comes back as the integer its
    # digits spell, which may differ from the float in the last bits. Below that, exact.
    | st.floats(allow_nan=False, allow_infinity=False, min_value=-(2.0**53), max_value=2.0**53)
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
anything = json_values | st.builds(object) | st.sets(st.integers()) | st.binary()


@given(st.dictionaries(st.text(max_size=10), anything, max_size=5))
def test_args_are_json_or_rejected_with_a_clear_error(args: dict[str, Any]) -> None:
    """Including strings with NUL, which jsonb can't store: refused at new()."""
    job, error = attempt(echo.new, args)
    if error is not None:
        assert isinstance(error, TypeError | ValueError)
        assert "args" in str(error)
    else:
        assert isinstance(job, trioban.Job)
        assert json.loads(json.dumps(dict(job.args))) == json.loads(json.dumps(args))


def attempt(
    function: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[Any, Exception | None]:
    """``function``'s result, or the exception it raised."""
    try:
        return function(*args, **kwargs), None
    except Exception as exc:
        return None, exc


@given(st.text(max_size=80))
def test_prefixes_are_identifiers_or_refused(prefix: str) -> None:
    quoted, error = attempt(quoted_prefix, prefix)
    if error is not None:
        assert isinstance(error, ConfigError)
        assert error.field == "prefix"
    else:
        assert quoted == f'"{prefix}"'
        assert prefix.isidentifier()
        assert prefix == prefix.lower()


@pytest.mark.parametrize(
    "prefix", ['public"; DROP TABLE oban_jobs; --', "a b", "Public", "x" * 64, "1abc", ""]
)
def test_injection_through_the_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigError, match="prefix"):
        trioban.Config(prefix=prefix)


@given(st.text(max_size=60))
def test_channel_names_are_checked(name: str) -> None:
    _, error = attempt(check_channel, name)
    if error is not None:
        assert isinstance(error, ValueError)
        assert "channel" in str(error)


@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_notifier_payloads_decode_or_fail_cleanly(raw: str) -> None:
    _, error = attempt(decode_payload, raw)
    assert error is None or isinstance(error, PayloadError)


@given(st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_payloads_round_trip(value: dict[str, Any]) -> None:
    assert decode_payload(encode_payload(value)) == json.loads(json.dumps(value))


@given(
    st.dictionaries(
        st.sampled_from(["queues", "pool_size", "shutdown_grace", "prefix", "node", "prune_limit",
                         "heartbeat_interval", "timezone", "testing", "install", "bogus"]),
        anything | st.dictionaries(st.text(max_size=5), st.integers()),
        max_size=4,
    )
)  # fmt: skip
def test_config_values_are_valid_or_a_config_error(settings_: dict[str, Any]) -> None:
    _, error = attempt(trioban.Config, **settings_)
    if error is not None:
        assert isinstance(error, ConfigError)
        assert error.field


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(args=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
       meta=st.dictionaries(st.text(max_size=10), json_values, max_size=3),
       tags=st.lists(st.text(min_size=1, max_size=10), max_size=3))  # fmt: skip
def test_random_jobs_survive_the_database_unchanged(
    dsn: str, args: dict[str, Any], meta: dict[str, Any], tags: list[str]
) -> None:
    """Whatever new() accepts is stored and read back unchanged."""
    built, error = attempt(echo.new, args, meta=meta, tags=tags)
    if error is not None:
        assert "NUL" in str(error)
        return
    job: trioban.Job = built

    async def round_trip() -> None:
        async with trioban.open(trioban.Config(dsn=dsn, install=False)) as oban:
            saved = await oban.insert(job)
            again = await oban.get_job(saved.id or 0)
            # The same job in a batch big enough for COPY: written by another encoder.
            copied = (await oban.insert_all([job] * _bulk.MIN_ROWS))[-1]
            copied_again = await oban.get_job(copied.id or 0)
        assert again is not None
        assert again.args == json.loads(json.dumps(args))
        assert again.meta == json.loads(json.dumps(meta))
        assert list(again.tags) == tags
        assert copied_again is not None
        assert (copied_again.args, copied_again.meta) == (again.args, again.meta)
        assert copied_again.tags == again.tags
        # Saved from the inputs: equal to the row read back, but for jsonb's own number forms.
        assert attrs.evolve(copied, args=copied_again.args, meta=copied_again.meta) == copied_again

    trio.run(round_trip)
