"""The ``journal`` LV: the domain record and request records, written by the writer only.

Layout (offsets in the LV)::

    0        domain record, copy A   (4 KiB)
    4 KiB    domain record, copy B   (4 KiB)
    1 MiB    request records: REQUEST_BUCKETS buckets of BUCKET_SLOTS 4 KiB slots

The domain record is written as A then B; a reader takes the valid copy with the
highest sequence, so a write torn by a crash leaves the older copy readable.

Request records make a client's ``--request-id`` exactly-once: the writer stores the
intent (``pending``, with the arguments it resolved, e.g. the new volume's UUID or
the absolute extend target) before it changes LVM metadata and the result (``done``
or ``failed``) after. A repeated request finds its record in one bucket (one 32 KiB
read): ``done``/``failed`` returns the first answer, ``pending`` rolls the same
resolved operation forward, which is idempotent by construction.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from . import ondisk
from .errors import CorruptRecord, DomainNotFound
from .lvm import EXTENT_SIZE

DOMAIN_MAGIC = b"SLVMDOM1"
REQUEST_MAGIC = b"SLVMREQ1"

DOMAIN_COPIES = (0, ondisk.BLOCK_SIZE)
REQUESTS_OFFSET = 1024 * 1024
BUCKET_SLOTS = 8
REQUEST_BUCKETS = 1024  # 8,192 slots: 32 MiB; the journal LV is 64 MiB at least
BUCKET_SIZE = BUCKET_SLOTS * ondisk.BLOCK_SIZE


@dataclass
class DomainRecord:
    domain_uuid: str
    vg_name: str
    manager_host_id: int
    created: float
    io_timeout: int = 10
    manager_generation: int = 0
    extent_size: int = EXTENT_SIZE
    seq: int = 0

    def payload(self) -> dict[str, Any]:
        return {
            "domain_uuid": self.domain_uuid, "vg_name": self.vg_name,
            "manager_host_id": self.manager_host_id, "created": self.created,
            "io_timeout": self.io_timeout, "manager_generation": self.manager_generation,
            "extent_size": self.extent_size,
        }

    @classmethod
    def from_record(cls, rec: ondisk.Record) -> DomainRecord:
        p = rec.payload
        try:
            return cls(domain_uuid=p["domain_uuid"], vg_name=p["vg_name"],
                       manager_host_id=int(p["manager_host_id"]), created=float(p["created"]),
                       io_timeout=int(p["io_timeout"]),
                       manager_generation=int(p["manager_generation"]),
                       extent_size=int(p["extent_size"]), seq=rec.seq)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptRecord(f"domain record is missing {exc}") from exc


def write_domain_record(dev: ondisk.BlockFile, record: DomainRecord) -> None:
    record.seq += 1
    block = ondisk.encode(DOMAIN_MAGIC, record.seq, record.payload())
    for offset in DOMAIN_COPIES:
        dev.write(offset, block)


def read_domain_record(dev: ondisk.BlockFile) -> DomainRecord:
    """The newest valid copy. Raises CorruptRecord if no copy verifies."""
    found: list[ondisk.Record] = []
    problems: list[str] = []
    for offset in DOMAIN_COPIES:
        try:
            rec = ondisk.decode(dev.read(offset, ondisk.BLOCK_SIZE), DOMAIN_MAGIC)
        except CorruptRecord as exc:
            problems.append(str(exc))
            continue
        if rec is not None:
            found.append(rec)
    if not found:
        if problems:
            raise CorruptRecord(f"domain record on {dev.path} is corrupt: {problems[0]}")
        raise DomainNotFound(f"no sharedlvm domain record on {dev.path}")
    return DomainRecord.from_record(max(found, key=lambda r: r.seq))


@dataclass
class RequestRecord:
    request_id: str
    op: str
    state: str  # pending | done | failed
    args: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    time: float = field(default_factory=time.time)

    def payload(self) -> dict[str, Any]:
        return {"id": self.request_id, "op": self.op, "state": self.state, "args": self.args,
                "result": self.result, "error": self.error, "time": self.time}

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> RequestRecord:
        return cls(request_id=p["id"], op=p["op"], state=p["state"], args=p["args"],
                   result=p["result"], error=p.get("error", ""), time=p["time"])


def _bucket_offset(request_id: str) -> int:
    digest = hashlib.sha256(request_id.encode()).digest()
    bucket = int.from_bytes(digest[:4], "big") % REQUEST_BUCKETS
    return REQUESTS_OFFSET + bucket * BUCKET_SIZE


class RequestLog:
    """Request records in the journal; see the module docstring."""

    def __init__(self, dev: ondisk.BlockFile) -> None:
        self.dev = dev

    def _bucket(self, request_id: str) -> tuple[int, list[tuple[int, ondisk.Record | None]]]:
        base = _bucket_offset(request_id)
        data = self.dev.read(base, BUCKET_SIZE)
        slots: list[tuple[int, ondisk.Record | None]] = []
        for i in range(BUCKET_SLOTS):
            block = data[i * ondisk.BLOCK_SIZE:(i + 1) * ondisk.BLOCK_SIZE]
            try:
                rec = ondisk.decode(block, REQUEST_MAGIC)
            except CorruptRecord:
                rec = None  # a torn slot is free space; it answered nothing
            slots.append((base + i * ondisk.BLOCK_SIZE, rec))
        return base, slots

    def find(self, request_id: str) -> RequestRecord | None:
        _, slots = self._bucket(request_id)
        best: ondisk.Record | None = None
        for _, rec in slots:
            if rec and rec.payload.get("id") == request_id and (best is None or
                                                                  rec.seq > best.seq):
                best = rec
        return RequestRecord.from_payload(best.payload) if best else None

    def put(self, record: RequestRecord) -> None:
        """Write ``record`` over its own earlier slot, a free slot, or the oldest
        finished one. Pending records are never overwritten by other requests."""
        _, slots = self._bucket(record.request_id)
        same = [(off, r) for off, r in slots if r and r.payload.get("id") == record.request_id]
        free = [(off, r) for off, r in slots if r is None]
        finished = sorted(((off, r) for off, r in slots
                           if r and r.payload.get("state") != "pending"),
                          key=lambda item: item[1].seq if item[1] else 0)
        candidates = same or free or finished
        if not candidates:
            raise CorruptRecord("request log bucket is full of pending requests")
        offset = candidates[0][0]
        top = max((r.seq for _, r in slots if r), default=0)
        self.dev.write(offset, ondisk.encode(REQUEST_MAGIC, top + 1, record.payload()))

    def pending(self) -> list[RequestRecord]:
        """Every pending record (read at manager takeover: 32 MiB sequential)."""
        found = []
        chunk = 64 * BUCKET_SIZE
        total = REQUEST_BUCKETS * BUCKET_SIZE
        for start in range(0, total, chunk):
            data = self.dev.read(REQUESTS_OFFSET + start, chunk)
            for i in range(0, chunk, ondisk.BLOCK_SIZE):
                try:
                    rec = ondisk.decode(data[i:i + ondisk.BLOCK_SIZE], REQUEST_MAGIC)
                except CorruptRecord:
                    continue
                if rec and rec.payload.get("state") == "pending":
                    found.append(RequestRecord.from_payload(rec.payload))
        return found
