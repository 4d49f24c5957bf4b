"""Sizes: parsing what people type, and printing what people read.

Everything inside sharedlvm is in bytes. Units are binary (K = KiB = 1024), as in LVM
and qemu-img; a size of 0, a negative size or garbage is an :class:`InvalidArgument`.
"""

from __future__ import annotations

import re

from .errors import InvalidArgument

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
PiB = 1024 * TiB

_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB, "p": PiB}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtpb]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``10G``, ``10GiB``, ``512M``, ``1.5G``, ``4096`` into bytes (> 0)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidArgument(f"invalid size {text!r}: use bytes or a binary unit, e.g. 10G")
    number, unit = m.groups()
    value = float(number) * _UNITS[unit.lower()]
    if value != int(value):
        raise InvalidArgument(f"invalid size {text!r}: not a whole number of bytes")
    size = int(value)
    if size <= 0:
        raise InvalidArgument(f"invalid size {text!r}: must be larger than 0")
    return size


def parse_resize(text: str, current: int) -> int:
    """Parse an extend target: ``+2G`` (relative to ``current``) or ``12G`` (absolute)."""
    stripped = text.strip()
    if stripped.startswith("-"):
        raise InvalidArgument(f"invalid size {text!r}: volumes can only grow")
    if stripped.startswith("+"):
        return current + parse_size(stripped[1:])
    return parse_size(stripped)


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def format_size(size: int) -> str:
    """Human size: ``10.0 GiB``; exact bytes when under 1 KiB."""
    for unit, factor in (("PiB", PiB), ("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"
