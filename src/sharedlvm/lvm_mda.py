"""A VG's name and sequence number, read from a PV's metadata area without running LVM.

The manager checks a VG's sequence number before and after each of its metadata
commands (docs/design.md rule 2). Asking LVM (``vgs``) is a command that scans the
PVs and parses the whole VG's metadata: at 500 volumes it costs about as much as the
``lvcreate`` it guards, twice per write. The committed sequence number is also in the
first lines of the metadata text on the PV, which one O_DIRECT read reaches.

What is read (LVM2's text format, as written by lvm2 2.02 and 2.03; learned from
lib/format_text/layout.h and format-text.c, not copied): a PV made by ``pvcreate
--metadatacopies 1`` has its metadata area 4 KiB into the device, starting with a
512-byte header: checksum (u32), magic (16 bytes), version (u32), area start (u64),
area size (u64), then "raw locations" (offset u64, size u64, checksum u32, flags u32)
of which the first is the committed metadata text, at ``start + offset`` and
circular after the header. The text begins ``<vg name> {\\nid = "..."\\nseqno = N``.

A reading that does not look like that returns None, and the caller asks LVM. The
value read is advisory: the caller confirms with LVM before acting on a mismatch
(a header read between LVM's text write and its header commit is old, never torn
into something else).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from . import errors, ondisk

MDA_OFFSET = 4096  # the first metadata area, after the label sector(s)
MDA_HEADER_SIZE = 512
MAGIC = b" LVM2 x[5A%r0N*>"
_HEADER = struct.Struct("<I16sIQQ")
_LOCN = struct.Struct("<QQII")
_HEAD_RE = re.compile(rb'^([A-Za-z0-9_+.-]+) \{\nid = "[^"\n]*"\nseqno = (\d+)\n')
_TEXT_HEAD = 512  # enough for the VG name (at most 128 characters), id and seqno


@dataclass(frozen=True)
class MdaHead:
    vg_name: str
    seqno: int


def read_head(pv: str) -> MdaHead | None:
    """The VG name and committed seqno in ``pv``'s first metadata area, or None when
    the area does not hold what LVM2's text format writes there (no PV, no VG yet,
    an unknown layout)."""
    try:
        with ondisk.BlockFile(pv) as dev:
            header = dev.read(MDA_OFFSET, ondisk.BLOCK_SIZE)[:MDA_HEADER_SIZE]
            _, magic, version, start, size = _HEADER.unpack_from(header)
            if magic != MAGIC or version != 1 or start != MDA_OFFSET or size <= MDA_HEADER_SIZE:
                return None
            offset, text_size, _, flags = _LOCN.unpack_from(header, _HEADER.size)
            if text_size == 0 or offset < MDA_HEADER_SIZE or offset >= size or flags:
                return None
            text = _read_circular(dev, start, size, offset, min(text_size, _TEXT_HEAD))
    except (errors.StorageIOError, errors.CorruptRecord, OSError):
        return None
    m = _HEAD_RE.match(text)
    if m is None:
        return None
    return MdaHead(m.group(1).decode(), int(m.group(2)))


def _read_circular(dev: ondisk.BlockFile, start: int, size: int, offset: int,
                   length: int) -> bytes:
    """``length`` bytes of the circular text area from ``offset`` (relative to the
    area's start), wrapping to just after the header."""
    first = min(length, size - offset)
    data = _read_span(dev, start + offset, first)
    if first < length:
        data += _read_span(dev, start + MDA_HEADER_SIZE, length - first)
    return data


def _read_span(dev: ondisk.BlockFile, at: int, length: int) -> bytes:
    block = ondisk.BLOCK_SIZE
    lo = at - at % block
    hi = -(-(at + length) // block) * block
    return dev.read(lo, hi - lo)[at - lo:at - lo + length]
