"""Sizes: parsing what people type, and printing what people read.

Everything inside sharedlvm is in bytes. Units are binary (K = KiB = 1024), as in LVM
and qemu-img; a size of 0, a negative size or garbage is an :class:`InvalidArgument`.
"""

from __future__ import annotations

import re

from .errors import InvalidArgument
from .sizes import GiB, KiB, MiB, PiB, TiB, format_size

__all__ = ["MAX_SIZE", "GiB", "KiB", "MiB", "PiB", "TiB", "format_size", "parse_resize",
           "parse_size", "round_up"]

_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB, "p": PiB}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtpb]?)(?:i?b)?\s*$", re.IGNORECASE)


# The largest size sharedlvm accepts: LVM's own limit for an LV is 8 EiB.
MAX_SIZE = 8 * 1024 * PiB


def parse_size(text: str) -> int:
    """Parse ``10G``, ``10GiB``, ``512M``, ``1.5G``, ``4096`` into bytes (> 0)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidArgument(f"invalid size {text!r}: use bytes or a binary unit, e.g. 10G")
    number, unit = m.groups()
    value = float(number) * _UNITS[unit.lower()]
    if not value <= MAX_SIZE:  # also inf and nan
        raise InvalidArgument(f"invalid size {text!r}: larger than 8 EiB")
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
    target = current + parse_size(stripped[1:]) if stripped.startswith("+") \
        else parse_size(stripped)
    if target > MAX_SIZE:
        raise InvalidArgument(f"invalid size {text!r}: the volume would exceed 8 EiB")
    return target


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step
