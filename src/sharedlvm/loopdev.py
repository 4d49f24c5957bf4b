"""The data path without device-mapper: one loop device per active LV.

On kernels without device-mapper (this project's test machines, docs/design.md
"Environment facts") :class:`LoopActivator` maps a linear, single-segment LV to a
loop device over its PV with ``--offset/--sizelimit``: the same bytes device-mapper
would map. It is chosen automatically (activation.make_activator) where
device-mapper is missing and refuses multi-segment LVs with a clear error. A
consumer's open device grows in place (LOOP_SET_CAPACITY) after an extend, like a
refreshed dm device does.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import struct
from pathlib import Path

from . import errors
from .command import Runner
from .errors import CommandError
from .lvm import LogicalVolume, Lvm

log = logging.getLogger(__name__)


# <linux/loop.h>: the ioctls to change a loop device's size limit in place, so a
# consumer's open device grows after an extend like a refreshed dm device does.
_LOOP_SET_STATUS64 = 0x4C04
_LOOP_GET_STATUS64 = 0x4C05
_LOOP_SET_CAPACITY = 0x4C07
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")
_DEVICES_RE = re.compile(r"^(?P<pv>[^()]+)\((?P<extent>\d+)\)$")


class LoopActivator:
    """Device-mapper stand-in for test machines: one loop device per active LV.

    Records live in ``<host run dir>/activations/<vg>/<lv>`` so each simulated host
    has its own devices, as real hosts have their own dm tables.
    """

    def __init__(self, lvm: Lvm, runner: Runner, activations_dir: Path) -> None:
        self.lvm = lvm
        self.runner = runner
        self.dir = activations_dir
        # A PV's data start and sector size and a VG's extent size are set when they
        # are made and never change (the domain caches pe_start the same way,
        # domain.py _pe_starts): read once, not at every activation.
        self._pe_starts: dict[str, int] = {}
        self._extents: dict[str, int] = {}
        self._sectors: dict[str, str] = {}

    def _record_path(self, vg_name: str, lv_name: str) -> Path:
        return self.dir / vg_name / lv_name

    def _read_record(self, vg_name: str, lv_name: str) -> dict[str, object] | None:
        try:
            data: dict[str, object] = json.loads(self._record_path(vg_name, lv_name).read_text())
            return data
        except FileNotFoundError:
            return None

    def _mapping(self, lv: LogicalVolume) -> tuple[str, int]:
        """(PV device, byte offset) of a single-segment linear LV."""
        if lv.segments != 1:
            raise errors.Unsupported(
                f"{lv.vg_name}/{lv.name} has {lv.segments} segments; without device-mapper "
                "only single-segment LVs can be mapped")
        m = _DEVICES_RE.match(lv.devices)
        if not m:
            raise errors.Unsupported(f"{lv.vg_name}/{lv.name}: unexpected devices {lv.devices!r}")
        pv = m.group("pv")
        if pv not in self._pe_starts:
            self._pe_starts[pv] = {p.name: p.pe_start for p in self.lvm.pvs([pv])}[pv]
        if lv.vg_name not in self._extents:
            self._extents[lv.vg_name] = self.lvm.vg(lv.vg_name).extent_size
        return pv, self._pe_starts[pv] + int(m.group("extent")) * self._extents[lv.vg_name]

    def activate(self, vg_name: str, lv_name: str) -> str:
        lv = self.lvm.lv(vg_name, lv_name)  # fresh view (rule 4)
        pv, offset = self._mapping(lv)
        record = self._read_record(vg_name, lv_name)
        if record and _loop_matches(str(record["device"]), pv, offset):
            if record["size"] != lv.size:
                _set_size_limit(str(record["device"]), lv.size)
                self._write_record(vg_name, lv_name, str(record["device"]), pv, offset, lv.size)
            return str(record["device"])
        if pv not in self._sectors:
            self._sectors[pv] = self.runner.run(["blockdev", "--getss", pv]).out.strip()
        sector = self._sectors[pv]
        device = self.runner.run([
            "losetup", "--find", "--show", "--offset", str(offset), "--sizelimit",
            str(lv.size), "--sector-size", sector, "--direct-io=on", pv]).out.strip()
        # A block device's read-only flag (BLKROSET) outlives a detach: a loop device
        # detached by something that did not reset it (a crashed host's cleanup,
        # another program) would make this mapping refuse writes (EPERM).
        try:
            self.runner.run(["blockdev", "--setrw", device])
        except CommandError:
            self.runner.run(["losetup", "--detach", device], check=False)
            raise
        self._write_record(vg_name, lv_name, device, pv, offset, lv.size)
        log.debug("activated %s/%s as %s (offset %d)", vg_name, lv_name, device, offset)
        return device

    def _write_record(self, vg_name: str, lv_name: str, device: str, pv: str, offset: int,
                      size: int) -> None:
        path = self._record_path(vg_name, lv_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"device": device, "pv": pv, "offset": offset, "size": size}))
        os.replace(tmp, path)

    def refresh(self, vg_name: str, lv_name: str) -> str:
        return self.activate(vg_name, lv_name)

    def deactivate(self, vg_name: str, lv_name: str) -> None:
        record = self._read_record(vg_name, lv_name)
        if record is None:
            return
        device = str(record["device"])
        if _loop_matches(device, str(record["pv"]), int(str(record["offset"]))):
            # The read-only flag of a shared lease's device (BLKROSET) belongs to the
            # block device, not to this mapping: it would outlive the detach and make
            # the next user of that loop device read-only.
            self.runner.run(["blockdev", "--setrw", device], check=False)
            try:
                self.runner.run(["losetup", "--detach", device])
            except CommandError as exc:
                raise errors.Busy(f"cannot deactivate {vg_name}/{lv_name}: "
                                  f"{exc.last_line()}") from exc
        self._record_path(vg_name, lv_name).unlink(missing_ok=True)

    def path(self, vg_name: str, lv_name: str) -> str | None:
        record = self._read_record(vg_name, lv_name)
        if record and _loop_matches(str(record["device"]), str(record["pv"]),
                                    int(str(record["offset"]))):
            return str(record["device"])
        return None

    def active(self, vg_name: str) -> list[str]:
        vg_dir = self.dir / vg_name
        if not vg_dir.is_dir():
            return []
        return sorted(p.name for p in vg_dir.iterdir() if not p.name.endswith(".tmp"))


def _loop_matches(device: str, pv: str, offset: int) -> bool:
    """True if ``device`` is still the loop device we made (not detached and reused)."""
    name = os.path.basename(device)
    sys_dir = Path("/sys/block") / name / "loop"
    try:
        backing = (sys_dir / "backing_file").read_text().strip()
        found_offset = int((sys_dir / "offset").read_text())
    except (FileNotFoundError, ValueError):
        return False
    return found_offset == offset and os.path.realpath(backing) == os.path.realpath(pv)


def _set_size_limit(device: str, size: int) -> None:
    fd = os.open(device, os.O_RDONLY)
    try:
        buf = bytearray(_LOOP_INFO64.size)
        fcntl.ioctl(fd, _LOOP_GET_STATUS64, buf)
        fields = list(_LOOP_INFO64.unpack(bytes(buf)))
        fields[4] = size  # lo_sizelimit
        fcntl.ioctl(fd, _LOOP_SET_STATUS64, _LOOP_INFO64.pack(*fields))
        fcntl.ioctl(fd, _LOOP_SET_CAPACITY, 0)
    finally:
        os.close(fd)
