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
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

from . import errors, journal, ondisk
from .activation import Activator, make_activator
from .command import Runner
from .devmapper import available as device_mapper_available
from .errors import CommandError
from .lvm import Lvm, LvmConfig, Segment, udev_running
from .model import DomainInfo
from .paths import HostPaths

log = logging.getLogger(__name__)

DOMAIN_TAG = "sharedlvm.domain"
FORMAT_TAG = "sharedlvm.format=1"
SPECIAL_TAG = "sharedlvm.special"

# The special LVs of format version 1 (docs/design.md "On-disk layout"), created in this
# order right after the VG so each is a single segment at the start of the first PV.
SPECIAL_LVS: dict[str, int] = {
    "ids": 8 * 1024 * 1024,
    "leases": 1024 * 1024 * 1024,
    "mailbox": 16 * 1024 * 1024,
    "journal": 64 * 1024 * 1024,
}

MAX_HOST_ID = 2000
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_+.-]{0,63}$")


def check_name(name: str) -> None:
    if not _NAME_RE.match(name) or name in SPECIAL_LVS:
        raise errors.InvalidArgument(
            f"invalid domain name {name!r}: use 1-64 characters of letters, digits, "
            "'_', '+', '.', '-', not starting with '+', '.' or '-'")


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


def _write_lvm_conf(paths: HostPaths) -> None:
    """LVM_SYSTEM_DIR needs an lvm.conf; ours is empty on purpose: every setting
    sharedlvm relies on is in the --config of each command (see lvm.py)."""
    paths.ensure()
    conf = paths.lvm_system_dir / "lvm.conf"
    if not conf.exists():
        # LVM refuses a file with no section at all.
        conf.write_text("# sharedlvm: settings are passed with --config; see lvm.py\n"
                        "config {\n    checks = 1\n}\n")


def make_lvm(paths: HostPaths, runner: Runner, luns: Sequence[str], writable: bool,
             before_write: Callable[[], None] | None = None,
             after_write: Callable[[], None] | None = None,
             write_timeout: float | None = None) -> Lvm:
    _write_lvm_conf(paths)
    return Lvm(runner, LvmConfig(devices=tuple(luns), writable=writable,
                                 system_dir=paths.lvm_system_dir, lock_dir=paths.lvm_lock_dir,
                                 activation=device_mapper_available(),
                                 udev=udev_running()),
               before_write=before_write, after_write=after_write,
               **({"write_timeout": write_timeout} if write_timeout else {}))


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
        self._pe_start_cache: dict[str, int] | None = None
        self._segments: dict[str, list[Segment]] = {}
        self._record: journal.DomainRecord | None = None
        self._extent_size: int | None = None
        # Long steps (a wipe) call this as they progress: the daemon's hang watch.
        self.on_progress: Callable[[], None] | None = None
        self.lvm = make_lvm(paths, runner, config.luns, writable=False)
        self.activator: Activator = make_activator(self.lvm, runner, paths.activations_dir)

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

    def become_manager(self, guard: Callable[[], None], before: Callable[[], None],
                       after: Callable[[], None], write_timeout: float) -> None:
        """Switch to read-write LVM, with ``before`` and ``after`` run around every
        metadata command and ``guard`` (the fencing check) before every other write.
        Called by the manager role only."""
        self.lvm = make_lvm(self.paths, self.runner, self.config.luns, writable=True,
                            before_write=before, after_write=after,
                            write_timeout=write_timeout)
        self.activator = make_activator(self.lvm, self.runner, self.paths.activations_dir)
        self._guard = guard
        self._manager = True

    def become_reader(self) -> None:
        self._manager = False
        self._guard = None
        self.lvm = make_lvm(self.paths, self.runner, self.config.luns, writable=False)
        self.activator = make_activator(self.lvm, self.runner, self.paths.activations_dir)

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
        if self._guard is not None:
            self._guard()

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
            if offset >= _device_size(path):
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

    def read_record(self) -> journal.DomainRecord:
        """The domain record as it is on the LUN now, checked against this host's
        config (the LUN holds the domain this host attached)."""
        path = self.activator.path(self.vg_name, "journal")
        if path is not None:
            base = 0
        else:  # read it where it lives on the PV: no activation just to look
            if self._extent_size is None:
                self._extent_size = self.lvm.vg(self.vg_name).extent_size
            path, base = self._pv_location("journal", 0, self._extent_size)
        with ondisk.BlockFile(path, base=base) as dev:
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
    def manager_lock(self) -> Iterator[None]:
        """Serialize metadata operations of processes on the manager host: the journal's
        request records are read-modify-write."""
        self.require_manager()
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.paths.run_dir / f"{self.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def info(self) -> DomainInfo:
        vg = self.lvm.vg(self.vg_name)
        record = self.read_record()  # fresh: another host may be manager since
        volumes = len([lv for lv in self.lvm.lvs(self.vg_name) if lv.name not in SPECIAL_LVS])
        return DomainInfo(
            name=self.name, domain_uuid=record.domain_uuid, vg_uuid=vg.uuid,
            format_version=ondisk.FORMAT_VERSION, host_id=self.host_id,
            manager_host_id=record.manager_host_id, is_manager=self.is_manager,
            io_timeout=record.io_timeout,
            manager_generation=record.manager_generation, luns=list(self.config.luns),
            size=vg.size, free=vg.free, extent_size=vg.extent_size, volumes=volumes,
            metadata_size=vg.mda_size, metadata_free=vg.mda_free, seqno=vg.seqno,
            created=record.created)

    def deactivate_all(self) -> None:
        for lv_name in self.activator.active(self.vg_name):
            self.activator.deactivate(self.vg_name, lv_name)

    def detach(self) -> None:
        """Forget the domain on this host (hosts that are not manager); the LUN is untouched."""
        self.deactivate_all()
        self.paths.domain_config(self.name).unlink(missing_ok=True)

    def check_removable(self, force: bool = False) -> None:
        volumes = [lv.name for lv in self.lvm.lvs(self.vg_name) if lv.name not in SPECIAL_LVS]
        if volumes and not force:
            raise errors.Busy(f"domain {self.name} has {len(volumes)} volume(s); "
                              "delete them or use --force")

    def destroy(self, force: bool = False) -> None:
        """Destroy the domain: VG, PV labels, this host's config.

        Like formatting, this runs outside the manager role: the daemon gives the role
        up and leaves the lockspace first (sanlock must stop renewing on ``ids`` before
        the LV goes), after checking no other host is still live in it."""
        self.check_removable(force)
        self.deactivate_all()
        lvm = make_lvm(self.paths, self.runner, self.config.luns, writable=True)
        lvm.vgremove(self.vg_name)
        lvm.pvremove(self.config.luns)
        self.paths.domain_config(self.name).unlink(missing_ok=True)


