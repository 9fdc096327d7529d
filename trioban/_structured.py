"""Structured args and results: attrs classes or dataclasses to and from JSON, via cattrs.

Private converters (one rejecting unknown keys, one ignoring them) so an application's own
cattrs hooks never change what trioban stores. Datetimes travel as ISO 8601 text, enums as
their values, nested classes as objects.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

import attrs
import cattrs
from cattrs.preconf.json import make_converter

_STRICT: Final = make_converter(forbid_extra_keys=True)
_LENIENT: Final = make_converter()


def check_class(value: object, field: str) -> type[Any] | None:
    """Validate a ``@worker(args=...)``/``result=`` class: attrs or dataclass, or None."""
    if value is None:
        return None
    if not isinstance(value, type) or not (attrs.has(value) or dataclasses.is_dataclass(value)):
        raise TypeError(f"expected {field} to be an attrs class or a dataclass, got {value!r}")
    return value


def structure(data: Any, cls: type[Any], field: str, *, forbid_extra: bool = True) -> Any:
    """``data`` (JSON) as a ``cls`` instance; every bad field is named in one ``ValueError``."""
    converter = _STRICT if forbid_extra else _LENIENT
    try:
        return converter.structure(data, cls)
    except Exception as exc:  # cattrs raises many kinds for data of the wrong shape
        text = f"invalid {field} for {cls.__qualname__}: {_explain(exc, field)}"
        raise ValueError(text) from None


def unstructure(value: Any, cls: type[Any], field: str, *, forbid_extra: bool = True) -> Any:
    """``value`` (a ``cls`` instance, or data shaped like one) as JSON-ready data."""
    if not isinstance(value, cls):
        value = structure(value, cls, field, forbid_extra=forbid_extra)
    return _STRICT.unstructure(value, unstructure_as=cls)


def _explain(exc: BaseException, field: str) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc, path=field))
    return f"{type(exc).__name__}: {exc}"
