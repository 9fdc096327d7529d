"""JSON encoding of args and results, and the notifier payload forms.

Only JSON is ever decoded: nothing here (or anywhere in trioban) unpickles.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

NOTIFY_LIMIT = 8000
"""PostgreSQL rejects NOTIFY payloads of 8,000 bytes or more."""

COMPRESS_ABOVE = 1024
"""Payloads longer than this (in UTF-8 bytes) are sent compressed when that makes them
shorter."""


def _default(value: Any) -> Any:
    # Read-only mappings (a job's args and meta) encode as objects.
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_encoder = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default
)
# JSONEncoder.encode() builds a new C encoder on every call; on the insert hot path that is
# most of the cost, so build it once (markers=None: a circular value hits the recursion limit,
# reported as ValueError below).
_c_encode = (
    json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, _default, json.encoder.encode_basestring, None, ":", ",",
        False, False, False,
    )
    if json.encoder.c_make_encoder is not None  # type: ignore[attr-defined]
    else None
)  # fmt: skip


class PayloadError(ValueError):
    """Raised when a notifier payload can't be decoded (logged and skipped by readers)."""


def dumps(value: Any) -> str:
    """Encode ``value`` as compact JSON; raise ``TypeError``/``ValueError`` if it isn't JSON."""
    if _c_encode is None or isinstance(value, str):
        return _encoder.encode(value)
    try:
        return "".join(_c_encode(value, 0))
    except RecursionError:
        raise ValueError("circular reference (or nesting too deep) in a JSON value") from None


_canonical = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=True, allow_nan=False, sort_keys=True, default=_default
)


def canonical_dumps(value: Any) -> str:
    """Encode ``value`` with sorted keys: equal values give equal text (for hashing)."""
    return _canonical.encode(value)


_decode = json.JSONDecoder().decode


def loads(data: str | bytes) -> Any:
    """Decode JSON text (UTF-8 when bytes); also psycopg's loader of json/jsonb columns.

    ``json.loads`` spends more on sniffing the encoding of ``bytes`` than on decoding the
    ``{}`` of a job's usual meta; this is the same decoding without that.
    """
    if isinstance(data, str):
        return _decode(data)
    if data == b"{}":
        return {}
    return _decode(str(data, "utf-8"))


def _stored_number(text: str) -> float | int:
    # jsonb keeps a number as numeric and prints it in full: 1e+20 comes back as the int
    # 100000000000000000000 (an exponent leaving no fraction), -0.0 as 0.0.
    if "e" in text or "E" in text:
        number = Decimal(text)
        exponent = number.as_tuple().exponent
        if isinstance(exponent, int) and exponent >= 0:
            return int(number)
    return float(text) or 0.0


def _stored_key(pair: tuple[str, Any]) -> tuple[int, str]:
    # jsonb orders an object's keys by their length in UTF-8 bytes, then bytewise (which,
    # among keys of one length, is code point order).
    key = pair[0]
    return (len(key) if key.isascii() else len(key.encode()), key)


def _stored_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > 1:
        pairs.sort(key=_stored_key)  # stable: of duplicate keys the last wins, as in jsonb
    return dict(pairs)


_decode_stored = json.JSONDecoder(
    parse_float=_stored_number, object_pairs_hook=_stored_object
).decode


def loads_stored(text: str) -> Any:
    """Decode JSON text as a jsonb column holding it reads back: keys in jsonb's order,
    numbers as jsonb prints them. A job claimed on insert gets its args and meta this way, as
    a job fetched from the database would."""
    return _decode_stored(text)


def encode_payload(value: Any) -> str:
    """Encode a notifier payload: plain JSON, or Oban's ``Z:`` + base64(gzip) when large."""
    return pack_payload(dumps(value))


def pack_payload(text: str) -> str:
    """A notifier payload's JSON ``text`` as sent: as is, or ``Z:`` + base64(gzip) when large."""
    # Sizes in bytes, as NOTIFY's limit counts them: a non-ASCII char takes 2 to 4.
    raw = text.encode()
    if len(raw) > COMPRESS_ABOVE:
        packed = "Z:" + base64.b64encode(gzip.compress(raw, mtime=0)).decode("ascii")
        if len(packed) < len(raw):
            return packed
    return text


def decode_payload(payload: str) -> Any:
    """Decode any payload form Oban nodes send: JSON, base64(gzip(JSON)) or ``Z:``+base64(gzip).

    >>> decode_payload('{"a":1}')
    {'a': 1}
    >>> decode_payload(encode_payload({"big": "x" * 5000})) == {"big": "x" * 5000}
    True
    """
    text = payload.strip()
    try:
        if text.startswith(("{", "[")):
            return json.loads(text)
        if text.startswith("Z:"):
            text = text[2:]
        return json.loads(gzip.decompress(base64.b64decode(text, validate=True)))
    except (ValueError, binascii.Error, OSError, EOFError, RecursionError) as exc:
        # RecursionError: JSON nested too deeply (any session may NOTIFY a channel).
        raise PayloadError(f"undecodable notifier payload {payload[:80]!r}: {exc}") from exc
