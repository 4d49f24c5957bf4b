"""Binary size units and the human form of a size; depends on nothing (errors.py
formats the sizes in its messages with it)."""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
PiB = 1024 * TiB


def format_size(size: int) -> str:
    """Human size: ``10.0 GiB``; exact bytes when under 1 KiB."""
    for unit, factor in (("PiB", PiB), ("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"
