"""Structured args and results: attrs classes or dataclasses to and from JSON, via cattrs.

Private converters (one rejecting unknown keys, one ignoring them) so an application's own
cattrs hooks never change what trioban stores. Datetimes travel as ISO 8601 text, enums as
their values, nested classes as objects. The converters validate rather than coerce: a str,
int, float or bool field takes only a value of that JSON type (an int for a float), and a list,
tuple or set field no str or object. As users can't add hooks to them, a class with a field
type they can't convert (or a union whose members they can't tell apart) is refused when the
worker is declared, naming the field.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import re
import threading
import types
import typing
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any, Final

import attrs
import cattrs
from cattrs.cols import is_any_set, is_sequence, list_structure_factory
from cattrs.fns import raise_error
from cattrs.preconf.json import JsonConverter, make_converter
from cattrs.v import format_exception

if typing.TYPE_CHECKING:
    from cattrs.dispatch import StructureHook

_COMBINATIONS: Final[frozenset[Any]] = frozenset({typing.Union, types.UnionType, typing.Annotated})
_UNIONS: Final[frozenset[Any]] = frozenset({typing.Union, types.UnionType})
_PLAIN: Final[frozenset[Any]] = frozenset({str, int, float, bool, type(None)})
"""Types a union passes through as the JSON value they are (by exact class)."""
_TEXT: Final = (datetime, date, bytes)
"""Types sent as JSON strings."""
Found = tuple[str, Any] | None
"""Where an unsupported type sits (a field path such as ``args.ship_to.city``), and the type."""
SUPPORTED: Final = (
    "str, int, float, bool, None, datetime, date, bytes, enums, Literal, nested attrs classes "
    "or dataclasses, and list, tuple, set, dict, Optional or unions of these"
)
UNIONS: Final = (
    "a union may join str, int, float, bool, None and Literal values with one other type that "
    "JSON doesn't send as one of them (a datetime, date or bytes is sent as a str, an enum as "
    "its values), or attrs classes or dataclasses told apart by a required field or a Literal "
    "field of their own"
)


class _Mismatch(TypeError):
    """A value of the wrong JSON type for its field (its message says what was expected)."""


def _only(kind: type[Any], accepts: tuple[type[Any], ...], what: str) -> StructureHook:
    """A hook taking only values of ``accepts`` (a bool only for a bool), never converting
    one: cattrs' own would store ``int(1.9)`` or ``str([1])``. An int for a float becomes
    the float it stands for (JSON doesn't tell 3 from 3.0)."""

    def hook(value: Any, cls: Any) -> Any:
        if value.__class__ is cls:  # the common case, first: this runs per field per job
            return value
        if not isinstance(value, accepts) or (isinstance(value, bool) and kind is not bool):
            raise _Mismatch(f"expected {what}, got {_kind(value)}")
        if cls is not kind:
            return cls(value)  # a subclass: an enum of str or int values
        if kind is not float:
            return value  # a str or int subclass (an enum's member) kept as it is
        try:
            return float(value)
        except OverflowError:
            raise _Mismatch(f"expected {what}, got an int too large for it") from None

    return hook


_LISTS: Final = frozenset({list, collections.abc.Sequence, collections.abc.MutableSequence})
"""The containers cattrs structures as lists."""

_BUILDING = threading.local()
"""The types whose hook this thread is building, left to cattrs' own factories."""


def _refused(kind: Any) -> tuple[type[Any], ...]:
    """What cattrs' own hook for ``kind`` would wrongly take: a str or an object iterated into
    a list, tuple or set (``"abc"`` as ``["a", "b", "c"]``, an object as its keys); a bool
    passed through as a member of a union with int (as it is an int subclass)."""
    if is_sequence(kind) or is_any_set(kind) or typing.get_origin(kind) is tuple:
        return (str, bytes, Mapping)
    if typing.get_origin(kind) not in _UNIONS:
        return ()
    members = typing.get_args(kind)
    if len(members) == 2 and type(None) in members:  # Optional: the member's own hook checks
        return ()
    if int not in members or bool in members or any(_literal_bool(m) for m in members):
        return ()
    return (bool,)


def _literal_bool(kind: Any) -> bool:
    return typing.get_origin(kind) is typing.Literal and bool in map(type, typing.get_args(kind))


def _refusing(kind: Any) -> bool:
    return bool(_refused(kind)) and kind not in vars(_BUILDING).get("kinds", ())


def _checked(kind: Any, converter: cattrs.Converter) -> StructureHook:
    """cattrs' own hook for ``kind``, first refusing what it would wrongly take."""
    if typing.get_origin(kind) in _LISTS:
        # cattrs' list factory itself: its elements' hooks are then looked up as usual, so a
        # recursive class's own list field gets this check too (the dispatch below would
        # hand it, while building, the unchecked hook).
        base = list_structure_factory(kind, converter)
    else:
        building: set[Any] = vars(_BUILDING).setdefault("kinds", set())
        building.add(kind)  # so the converter hands out the hook it would without this factory
        try:
            base = converter.get_structure_hook(kind, cache_result=False)
        finally:
            building.discard(kind)
    refused = _refused(kind)
    what = "a list" if Mapping in refused else _name(kind)

    def hook(value: Any, cls: Any) -> Any:
        if isinstance(value, refused):
            raise _Mismatch(f"expected {what}, got {_kind(value)}")
        return base(value, cls)

    return hook


def _converter(*, forbid_extra: bool) -> JsonConverter:
    converter = make_converter(forbid_extra_keys=forbid_extra)
    converter.register_structure_hook(int, _only(int, (int,), "int"))
    converter.register_structure_hook(float, _only(float, (int, float), "float"))
    converter.register_structure_hook(str, _only(str, (str,), "str"))
    converter.register_structure_hook(bool, _only(bool, (bool,), "bool"))
    converter.register_structure_hook_factory(_refusing, _checked)
    return converter


_STRICT: Final = _converter(forbid_extra=True)
_LENIENT: Final = _converter(forbid_extra=False)


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
    """``value`` (a ``cls`` instance, or a mapping of its fields) as JSON-ready data, checked
    as ``structure`` checks JSON: a ``ValueError`` names every bad field."""
    if isinstance(value, cls):  # built in code, unchecked: its data must read back
        data = _dump(value, cls, field)
        structure(data, cls, field)
        return data
    if not isinstance(value, Mapping):
        raise TypeError(
            f"expected {field} to be an instance of {cls.__qualname__} or a mapping of its "
            f"fields, got {_kind(value)}"
        )
    instance = structure(value, cls, field, forbid_extra=forbid_extra)
    return _STRICT.unstructure(instance, unstructure_as=cls)


def _dump(value: Any, cls: type[Any], field: str) -> Any:
    try:
        return _STRICT.unstructure(value, unstructure_as=cls)
    except Exception as exc:  # a field holds a value its type's hook can't read
        bad = _bad_fields(value, cls, field) or [_format(exc, None)]
        raise ValueError(f"invalid {field} for {cls.__qualname__}: {'; '.join(bad)}") from None


def _bad_fields(value: Any, cls: type[Any], where: str) -> list[str]:
    """The fields of the instance ``value`` that can't be written, down into nested ones."""
    bad: list[str] = []
    for name, kind in _field_types(cls):
        part = getattr(value, name)
        if _dumps(part, kind):
            continue
        if isinstance(kind, type) and _is_class(kind) and isinstance(part, kind):
            bad += _bad_fields(part, kind, f"{where}.{name}") or [f"invalid @ {where}.{name}"]
        else:
            bad.append(f"expected {_describe(kind)}, got {_kind(part)} @ {where}.{name}")
    return bad


def _dumps(value: Any, kind: Any) -> bool:
    try:
        _STRICT.unstructure(value, unstructure_as=kind)
    except Exception:
        return False
    return True


def _advice(where: str, kind: Any) -> str:
    if _is_mapping(typing.get_origin(kind)):
        return (
            f"{where} is a {kind!r}, whose keys JSON would turn into text; use str keys (or a "
            "Literal or enum of str values) and convert them in your code"
        )
    if typing.get_origin(kind) in _UNIONS:
        return (
            f"{where} is {_name(kind)}, a union whose members trioban can't tell apart in JSON; "
            f"{UNIONS} (e.g. use one type and convert it in your code)"
        )
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
    if _is_mapping(origin) and args and not _text_keys(args[0]):
        return (where, kind)  # JSON keys are text: an int key comes back a str
    found = _first([(where, arg) for arg in args], seen, containers)
    if found is None and origin in _UNIONS and not containers and not _told_apart(kind):
        return (where, kind)
    if found is not None or origin in _COMBINATIONS or (origin is not None and not containers):
        return found
    return None if _handled(kind) else (where, kind)


def _is_mapping(origin: Any) -> bool:
    return isinstance(origin, type) and issubclass(origin, Mapping)


def _text_keys(kind: Any) -> bool:
    """Whether mapping keys of ``kind`` survive JSON, whose object keys are text: a str, or a
    Literal or enum of str values."""
    while hasattr(kind, "__supertype__") or typing.get_origin(kind) is typing.Annotated:
        kind = getattr(kind, "__supertype__", None) or typing.get_args(kind)[0]  # NewType
    if kind is Any or (isinstance(kind, type) and issubclass(kind, str)):
        return True
    if typing.get_origin(kind) is typing.Literal:
        return all(isinstance(value, str) for value in typing.get_args(kind))
    return isinstance(kind, type) and issubclass(kind, enum.Enum) and _sent_as(kind) == {str}


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


def _told_apart(union: Any) -> bool:
    """Whether the converter can tell ``union``'s members apart in JSON: it passes str, int,
    float, bool and None through by class, so a ``date | str`` would read a date as a str."""
    members = typing.get_args(union)
    if any(isinstance(member, str | typing.ForwardRef) for member in members):
        return True  # unresolved annotations: can't tell yet
    plain = _PLAIN.intersection(members)
    others = [m for m in members if m not in plain and typing.get_origin(m) is not typing.Literal]
    if any(_sent_as(member) & plain for member in others):
        return False
    # The converter builds the hook for the members it doesn't pass through (a P | Q of
    # classes it can't tell apart) only once a value needs it: build it now.
    rest = [union] if len(others) < 2 else [union, typing.Union[tuple(others)]]  # noqa: UP007
    return all(
        _handled(part, failing=(cattrs.StructureHandlerNotFoundError, TypeError)) for part in rest
    )


def _sent_as(kind: Any) -> set[Any]:
    """The JSON values ``kind`` is sent as, among those a union passes through."""
    if not isinstance(kind, type):
        return set()
    if issubclass(kind, enum.Enum):
        sent = {type(member.value) for member in kind}
    else:
        sent = {str} if issubclass(kind, _TEXT) else set()
    return (sent | {float}) if int in sent else sent  # a float passes an int through


def _handled(
    kind: Any, *, failing: tuple[type[Exception], ...] = (cattrs.StructureHandlerNotFoundError,)
) -> bool:
    try:
        hook = _STRICT.get_structure_hook(kind)
    except failing:
        return False
    except Exception:  # not a type the converter would look up on its own
        return True
    return hook is not raise_error  # older cattrs hand out this fallback instead of raising


def _explain(exc: BaseException, field: str) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc, path=field, format_exception=_format))
    return _format(exc, None)


