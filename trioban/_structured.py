"""Structured args and results: attrs classes or dataclasses to and from JSON, via cattrs.

Private converters (one rejecting unknown keys, one ignoring them) so an application's own
cattrs hooks never change what trioban stores. Datetimes travel as ISO 8601 text, enums as
their values, nested classes as objects. As users can't add hooks to them, a class with a field
type they can't convert is refused when the worker is declared, naming the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Final

import attrs
import cattrs
from cattrs.fns import raise_error
from cattrs.preconf.json import make_converter

_STRICT: Final = make_converter(forbid_extra_keys=True)
_LENIENT: Final = make_converter()
_COMBINATIONS: Final[frozenset[Any]] = frozenset({typing.Union, types.UnionType, typing.Annotated})
Found = tuple[str, Any] | None
"""Where an unsupported type sits (a field path such as ``args.ship_to.city``), and the type."""
SUPPORTED: Final = (
    "str, int, float, bool, None, datetime, date, bytes, enums, Literal, nested attrs classes "
    "or dataclasses, and list, tuple, set, dict, Optional or unions of these"
)


def check_class(value: object, field: str) -> type[Any] | None:
    """Validate a ``@worker(args=...)``/``result=`` class: attrs or dataclass, or None."""
    if value is None:
        return None
    if not isinstance(value, type) or not _is_class(value):
        raise TypeError(f"expected {field} to be an attrs class or a dataclass, got {value!r}")
    found = _unsupported(value, field)
    if found is not None:  # every job would fail: say so now, naming the field
        text = f"unsupported field type in {field} class {value.__qualname__}: "
        raise TypeError(text + _advice(*found))
    return value


def structure(data: Any, cls: type[Any], field: str, *, forbid_extra: bool = True) -> Any:
    """``data`` (JSON) as a ``cls`` instance; every bad field is named in one ``ValueError``."""
    converter = _STRICT if forbid_extra else _LENIENT
    try:
        return converter.structure(data, cls)
    except Exception as exc:  # cattrs raises many kinds for data of the wrong shape
        # Or the class is at fault, not the data: a type defined after the worker.
        found = _unsupported(cls, field)
        if found is None and isinstance(exc, cattrs.StructureHandlerNotFoundError):
            found = (field, exc.type_ or cls)
        if found is not None:
            text = f"cannot use {field} class {cls.__qualname__}: {_advice(*found)}"
        else:
            text = f"invalid {field} for {cls.__qualname__}: {_explain(exc, field)}"
        raise ValueError(text) from None


def unstructure(value: Any, cls: type[Any], field: str, *, forbid_extra: bool = True) -> Any:
    """``value`` (a ``cls`` instance, or data shaped like one) as JSON-ready data."""
    if not isinstance(value, cls):
        value = structure(value, cls, field, forbid_extra=forbid_extra)
    return _STRICT.unstructure(value, unstructure_as=cls)


def _advice(where: str, kind: Any) -> str:
    name = getattr(kind, "__qualname__", None) or repr(kind)
    return (
        f"{where} is a {name}, which trioban can't convert to and from JSON; use {SUPPORTED} "
        "(e.g. keep it as a str and convert it in your code)"
    )


def _unsupported(cls: type[Any], field: str) -> Found:
    """Where in ``cls`` a type sits that the converter can't structure, and that type; None if
    it handles them all (or can't tell yet: unresolved annotations). Walked by hand, as the
    converter looks some types up only once it meets their data: first the plain types, then
    the containers (a container of a class fails whenever the class does)."""
    return _walk(cls, field, set(), containers=False) or _walk(cls, field, set(), containers=True)


def _walk(kind: Any, where: str, seen: set[type[Any]], *, containers: bool) -> Found:
    if isinstance(kind, type) and _is_class(kind):
        if kind in seen:  # a recursive class: being checked already
            return None
        seen.add(kind)
        parts = [(f"{where}.{name}", part) for name, part in _field_types(kind)]
        return _first(parts, seen, containers)
    origin = typing.get_origin(kind)
    if kind is Any or kind is type(None) or origin is typing.Literal:  # as they are
        return None
    args = typing.get_args(kind)[:1] if origin is typing.Annotated else typing.get_args(kind)
    found = _first([(where, arg) for arg in args], seen, containers)
    if found is not None or origin in _COMBINATIONS or (origin is not None and not containers):
        return found
    return None if _handled(kind) else (where, kind)


def _first(parts: list[tuple[str, Any]], seen: set[type[Any]], containers: bool) -> Found:
    for place, part in parts:
        if isinstance(part, type) or typing.get_origin(part) is not None:  # not "...", a str
            found = _walk(part, place, seen, containers=containers)
            if found is not None:
                return found
    return None


def _is_class(kind: type[Any]) -> bool:
    return attrs.has(kind) or dataclasses.is_dataclass(kind)


def _field_types(cls: type[Any]) -> list[tuple[str, Any]]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: the fields' own types
        hints = {}
    fields = attrs.fields(cls) if attrs.has(cls) else dataclasses.fields(cls)
    return [(field.name, hints.get(field.name, field.type)) for field in fields]


def _handled(kind: Any) -> bool:
    try:
        hook = _STRICT.get_structure_hook(kind)
    except cattrs.StructureHandlerNotFoundError:
        return False
    except Exception:  # not a type the converter would look up on its own
        return True
    return hook is not raise_error  # older cattrs hand out this fallback instead of raising


def _explain(exc: BaseException, field: str) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc, path=field))
    return f"{type(exc).__name__}: {exc}"
