"""Dataclasses to JSON values and back, driven by their type annotations.

The one place where typed requests and results become wire data (the daemon's
socket, the storage mailbox, the journal, HTTP) and where wire data is checked
against the type it claims to be. Supported: ``str``, ``int``, ``float``, ``bool``,
``None``, ``StrEnum``, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``
and nested dataclasses. A value of the wrong type is an :class:`InvalidArgument`
naming the field, never a ``KeyError`` or ``TypeError`` further down.

The same annotations give the JSON schema of each type (:func:`schema`), from which
the HTTP API's OpenAPI document is built.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, Union, get_args, get_origin

from .errors import InvalidArgument

T = TypeVar("T")


_HINTS: dict[Any, dict[str, Any]] = {}


def hints(cls: Any) -> dict[str, Any]:
    """The resolved annotations of a dataclass (cached: the types never change)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def to_wire(value: Any) -> Any:
    kind = type(value)
    encode = _ENCODERS.get(kind)
    if encode is None:
        encode = _ENCODERS[kind] = _make_encoder(kind)
    return encode(value)


# An encoder per Python type met, so a value's kind is worked out once per type.
_ENCODERS: dict[type, Callable[[Any], Any]] = {
    kind: lambda value: value for kind in (str, int, float, bool, type(None))}


def _make_encoder(kind: type) -> Callable[[Any], Any]:
    if dataclasses.is_dataclass(kind):
        names = tuple(f.name for f in dataclasses.fields(kind))
        return lambda value: {name: to_wire(getattr(value, name)) for name in names}
    if issubclass(kind, enum.Enum):
        return lambda value: value.value
    if issubclass(kind, list | tuple):
        return lambda value: [to_wire(v) for v in value]
    if issubclass(kind, dict):
        return lambda value: {str(k): to_wire(v) for k, v in value.items()}
    return lambda value: value


# A decoder per type, made once from its annotations (a list of 10,000 volumes is
# decoded without asking typing about each value).
Decoder = Callable[[Any, str], Any]
_DECODERS: dict[Any, Decoder] = {}


def from_wire(tp: Any, data: Any, where: str = "value") -> Any:
    """``data`` (JSON values) as an instance of ``tp``; InvalidArgument if it is not."""
    return _decoder(tp)(data, where)


def _decoder(tp: Any) -> Decoder:
    decode = _DECODERS.get(tp)
    if decode is None:
        decode = _DECODERS[tp] = _make_decoder(tp)
    return decode


def _make_decoder(tp: Any) -> Decoder:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        inner = [o for o in options if o is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported union {tp}")  # a programming error, not input
        if type(None) not in options:
            return _decoder(inner[0])
        one = inner[0]
        return lambda data, where: None if data is None else _decoder(one)(data, where)
    if tp is Any:
        return lambda data, where: data
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _dataclass_decoder(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        members = {m.value: m for m in tp}
        choices = ", ".join(str(m.value) for m in tp)

        def enum_value(data: Any, where: str) -> Any:
            try:
                return members[data]
            except (KeyError, TypeError):
                raise InvalidArgument(f"invalid {where} {data!r}: use {choices}") from None
        return enum_value
    if origin in (list, tuple):
        args = get_args(tp)
        item = args[0] if args else Any
        as_tuple = origin is tuple

        def sequence(data: Any, where: str) -> Any:
            if not isinstance(data, list | tuple):
                raise InvalidArgument(f"{where} must be a list")
            decode = _decoder(item)
            items = [decode(v, where) for v in data]
            return tuple(items) if as_tuple else items
        return sequence
    if origin is dict:
        _, value_type = get_args(tp)

        def mapping(data: Any, where: str) -> Any:
            if not isinstance(data, dict):
                raise InvalidArgument(f"{where} must be an object")
            decode = _decoder(value_type)
            return {str(k): decode(v, where) for k, v in data.items()}
        return mapping
    if tp is bool:
        return _checked(lambda d: isinstance(d, bool), "must be true or false")
    if tp is int:
        return _checked(lambda d: isinstance(d, int) and not isinstance(d, bool),
                        "must be an integer")
    if tp is float:
        number = _checked(lambda d: isinstance(d, int | float) and not isinstance(d, bool),
                          "must be a number")
        return lambda data, where: float(number(data, where))
    if tp is str:
        return _checked(lambda d: isinstance(d, str), "must be a string")
    if tp is type(None):
        return _checked(lambda d: d is None, "must be null")
    raise TypeError(f"unsupported type {tp}")


def _checked(ok: Callable[[Any], bool], problem: str) -> Decoder:
    def check(data: Any, where: str) -> Any:
        if not ok(data):
            raise InvalidArgument(f"{where} {problem}")
        return data
    return check


def _dataclass_decoder(cls: type[T]) -> Decoder:
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = frozenset(f.name for f in fields)
    plan: list[tuple[str, bool, Any, Any]] | None = None  # made at first use

    def dataclass_value(data: Any, where: str) -> Any:
        nonlocal plan
        if not isinstance(data, dict):
            raise InvalidArgument(f"{where} must be an object")
        if plan is None:
            types_ = hints(cls)
            plan = [(f.name, f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING,
                     f.metadata.get("decode"), _decoder(types_[f.name])) for f in fields]
        if not names.issuperset(data):
            unknown = sorted(set(data) - names)
            raise InvalidArgument(f"unknown field(s) {', '.join(map(str, unknown))}")
        values: dict[str, Any] = {}
        for name, required, hook, decode in plan:
            if name not in data:
                if required:
                    raise InvalidArgument(f"{name} is required")
                continue
            raw = data[name]
            if hook and raw is not None:
                raw = hook(raw)
            values[name] = decode(raw, name)
        return cls(**values)
    return dataclass_value


def schema(tp: Any) -> dict[str, Any]:
    """JSON schema (OpenAPI 3.0 dialect) of a type this module can decode."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [o for o in get_args(tp) if o is not type(None)]
        return {**schema(inner[0]), "nullable": True}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        props: dict[str, Any] = {}
        required = []
        types_ = hints(tp)
        for f in dataclasses.fields(tp):
            prop = f.metadata.get("schema") or schema(types_[f.name])
            if f.metadata.get("help"):
                prop = {**prop, "description": f.metadata["help"]}
            props[f.name] = prop
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
        out: dict[str, Any] = {"type": "object", "properties": props,
                               "additionalProperties": False}
        if required:
            out["required"] = required
        return out
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"type": "string", "enum": [m.value for m in tp]}
    if origin in (list, tuple):
        args = get_args(tp)
        return {"type": "array", "items": schema(args[0]) if args else {}}
    if origin is dict:
        return {"type": "object", "additionalProperties": schema(get_args(tp)[1])}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    if tp is Any:
        return {}
    raise TypeError(f"unsupported type {tp}")
