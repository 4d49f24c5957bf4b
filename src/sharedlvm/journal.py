"""The ``journal`` LV: the domain record and request records, written by the manager only.

Layout (offsets in the LV)::

    0        domain record, copy A   (4 KiB)
    4 KiB    domain record, copy B   (4 KiB)
    1 MiB    request records: REQUEST_BUCKETS buckets of BUCKET_SLOTS 4 KiB slots
    40 MiB   format 2: the shard table, one 4 KiB record per shard (MAX_SHARDS)
    48 MiB   format 2: the volume index, INDEX_BUCKETS 4 KiB buckets (volume -> shard)

The domain record is written as A then B; a reader takes the valid copy with the
highest sequence, so a write torn by a crash leaves the older copy readable.

Request records make a client's ``--request-id`` exactly-once: the manager stores the
intent (``pending``, with the arguments it resolved, e.g. the new volume's UUID or
the absolute extend target, and a digest of the request) before it changes LVM
metadata and the answer (``done``, or ``failed`` for a final error) after. A repeated
request finds its record in one bucket (one 32 KiB read): ``done``/``failed`` returns
the first answer, ``pending`` rolls the same resolved operation forward, which is
idempotent by construction; a transient failure (lost role, a held lease, no space)
leaves the record pending, so a retry tries again. The same id with other arguments
is refused. A new manager rolls every pending request forward (or marks it
``aborted`` when nothing of it was done) before it serves requests.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import ondisk
from .errors import Busy, CorruptRecord, DomainNotFound, InvalidArgument
from .lvm import EXTENT_SIZE

DOMAIN_MAGIC = b"SLVMDOM1"
REQUEST_MAGIC = b"SLVMREQ1"
SHARD_MAGIC = b"SLVMSHD1"
INDEX_MAGIC = b"SLVMIDX1"

DOMAIN_COPIES = (0, ondisk.BLOCK_SIZE)
REQUESTS_OFFSET = 1024 * 1024
BUCKET_SLOTS = 8
REQUEST_BUCKETS = 1024  # 8,192 slots: 32 MiB; the journal LV is 64 MiB at least
BUCKET_SIZE = BUCKET_SLOTS * ondisk.BLOCK_SIZE
SHARDS_OFFSET = 40 * 1024 * 1024
MAX_SHARDS = 256
INDEX_OFFSET = 48 * 1024 * 1024
# 2,048 buckets of one block: about 80 volumes fit a bucket (a 36-character UUID and
# its shard, as JSON), 5 on average at 10,000 volumes: a full bucket is a refusal
# (Busy) at some 10^5 volumes, far past what a domain's LUNs hold.
INDEX_BUCKETS = 2048
JOURNAL_END = INDEX_OFFSET + INDEX_BUCKETS * ondisk.BLOCK_SIZE  # 56 MiB of the 64


@dataclass
class DomainRecord:
    domain_uuid: str
    vg_name: str
    manager_host_id: int
    created: float
    io_timeout: int = 10
    manager_generation: int = 0
    extent_size: int = EXTENT_SIZE
    format_version: int = 1
    shard_count: int = 1  # format 2: shards 0..shard_count-1 in the shard table
    seq: int = 0

    def payload(self) -> dict[str, Any]:
        out = {
            "domain_uuid": self.domain_uuid, "vg_name": self.vg_name,
            "manager_host_id": self.manager_host_id, "created": self.created,
            "io_timeout": self.io_timeout, "manager_generation": self.manager_generation,
            "extent_size": self.extent_size,
        }
        if self.format_version > 1:  # a version-1 record stays as version 1 wrote it
            out["format_version"] = self.format_version
            out["shard_count"] = self.shard_count
        return out

    @classmethod
    def from_record(cls, rec: ondisk.Record) -> DomainRecord:
        p = rec.payload
        try:
            return cls(domain_uuid=p["domain_uuid"], vg_name=p["vg_name"],
                       manager_host_id=int(p["manager_host_id"]), created=float(p["created"]),
                       io_timeout=int(p["io_timeout"]),
                       manager_generation=int(p["manager_generation"]),
                       extent_size=int(p["extent_size"]),
                       format_version=int(p.get("format_version", 1)),
                       shard_count=int(p.get("shard_count", 1)), seq=rec.seq)
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


# How long a finished request is remembered: a repeat of its id within this time is
# answered from the record. It covers a client that timed out and retries: the CLI
# waits up to 10 minutes for an answer (rpc.CLIENT_TIMEOUT), a forwarded request up to
# the host-dead time + 60 s. The log holds 8,192 records in 1,024 buckets of 8: a
# request whose bucket holds 8 records younger than this is refused with a transient
# Busy (retry later), never by forgetting an id that may still be retried. At 2
# requests a second sustained, some bucket fills within ~20 minutes (measured by the
# fault harness): new ids landing there wait; started requests always finish.
RETENTION = 15 * 60.0

# Request states. "aborted": the intent was never carried out (a new manager found
# nothing of it); a repeat runs as new.
PENDING, DONE, FAILED, ABORTED = "pending", "done", "failed", "aborted"


@dataclass
class RequestRecord:
    request_id: str
    op: str
    state: str  # pending | done | failed | aborted
    digest: str = ""  # of the request's arguments: an id is never reused for others
    args: dict[str, Any] = field(default_factory=dict)  # the resolved intent (pending)
    result: Any = None  # the answer (done)
    error: dict[str, Any] = field(default_factory=dict)  # errors.Error.to_wire() (failed)
    time: float = field(default_factory=time.time)

    def payload(self) -> dict[str, Any]:
        """Only what the state needs: a done record does not repeat the intent."""
        out: dict[str, Any] = {"id": self.request_id, "op": self.op, "state": self.state,
                               "digest": self.digest, "time": self.time}
        if self.state == PENDING:
            out["args"] = self.args
        elif self.state == DONE:
            out["result"] = self.result
        elif self.state == FAILED:
            out["error"] = self.error
        return out

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> RequestRecord:
        return cls(request_id=p["id"], op=p["op"], state=p["state"],
                   digest=p.get("digest", ""), args=p.get("args") or {},
                   result=p.get("result"), error=_error(p.get("error")), time=p["time"])


def _error(value: Any) -> dict[str, Any]:
    """An error as errors.Error.to_wire() stored it (records of version 0.1 kept only
    the message: it comes back as a plain Error)."""
    if isinstance(value, dict):
        return value
    return {"kind": "Error", "message": str(value or ""), "fields": {}}


def _bucket_offset(request_id: str) -> int:
    digest = hashlib.sha256(request_id.encode()).digest()
    bucket = int.from_bytes(digest[:4], "big") % REQUEST_BUCKETS
    return REQUESTS_OFFSET + bucket * BUCKET_SIZE


class RequestLog:
    """Request records in the journal; see the module docstring.

    A new state of a request is written to another slot than its current record and
    wins by its higher sequence number, so a torn write leaves the previous state
    readable (a torn ``done`` leaves ``pending``: the request rolls forward again,
    idempotently), never nothing."""

    def __init__(self, dev: ondisk.BlockFile, clock: Callable[[], float] = time.time,
                 lock: threading.Lock | None = None) -> None:
        """``lock``: held around each read-modify-write of a bucket, when threads of
        one manager write concurrently (operations on different shards)."""
        self.dev = dev
        self.clock = clock
        self._lock = lock or threading.Lock()

    def _bucket(self, request_id: str) -> list[tuple[int, ondisk.Record | None]]:
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
        return slots

    @staticmethod
    def _newest(slots: list[tuple[int, ondisk.Record | None]]) -> dict[str, int]:
        """Request id -> seq of its newest record in the bucket."""
        newest: dict[str, int] = {}
        for _, rec in slots:
            if rec is not None:
                rid = str(rec.payload.get("id"))
                newest[rid] = max(newest.get(rid, 0), rec.seq)
        return newest

    def find(self, request_id: str) -> RequestRecord | None:
        with self._lock:
            slots = self._bucket(request_id)
        best: ondisk.Record | None = None
        for _, rec in slots:
            if rec and rec.payload.get("id") == request_id and (best is None or
                                                                  rec.seq > best.seq):
                best = rec
        return RequestRecord.from_payload(best.payload) if best else None

    def put(self, record: RequestRecord) -> None:
        """Write ``record`` as the newest state of its request, in a slot that holds
        nothing that may still be needed: a free or torn slot, a record superseded by a
        newer one of its request, or a finished record older than RETENTION. The
        newest record of any request, pending or younger than RETENTION, is never
        overwritten; with no such slot a new request is refused (Busy, retry later),
        while the answer of a started one replaces its own current record.
        Raises InvalidArgument, before writing anything, if the record is too large."""
        with self._lock:
            self._put(record)

    def _put(self, record: RequestRecord) -> None:
        slots = self._bucket(record.request_id)
        newest = self._newest(slots)
        top = max((r.seq for _, r in slots if r), default=0)
        block = ondisk.encode(REQUEST_MAGIC, top + 1, record.payload())
        now = self.clock()

        def reusable(rec: ondisk.Record | None) -> bool:
            if rec is None:
                return True
            if rec.seq != newest[str(rec.payload.get("id"))]:
                return True  # superseded by a newer state of its request
            if rec.payload.get("id") == record.request_id:
                return False  # the current state stays until the new one is written
            finished = rec.payload.get("state") != PENDING
            return finished and now - float(rec.payload.get("time", 0)) > RETENTION

        candidates = sorted((rec.seq if rec else -1, off) for off, rec in slots
                            if reusable(rec))
        if not candidates and record.state != PENDING:
            # The answer of a started request always finds room: in a bucket full of
            # young records it replaces the request's own current record (a torn write
            # there is the lesser risk; refusing would leave the request pending for
            # ever, and every new manager would fail to finish it: a takeover livelock
            # the fault harness found at ~2 requests a second).
            candidates = [(rec.seq, off) for off, rec in slots
                          if rec and rec.payload.get("id") == record.request_id]
        if not candidates:
            raise Busy(f"the request log has no room for request {record.request_id} now "
                       f"(ids are remembered {RETENTION / 60:g} minutes); retry later")
        self.dev.write(candidates[0][1], block)

    def pending(self) -> list[RequestRecord]:
        """The requests whose newest record is pending (read at manager takeover:
        32 MiB sequential)."""
        newest: dict[str, ondisk.Record] = {}
        chunk = 64 * BUCKET_SIZE
        total = REQUEST_BUCKETS * BUCKET_SIZE
        for start in range(0, total, chunk):
            data = self.dev.read(REQUESTS_OFFSET + start, chunk)
            for i in range(0, chunk, ondisk.BLOCK_SIZE):
                try:
                    rec = ondisk.decode(data[i:i + ondisk.BLOCK_SIZE], REQUEST_MAGIC)
                except CorruptRecord:
                    continue
                if rec is None:
                    continue
                rid = str(rec.payload.get("id"))
                if rid not in newest or rec.seq > newest[rid].seq:
                    newest[rid] = rec
        return [RequestRecord.from_payload(r.payload) for r in newest.values()
                if r.payload.get("state") == PENDING]


# The shard table (format 2): what each shard is, for hosts that have not seen it yet.

@dataclass(frozen=True)
class ShardRecord:
    """Shard ``index``: its VG, and the LUN paths it was made on (a host that has no
    LUN of that VG in its own config looks there: give LUNs by names that are the
    same on every host, /dev/disk/by-id or /dev/mapper/WWID)."""

    index: int
    vg_name: str
    luns: tuple[str, ...]


def write_shard(dev: ondisk.BlockFile, shard: ShardRecord) -> None:
    if not 0 <= shard.index < MAX_SHARDS:
        raise InvalidArgument(f"a domain has at most {MAX_SHARDS} shards")
    dev.write(SHARDS_OFFSET + shard.index * ondisk.BLOCK_SIZE, ondisk.encode(
        SHARD_MAGIC, 1, {"index": shard.index, "vg": shard.vg_name,
                         "luns": list(shard.luns)}))


def read_shards(dev: ondisk.BlockFile, count: int) -> list[ShardRecord]:
    """The first ``count`` shard records (one read). A missing or corrupt record is
    an error: the table is written before the domain record counts the shard."""
    data = dev.read(SHARDS_OFFSET, max(count, 1) * ondisk.BLOCK_SIZE)
    found = []
    for i in range(count):
        rec = ondisk.decode(data[i * ondisk.BLOCK_SIZE:(i + 1) * ondisk.BLOCK_SIZE],
                            SHARD_MAGIC)
        if rec is None or rec.payload.get("index") != i:
            raise CorruptRecord(f"shard table on {dev.path}: no record for shard {i}")
        found.append(ShardRecord(i, str(rec.payload["vg"]),
                                 tuple(str(x) for x in rec.payload.get("luns", []))))
    return found


# The volume index (format 2): volume UUID -> shard, so any host finds a volume's VG
# with one 4 KiB read instead of asking LVM about every shard. The LVs stay the truth:
# an entry is written before the volume's lvcreate and removed after its lvremove, so
# an entry may name a volume that is gone (a crash between), never miss one that
# exists; a torn or missing bucket is rebuilt by the manager from the shards' LVs.

def _index_offset(volume: str) -> int:
    digest = hashlib.sha256(volume.encode()).digest()
    return INDEX_OFFSET + int.from_bytes(digest[:4], "big") % INDEX_BUCKETS * ondisk.BLOCK_SIZE


def index_bucket(volume: str) -> int:
    return (_index_offset(volume) - INDEX_OFFSET) // ondisk.BLOCK_SIZE


def read_index(dev: ondisk.BlockFile, volume: str) -> dict[str, int]:
    """The bucket holding ``volume``: {uuid: shard} of every volume hashed there.
    Raises CorruptRecord for a torn bucket."""
    rec = ondisk.decode(dev.read(_index_offset(volume), ondisk.BLOCK_SIZE), INDEX_MAGIC)
    if rec is None:
        return {}
    return {str(k): int(v) for k, v in rec.payload.get("volumes", {}).items()}


def write_index(dev: ondisk.BlockFile, volume: str, entries: dict[str, int]) -> None:
    """Write the bucket of ``volume`` (and of every other volume in ``entries``)."""
    try:
        block = ondisk.encode(INDEX_MAGIC, 1, {"volumes": entries})
    except InvalidArgument:
        raise Busy(f"the volume index bucket of {volume} is full "
                   f"({len(entries)} volumes)") from None
    dev.write(_index_offset(volume), block)
