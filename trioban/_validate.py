"""Checks of the values a job is built from: names, numbers, text and JSON objects, each
refused with an error naming the field (before anything reaches PostgreSQL)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, TypeGuard

from . import _codec
from ._job import as_str_tuple

MAX_PRIORITY: Final = 9
MAX_QUEUE_LIMIT: Final = 10_000
MAX_NAME: Final = 127  # oban_jobs' queue_length / worker_length constraints

# A NUL character as JSON escapes it: \u0000 after an even run of backslashes.
_NUL_ESCAPE: Final = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def valid_queue_name(name: object) -> TypeGuard[str]:
    """Whether ``name`` may name a queue: a printable str of 1 to 127 chars, no whitespace
    (the rule of ``Config.queues`` and of the queue methods of ``Oban``)."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_NAME
        and name.isprintable()
        and not any(ch.isspace() for ch in name)
    )


def valid_queue_limit(limit: object) -> TypeGuard[int]:
    """Whether ``limit`` may be a queue's concurrency limit: an int from 1 to 10,000."""
    return isinstance(limit, int) and not isinstance(limit, bool) and 1 <= limit <= MAX_QUEUE_LIMIT


def queue_name_error(name: object, field: str) -> str:
    """Why ``name`` can't name a queue, stating the whole rule (whichever part it breaks)."""
    got = repr(name)
    if isinstance(name, str) and len(name) > MAX_NAME:
        got = f"a name of {len(name)} chars, {name[:40]!r}..."
    # "printable" already excludes every other whitespace (tabs, newlines, no-break spaces).
    rule = f"a name of 1 to {MAX_NAME} printable chars without spaces"
    return f"expected {field} to be {rule}, got {got}"


def check_queue(queue: object, field: str = "queue") -> str:
    """A queue name as ``Config.queues`` takes it, so no job goes to a queue no node can run."""
    if not valid_queue_name(queue):
        raise ValueError(queue_name_error(queue, field))
    return queue


def check_utf8(text: str, field: str) -> None:
    """Reject a lone surrogate (left by decoding bytes with ``errors="surrogateescape"``, say):
    PostgreSQL is sent UTF-8, which can't encode one."""
    if text.isascii():
        return
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"expected {field} to be text UTF-8 can encode, but it holds the lone surrogate "
            f"{text[exc.start]!r}, which PostgreSQL can't store"
        ) from None


def check_text(text: object, field: str) -> str:
    """A str PostgreSQL can store in a text column: no NUL, no lone surrogate."""
    if not isinstance(text, str):
        raise TypeError(f"expected {field} to be a str, got {text!r}")
    if "\x00" in text:
        raise ValueError(
            f"expected {field} to be text without the NUL character (\\x00), which PostgreSQL "
            f"can't store, got {text!r}"
        )
    check_utf8(text, field)
    return text


def check_tags(tags: Sequence[str], field: str = "tags") -> tuple[str, ...]:
    checked = as_str_tuple(tags, field)
    for tag in checked:
        check_utf8(tag, field)
    return checked


def check_name(name: str) -> str:
    if not 0 < len(name) <= MAX_NAME:
        raise ValueError(
            f"a worker's name (its module and qualified name, stored in each job) must be 1 to "
            f"{MAX_NAME} characters; {name!r} has {len(name)}: use a shorter name or module path"
        )
    return name


MAX_ATTEMPTS: Final = 2**31 - 1
"""The largest max_attempts the column (a PostgreSQL integer) holds."""


def check_int(value: object, field: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected {field} to be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"expected {field} to be {bound}, got {value}")
    return value


def check_seconds(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected {field} to be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected {field} to be a finite number of seconds > 0, got {value}")
    return float(value)


def check_json_object(value: object, field: str) -> tuple[Mapping[str, Any], str]:
    """Validate a JSON object; return a read-only copy and its encoding (reused at insert)."""
    if type(value) is not dict and not isinstance(value, Mapping):
        raise TypeError(
            f"expected {field} to be a dict (a JSON object), got {type(value).__name__}"
        )
    copy = dict(value)
    for key in copy:
        if type(key) is not str:
            raise TypeError(f"expected the keys of {field} to be str, got {key!r}")
    try:
        encoded = _codec.dumps(copy)
    except RecursionError:
        raise ValueError(_too_deep_error(field)) from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, TypeError):
            _check_nested_keys(copy, field)  # name the place of a bad key, if that is it
        elif _nests_deeper(copy):  # the encoder's "nesting too deep"
            raise ValueError(_too_deep_error(field)) from None
        raise type(exc)(f"expected {field} to be JSON-serialisable: {exc}") from None
    if nests_too_deep(copy, encoded):
        raise ValueError(_too_deep_error(field))
    if "\\u0000" in encoded and _NUL_ESCAPE.search(encoded):
        raise ValueError(
            f"{field} contains the NUL character (\\u0000), which PostgreSQL's jsonb can't "
            "store; remove it or encode the value (e.g. base64)"
        )
    if not encoded.isascii():
        check_utf8(encoded, field)
    if encoded.find("{", 1) >= 0:  # a nested object (or a "{" in a string): check its keys
        _check_nested_keys(copy, field)
    # Read-only, so the encoding cached for insert can't go stale.
    return MappingProxyType(copy), encoded