def _device_size(path: str) -> int:
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
                  leases_size: int | None = None) -> Domain:
    """Format ``luns`` as a new domain with this host as its manager."""
    check_name(name)
    check_host_id(host_id)
    if not luns:
        raise errors.InvalidArgument("at least one --lun is needed")
    if len(set(luns)) != len(luns):
        raise errors.InvalidArgument("the same LUN is given twice")
    if not 1 <= io_timeout <= 60:
        raise errors.InvalidArgument(f"invalid io_timeout {io_timeout}: must be 1..60 s")
    for lun in luns:
        check_lun(lun)
    if paths.domain_config(name).exists():
        raise errors.AlreadyExists(f"domain {name} is already attached on this host")
    for lun in luns:
        found = _lun_signature(runner, lun)
        if found:
            raise errors.AlreadyExists(f"LUN {lun} is not empty: it holds {found}")

    domain_uuid = str(uuid.uuid4())
    lvm = make_lvm(paths, runner, luns, writable=True)
    lvm.pvcreate(luns)
    try:
        lvm.vgcreate(name, luns, [f"{DOMAIN_TAG}={domain_uuid}", FORMAT_TAG])
        for lv_name, size in SPECIAL_LVS.items():
            if lv_name == "leases" and leases_size:
                size = leases_size
            lvm.lvcreate(name, lv_name, size, [SPECIAL_TAG])
        activator = make_activator(lvm, runner, paths.activations_dir)
        record = journal.DomainRecord(domain_uuid=domain_uuid, vg_name=name,
                                      manager_host_id=0, created=time.time(),
                                      io_timeout=io_timeout)
        with ondisk.BlockFile(activator.activate(name, "journal"), writable=True) as dev:
            dev.write(0, b"\0" * journal.REQUESTS_OFFSET)
            journal.write_domain_record(dev, record)
        config = HostDomainConfig(name, domain_uuid, tuple(luns), host_id)
        domain = Domain(paths, runner, config)
        if format_leases is not None:
            format_leases(domain)  # the lockspace and the manager lease
    except BaseException:
        _undo_format(lvm, paths, runner, name, luns)
        raise
    config.save(paths)
    return domain


def _undo_format(lvm: Lvm, paths: HostPaths, runner: Runner, name: str,
                 luns: Sequence[str]) -> None:
    """Best effort: leave the LUNs as empty as they were found."""
    activator = make_activator(lvm, runner, paths.activations_dir)
    for lv_name in SPECIAL_LVS:
        with contextlib.suppress(errors.Error):
            activator.deactivate(name, lv_name)
    with contextlib.suppress(errors.Error):
        lvm.vgremove(name)
    with contextlib.suppress(errors.Error):
        lvm.pvremove(luns)


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
    lvm = make_lvm(paths, runner, luns, writable=False)
    try:
        vg = lvm.vg(name)
    except (errors.LvmError, errors.DomainNotFound):
        raise errors.DomainNotFound(f"domain {name} not found on {', '.join(luns)}") from None
    tags = dict(t.split("=", 1) for t in vg.tags if "=" in t)
    domain_uuid = tags.get(DOMAIN_TAG)
    if not domain_uuid:
        raise errors.DomainNotFound(f"volume group {name} is not a sharedlvm domain")
    if vg.pv_count != len(luns):
        raise errors.InvalidArgument(
            f"domain {name} has {vg.pv_count} LUN(s); give all of them with --lun")
    config = HostDomainConfig(name, domain_uuid, tuple(luns), host_id)
    domain = Domain(paths, runner, config)
    try:
        domain.record  # noqa: B018 - reads and verifies the domain record
    except (errors.Error, CommandError):
        make_activator(lvm, runner, paths.activations_dir).deactivate(name, "journal")
        raise
    config.save(paths)
    return domain
