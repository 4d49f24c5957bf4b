"""LVM2, behind one small class: the only module that knows LVM's flags and messages.

Every command gets the same ``--config`` built from :data:`CONFIG_TEMPLATE`, with the
domain's PVs as the only devices LVM may look at. A host that is not the domain's
manager gets ``locking_type = 4``, so LVM itself refuses to change metadata
there ("Operation prohibited while --readonly is set") whatever the caller does:
docs/design.md rule 1, enforced by the command layer, not by convention.

Reports are JSON with sizes in bytes. LVM's failures are mapped to the project's
errors in :func:`_map_error`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import errors
from .command import DEFAULT_TIMEOUT, Runner
from .errors import CommandError
from .lvm_shell import LvmShell, shell_safe

log = logging.getLogger(__name__)

# The --config given to every LVM command. Each setting has a reason:
CONFIG_TEMPLATE = """\
devices {{
    filter = [ {accept} "r|.*|" ]
    global_filter = [ {accept} "r|.*|" ]
    obtain_device_list_from_udev = 0
    hints = "none"
    use_devicesfile = 0
    write_cache_state = 0
    scan_lvs = 0
}}
global {{
    {locking}
    activation = {activation}
    use_lvmlockd = 0
    locking_dir = "{lock_dir}"
}}
activation {{
    udev_sync = {udev}
    udev_rules = {udev}
    monitoring = 0
}}
backup {{
    backup = 0
    archive = 0
}}
"""
# devices/filter, global_filter: accept only the domain's PVs. LVM never scans, reads
#   or writes any other device of the host (seed 004: "LVM short filters ... avoid
#   accessing host 'owned' devices"), and a scan stays fast on hosts with many disks.
# obtain_device_list_from_udev = 0: after a SAN rescan udev may lag; read /dev.
# hints = "none": the hints file caches which devices are PVs; another host changing
#   the LUN makes it stale (vdsm disables it for the same reason).
# use_devicesfile = 0: the filter above is the source of truth, not
#   /etc/lvm/devices/system.devices, which belongs to the host's admin.
# write_cache_state = 0, scan_lvs = 0: no host-local caches, never scan guests' PVs
#   inside our LVs (a VM's own LVM on its disk must stay invisible to the host).
# global/locking_type = 4 on every host but the manager: read-only; LVM 2.03 honours
#   it as --readonly --sysinit (docs/design.md), activation still allowed.
# global/activation = 0 only where the kernel has no device-mapper (test machines;
#   devmapper.available() asks the kernel, not whether /dev/mapper/control exists).
# use_lvmlockd = 0: sharedlvm is the cluster coordination; lvmlockd is not used.
# activation/udev_sync, udev_rules: 1 where udev runs (it makes /dev/VG/LV); 0 where it
#   does not (minimal hosts, the VM test bed), so libdevmapper makes the nodes itself:
#   with the defaults and no udevd, `lvchange -ay` left no /dev/VG/LV (seen in the VM bed).
# activation/monitoring = 0: only linear LVs, nothing for dmeventd to watch.
# locking_dir: per host, so simulated hosts on one machine do not serialize each
#   other through a shared /run/lock/lvm and hide races the real world has.
# backup/archive = 0: LVM's own backup and archive rewrite a copy of the whole VG's
#   metadata on every commit (0.8-8 MB at 1,000-10,000 volumes) on the host that
#   commits, where the next manager cannot read it, and make later commands parse
#   it (15-18% per commit, more for vgs). sharedlvm keeps its own (planned: see
#   docs/design.md "Shards").
# global/use_aio is not here: LVM ignores it in --config; it is in the private
#   lvm.conf (domain.LVM_CONF).

# Metadata area per PV. Measured (bench/metadata_ops.py, vgcfgbackup): 632 bytes of
# metadata text per volume with its tags, so 10,000 volumes take about 6 MiB. LVM
# keeps the old and the new copy in the circular area while it commits, and user
# tags can make a volume several times larger, so vdsm's 128 MiB leaves a wide
# margin for the 10,000-volume target.
METADATA_SIZE = 128 * 1024 * 1024

# Extent size: vdsm's 128 MiB keeps the extent count (and so the metadata) small for
# multi-TiB LUNs; volumes are rounded up to it.
EXTENT_SIZE = 128 * 1024 * 1024

LV_FIELDS = "lv_name,vg_name,lv_size,lv_tags,lv_attr,seg_count,devices,lv_uuid"
# What a volume is made of (model.VolumeInfo from tags.volume_from_lv).
VOLUME_FIELDS = "lv_name,lv_size,lv_tags"


@dataclass(frozen=True)
class LvmConfig:
    devices: tuple[str, ...]
    writable: bool
    system_dir: Path
    lock_dir: Path
    activation: bool = True
    udev: bool = True

    def text(self) -> str:
        accept = " ".join(f'"a|^{_regex_escape(d)}$|",' for d in self.devices)
        locking = "" if self.writable else "locking_type = 4"
        return CONFIG_TEMPLATE.format(
            accept=accept,
            locking=locking,
            activation=1 if self.activation else 0,
            udev=1 if self.udev else 0,
            lock_dir=self.lock_dir,
        )


def udev_running() -> bool:
    return os.path.exists("/run/udev/control")


def _regex_escape(path: str) -> str:
    return re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", path)


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    vg_name: str
    size: int
    tags: tuple[str, ...]
    attr: str
    segments: int
    devices: str
    uuid: str

    @property
    def active(self) -> bool:
        return len(self.attr) > 4 and self.attr[4] == "a"


# What a metadata command did to a VG's LVs, applied to the manager's view of them:
# (LVs by name, the VG's extent size, the command's output).
ViewChange = Callable[[dict[str, LogicalVolume], int, str], None]


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    uuid: str
    size: int
    free: int
    extent_size: int
    extent_count: int
    free_count: int
    lv_count: int
    pv_count: int
    tags: tuple[str, ...]
    seqno: int
    mda_size: int
    mda_free: int


@dataclass(frozen=True)
class Segment:
    """A linear segment: LV extents [start, start + count) live on ``pv`` from
    physical extent ``pv_start``."""

    start: int
    count: int
    pv: str
    pv_start: int


@dataclass(frozen=True)
class PhysicalVolume:
    name: str
    vg_name: str
    size: int
    pe_start: int


class Lvm:
    """LVM commands for one host and one set of devices."""

    def __init__(self, runner: Runner, config: LvmConfig,
                 before_write: Callable[[], None] | None = None,
                 after_write: Callable[[], None] | None = None,
                 write_timeout: float = DEFAULT_TIMEOUT, keep_view: bool = False,
                 shell: bool = False) -> None:
        self.runner = runner
        self.config = config
        self._config_text = config.text()
        # Called before every metadata-writing command: the manager's fencing-token
        # check (docs/design.md rule 2). It raises to stop the write.
        self.before_write = before_write
        # Called after it, also when it failed: the manager's check that the VG
        # changed by its own commit only (no second writer).
        self.after_write = after_write
        # A metadata command must end while this host surely still holds the role.
        self.write_timeout = write_timeout
        # One metadata command at a time on these devices, checks included: the
        # seqno check before a command is only true if no other thread commits.
        self._write_lock = threading.Lock()
        # The manager's view (keep_view): VG -> its LVs as this process's own commits
        # left them, and the VG's extent size. See volume_lv().
        self._views: dict[str, tuple[dict[str, LogicalVolume], int]] | None = (
            {} if keep_view else None)
        # The manager's metadata commands through one persistent lvm process
        # (lvm_shell.py: ~10 ms less per command); reports still run as processes.
        self._shell = (LvmShell(runner, config.system_dir, self._config_text, self._env(),
                                devices=config.devices) if shell else None)

    def close(self) -> None:
        """This Lvm is dropped (a new manager term, shards reloaded): its shell ends."""
        if self._shell is not None:
            self._shell.close()

    @property
    def shell_pid(self) -> int | None:
        """The pid of the running lvm shell, if any (tests)."""
        return self._shell.pid if self._shell is not None else None

    @property
    def writable(self) -> bool:
        return self.config.writable

    # Running

    def _env(self) -> dict[str, str]:
        return {
            "LVM_SYSTEM_DIR": str(self.config.system_dir),
            # close_fds=True in the runner; LVM need not warn about anything.
            "LVM_SUPPRESS_FD_WARNINGS": "1",
        }

    def run(self, command: str, *args: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        argv = ["lvm", command, "--config", self._config_text, *args]
        try:
            result = self.runner.run(argv, env=self._env(), timeout=timeout)
        except CommandError as exc:
            raise _map_error(exc) from exc
        return result.out

    def _run_write(self, command: str, args: Sequence[str]) -> str:
        shell = self._shell
        if shell is None or shell.closed or not shell_safe([command, *args]):
            return self.run(command, *args, timeout=self.write_timeout)
        # The shell reads the config from its own lvm.conf (same text as --config).
        try:
            return shell.run([command, *args], timeout=self.write_timeout).out
        except CommandError as exc:
            raise _map_error(exc) from exc

    def write(self, command: str, *args: str, vg_name: str | None = None,
              change: ViewChange | None = None) -> str:
        """Run a metadata-changing command, between the manager's checks. With a
        view kept: ``change`` applies the command's effect on ``vg_name``'s LVs to it
        once the command succeeded; without one, or when the command failed (it may
        have committed anyway), the view of ``vg_name`` (of every VG when None) is
        dropped, to be read again from LVM."""
        with self._write_lock:
            if self.before_write is not None:
                self.before_write()
            applied = False
            try:
                out = self._run_write(command, args)
                if self._views is not None and vg_name is not None and change is not None:
                    view = self._views.get(vg_name)
                    if view is not None:
                        change(view[0], view[1], out)
                    applied = True
                return out
            finally:
                if not applied and self._views is not None:
                    if vg_name is None:
                        self._views.clear()
                    else:
                        self._views.pop(vg_name, None)
                if self.after_write is not None:
                    self.after_write()

    def _report(self, command: str, kind: str, fields: str, *args: str) -> list[dict[str, str]]:
        out = self.run(command, "--reportformat", "json", "--units", "b", "--nosuffix",
                       "-o", fields, *args)
        data = json.loads(out)
        rows: list[dict[str, str]] = []
        for section in data.get("report", []):
            rows.extend(section.get(kind, []))
        return rows

    # Reports

    def pvs(self, devices: Iterable[str] = ()) -> list[PhysicalVolume]:
        rows = self._report("pvs", "pv", "pv_name,vg_name,pv_size,pe_start", *devices)
        return [PhysicalVolume(r["pv_name"], r["vg_name"], int(r["pv_size"]),
                               int(r["pe_start"])) for r in rows]

    def vgs(self, vg_name: str | None = None) -> list[VolumeGroup]:
        fields = ("vg_name,vg_uuid,vg_size,vg_free,vg_extent_size,vg_extent_count,"
                  "vg_free_count,lv_count,pv_count,vg_tags,vg_seqno,vg_mda_size,vg_mda_free")
        args = [vg_name] if vg_name else []
        rows = self._report("vgs", "vg", fields, *args)
        return [_vg_from_row(r) for r in rows]

    def vg(self, vg_name: str) -> VolumeGroup:
        vgs = self.vgs(vg_name)
        if not vgs:
            raise errors.DomainNotFound(f"volume group {vg_name} not found")
        return vgs[0]

    def lvs(self, vg_name: str, lv_names: Sequence[str] = (),
            select: str | None = None) -> list[LogicalVolume]:
        args = [f"{vg_name}/{lv}" for lv in lv_names] or [vg_name]
        if select:
            args = ["--select", select, *args]
        return [_lv_from_row(r) for r in self._lv_rows(LV_FIELDS, *args)]

    def _lv_rows(self, fields: str, *args: str) -> list[dict[str, str]]:
        rows = self._report("lvs", "lv", fields, *args)
        # "devices" is a segment field: LVM reports one row per segment. Merge them.
        merged: dict[str, dict[str, str]] = {}
        for row in rows:
            first = merged.setdefault(row["lv_uuid"], dict(row))
            if first is not row and row["devices"] and row["devices"] not in first["devices"]:
                first["devices"] = f"{first['devices']},{row['devices']}"
        return list(merged.values())

    @property
    def keeps_view(self) -> bool:
        return self._views is not None

    def volume_lv(self, vg_name: str, lv_name: str) -> LogicalVolume | None:
        """An LV by name (None when there is none); only its name, size and tags are
        meant to be used (its segment count is 0: not read).

        Read from LVM, but in the manager (``keep_view``) from its view of the VG: the
        VG's LVs read with one report on first use in the term, then changed by each
        of this process's own commits as LVM changes them (sizes rounded up to the
        VG's extent). The manager is the VG's only writer, which its checks around
        every commit prove (the VG's seqno moved by its own commit only), so the view
        is what is on the disk without a read per operation; a failed command drops
        it. docs/design.md, rule 4."""
        if self._views is None:
            try:
                return self.lv(vg_name, lv_name)
            except errors.VolumeNotFound:
                return None
        return self._view(vg_name).get(lv_name)

    def volume_lvs(self, vg_name: str) -> list[LogicalVolume]:
        """Every LV of ``vg_name``, only their names, sizes and tags meant to be used:
        the manager's view (see volume_lv), or one report of just those fields (no
        segment field: one row per LV, the least LVM has to format and we to parse)."""
        if self._views is None:
            rows = self._report("lvs", "lv", VOLUME_FIELDS, vg_name)
            return [_volume_lv(vg_name, r) for r in rows]
        return list(self._view(vg_name).values())

    def _view(self, vg_name: str) -> dict[str, LogicalVolume]:
        assert self._views is not None
        with self._write_lock:  # no command between the report and its use
            view = self._views.get(vg_name)
            if view is None:
                rows = self._report("lvs", "lv", f"{VOLUME_FIELDS},vg_extent_size", vg_name)
                extent = int(rows[0]["vg_extent_size"]) if rows else self.vg(
                    vg_name).extent_size
                view = ({r["lv_name"]: _volume_lv(vg_name, r) for r in rows}, extent)
                self._views[vg_name] = view
            return view[0]

    def lv(self, vg_name: str, lv_name: str) -> LogicalVolume:
        lvs = self.lvs(vg_name, [lv_name])
        if not lvs:
            raise errors.VolumeNotFound(lv_name, vg_name)
        return lvs[0]

    def segments(self, vg_name: str, lv_name: str) -> list[Segment]:
        rows = self._report("lvs", "seg", "seg_start_pe,seg_size_pe,seg_pe_ranges",
                            "--segments", f"{vg_name}/{lv_name}")
        found = []
        for r in rows:
            pv, _, extents = r["seg_pe_ranges"].rpartition(":")
            found.append(Segment(int(r["seg_start_pe"]), int(r["seg_size_pe"]), pv,
                                 int(extents.split("-")[0])))
        return sorted(found, key=lambda seg: seg.start)

    # Metadata writes. LVM refuses every one of these under locking_type=4.

    def pvcreate(self, devices: Sequence[str]) -> None:
        self.write("pvcreate", "--metadatasize", f"{METADATA_SIZE}b", "--metadatacopies", "1",
                 *devices)

    def vgcreate(self, vg_name: str, devices: Sequence[str], tags: Sequence[str]) -> None:
        self.write("vgcreate", "--physicalextentsize", f"{EXTENT_SIZE}b",
                 *_tag_args("--addtag", tags), vg_name, *devices)

    def vgremove(self, vg_name: str) -> None:
        self.write("vgremove", "--force", vg_name)

    def pvremove(self, devices: Sequence[str]) -> None:
        self.write("pvremove", "--force", *devices)

    def lvcreate(self, vg_name: str, lv_name: str, size: int, tags: Sequence[str]) -> None:
        # --zero n / --wipesignatures n: zeroing needs activation, and a new volume's
        # content is the creator's business (qemu-img create, a copy, or --wipe at
        # delete time); --yes answers nothing interactively.
        def created(view: dict[str, LogicalVolume], extent: int, out: str) -> None:
            # (segments: 0, not known without reading it back)
            view[lv_name] = LogicalVolume(lv_name, vg_name, _round_up(size, extent),
                                          tuple(dict.fromkeys(tags)), attr="", segments=0,
                                          devices="", uuid="")

        self.write("lvcreate", "--name", lv_name, "--size", f"{size}b", "--zero", "n",
                   "--wipesignatures", "n", "--yes", *_tag_args("--addtag", tags), vg_name,
                   vg_name=vg_name, change=created)

    def lvextend(self, vg_name: str, lv_name: str, size: int) -> None:
        """Extend to ``size`` bytes; a no-op when the LV already has that size."""
        self._resize("lvextend", vg_name, lv_name, size, max)

    def lvreduce(self, vg_name: str, lv_name: str, size: int) -> None:
        """Reduce to ``size`` bytes (rounded up to the extent); a no-op when the LV has
        that size. The caller has checked that nothing it keeps lies past ``size``:
        LVM frees those extents at once."""
        self._resize("lvreduce", vg_name, lv_name, size, min, "--yes")

    def _resize(self, command: str, vg_name: str, lv_name: str, size: int,
                pick: Callable[[int, int], int], *flags: str) -> None:
        def resized(view: dict[str, LogicalVolume], extent: int, out: str) -> None:
            # One assignment: a reader (no lock) never finds the LV missing.
            lv = view.get(lv_name)
            if lv is not None:
                view[lv_name] = replace(lv, size=pick(lv.size, _round_up(size, extent)),
                                        segments=0)

        try:
            self.write(command, *flags, "--size", f"{size}b", f"{vg_name}/{lv_name}",
                       vg_name=vg_name, change=resized)
        except errors.LvmError as exc:
            if "matches existing size" in str(exc):
                return
            raise

    def lvremove(self, vg_name: str, lv_names: Sequence[str]) -> None:
        def removed(view: dict[str, LogicalVolume], extent: int, out: str) -> None:
            for name in lv_names:
                view.pop(name, None)

        self.write("lvremove", "--yes", *[f"{vg_name}/{lv}" for lv in lv_names],
                   vg_name=vg_name, change=removed)

    def lvremove_selected(self, vg_name: str, select: str) -> list[str]:
        """Remove the LVs of ``vg_name`` matching an LVM selection; returns their names
        (empty when nothing matched, which LVM does not treat as an error)."""
        def removed(view: dict[str, LogicalVolume], extent: int, out: str) -> None:
            for name in _removed_names(out):
                view.pop(name, None)

        return _removed_names(self.write("lvremove", "--yes", "--select", select, vg_name,
                                         vg_name=vg_name, change=removed))

    def change_tags(self, vg_name: str, lv_name: str, add: Sequence[str] = (),
                    delete: Sequence[str] = ()) -> None:
        """Add and delete tags in one metadata commit."""
        def changed(view: dict[str, LogicalVolume], extent: int, out: str) -> None:
            lv = view.get(lv_name)
            if lv is not None:
                kept = tuple(t for t in lv.tags if t not in delete)
                view[lv_name] = replace(lv, tags=kept + tuple(
                    t for t in dict.fromkeys(add) if t not in kept))

        self.write("lvchange", *_tag_args("--deltag", delete), *_tag_args("--addtag", add),
                   f"{vg_name}/{lv_name}", vg_name=vg_name, change=changed)

    def vgck(self, vg_name: str) -> None:
        self.run("vgck", vg_name)

    # Activation: a host-local operation, allowed on every host.

    def activate(self, vg_name: str, lv_name: str) -> None:
        self.run("lvchange", "--activate", "y", f"{vg_name}/{lv_name}")

    def deactivate(self, vg_name: str, lv_name: str) -> None:
        self.run("lvchange", "--activate", "n", f"{vg_name}/{lv_name}")

    def refresh(self, vg_name: str, lv_name: str) -> None:
        """Reload the device-mapper table after the manager changed the LV (extend)."""
        self.run("lvchange", "--refresh", f"{vg_name}/{lv_name}")


def _tag_args(flag: str, tags: Iterable[str]) -> list[str]:
    args: list[str] = []
    for tag in tags:
        args += [flag, tag]
    return args


def _volume_lv(vg_name: str, r: dict[str, Any]) -> LogicalVolume:
    """An LV from a VOLUME_FIELDS report row."""
    return LogicalVolume(r["lv_name"], vg_name, int(r["lv_size"]), _split_tags(r["lv_tags"]),
                         attr="", segments=0, devices="", uuid="")


def _round_up(size: int, extent: int) -> int:
    return -(-size // extent) * extent


def _removed_names(out: str) -> list[str]:
    return re.findall(r'Logical volume "([^"]+)" successfully removed', out)


def _split_tags(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def _vg_from_row(r: dict[str, Any]) -> VolumeGroup:
    return VolumeGroup(
        name=r["vg_name"], uuid=r["vg_uuid"], size=int(r["vg_size"]), free=int(r["vg_free"]),
        extent_size=int(r["vg_extent_size"]), extent_count=int(r["vg_extent_count"]),
        free_count=int(r["vg_free_count"]), lv_count=int(r["lv_count"]),
        pv_count=int(r["pv_count"]), tags=_split_tags(r["vg_tags"]),
        seqno=int(r["vg_seqno"]), mda_size=int(r["vg_mda_size"]),
        mda_free=int(r["vg_mda_free"]))


def _lv_from_row(r: dict[str, Any]) -> LogicalVolume:
    return LogicalVolume(
        name=r["lv_name"], vg_name=r["vg_name"], size=int(r["lv_size"]),
        tags=_split_tags(r["lv_tags"]), attr=r["lv_attr"], segments=int(r["seg_count"] or 0),
        devices=r["devices"], uuid=r["lv_uuid"])


# LVM's messages that mean something to us, first match wins. LVM's exit code is
# almost always 5 (ECMD_FAILED), so the text is all there is.
_ERROR_PATTERNS: list[tuple[str, type[errors.Error]]] = [
    ("prohibited while --readonly is set", errors.ReadOnlyDenied),
    ("Write locks are prohibited", errors.ReadOnlyDenied),
    ("Insufficient free space", errors.NoSpace),
    ("insufficient free space", errors.NoSpace),
    ("already exists", errors.AlreadyExists),
    ("Failed to find logical volume", errors.VolumeNotFound),
    ("not found in volume group", errors.VolumeNotFound),  # lvextend's way
    ("Volume group \"", errors.DomainNotFound),  # ... "not found"; checked below
]


def _no_space(line: str, argv: Sequence[str]) -> errors.Error:
    """LVM's two ways of saying it (2.03.16), with the sizes in extents:
    Volume group "VG" has insufficient free space (10 extents): 80 required.
    Insufficient free space: 80 extents needed, but only 10 available"""
    vg = next((a.split("/")[0] for a in reversed(argv) if not a.startswith("-")), "")
    m = re.search(r'"([^"]+)".*\((\d+) extents\): (\d+) required', line)
    if m:
        return errors.NoSpace(m.group(1), int(m.group(3)) * EXTENT_SIZE,
                              int(m.group(2)) * EXTENT_SIZE)
    m = re.search(r"(\d+) extents needed, but only (\d+) available", line)
    if m:
        return errors.NoSpace(vg, int(m.group(1)) * EXTENT_SIZE, int(m.group(2)) * EXTENT_SIZE)
    return errors.NoSpace(vg, 0, 0)


def _map_error(exc: CommandError) -> errors.Error:
    if isinstance(exc, errors.CommandTimeout):
        return exc  # says what it is: "command lvm timed out after N s"
    text = exc.err
    for pattern, cls in _ERROR_PATTERNS:
        matching = [ln.strip() for ln in text.splitlines() if pattern in ln]
        if cls is errors.DomainNotFound:
            matching = [ln for ln in matching if "not found" in ln]
        if not matching:
            continue
        if cls is errors.ReadOnlyDenied:
            return cls("LVM refused to change metadata: this host has read-only locking")
        if cls is errors.VolumeNotFound:
            # Failed to find logical volume "VG/LV"
            name = re.search(r'"([^"/]+)/([^"]+)"', matching[0])
            if name:
                return errors.VolumeNotFound(name.group(2), name.group(1))
            # Logical volume LV not found in volume group VG.
            name = re.search(r"Logical volume (\S+) not found in volume group (\S+?)\.?$",
                             matching[0])
            if name:
                return errors.VolumeNotFound(name.group(1), name.group(2))
            return errors.NotFound(matching[0])
        if cls is errors.NoSpace:
            return _no_space(matching[0], exc.argv)
        return cls(matching[0])
    command = exc.argv[1] if len(exc.argv) > 1 else "lvm"
    return errors.LvmError(f"{command}: {exc.last_line()}")
