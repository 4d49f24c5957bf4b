"""Volume metadata in LV tags.

One LVM commit writes an LV and all its tags, so a volume and its metadata appear (or
vanish) together. Tags are ``sl.<key>=<value>``; user tags are ``sl.user.<key>=<value>``.

LVM limits a tag to 128 characters from ``[A-Za-z0-9_+.\\-/=!:&#]``. Values are encoded
so that anything round-trips: characters outside a safe set become ``&XX`` (hex of
each UTF-8 byte). A tag that would still be too long is an error, never truncated.
"""

from __future__ import annotations

import re
import string

from .errors import InvalidArgument

PREFIX = "sl."
USER_PREFIX = "sl.user."
MAX_TAG_LENGTH = 128

# Characters stored as themselves. '&' is the escape character and so is escaped.
_SAFE = set(string.ascii_letters + string.digits + "_+.-/:")
_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def encode_value(value: str) -> str:
    out = []
    for ch in value:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"&{b:02X}" for b in ch.encode())
    return "".join(out)


def decode_value(text: str) -> str:
    data = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "&" and _is_hex(text[i + 1:i + 3]):
            data.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            data.extend(text[i].encode())
            i += 1
    return data.decode(errors="replace")


def _is_hex(text: str) -> bool:
    return len(text) == 2 and all(c in string.hexdigits for c in text)


def make_tag(key: str, value: str) -> str:
    tag = f"{PREFIX}{key}={encode_value(value)}"
    if len(tag) > MAX_TAG_LENGTH:
        raise InvalidArgument(
            f"tag {key!r} is too long once encoded ({len(tag)} > {MAX_TAG_LENGTH} characters)")
    return tag


def make_user_tag(key: str, value: str) -> str:
    check_user_key(key)
    return make_tag(f"user.{key}", value)


def check_user_key(key: str) -> None:
    if not _KEY_RE.match(key):
        raise InvalidArgument(
            f"invalid tag key {key!r}: use 1-64 characters of letters, digits, '_', '.', '-'")


def parse_user_tag(text: str) -> tuple[str, str]:
    """Parse ``key=value`` from the command line."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidArgument(f"invalid tag {text!r}: use key=value")
    check_user_key(key)
    return key, value


def parse_tags(tags: tuple[str, ...] | list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Split LV tags into (sharedlvm metadata, user tags). Foreign tags are ignored."""
    meta: dict[str, str] = {}
    user: dict[str, str] = {}
    for tag in tags:
        if not tag.startswith(PREFIX):
            continue
        key, sep, value = tag[len(PREFIX):].partition("=")
        if not sep:
            continue
        if key.startswith("user."):
            user[key[len("user."):]] = decode_value(value)
        else:
            meta[key] = decode_value(value)
    return meta, user
