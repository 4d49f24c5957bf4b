from __future__ import annotations

import pytest

from sharedlvm import errors, tags, units


@pytest.mark.parametrize("text, expected", [
    ("4096", 4096), ("10G", 10 * units.GiB), ("10GiB", 10 * units.GiB), ("10gb", 10 * units.GiB),
    ("512M", 512 * units.MiB), ("1.5G", 3 * units.GiB // 2), ("1T", units.TiB), ("1k", 1024),
    ("7b", 7),
])
def test_parse_size(text: str, expected: int) -> None:
    assert units.parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "0G", "-1G", "", "G", "10X", "1.3", "ten", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        units.parse_size(text)


def test_parse_resize() -> None:
    assert units.parse_resize("+2G", units.GiB) == 3 * units.GiB
    assert units.parse_resize("12G", units.GiB) == 12 * units.GiB
    with pytest.raises(errors.InvalidArgument, match="only grow"):
        units.parse_resize("-1G", units.GiB)


def test_format_size() -> None:
    assert units.format_size(10 * units.GiB) == "10.0 GiB"
    assert units.format_size(100) == "100 B"


@pytest.mark.parametrize("value", ["plain", "a b&c", "héllo wörld", "100%", "=,;\"'", "&41", ""])
def test_tag_value_roundtrip(value: str) -> None:
    tag = tags.make_user_tag("k", value)
    assert len(tag) <= tags.MAX_TAG_LENGTH
    assert all(c.isalnum() or c in "_+.-/=!:&#" for c in tag), tag
    assert tags.parse_tags([tag]) == ({}, {"k": value})


def test_tag_too_long_is_an_error_not_truncated() -> None:
    with pytest.raises(errors.InvalidArgument, match="too long"):
        tags.make_user_tag("k", "é" * 30)


def test_parse_tags_splits_metadata_user_and_foreign() -> None:
    meta, user = tags.parse_tags(["sl.image=abc", "sl.user.vm=web", "foreign", "sl.bad"])
    assert meta == {"image": "abc"} and user == {"vm": "web"}


@pytest.mark.parametrize("text", ["novalue", "bad key=v", "=v", "k" * 65 + "=v"])
def test_parse_user_tag_rejects(text: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        tags.parse_user_tag(text)
