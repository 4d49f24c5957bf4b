"""The manager's own backup of every shard's LVM metadata, kept in the domain.

LVM's backup and archive are off (lvm.py): they rewrite a copy of the whole VG on
every commit, on the committing host only, where the next manager cannot read it.
Instead the manager copies each shard's committed metadata (``vgcfgbackup``) into the
``backup`` LV of shard 0 when the shard changed, at most every ``interval`` seconds,
and at once after a takeover's recovery. Any host reads it back (``sharedlvm domain
backup --shard K --output FILE``) as a file ``vgcfgrestore -f FILE VG`` takes.

Layout of the ``backup`` LV (format 2): shard k has two slots of SLOT_SIZE at
``(2k + c) * SLOT_SIZE``. A slot is a checksummed header record (ondisk.py: VG name,
seqno, time, size and sha256 of the data) followed by the zlib-compressed text. A new
backup goes to the slot that does not hold the newest valid one, data first, then the
header naming it: a write torn by a crash leaves the previous backup readable.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from . import errors, lvm_mda, ondisk
from .domain import Domain
from .shards import Shard

log = logging.getLogger(__name__)

MAGIC = b"SLVMBAK1"
SLOT_SIZE = 1024 * 1024
LV_SIZE = 256 * 1024 * 1024  # 2 slots for each of 128 shards
MAX_DATA = SLOT_SIZE - ondisk.BLOCK_SIZE
DEFAULT_INTERVAL = 60.0


@dataclass(frozen=True)
class Backup:
    vg_name: str
    seqno: int
    time: float
    text: bytes


def _slot(index: int, copy: int) -> int:
    return (2 * index + copy) * SLOT_SIZE


def _read_slot(dev: ondisk.BlockFile, offset: int) -> Backup | None:
    try:
        rec = ondisk.decode(dev.read(offset, ondisk.BLOCK_SIZE), MAGIC)
    except errors.CorruptRecord:
        return None
    if rec is None:
        return None
    p = rec.payload
    size = int(p.get("size", 0))
    if not 0 < size <= MAX_DATA:
        return None
    padded = -(-size // ondisk.BLOCK_SIZE) * ondisk.BLOCK_SIZE
    data = dev.read(offset + ondisk.BLOCK_SIZE, padded)[:size]
    if hashlib.sha256(data).hexdigest() != p.get("sha256"):
        return None  # torn: the header names data that is not there
    try:
        text = zlib.decompress(data)
    except zlib.error:
        return None
    return Backup(str(p["vg"]), int(p["seqno"]), float(p["time"]), text)


def read(dev: ondisk.BlockFile, index: int) -> Backup | None:
    """The newest valid backup of shard ``index`` (None: there is none)."""
    found = [b for b in (_read_slot(dev, _slot(index, c)) for c in (0, 1)) if b]
    return max(found, key=lambda b: (b.seqno, b.time)) if found else None


def write(dev: ondisk.BlockFile, index: int, backup: Backup) -> None:
    data = zlib.compress(backup.text, 6)
    if len(data) > MAX_DATA:
        raise errors.Unsupported(f"the metadata of {backup.vg_name} compresses to "
                                 f"{len(data)} bytes, more than a backup slot holds")
    slots = [_read_slot(dev, _slot(index, c)) for c in (0, 1)]
    # the slot not holding the newest valid backup
    copy = 0 if slots[0] is None else 1 if slots[1] is None else (
        0 if (slots[0].seqno, slots[0].time) < (slots[1].seqno, slots[1].time) else 1)
    offset = _slot(index, copy)
    padded = data.ljust(-(-len(data) // ondisk.BLOCK_SIZE) * ondisk.BLOCK_SIZE, b"\0")
    dev.write(offset + ondisk.BLOCK_SIZE, padded)
    dev.write(offset, ondisk.encode(MAGIC, backup.seqno, {
        "vg": backup.vg_name, "seqno": backup.seqno, "time": backup.time,
        "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def take(shard: Shard) -> Backup:
    """The shard's committed metadata now, as ``vgcfgbackup`` writes it."""
    with tempfile.TemporaryDirectory(prefix="sharedlvm-backup-") as tmp:
        path = Path(tmp) / "vg.txt"
        shard.lvm.run("vgcfgbackup", "--file", str(path), shard.vg_name)
        text = path.read_bytes()
    seqno = _seqno_of(text)
    return Backup(shard.vg_name, seqno, time.time(), text)


def _seqno_of(text: bytes) -> int:
    for line in text.splitlines():
        if line.strip().startswith(b"seqno = "):
            return int(line.split(b"=")[1])
    raise errors.LvmError("vgcfgbackup wrote no seqno")


class Backups:
    """The manager's side: back up the shards that changed (service loop)."""

    def __init__(self, domain: Domain, interval: float = DEFAULT_INTERVAL) -> None:
        self.domain = domain
        self.interval = interval
        self._done: dict[int, int] = {}  # shard -> seqno backed up
        self._last: dict[int, float] = {}  # shard -> when (monotonic)
        self._checked = 0.0

    def available(self) -> bool:
        return "backup" in self.domain.special_lvs()

    def reset(self) -> None:
        """A new term: what the domain holds is read again, and every shard that
        changed since is backed up at once (after the takeover's recovery)."""
        self._done.clear()
        self._last.clear()
        self._checked = 0.0

    def delay(self) -> None:
        """After a failure: the next try in ``interval``, not at the next loop."""
        self._checked = time.monotonic() + self.interval

    def run(self, now: float | None = None) -> int:
        """Back up what is due; returns how many shards were backed up. Cheap when
        nothing is due: one metadata-area read per shard, every few seconds."""
        now = time.monotonic() if now is None else now
        if now - self._checked < min(5.0, self.interval) or not self.available():
            return 0
        self._checked = now
        done = 0
        for shard in self.domain.shards():
            if not shard.luns:
                continue
            if shard.index not in self._done:
                with self.domain.special_reader("backup") as dev:
                    found = read(dev, shard.index)
                self._done[shard.index] = found.seqno if found else -1
                self._last[shard.index] = -self.interval  # due now if it changed
            head = lvm_mda.read_head(shard.luns[0])
            if head is not None and head.seqno == self._done[shard.index]:
                continue
            if now - self._last[shard.index] < self.interval:
                continue
            backup = take(shard)
            self.domain.require_manager_now()
            with self.domain.special_writer("backup") as dev:
                write(dev, shard.index, backup)
            self._done[shard.index] = backup.seqno
            self._last[shard.index] = now
            log.info("domain %s: backed up the metadata of %s at seqno %d (%d bytes)",
                     self.domain.name, shard.vg_name, backup.seqno, len(backup.text))
            done += 1
        return done
