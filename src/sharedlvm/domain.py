"""A sharedlvm domain: one VG on shared LUNs, its special LVs and its domain record.

``create_domain`` formats LUNs (on the host that becomes the manager), ``attach_domain``
makes another host use an existing domain, and :class:`Domain` is an attached domain
opened on this host: its LVM (read-only unless this host becomes its manager), its
activator, and its domain record read fresh from the ``journal`` LV.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from . import errors, journal, lvm_mda, ondisk, partitions
from .activation import Activator, make_activator
from .command import Runner
from .devmapper import available as device_mapper_available
from .errors import CommandError
from .lvm import LogicalVolume, Lvm, LvmConfig, Segment, udev_running
from .model import DomainInfo, ShardInfo
from .paths import HostPaths
from .shards import Placement, Shard, ShardHook, shard_vg_name

log = logging.getLogger(__name__)

DOMAIN_TAG = "sharedlvm.domain"
FORMAT_TAG = "sharedlvm.format"
SHARD_TAG = "sharedlvm.shard"
SPECIAL_TAG = "sharedlvm.special"

# Format 1: one VG holds everything. Format 2: the domain's metadata is sharded over
# several VGs ("shards"), each on its own LUN(s), so that an LVM command parses and
# rewrites the metadata of one shard, not of the whole domain (docs/design.md
# "Shards"). Shard 0 is the VG named like the domain and holds the special LVs; a
# version-1 domain is a domain of one shard.
FORMAT_VERSION = 2

# The special LVs of format version 1 (docs/design.md "On-disk layout"), created in this
# order right after the VG so each is a single segment at the start of the first PV.
SPECIAL_LVS: dict[str, int] = {
    "ids": 8 * 1024 * 1024,
    "leases": 1024 * 1024 * 1024,
    "mailbox": 16 * 1024 * 1024,
    "journal": 64 * 1024 * 1024,
}
# Format 2 adds the manager's backups of every shard's metadata (backup.py).
SPECIAL_LVS_V2: dict[str, int] = {**SPECIAL_LVS, "backup": 256 * 1024 * 1024}
SPECIAL_NAMES = frozenset(SPECIAL_LVS_V2)

MAX_HOST_ID = 2000
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_+.-]{0,63}$")
_SHARD_SUFFIX = re.compile(r"\+[0-9]+$")


def check_name(name: str) -> None:
    if not _NAME_RE.match(name) or name in SPECIAL_NAMES or _SHARD_SUFFIX.search(name):
        raise errors.InvalidArgument(
            f"invalid domain name {name!r}: use 1-64 characters of letters, digits, "
            "'_', '+', '.', '-', not starting with '+', '.' or '-' and not ending in "
            "'+' and digits (the names of a domain's shards)")


def check_host_id(host_id: int) -> None:
    if not 1 <= host_id <= MAX_HOST_ID:
        raise errors.InvalidArgument(f"invalid host id {host_id}: must be 1..{MAX_HOST_ID}")


def check_lun(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise errors.NotFound(f"LUN {path} does not exist") from None
    if not stat.S_ISBLK(mode):
        raise errors.InvalidArgument(f"LUN {path} is not a block device")


@dataclass(frozen=True)
class HostDomainConfig:
    """What this host knows about an attached domain (etc/sharedlvm/domains/NAME.json)."""

    name: str
    domain_uuid: str
    luns: tuple[str, ...]
    host_id: int

    def save(self, paths: HostPaths) -> None:
        paths.ensure()
        target = paths.domain_config(self.name)
        tmp = target.with_suffix(".tmp")
        data = asdict(self)
        data["luns"] = list(self.luns)
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, target)

    @classmethod
    def load(cls, paths: HostPaths, name: str) -> HostDomainConfig:
        try:
            data = json.loads(paths.domain_config(name).read_text())
        except FileNotFoundError:
            raise errors.DomainNotFound(f"domain {name} is not attached on this host") from None
        return cls(data["name"], data["domain_uuid"], tuple(data["luns"]), int(data["host_id"]))


def attached_domains(paths: HostPaths) -> list[str]:
    if not paths.domains_dir.is_dir():
        return []
    return sorted(p.stem for p in paths.domains_dir.glob("*.json"))


# The private lvm.conf of LVM_SYSTEM_DIR. Everything else is in each command's --config
# (lvm.py); use_aio is here because LVM ignores it in --config (lvm2 2.03.16, measured).
LVM_CONF = """\
# sharedlvm: settings are passed with --config; see lvm.py
config {
    checks = 1
}
global {
    # Without it every command waits ~35 ms for its async I/O context at exit
    # (measured: vgs 42 ms -> 9 ms on a loop LUN); sharedlvm's commands do a few
    # metadata I/Os each, where aio gains nothing.
    use_aio = 0
}
"""


def _write_lvm_conf(paths: HostPaths) -> None:
    """LVM_SYSTEM_DIR needs an lvm.conf; ours holds only what --config cannot carry."""
    paths.ensure()
    conf = paths.lvm_system_dir / "lvm.conf"
    try:
        if conf.read_text() == LVM_CONF:
            return
    except FileNotFoundError:
        pass
    tmp = conf.with_suffix(".tmp")
    tmp.write_text(LVM_CONF)
    os.replace(tmp, conf)


def make_lvm(paths: HostPaths, runner: Runner, luns: Sequence[str], writable: bool,
             before_write: Callable[[], None] | None = None,
             after_write: Callable[[], None] | None = None,
             write_timeout: float | None = None, keep_view: bool = False,
             shell: bool = False) -> Lvm:
    _write_lvm_conf(paths)
    return Lvm(runner, LvmConfig(devices=tuple(luns), writable=writable,
                                 system_dir=paths.lvm_system_dir, lock_dir=paths.lvm_lock_dir,
                                 activation=device_mapper_available(),
                                 udev=udev_running()),
               before_write=before_write, after_write=after_write, keep_view=keep_view,
               shell=shell, **({"write_timeout": write_timeout} if write_timeout else {}))


class Domain:
    """An attached domain, opened on this host."""

    def __init__(self, paths: HostPaths, runner: Runner, config: HostDomainConfig) -> None:
        self.paths = paths
        self.runner = runner
        self.config = config
        self.name = config.name
        self.vg_name = config.name
        self.host_id = config.host_id
        # Read-only (locking_type=4) unless this process holds the manager role:
        # see become_manager().
        self._manager = False
        self._guard: Callable[[], None] | None = None
        self._hooks: tuple[ShardHook, ShardHook, float] | None = None
        self._pe_start_cache: dict[str, int] | None = None
        self._segments: dict[str, list[Segment]] = {}
        self._record: journal.DomainRecord | None = None
        self._extent_size: int | None = None
        # Long steps (a wipe) call this as they progress: the daemon's hang watch.
        self.on_progress: Callable[[], None] | None = None
        # The daemon's: runs a step that need not delay the answer, after it (a deleted
        # volume's index entry cleared); without a daemon, at once.
        self.later: Callable[[Callable[[], None]], None] | None = None
        self._clearing: set[str] = set()  # index entries to clear later (under the lock)
        self._shards_lock = threading.Lock()
        self._journal_lock = threading.Lock()
        self._request_locks = [threading.Lock() for _ in range(64)]
        self._chain_locks = [threading.Lock() for _ in range(64)]
        self._lun_vgs = _lun_vgs(_expand(config.luns))
        zero = tuple(lun for lun, vg in self._lun_vgs.items() if vg == self.vg_name)
        # shard 0: the domain's VG (format 1: the only one, on all the LUNs)
        self._shards: list[Shard] = [self._open_shard(0, self.vg_name, zero or config.luns)]
        self._shards_loaded = False
        self._where: dict[str, int] = {}  # volume -> shard, as found (volumes never move)
        self.placement = Placement(
            self, lambda need, seen: grow_into_free_space(self, need, seen))
        # Held while shards are added (domain extend, growth into free space): each
        # takes the next index and partition.
        self.adding_shards = threading.RLock()

    # Shards

    def _open_shard(self, index: int, vg_name: str, luns: tuple[str, ...]) -> Shard:
        if self._hooks is not None:
            before, after, timeout = self._hooks
            lvm = make_lvm(self.paths, self.runner, luns, writable=True,
                           before_write=lambda: before(shard),
                           after_write=lambda: after(shard), write_timeout=timeout,
                           keep_view=True, shell=True)
        else:
            lvm = make_lvm(self.paths, self.runner, luns, writable=False)
        shard = Shard(index, vg_name, luns, lvm,
                      make_activator(lvm, self.runner, self.paths.activations_dir))
        return shard

    @property
    def lvm(self) -> Lvm:
        """Shard 0's LVM: the special LVs (and, in format 1, every volume)."""
        return self._shards[0].lvm

    @property
    def activator(self) -> Activator:
        return self._shards[0].activator

    def shards(self) -> list[Shard]:
        """Every shard of the domain, in order (format 1: one)."""
        with self._shards_lock:
            if not self._shards_loaded:
                self._load_shards()
            return list(self._shards)

    def shard(self, index: int) -> Shard:
        shards = self.shards()
        if index >= len(shards):
            self.reload_shards()
            shards = self.shards()
        if index >= len(shards):
            raise errors.NotFound(f"domain {self.name} has no shard {index}")
        found = shards[index]
        if not found.luns:
            raise errors.NotFound(
                f"shard {index} of domain {self.name} (VG {found.vg_name}) is on no LUN "
                "this host sees: attach the domain again with all its LUNs (--lun)")
        return found

    def reload_shards(self) -> None:
        """Read the shard table again (another host added a shard)."""
        with self._shards_lock:
            self._shards_loaded = False
            self._record = None

    def _load_shards(self) -> None:
        record = self.record
        shards = [self._shards[0]]
        if record.format_version >= 2 and record.shard_count > 1:
            with self._journal_reader() as dev:
                table = journal.read_shards(dev, record.shard_count)
            known = {s.index: s for s in self._shards}
            for entry in table[1:]:
                old = known.get(entry.index)
                if old is not None and old.luns:
                    shards.append(old)
                    continue
                luns = tuple(lun for lun, vg in self._lun_vgs.items() if vg == entry.vg_name)
                if not luns:
                    # A shard added after this host attached: on new partitions of its
                    # LUNs (which this host's kernel may not show yet), or on a LUN at
                    # the path recorded in the shard table.
                    for lun in self.config.luns:
                        partitions.reread(self.runner, lun)
                    self._lun_vgs.update(_lun_vgs(_expand(self.config.luns)))
                    hints = _lun_vgs(tuple(x for x in entry.luns if os.path.exists(x)))
                    self._lun_vgs.update(hints)
                    luns = tuple(lun for lun, vg in self._lun_vgs.items()
                                 if vg == entry.vg_name)
                if len(luns) > 1 and set(entry.luns) & set(luns):
                    # Another device names the same VG (a shard addition interrupted
                    # after its vgcreate): the shard is on the device its record names.
                    luns = tuple(lun for lun in luns if lun in entry.luns)
                shards.append(self._open_shard(entry.index, entry.vg_name, luns))
        kept = {id(s) for s in shards}
        for shard in self._shards:
            if id(shard) not in kept:
                shard.lvm.close()
        self._shards = shards
        self._shards_loaded = True

    def volume_shard(self, volume_id: str) -> Shard:
        """The shard that holds ``volume_id`` (or would: VolumeNotFound is the caller's
        to raise when the LV is not there). Format 2 reads the volume index, one 4 KiB
        block; a volume found is remembered (volumes never move between shards)."""
        if self.record.format_version < 2:
            return self._shards[0]
        known = self._where.get(volume_id)
        if known is not None:
            return self.shard(known)
        try:
            with self._journal_reader() as dev:
                index = journal.read_index(dev, volume_id).get(volume_id)
        except errors.CorruptRecord:
            index = None
        if index is None:
            index = self._search(volume_id)
        if index is None:
            return self._shards[0]  # nowhere: the caller's lookup fails there
        self._where[volume_id] = index
        return self.shard(index)

    def _search(self, volume_id: str) -> int | None:
        """Ask every shard's LVM (a torn index bucket): slow, and only then."""
        for shard in self.shards():
            if shard.luns and shard.lvm.lvs(shard.vg_name, select=f"lv_name={volume_id}"):
                return shard.index
        return None

    def deactivate_volume(self, volume_id: str) -> None:
        shard = self.volume_shard(volume_id)
        shard.activator.deactivate(shard.vg_name, volume_id)

    def forget_volume(self, volume_id: str) -> None:
        self._where.pop(volume_id, None)

    def set_volume_shard(self, volume_id: str, shard: Shard) -> None:
        """Record in the index that ``volume_id`` lives in ``shard`` (manager, before
        its lvcreate)."""
        if self.record.format_version < 2:
            return
        with self.journal() as dev, self._journal_lock:
            self._clearing.discard(volume_id)  # a clear still queued must not undo this
            entries, rebuilt = self._index_bucket(dev, volume_id)
            if rebuilt or entries.get(volume_id) != shard.index:
                entries[volume_id] = shard.index
                journal.write_index(dev, volume_id, entries)
        self._where[volume_id] = shard.index

    def clear_volume_shard(self, volume_id: str, later: bool = False) -> None:
        """Drop ``volume_id`` from the index (manager, after its lvremove). ``later``:
        after the answer, through :attr:`later`. An entry left behind (the manager
        died first, or a queued clear found this host no longer manager) names a shard
        where the LV is not: a lookup there finds no volume, which is the answer; a
        create of the same UUID meanwhile cancels the queued clear."""
        self._where.pop(volume_id, None)
        if self.record.format_version < 2:
            return
        if later and self.later is not None:
            with self._journal_lock:
                self._clearing.add(volume_id)
            self.later(lambda: self._clear_index(volume_id, queued=True))
        else:
            self._clear_index(volume_id)

    def _clear_index(self, volume_id: str, queued: bool = False) -> None:
        with self.journal() as dev, self._journal_lock:
            if queued:
                if volume_id not in self._clearing:
                    return  # created again since
                self._clearing.discard(volume_id)
                self._where.pop(volume_id, None)  # a lookup meanwhile cached it
            entries, rebuilt = self._index_bucket(dev, volume_id)
            if entries.pop(volume_id, None) is not None or rebuilt:
                journal.write_index(dev, volume_id, entries)

    def _index_bucket(self, dev: ondisk.BlockFile,
                      volume_id: str) -> tuple[dict[str, int], bool]:
        """The index bucket of ``volume_id``, and whether it had to be rebuilt."""
        try:
            return journal.read_index(dev, volume_id), False
        except errors.CorruptRecord:
            # torn: rebuilt from the LVs of every shard (the truth), for that bucket
            bucket = journal.index_bucket(volume_id)
            log.warning("volume index bucket %d of %s is corrupt: rebuilding it", bucket,
                        self.name)
            return {lv.name: shard.index for shard in self.shards() if shard.luns
                    for lv in shard.lvm.lvs(shard.vg_name)
                    if lv.name not in SPECIAL_NAMES
                    and journal.index_bucket(lv.name) == bucket}, True

    def request_log(self, dev: ondisk.BlockFile) -> journal.RequestLog:
        """The request log on ``dev``, its read-modify-writes serialized between this
        manager's threads."""
        return journal.RequestLog(dev, lock=self._journal_lock)

    @contextlib.contextmanager
    def request_lock(self, request_id: str | None) -> Iterator[None]:
        """Held across a whole operation with a request id: two concurrent requests of
        one id (a client retrying early) run one after the other, whatever shards
        they would use. Striped: ids sharing a stripe wait for each other too."""
        if request_id is None:
            yield
            return
        with self._request_locks[hash(request_id) % len(self._request_locks)]:
            yield

    @contextlib.contextmanager
    def chain_lock(self, volume_id: str) -> Iterator[None]:
        """Held by an operation that checks what is on top of ``volume_id`` and acts on
        it: a delete of the volume, a snapshot or clone over it. Without it a clone
        could be made over a template a concurrent delete found childless. Taken
        after the request lock, before the shard's. Striped like the request locks."""
        with self._chain_locks[hash(volume_id) % len(self._chain_locks)]:
            yield

    @property
    def record(self) -> journal.DomainRecord:
        """The domain record, read (and verified) on first use: listing volumes needs
        no journal, so opening a domain does not activate it."""
        if self._record is None:
            self._record = self.read_record()
        return self._record

    @record.setter
    def record(self, value: journal.DomainRecord) -> None:
        self._record = value

    @classmethod
    def open(cls, paths: HostPaths, runner: Runner, name: str | None = None) -> Domain:
        if name is None:
            names = attached_domains(paths)
            if not names:
                raise errors.DomainNotFound("no domain is attached on this host")
            if len(names) > 1:
                raise errors.InvalidArgument(
                    f"several domains are attached ({', '.join(names)}): use --domain")
            name = names[0]
        check_name(name)
        return cls(paths, runner, HostDomainConfig.load(paths, name))

    @property
    def is_manager(self) -> bool:
        """True in the one process that holds the manager role (manager.py)."""
        return self._manager

    def become_manager(self, guard: Callable[[], None], before: ShardHook,
                       after: ShardHook, write_timeout: float) -> None:
        """Switch every shard to read-write LVM, with ``before`` and ``after`` run
        around every metadata command of a shard and ``guard`` (the fencing check)
        before every other write. Called by the manager role only."""
        with self._shards_lock:
            self._hooks = (before, after, write_timeout)
            self._reopen_shards()
            self.placement.reset()
            self._guard = guard
            self._manager = True

    @property
    def write_timeout(self) -> float | None:
        """How long a metadata command may take in this manager term (None: reader)."""
        return self._hooks[2] if self._hooks is not None else None

    def become_reader(self) -> None:
        with self._shards_lock:
            self._manager = False
            self._guard = None
            self._hooks = None
            self._reopen_shards()

    def _reopen_shards(self) -> None:
        old, self._shards = self._shards, [self._open_shard(s.index, s.vg_name, s.luns)
                                           for s in self._shards]
        for shard in old:
            shard.lvm.close()

    def add_shard(self, shard: Shard) -> None:
        """A shard this manager just made (domain extend)."""
        with self._shards_lock:
            self._shards.append(self._open_shard(shard.index, shard.vg_name, shard.luns))

    def require_manager(self) -> None:
        if not self.is_manager:
            manager = self.read_record().manager_host_id
            raise errors.NotManager(self.host_id, self.name, manager)

    def progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress()

    def require_manager_now(self) -> None:
        """The fencing check, before a write that does not go through LVM (the
        journal, a lease, qemu-img, zeroing): raises Fenced if the role is lost."""
        self.require_manager()
        guard = self._guard  # read once: become_reader() may clear it meanwhile
        if guard is None:
            raise errors.NotManager(self.host_id, self.name, None)
        guard()

    @property
    def lockspace(self) -> str:
        """sanlock lockspace name: the domain UUID without dashes (sanlock allows 48)."""
        return self.config.domain_uuid.replace("-", "")

    def special_path(self, lv_name: str) -> str:
        """Device path of a special LV, activating it on first use. Special LVs never
        move, so an existing activation is reused without another LVM scan."""
        return self.activator.path(self.vg_name, lv_name) or self.activator.activate(
            self.vg_name, lv_name)

    def lv_location(self, lv_name: str, offset: int) -> tuple[str, int]:
        """(device path, byte offset) where byte ``offset`` of a special LV lives, for
        sanlock, which takes a path and an offset. With device-mapper that is the
        activated LV; without it, the PV itself, so that a special LV that grew into
        several segments (``leases``) stays reachable."""
        if self.lvm.config.activation:
            path = self.special_path(lv_name)
            if offset >= device_size(path):
                # The manager grew it (``leases``) after this host activated it: reload
                # the mapping from the LV's segments now, or sanlock would be given an
                # offset past the end of this host's device.
                path = self.activator.refresh(self.vg_name, lv_name)
            return path, offset
        return self._pv_location(lv_name, offset, self.record.extent_size)

    def _pv_location(self, lv_name: str, offset: int, extent: int) -> tuple[str, int]:
        """(PV, byte offset on it) of byte ``offset`` of a special LV."""
        # Extents of a special LV never move; the map only grows (leases), so it is
        # cached and re-read only for an offset it does not cover yet.
        for fresh in (False, True):
            if fresh or lv_name not in self._segments:
                self._segments[lv_name] = self.lvm.segments(self.vg_name, lv_name)
            for seg in self._segments[lv_name]:
                if seg.start * extent <= offset < (seg.start + seg.count) * extent:
                    pe_start = self._pe_starts().get(seg.pv)
                    if pe_start is None:
                        raise errors.NotFound(f"PV {seg.pv} of {lv_name} is not a LUN of "
                                              f"domain {self.name}")
                    return (seg.pv,
                            pe_start + seg.pv_start * extent + offset - seg.start * extent)
        raise errors.InvalidArgument(f"offset {offset} is beyond {self.vg_name}/{lv_name}")

    def _pe_starts(self) -> dict[str, int]:
        if self._pe_start_cache is None:
            self._pe_start_cache = {pv.name: pv.pe_start for pv in self.lvm.pvs()}
        return self._pe_start_cache

    def special_lvs(self) -> list[str]:
        """The special LVs this domain's format has."""
        return list(SPECIAL_LVS if self.record.format_version < 2 else SPECIAL_LVS_V2)

    @contextlib.contextmanager
    def special_reader(self, lv_name: str) -> Iterator[ondisk.BlockFile]:
        """A special LV opened for reading where it is: the activated LV, or its place
        on the PV (no activation just to look; special LVs are one segment, but for
        ``leases``, which is not read this way)."""
        path = self.activator.path(self.vg_name, lv_name)
        if path is not None:
            base = 0
        else:
            if self._extent_size is None:
                self._extent_size = self.lvm.vg(self.vg_name).extent_size
            path, base = self._pv_location(lv_name, 0, self._extent_size)
        with ondisk.BlockFile(path, base=base) as dev:
            yield dev

    @contextlib.contextmanager
    def special_writer(self, lv_name: str) -> Iterator[ondisk.BlockFile]:
        """A special LV opened for writing, after the fencing check (manager)."""
        self.require_manager_now()
        with ondisk.BlockFile(self.special_path(lv_name), writable=True) as dev:
            yield dev

    def _journal_reader(self) -> contextlib.AbstractContextManager[ondisk.BlockFile]:
        return self.special_reader("journal")

    def read_record(self) -> journal.DomainRecord:
        """The domain record as it is on the LUN now, checked against this host's
        config (the LUN holds the domain this host attached)."""
        with self._journal_reader() as dev:
            record = journal.read_domain_record(dev)
        if record.domain_uuid != self.config.domain_uuid:
            raise errors.CorruptRecord(
                f"domain record on {self.name} has UUID {record.domain_uuid}, "
                f"this host attached {self.config.domain_uuid}")
        return record

    @contextlib.contextmanager
    def journal(self) -> Iterator[ondisk.BlockFile]:
        """The journal opened for writing, after the fencing check."""
        self.require_manager_now()
        with ondisk.BlockFile(self.special_path("journal"), writable=True) as dev:
            yield dev

    @contextlib.contextmanager
    def manager_lock(self, shard: Shard | None = None) -> Iterator[None]:
        """Serialize the metadata operations of one shard (all of them without one):
        operations on different shards run in parallel, each shard's commits in order."""
        self.require_manager()
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        suffix = "" if shard is None or shard.index == 0 else f".{shard.index}"
        fd = os.open(self.paths.run_dir / f"{self.name}{suffix}.lock",
                     os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def volume_lvs(self) -> list[LogicalVolume]:
        """Every LV but the special ones (name, size, tags), of every shard this host
        sees: one report per shard, in parallel; the manager's from its view of each
        shard (Lvm.volume_lvs). The shard count is read fresh (one 8 KiB read): another
        host may have added a shard since this process looked."""
        if self.record.format_version >= 2:
            fresh = self.read_record()
            if fresh.shard_count != len(self.shards()):
                self.reload_shards()
        shards = [s for s in self.shards() if s.luns]
        for unseen in (s for s in self.shards() if not s.luns):
            log.warning("domain %s: shard %d (VG %s) is on no LUN this host sees: its "
                        "volumes are not listed", self.name, unseen.index, unseen.vg_name)
        if len(shards) == 1:
            found = [shards[0].lvm.volume_lvs(shards[0].vg_name)]
        else:
            with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
                found = list(pool.map(lambda s: s.lvm.volume_lvs(s.vg_name), shards))
        return [lv for lvs in found for lv in lvs if lv.name not in SPECIAL_NAMES]

    def info(self) -> DomainInfo:
        record = self.read_record()  # fresh: another host may be manager since
        self.reload_shards()
        shards = [s for s in self.shards() if s.luns]
        vgs = [s.lvm.vg(s.vg_name) for s in shards]
        volumes = len(self.volume_lvs())
        return DomainInfo(
            name=self.name, domain_uuid=record.domain_uuid, vg_uuid=vgs[0].uuid,
            format_version=record.format_version, host_id=self.host_id,
            manager_host_id=record.manager_host_id, is_manager=self.is_manager,
            io_timeout=record.io_timeout,
            manager_generation=record.manager_generation,
            luns=[lun for s in shards for lun in s.luns],
            size=sum(v.size for v in vgs), free=sum(v.free for v in vgs),
            extent_size=vgs[0].extent_size, volumes=volumes,
            metadata_size=vgs[0].mda_size, metadata_free=min(v.mda_free for v in vgs),
            seqno=vgs[0].seqno, created=record.created,
            shards=[ShardInfo(s.index, s.vg_name, list(s.luns), v.lv_count - (
                len(self.special_lvs()) if s.index == 0 else 0), v.size, v.free, v.seqno)
                for s, v in zip(shards, vgs, strict=True)])

    def deactivate_all(self) -> None:
        for shard in self.shards():
            if shard.luns:
                for lv_name in shard.activator.active(shard.vg_name):
                    shard.activator.deactivate(shard.vg_name, lv_name)

    def detach(self) -> None:
        """Forget the domain on this host (hosts that are not manager); the LUN is untouched."""
        self.deactivate_all()
        self.paths.domain_config(self.name).unlink(missing_ok=True)

    def check_removable(self, force: bool = False) -> None:
        volumes = [lv.name for lv in self.volume_lvs()]
        if volumes and not force:
            raise errors.Busy(f"domain {self.name} has {len(volumes)} volume(s); "
                              "delete them or use --force")

    def destroy(self, force: bool = False) -> None:
        """Destroy the domain: VGs, PV labels, this host's config.

        Like formatting, this runs outside the manager role: the daemon gives the role
        up and leaves the lockspace first (sanlock must stop renewing on ``ids`` before
        the LV goes), after checking no other host is still live in it."""
        self.check_removable(force)
        shards = self.shards()
        self.deactivate_all()
        for shard in reversed(shards):  # shard 0, with the domain record, last
            if not shard.luns:
                continue
            lvm = make_lvm(self.paths, self.runner, shard.luns, writable=True)
            lvm.vgremove(shard.vg_name)
            lvm.pvremove(shard.luns)
        for lun in self.config.luns:  # the partition tables sharedlvm wrote
            if partitions.members(lun) != [lun]:
                partitions.forget(self.runner, lun)
        self.paths.domain_config(self.name).unlink(missing_ok=True)


def _expand(luns: Sequence[str]) -> tuple[str, ...]:
    """LUNs, a partitioned one as its partitions."""
    return tuple(p for lun in luns for p in partitions.members(lun))


def _lun_vgs(luns: Sequence[str]) -> dict[str, str | None]:
    """LUN -> the VG its metadata area names (None: not readable as one), read from the
    metadata areas directly: no LVM command that would parse every shard."""
    found: dict[str, str | None] = {}
    for lun in luns:
        head = lvm_mda.read_head(lun)
        found[lun] = head.vg_name if head else None
    return found


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _lun_signature(runner: Runner, lun: str) -> str | None:
    """What blkid finds on the LUN (a filesystem, an LVM PV, a partition table)."""
    result = runner.run(["blkid", "--probe", "--output", "export", lun], check=False)
    if result.rc == 2:  # nothing found
        return None
    if result.rc != 0:
        raise errors.LvmError(f"cannot probe {lun}: {result.err.strip()}")
    fields = dict(line.split("=", 1) for line in result.out.splitlines() if "=" in line)
    kind = fields.get("TYPE") or fields.get("PTTYPE") or "unknown data"
    return {"LVM2_member": "an LVM physical volume"}.get(kind, kind)


def create_domain(paths: HostPaths, runner: Runner, name: str, luns: Sequence[str],
                  host_id: int, io_timeout: int = 10,
                  format_leases: Callable[[Domain], None] | None = None,
                  leases_size: int | None = None,
                  format_version: int = FORMAT_VERSION, split: int = 1) -> Domain:
    """Format ``luns`` as a new domain with this host as its manager: format 2, one
    shard per LUN, or per partition with ``split`` > 1 (each LUN cut into that many
    GPT partitions); format 1: one VG over all of them."""
    check_name(name)
    check_host_id(host_id)
    if not 1 <= io_timeout <= 60:
        raise errors.InvalidArgument(f"invalid io_timeout {io_timeout}: must be 1..60 s")
    if format_version not in (1, 2):
        raise errors.InvalidArgument(f"invalid format version {format_version}: 1 or 2")
    if len(luns) > journal.MAX_SHARDS:
        raise errors.InvalidArgument(f"a domain has at most {journal.MAX_SHARDS} shards")
    if paths.domain_config(name).exists():
        raise errors.AlreadyExists(f"domain {name} is already attached on this host")
    if split != 1 and format_version == 1:
        raise errors.InvalidArgument("a format-1 domain has no partitions")
    if len(luns) * split > journal.MAX_SHARDS:
        raise errors.InvalidArgument(f"a domain has at most {journal.MAX_SHARDS} shards")
    _check_new_luns(paths, runner, luns)

    domain_uuid = str(uuid.uuid4())
    made: list[tuple[str, tuple[str, ...]]] = []
    try:
        # format 1: one VG on every LUN (kept for tests of old domains); 2: a shard per
        # LUN or partition
        shard_luns = [tuple(luns)] if format_version == 1 else [
            (p,) for lun in luns
            for p in (partitions.split(runner, lun, split) if split > 1 else [lun])]
        for index, members in enumerate(shard_luns):
            vg_name = shard_vg_name(name, index)
            lvm = make_lvm(paths, runner, members, writable=True)
            lvm.pvcreate(members)
            made.append((vg_name, members))
            vg_tags = [f"{DOMAIN_TAG}={domain_uuid}", f"{FORMAT_TAG}={format_version}"]
            if format_version >= 2:
                vg_tags.append(f"{SHARD_TAG}={index}")
            lvm.vgcreate(vg_name, members, vg_tags)
        lvm = make_lvm(paths, runner, shard_luns[0], writable=True)
        for lv_name, size in (SPECIAL_LVS if format_version == 1 else SPECIAL_LVS_V2).items():
            if lv_name == "leases" and leases_size:
                size = leases_size
            lvm.lvcreate(name, lv_name, size, [SPECIAL_TAG])
        activator = make_activator(lvm, runner, paths.activations_dir)
        record = journal.DomainRecord(domain_uuid=domain_uuid, vg_name=name,
                                      manager_host_id=0, created=time.time(),
                                      io_timeout=io_timeout, format_version=format_version,
                                      shard_count=len(shard_luns))
        with ondisk.BlockFile(activator.activate(name, "journal"), writable=True) as dev:
            # Nothing of an earlier use of the LUN may read as a record of this domain.
            chunk = b"\0" * (4 * 1024 * 1024)
            for offset in range(0, journal.JOURNAL_END, len(chunk)):
                dev.write(offset, chunk)
            if format_version >= 2:
                for index, members in enumerate(shard_luns):
                    journal.write_shard(dev, journal.ShardRecord(
                        index, shard_vg_name(name, index), members))
            journal.write_domain_record(dev, record)
        config = HostDomainConfig(name, domain_uuid, tuple(luns), host_id)
        domain = Domain(paths, runner, config)
        if format_leases is not None:
            format_leases(domain)  # the lockspace and the manager lease
    except BaseException:
        _undo_format(paths, runner, name, made)
        if split > 1:
            for lun in luns:
                partitions.forget(runner, lun)
        raise
    config.save(paths)
    return domain


def extend_domain(domain: Domain, luns: Sequence[str], split: int = 1) -> list[Shard]:
    """Add a shard on each of ``luns`` (manager only; empty LUNs): the VG, its shard
    record, then the domain record that counts it, so a crash in between leaves an
    unused VG, never a counted shard that is not there."""
    domain.require_manager()
    record = domain.read_record()
    if record.format_version < 2:
        raise errors.Unsupported(f"domain {domain.name} has format version "
                                 f"{record.format_version}: it cannot grow shards")
    _check_new_luns(domain.paths, domain.runner, luns)
    known = {lun for s in domain.shards() for lun in s.luns}
    for lun in luns:
        if lun in known:
            raise errors.AlreadyExists(f"LUN {lun} is already in domain {domain.name}")
    if record.shard_count + len(luns) * split > journal.MAX_SHARDS:
        raise errors.InvalidArgument(f"a domain has at most {journal.MAX_SHARDS} shards")
    with domain.adding_shards:
        domain.require_manager_now()  # (sfdisk writes the LUNs)
        devices = [p for lun in luns for p in (
            partitions.split(domain.runner, lun, split) if split > 1 else [lun])]
        added = [_add_shard(domain, device) for device in devices]
    config = domain.config
    domain.config = HostDomainConfig(config.name, config.domain_uuid,
                                     config.luns + tuple(luns), config.host_id)
    domain.config.save(domain.paths)
    return added


def _add_shard(domain: Domain, device: str, made: bool = False) -> Shard:
    """A new shard's VG on the empty ``device`` (``made``: the VG of the next index is
    there already, from an addition interrupted after its vgcreate), its shard
    record, then the domain record that counts it (manager; every LVM command after a
    fencing check)."""
    record = domain.read_record()
    index = record.shard_count
    vg_name = shard_vg_name(domain.name, index)
    domain.require_manager_now()
    lvm = make_lvm(domain.paths, domain.runner, [device], writable=True,
                   before_write=domain.require_manager_now,
                   write_timeout=domain.write_timeout)
    if not made:
        lvm.pvcreate([device])
        lvm.vgcreate(vg_name, [device], [f"{DOMAIN_TAG}={domain.config.domain_uuid}",
                                         f"{FORMAT_TAG}={record.format_version}",
                                         f"{SHARD_TAG}={index}"])
    with domain.journal() as dev:
        journal.write_shard(dev, journal.ShardRecord(index, vg_name, (device,)))
        record = journal.read_domain_record(dev)
        record.shard_count = index + 1
        journal.write_domain_record(dev, record)
    domain.record = record
    shard = Shard(index, vg_name, (device,), lvm, make_activator(
        lvm, domain.runner, domain.paths.activations_dir))
    domain.add_shard(shard)
    log.info("domain %s: shard %d (VG %s) added on %s", domain.name, index, vg_name, device)
    return domain.shard(index)  # the one opened with the manager's checks


def grow_into_free_space(domain: Domain, need: int, seen: int) -> Shard | None:
    """A new shard on a new partition in the free space at the end of one of the
    domain's partitioned LUNs (one that grew, or that was not cut to its end), as
    large as the LUN's first partition (less when less is left, but at least
    partitions.MIN_PARTITION and ``need``); None when no LUN has that room. Manager
    only, when no shard has room for a volume or every shard has its share of
    volumes (shards.Placement). ``seen``: the shard count the caller chose from: a
    shard added since (by another request) is returned instead of a second one."""
    domain.require_manager()
    with domain.adding_shards:
        record = domain.read_record()
        if record.shard_count > seen:
            return domain.shard(record.shard_count - 1)
        return _grow(domain, need, record)


def _grow(domain: Domain, need: int, record: journal.DomainRecord) -> Shard | None:
    if record.format_version < 2 or record.shard_count >= journal.MAX_SHARDS:
        return None
    used = {device for shard in domain.shards() for device in shard.luns}
    next_vg = shard_vg_name(domain.name, record.shard_count)
    for lun in domain.config.luns:
        partitions.reread(domain.runner, lun)  # the table as on the disk, not as known
        found = partitions.free_tail(domain.runner, lun)
        if found is None:
            continue
        # A partition of an addition interrupted before it was counted: finish it
        # (blank, or holding the VG of the next index, of this domain), or leave it.
        for orphan in partitions.members(lun):
            if orphan in used:
                continue
            if _lun_signature(domain.runner, orphan) is None:
                log.info("domain %s: blank partition %s of %s is in no shard: using it",
                         domain.name, orphan, lun)
                return _add_shard(domain, orphan)
            head = lvm_mda.read_head(orphan)
            if head is not None and head.vg_name == next_vg and _our_vg(domain, orphan):
                log.info("domain %s: VG %s on %s was made but not counted: counting it",
                         domain.name, next_vg, orphan)
                return _add_shard(domain, orphan, made=True)
        free, usual = found
        size = min(usual, free) // (1024 * 1024) * 1024 * 1024
        if size < max(partitions.MIN_PARTITION, need):
            continue
        domain.require_manager_now()
        log.info("domain %s: %d bytes free after the partitions of %s: adding a shard "
                 "on a new partition of %d bytes", domain.name, free, lun, size)
        return _add_shard(domain, partitions.append(domain.runner, lun, size))
    return None


def _our_vg(domain: Domain, device: str) -> bool:
    """The VG on ``device`` carries this domain's UUID tag."""
    lvm = make_lvm(domain.paths, domain.runner, [device], writable=False)
    try:
        return any(f"{DOMAIN_TAG}={domain.config.domain_uuid}" in vg.tags for vg in lvm.vgs())
    except errors.Error:
        return False


def _check_new_luns(paths: HostPaths, runner: Runner, luns: Sequence[str]) -> None:
    if not luns:
        raise errors.InvalidArgument("at least one --lun is needed")
    if len(set(luns)) != len(luns):
        raise errors.InvalidArgument("the same LUN is given twice")
    for lun in luns:
        check_lun(lun)
    for lun in luns:
        found = _lun_signature(runner, lun)
        if found:
            raise errors.AlreadyExists(f"LUN {lun} is not empty: it holds {found}")


def _undo_format(paths: HostPaths, runner: Runner, name: str,
                 made: Sequence[tuple[str, tuple[str, ...]]]) -> None:
    """Best effort: leave the LUNs as empty as they were found."""
    for vg_name, members in reversed(made):
        lvm = make_lvm(paths, runner, members, writable=True)
        if vg_name == name:
            activator = make_activator(lvm, runner, paths.activations_dir)
            for lv_name in SPECIAL_NAMES:
                with contextlib.suppress(errors.Error):
                    activator.deactivate(name, lv_name)
        with contextlib.suppress(errors.Error):
            lvm.vgremove(vg_name)
        with contextlib.suppress(errors.Error):
            lvm.pvremove(members)


def attach_domain(paths: HostPaths, runner: Runner, name: str, luns: Sequence[str],
                  host_id: int) -> Domain:
    """Attach an existing domain on this host after verifying its domain record."""
    check_name(name)
    check_host_id(host_id)
    if not luns:
        raise errors.InvalidArgument("at least one --lun is needed")
    for lun in luns:
        check_lun(lun)
    if paths.domain_config(name).exists():
        raise errors.AlreadyExists(f"domain {name} is already attached on this host")
    for lun in luns:  # a partitioned LUN: this host's kernel must show the partitions
        partitions.reread(runner, lun)
    heads = _lun_vgs(_expand(luns))
    zero = [lun for lun, vg in heads.items() if vg == name] or list(luns)
    lvm = make_lvm(paths, runner, zero, writable=False)
    try:
        vg = lvm.vg(name)
    except (errors.LvmError, errors.DomainNotFound):
        raise errors.DomainNotFound(f"domain {name} not found on {', '.join(luns)}") from None
    tags = dict(t.split("=", 1) for t in vg.tags if "=" in t)
    domain_uuid = tags.get(DOMAIN_TAG)
    if not domain_uuid:
        raise errors.DomainNotFound(f"volume group {name} is not a sharedlvm domain")
    if vg.pv_count != len(zero):
        raise errors.InvalidArgument(
            f"domain {name} has {vg.pv_count} LUN(s) in VG {name}; give all the domain's "
            "LUNs with --lun")
    config = HostDomainConfig(name, domain_uuid, tuple(luns), host_id)
    domain = Domain(paths, runner, config)
    try:
        domain.record  # noqa: B018 - reads and verifies the domain record
        shards = domain.shards()
    except (errors.Error, CommandError):
        make_activator(lvm, runner, paths.activations_dir).deactivate(name, "journal")
        raise
    missing = [s.vg_name for s in shards if not s.luns]
    ours = {lun for s in shards for lun in s.luns}
    foreign = [lun for lun in luns if not ours & set(partitions.members(lun))]
    if missing or foreign:
        make_activator(lvm, runner, paths.activations_dir).deactivate(name, "journal")
        raise errors.InvalidArgument(
            f"domain {name}: " + "; ".join(
                ([f"no LUN given for shard VG(s) {', '.join(missing)}"] if missing else [])
                + ([f"{', '.join(foreign)} not in the domain"] if foreign else [])))
    config.save(paths)
    return domain
