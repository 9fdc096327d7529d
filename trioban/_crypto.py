"""Encrypted args: AES-256-GCM at rest, decrypted only on the node that runs the job.

The stored args are ``{"encrypted": base64(nonce + ciphertext + tag)}``. The worker's name is
authenticated with the ciphertext, so args can't be moved to another worker; a wrong key or a
changed byte fails authentication instead of handing the worker garbage. Keys rotate: the
first key encrypts, every key is tried to decrypt.

Uniqueness can't look at encrypted args (every encryption differs): a unique encrypted job is
keyed on the args before encryption, or on ``meta``. A plain hash of the args would let anyone
reading the table confirm guesses of them, so args go into an HMAC under a secret derived from
the current key (``unique_secret``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, final

from ._errors import TriobanError

KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
FIELD: Final = "encrypted"
UNIQUE_LABEL: Final = b"trioban unique key"

KeySource = bytes | Sequence[bytes] | Callable[[], bytes | Sequence[bytes]]


class DecryptionError(TriobanError):
    """Raised when a job's args can't be decrypted with any configured key."""


@final
class Encrypted:
    """``@worker(encrypted=Encrypted(key=...))``: args encrypted at rest with AES-256-GCM.

    ``key`` is 32 bytes, a list of them (the first encrypts, all decrypt: key rotation), or a
    callable returning either, called each time (e.g. reading the environment). Raw bytes, not
    their text: decode a base64 or hex key first. Unique keys over the args of a job derive
    from the current (first) key, so rotating it changes them.
    """

    def __init__(self, key: KeySource) -> None:
        if not callable(key):
            _check_keys(key)
        self._key = key

    def __repr__(self) -> str:
        return "Encrypted(key=<hidden>)"

    def keys(self) -> list[bytes]:
        """The keys, newest first, validated."""
        return _check_keys(self._key() if callable(self._key) else self._key)

    def current_key(self, worker: str) -> bytes:
        """The key that encrypts ``worker``'s new jobs (the first); a key callable that raises or
        gives no valid key raises ``TriobanError`` naming the worker and what it must give."""
        try:
            return self.keys()[0]
        except Exception as exc:  # only a callable's keys can fail: others were checked
            raise TriobanError(
                f"cannot get the encryption key of worker {worker} "
                f"({type(exc).__name__}: {exc}); its Encrypted(key=...) callable must return a "
                f"{KEY_BYTES}-byte key or a list of them, newest first (e.g. "
                'base64.b64decode(os.environ["APP_JOB_KEY"]))'
            ) from exc

    def encrypt(self, plaintext: str, worker: str, *, key: bytes | None = None) -> dict[str, str]:
        """The stored form of ``plaintext`` (JSON args) for ``worker``, sealed with ``key`` (by
        default the current key)."""
        aead = _aead(self.current_key(worker) if key is None else key)
        nonce = os.urandom(NONCE_BYTES)
        sealed = aead.encrypt(nonce, plaintext.encode(), worker.encode())
        return {FIELD: base64.b64encode(nonce + sealed).decode("ascii")}

    def decrypt(self, stored: Mapping[str, Any], worker: str) -> str:
        """The JSON args text sealed in ``stored``; ``DecryptionError`` if no key opens it, or
        the keys can't be had (a key callable that raises, a key of the wrong size)."""
        token = stored.get(FIELD) if isinstance(stored, Mapping) else None
        if not isinstance(token, str):
            raise DecryptionError(
                f"the args of this {worker} job are not encrypted (expected {{{FIELD!r}: ...}}); "
                "was it inserted by a worker without encryption?"
            )
        try:
            raw = base64.b64decode(token, validate=True)
        except binascii.Error:
            text = f"the encrypted args of this {worker} job are not base64"
            raise DecryptionError(text) from None
        if len(raw) < NONCE_BYTES + TAG_BYTES:  # AESGCM would raise ValueError on a short nonce
            text = f"the encrypted args of this {worker} job are too short to be sealed args"
            raise DecryptionError(text)
        nonce, sealed = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
        keys = self._keys_for(worker)
        opened = _open(keys, nonce, sealed, worker)
        if opened is None:
            raise DecryptionError(
                f"cannot decrypt the args of this {worker} job with any of the worker's "
                f"{len(keys)} key(s): a wrong key, or the stored args were altered"
            )
        return opened.decode()

    def _keys_for(self, worker: str) -> list[bytes]:
        # A node missing a key (an unset environment variable) or holding a mangled one: the
        # attempt fails with DecryptionError, retried, so a fixed node still runs the job.
        try:
            return self.keys()
        except Exception as exc:
            raise DecryptionError(
                f"cannot get the encryption keys of worker {worker} on this node "
                f"({type(exc).__name__}: {exc}); fix its Encrypted(key=...) source (e.g. the "
                f"environment variables it reads) to give {KEY_BYTES}-byte keys"
            ) from exc