def _format(exc: BaseException, kind: Any) -> str:
    """A message naming what was expected, never the value (args may be secret): cattrs'
    own quotes the error, value and all, where it has no words of its own."""
    if isinstance(exc, _Mismatch):
        return str(exc)
    if typing.get_origin(kind) is typing.Literal:
        return f"expected one of {list(typing.get_args(kind))!r}"
    text = format_exception(exc, kind)
    if text.startswith(("unknown error", "invalid type (")):
        expected = "" if kind is None else f", expected {_describe(kind)}"
        return f"invalid value ({type(exc).__name__}){expected}"
    return text


_KEY_IN_PATH: Final = re.compile(r"\[(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\]")
_EXTRA_KEYS: Final = re.compile(r"extra fields found \([^)]*\)")


def without_keys(message: str) -> str:
    """``message`` (a ``structure`` error) without the data's keys: those in the paths of a
    dict field's values, and the extra keys it names."""
    return _EXTRA_KEYS.sub("extra fields found", _KEY_IN_PATH.sub("[...]", message))


def _kind(value: Any) -> str:
    """The type of ``value``, never the value: args may be secret (encrypted)."""
    return type(value).__qualname__


def _name(kind: Any) -> str:
    return " | ".join(map(_describe, typing.get_args(kind)))


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) in _UNIONS:
        return _name(kind)
    plain = isinstance(kind, type) and typing.get_origin(kind) is None  # not a list[int]
    return kind.__qualname__ if plain else repr(kind)
