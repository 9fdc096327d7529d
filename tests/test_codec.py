"""Payload forms the notifier reads and writes; backoff shape."""

from __future__ import annotations

import base64
import gzip
import json
import random

import pytest

from trioban import _backoff, _codec


def test_payload_forms_round_trip() -> None:
    small = {"queue": "default"}
    assert _codec.encode_payload(small) == '{"queue":"default"}'
    big = {"data": "abc" * 2000}
    packed = _codec.encode_payload(big)
    assert packed.startswith("Z:")
    assert len(packed) < len(json.dumps(big))
    assert _codec.decode_payload(packed) == big
    plain_b64 = base64.b64encode(gzip.compress(json.dumps(big).encode())).decode()
    assert _codec.decode_payload(plain_b64) == big
    assert _codec.decode_payload(json.dumps(small)) == small


def test_payload_size_is_weighed_in_utf8_bytes() -> None:
    """NOTIFY's limit counts bytes: non-ASCII text is compressed when that is fewer bytes
    (before, characters were compared and 3-byte CJK text was sent plain, or refused)."""
    rng = random.Random(1)
    cjk = "".join(rng.choice([chr(0x4E00 + i) for i in range(128)]) for _ in range(2700))
    for value in ({"text": "é" * 600}, {"text": cjk[:1000]}, {"text": cjk}):
        plain = _codec.dumps(value).encode()
        packed = _codec.encode_payload(value)
        assert packed.startswith("Z:")
        assert len(packed) < len(plain)
        assert _codec.decode_payload(packed) == value
    assert len(_codec.encode_payload({"text": cjk})) < _codec.NOTIFY_LIMIT  # 8,111 bytes plain
    assert not _codec.encode_payload({"text": "é" * 100}).startswith("Z:")  # small: plain


@pytest.mark.parametrize("bad", ["", "Z:!!!", "not json", "{broken", "Z:" + "A" * 8])
def test_malformed_payloads_raise_payload_error(bad: str) -> None:
    with pytest.raises(_codec.PayloadError):
        _codec.decode_payload(bad)


def test_dumps_rejects_non_json() -> None:
    with pytest.raises(ValueError, match="Out of range"):
        _codec.dumps(float("inf"))
    with pytest.raises(TypeError):
        _codec.dumps({"x": object()})


def test_default_backoff_is_jittered_exponential() -> None:
    assert _backoff.exponential(0) == 16
    assert _backoff.exponential(10) == 15 + 1024
    rng = random.Random(1)
    values = {round(_backoff.jitter(100, rng=rng), 3) for _ in range(50)}
    assert len(values) > 40
    assert all(90 <= v <= 110 for v in values)
    assert _backoff.exponential(10_000) == 15 + 2**30
