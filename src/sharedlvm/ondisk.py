"""Checksummed fixed-size records on shared block devices, read and written with O_DIRECT.

Every record is one 4 KiB block: a whole number of sectors on both 512 B and 4 KiB
LUNs, so a record write never shares a sector with another record and the storage
never has to read-modify-write. Writes are O_DIRECT | O_DSYNC: acknowledged means on
the LUN, not in this host's page cache (docs/design.md rule 5), and reads are O_DIRECT so
a host never sees a stale cached copy of what another host wrote (rule 4).

Layout of a block::

    magic (8) | format version (u32) | payload length (u32) | sequence (u64)
    | sha256 of everything else (32) | payload (JSON, UTF-8) | zero padding

A block whose magic is unknown is "empty"; a block with the right magic and a wrong
checksum is corrupt (torn write, bit rot, a foreign writer) and is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import CorruptRecord, InvalidArgument, StorageIOError

BLOCK_SIZE = 4096
FORMAT_VERSION = 1

_HEADER = struct.Struct(">8sIIQ")
_DIGEST_SIZE = 32
_PAYLOAD_OFFSET = _HEADER.size + _DIGEST_SIZE
MAX_PAYLOAD = BLOCK_SIZE - _PAYLOAD_OFFSET


@dataclass(frozen=True)
class Record:
    magic: bytes
    seq: int
    payload: dict[str, Any]


def encode(magic: bytes, seq: int, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    if len(body) > MAX_PAYLOAD:
        raise InvalidArgument(f"record too large: {len(body)} > {MAX_PAYLOAD} bytes")
    header = _HEADER.pack(magic, FORMAT_VERSION, len(body), seq)
    digest = hashlib.sha256(header + body).digest()
    return (header + digest + body).ljust(BLOCK_SIZE, b"\0")


def decode(block: bytes, magic: bytes) -> Record | None:
    """The record in ``block``, None if the block does not hold one of ``magic``.

    Raises CorruptRecord when the magic matches but the record does not verify.
    """
    found, version, length, seq = _HEADER.unpack_from(block)
    if found != magic:
        return None
    if version != FORMAT_VERSION:
        raise CorruptRecord(f"record format version {version} is not supported "
                            f"(this sharedlvm knows version {FORMAT_VERSION})")
    if length > MAX_PAYLOAD:
        raise CorruptRecord("record length out of range")
    digest = block[_HEADER.size:_PAYLOAD_OFFSET]
    body = block[_PAYLOAD_OFFSET:_PAYLOAD_OFFSET + length]
    if hashlib.sha256(block[:_HEADER.size] + body).digest() != digest:
        raise CorruptRecord("record checksum mismatch")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # nested 2,000 deep fits in 4 KiB
        raise CorruptRecord(f"record payload is not JSON: {exc!r}") from None
    if not isinstance(payload, dict):
        raise CorruptRecord("record payload is not an object")
    return Record(magic, seq, payload)


class BlockFile:
    """Aligned O_DIRECT reads and writes of whole blocks on one device."""

    def __init__(self, path: str, writable: bool = False, base: int = 0) -> None:
        """``base``: where the area starts on the device (an LV read through its PV);
        offsets given to read and write are relative to it."""
        _check_aligned(base, BLOCK_SIZE)
        flags = os.O_DIRECT | (os.O_RDWR | os.O_DSYNC if writable else os.O_RDONLY)
        self.path = path
        self.base = base
        self.fd = -1
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise StorageIOError(f"cannot open {path}: {exc.strerror}") from exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BlockFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, offset: int, size: int) -> bytes:
        _check_aligned(offset, size)
        buf = mmap.mmap(-1, size)  # page aligned, as O_DIRECT requires
        try:
            done = _io(self.path, os.preadv, self.fd, [buf], self.base + offset)
            if done != size:
                raise CorruptRecord(f"short read at {offset} of {self.path}: {done} of {size}")
            return bytes(buf)
        finally:
            buf.close()

    def read_sector(self, offset: int, sector_size: int) -> bytes:
        """One logical sector (512 B or 4 KiB), for cheap header reads."""
        if offset % sector_size or sector_size not in (512, 4096):
            raise ValueError(f"unaligned sector read: offset={offset} size={sector_size}")
        buf = mmap.mmap(-1, BLOCK_SIZE)
        try:
            done = _io(self.path, os.preadv, self.fd, [memoryview(buf)[:sector_size]],
                       self.base + offset)
            if done != sector_size:
                raise CorruptRecord(f"short read at {offset} of {self.path}")
            return bytes(buf[:sector_size])
        finally:
            buf.close()

    def write(self, offset: int, data: bytes) -> None:
        _check_aligned(offset, len(data))
        buf = mmap.mmap(-1, len(data))
        try:
            buf.write(data)
            done = _io(self.path, os.pwritev, self.fd, [buf], self.base + offset)
            if done != len(data):
                raise StorageIOError(f"short write at {offset} of {self.path}: {done} of "
                                     f"{len(data)}")
        finally:
            buf.close()


def _io(path: str, call: Callable[..., int], *args: Any) -> int:
    """One read or write; an I/O error is the project's StorageIOError."""
    try:
        return call(*args)
    except OSError as exc:
        raise StorageIOError(f"I/O error on {path}: {exc.strerror}") from exc


def peek_seq(head: bytes, magic: bytes) -> int | None:
    """The sequence number in a record's header, unverified (a hint)."""
    found, _version, _length, seq = _HEADER.unpack_from(head)
    return int(seq) if found == magic else None


def _check_aligned(offset: int, size: int) -> None:
    if offset % BLOCK_SIZE or size % BLOCK_SIZE or size <= 0:
        raise ValueError(f"unaligned block I/O: offset={offset} size={size}")
