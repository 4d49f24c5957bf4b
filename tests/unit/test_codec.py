"""codec: typed values to wire data and back, the checks on what comes in."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

import pytest

from sharedlvm import codec, errors


class Color(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Inner:
    n: int
    color: Color = Color.RED


@dataclass(frozen=True)
class Outer:
    name: str
    inners: list[Inner]
    pair: tuple[int, ...] = ()
    maybe: Inner | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ratio: float = 0.5
    flag: bool = False


VALUE = Outer("x", [Inner(1), Inner(2, Color.BLUE)], (3, 4), Inner(5), {"a": "b"}, 2.0, True)


def test_round_trip_through_json() -> None:
    wire = json.loads(json.dumps(codec.to_wire(VALUE)))
    assert wire["inners"][1] == {"n": 2, "color": "blue"} and wire["pair"] == [3, 4]
    assert codec.from_wire(Outer, wire) == VALUE
    # ints are accepted where a float is expected, and come back as floats
    back = codec.from_wire(Outer, {**wire, "ratio": 1})
    assert back.ratio == 1.0 and isinstance(back.ratio, float)


@pytest.mark.parametrize(("change", "message"), [
    ({"name": 3}, "name must be a string"),
    ({"inners": {}}, "inners must be a list"),
    ({"inners": [{"n": "1"}]}, "n must be an integer"),
    ({"inners": [{"n": True}]}, "n must be an integer"),
    ({"inners": [{"n": 1, "color": "green"}]}, "invalid color 'green': use red, blue"),
    ({"inners": [{"n": 1, "color": ["red"]}]}, "invalid color ['red']: use red, blue"),
    ({"inners": [{}]}, "n is required"),
    ({"maybe": 7}, "maybe must be an object"),
    ({"labels": []}, "labels must be an object"),
    ({"labels": {"a": 1}}, "labels must be a string"),
    ({"ratio": "1"}, "ratio must be a number"),
    ({"flag": 1}, "flag must be true or false"),
    ({"extra": 1, "other": 2}, "unknown field(s) extra, other"),
])
def test_bad_input_names_the_field(change: dict[str, object], message: str) -> None:
    wire = {**codec.to_wire(VALUE), **change}
    with pytest.raises(errors.InvalidArgument) as info:
        codec.from_wire(Outer, wire)
    assert str(info.value) == message


def test_optional_and_defaults() -> None:
    assert codec.from_wire(Outer, {"name": "y", "inners": [], "maybe": None}) == Outer("y", [])
    assert codec.from_wire(Inner | None, None) is None
    with pytest.raises(errors.InvalidArgument, match="value must be an object"):
        codec.from_wire(Inner, "no")
