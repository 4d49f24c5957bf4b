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
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_wire(v) for k, v in value.items()}
    return value


def from_wire(tp: Any, data: Any, where: str = "value") -> Any:
    """``data`` (JSON values) as an instance of ``tp``; InvalidArgument if it is not."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if data is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        if len(inner) == 1:
            return from_wire(inner[0], data, where)
        raise TypeError(f"unsupported union {tp}")  # a programming error, not input
    if tp is Any:
        return data
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _dataclass_from_wire(tp, data, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            choices = ", ".join(str(m.value) for m in tp)
            raise InvalidArgument(f"invalid {where} {data!r}: use {choices}") from None
    if origin in (list, tuple):
        if not isinstance(data, list | tuple):
            raise InvalidArgument(f"{where} must be a list")
        args = get_args(tp)
        item = args[0] if args else Any
        items = [from_wire(item, v, where) for v in data]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(data, dict):
            raise InvalidArgument(f"{where} must be an object")
        _, value_type = get_args(tp)
        return {str(k): from_wire(value_type, v, where) for k, v in data.items()}
    if tp is bool:
        if not isinstance(data, bool):
            raise InvalidArgument(f"{where} must be true or false")
        return data
    if tp is int:
        if not isinstance(data, int) or isinstance(data, bool):
            raise InvalidArgument(f"{where} must be an integer")
        return data
    if tp is float:
        if not isinstance(data, int | float) or isinstance(data, bool):
            raise InvalidArgument(f"{where} must be a number")
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise InvalidArgument(f"{where} must be a string")
        return data
    if tp is type(None):
        if data is not None:
            raise InvalidArgument(f"{where} must be null")
        return None
    raise TypeError(f"unsupported type {tp}")


def _dataclass_from_wire(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where} must be an object")
    types_ = hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InvalidArgument(f"unknown field(s) {', '.join(map(str, unknown))}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and \
                    f.default_factory is dataclasses.MISSING:
                raise InvalidArgument(f"{name} is required")
            continue
        decode = f.metadata.get("decode")
        raw = decode(data[name]) if decode and data[name] is not None else data[name]
        values[name] = from_wire(types_[name], raw, name)
    return cls(**values)


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