MAX_NESTING: Final = 256
"""How deep args, meta and recorded results may nest: decoding them again where jobs are
fetched (deeper in the stack than where they were built) must stay well within Python's
recursion limit."""


def nests_too_deep(value: object, encoded: str) -> bool:
    """Whether ``value`` (encoded as the JSON ``encoded``) nests deeper than ``MAX_NESTING``."""
    return encoded.count("[") + encoded.count("{") > MAX_NESTING and _nests_deeper(value)


def _nests_deeper(value: object, limit: int = MAX_NESTING) -> bool:
    """Whether lists and objects nest in ``value`` more than ``limit`` levels deep."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Iterable[object] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _too_deep_error(field: str) -> str:
    return f"expected {field} to nest lists and objects at most {MAX_NESTING} levels deep"


CRON_META: Final = frozenset({"cron", "cron_expr"})
"""The meta keys of a cron slot's job (``_cron.slot_job``)."""

RESERVED_META: Final = CRON_META | {
    "relay",  # a relayed job's ref (_notice.META_REF): its outcome is published to that relay
    "result",  # a relayed or recorded job's result (_notice.META_RESULT)
    "workflow_id",  # makes the job a workflow step (_workflow)
    "batch_id",  # makes the job a member of a batch (_batch)
    "callback",  # the handler a class worker runs (_batch)
}
"""The meta keys whose mere presence tells trioban what a job is: a caller's value would be
taken for its own (a "result" for a recorded result, a "callback" for the handler to run).
The other keys of steps and batch jobs are read only beside these; ``Workflow.add`` and
``Batch.add`` refuse jobs that hold them."""


def check_meta(meta: object) -> Mapping[str, Any]:
    """A job's meta as ``check_json_object`` checks it, without the keys trioban reserves."""
    checked = check_json_object(meta, "meta")[0]
    reserved = sorted(RESERVED_META.intersection(checked))
    if reserved:
        raise ValueError(
            f"meta key {reserved[0]!r} is reserved: trioban writes it itself (relays, recorded "
            "results, workflows, batches, cron); give your key another name"
        )
    return checked


def check_own_keys(meta: Mapping[str, Any], keys: Iterable[str], what: str, owner: str) -> None:
    """Refuse a job for ``what`` whose meta holds a key ``owner`` sets: it would be lost."""
    taken = [key for key in keys if key in meta]
    if taken:
        raise ValueError(
            f"{what}: meta key {taken[0]!r} is set by {owner} itself and would overwrite "
            "yours; give your key another name"
        )


_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


def _check_nested_keys(value: Mapping[str, Any], field: str) -> None:
    """Every key of the objects nested in ``value`` is a str: the encoder would silently turn
    others into text (``{1: 2, "1": 3}`` into duplicate keys), and unique keys couldn't sort
    them."""
    try:
        found = _non_str_key(value)
    except RecursionError:  # nested about as deep as the encoder allows
        raise ValueError(f"expected {field} to be nested less deeply") from None
    if found is not None:
        path, key = found
        where = field + "".join(f"[{step!r}]" for step in path)
        raise TypeError(f"expected the keys of {where} to be str, got {key!r}")


def _non_str_key(value: Any) -> tuple[list[Any], Any] | None:
    """The path to the first object in ``value`` (an encodable container) with a key that
    isn't a str, and that key."""
    children: Iterable[tuple[Any, Any]]
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                return [], key
        children = value.items()
    else:
        children = enumerate(value)
    for step, item in children:
        if type(item) not in _SCALARS and isinstance(item, Mapping | list | tuple):
            found = _non_str_key(item)
            if found is not None:
                found[0].insert(0, step)
                return found
    return None


def check_flag(value: object, name: str) -> bool:
    """``value`` if it is a bool, else a ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"expected {name} to be True or False, got {value!r}")
    return value