def unique_secret(key: bytes) -> bytes:
    """The secret keying the unique keys of jobs encrypted with ``key``: derived from it, as the
    key itself only encrypts. Rotating the key changes it (and so the unique keys)."""
    return hmac.new(key, UNIQUE_LABEL, hashlib.sha256).digest()


def _check_keys(value: object) -> list[bytes]:
    keys = [value] if isinstance(value, bytes | bytearray | str) else value
    if not isinstance(keys, Sequence) or not keys:
        raise TypeError(
            f"expected an encryption key of {KEY_BYTES} bytes or a list of them, "
            f"got {type(value).__name__}"
        )
    for key in keys:
        if isinstance(key, bytes | bytearray) and len(key) == KEY_BYTES:
            continue
        got = f"{type(key).__name__}" + (
            f" of {len(key)} bytes" if isinstance(key, bytes | bytearray) else ""
        )
        text = f"expected each encryption key to be {KEY_BYTES} bytes (AES-256), got {got}"
        advice = _decoding_advice(key) or (
            "; make one with os.urandom(32) (to keep it as text, in the environment say, "
            "base64-encode it and read it back with base64.b64decode)"
        )
        raise (ValueError if isinstance(key, bytes | bytearray) else TypeError)(text + advice)
    return [bytes(key) for key in keys]


def _decoding_advice(key: object) -> str:
    """How to decode ``key`` if it is the hex or base64 text of a 32-byte key, else ""."""
    if isinstance(key, bytes | bytearray):
        key = bytes(key).decode("ascii", "replace")
    if not isinstance(key, str):
        return ""
    text = key.strip()
    if len(text) == 2 * KEY_BYTES and all(char in string.hexdigits for char in text):
        return "; it looks hex-encoded: decode it first (bytes.fromhex(...))"
    padding = "=" * (-len(text) % 4)
    try:
        standard = text.replace("-", "+").replace("_", "/") + padding
        decoded = base64.b64decode(standard, validate=True)
    except (binascii.Error, ValueError):
        return ""
    if len(decoded) != KEY_BYTES:
        return ""
    decode = "urlsafe_b64decode" if "-" in text or "_" in text else "b64decode"
    pad = f" after appending {padding!r}" if padding else ""
    return f"; it looks base64-encoded: decode it first (base64.{decode}(...){pad})"


def _open(keys: list[bytes], nonce: bytes, sealed: bytes, worker: str) -> bytes | None:
    """The plaintext sealed for ``worker``, opened with the first key that fits, or None."""
    try:
        from cryptography.exceptions import InvalidTag

        for key in keys:
            try:
                opened: bytes = _aead(key).decrypt(nonce, sealed, worker.encode())
                return opened
            except InvalidTag:
                continue
    except Exception as exc:  # e.g. the cryptography package missing on this node
        text = f"cannot decrypt the args of this {worker} job on this node"
        raise DecryptionError(f"{text} ({type(exc).__name__}: {exc})") from exc
    return None


def _aead(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # imported when first used

    return AESGCM(key)
