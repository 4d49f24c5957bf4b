"""Volume metadata in LV tags: the encoding and the volume tag schema.

One LVM commit writes an LV and all its tags, so a volume and its metadata appear (or
vanish) together. Tags are ``sl.<key>=<value>``; user tags are ``sl.user.<key>=<value>``.

LVM limits a tag to 128 characters from ``[A-Za-z0-9_+.\\-/=!:&#]``. Values are encoded
so that anything round-trips: characters outside a safe set become ``&XX`` (hex of
each UTF-8 byte). A tag that would still be too long is an error, never truncated.
"""

from __future__ import annotations

import re
import string
from typing import TYPE_CHECKING, TypeVar

from .errors import InvalidArgument
from .model import Allocation, VolumeFormat, VolumeInfo, VolumeRole, VolumeState

if TYPE_CHECKING:
    from .lvm import LogicalVolume

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


# The volume tag schema (docs/design.md "On-disk layout"): the one place that knows which
# sl.* keys a volume carries and how they map to a VolumeInfo.

def volume_tags(*, image: str, parent: str | None, fmt: VolumeFormat, alloc: Allocation,
                generation: int, lease: int, state: VolumeState,
                capacity: int | None = None, user: dict[str, str] | None = None) -> list[str]:
    """Every tag of a volume, for the one lvcreate that publishes it. ``capacity``
    only for qcow2: a raw volume's capacity is its LV size (one source of truth). A
    new volume is a leaf: no role tag (every tag is parsed by every LVM command)."""
    out = [make_tag("image", image), make_tag("parent", parent or "none"),
           make_tag("format", fmt.value), make_tag("alloc", alloc.value),
           make_tag("gen", str(generation)), make_tag("lease", str(lease)), state_tag(state)]
    if capacity is not None:
        out.append(capacity_tag(capacity))
    out += [make_user_tag(k, v) for k, v in (user or {}).items()]
    return out


def state_tag(state: VolumeState) -> str:
    return make_tag("state", state.value)


def role_tag(role: VolumeRole) -> str | None:
    """The tag of a role; None for a leaf, which carries none."""
    return None if role == VolumeRole.LEAF else make_tag("role", role.value)


def parent_tag(parent: str) -> str:
    return make_tag("parent", parent)


def capacity_tag(capacity: int) -> str:
    return make_tag("capacity", str(capacity))


def is_volume(lv: LogicalVolume) -> bool:
    """A sharedlvm volume (not a special LV, not a foreign LV): it has an image."""
    return any(t.startswith(f"{PREFIX}image=") for t in lv.tags)


def lease_slot(lv_tags: tuple[str, ...] | list[str]) -> int | None:
    value = parse_tags(lv_tags)[0].get("lease", "")
    return int(value) if value.isdigit() else None


E = TypeVar("E", VolumeFormat, Allocation, VolumeState, VolumeRole)


def _known(cls: type[E], value: str | None) -> E:
    """The enum member, or UNKNOWN for a value this version does not know."""
    try:
        return cls(value or "")
    except ValueError:
        return cls("unknown")


def _number(value: str | None, default: int) -> int:
    return int(value) if value is not None and value.isdigit() else default


def volume_from_lv(lv: LogicalVolume) -> VolumeInfo:
    """Never raises for what the tags say: unknown values become UNKNOWN."""
    meta, user = parse_tags(lv.tags)
    parent = meta.get("parent", "none")
    return VolumeInfo(
        uuid=lv.name, domain=lv.vg_name, image=meta.get("image", ""),
        parent=None if parent == "none" else parent,
        format=_known(VolumeFormat, meta.get("format", "raw")),
        alloc=_known(Allocation, meta.get("alloc", "preallocated")),
        # qcow2 volumes carry their virtual size; the LV may be smaller (thin).
        capacity=_number(meta.get("capacity"), lv.size), size=lv.size,
        state=_known(VolumeState, meta.get("state")),
        generation=_number(meta.get("gen"), 0), tags=user, lease=lease_slot(lv.tags),
        segments=lv.segments, role=_known(VolumeRole, meta.get("role", "leaf")))
