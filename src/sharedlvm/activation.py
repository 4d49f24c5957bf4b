"""Reaching an LV's data on this host.

Production activates with device-mapper (``lvchange -ay``, ``--refresh``, ``-an``) and
the device is ``/dev/<vg>/<lv>`` (:class:`DeviceMapperActivator`). On kernels without
device-mapper (this project's test machines, docs/design.md "Environment facts") the
loop-device data path of loopdev.py maps a linear, single-segment LV to a loop device
over its PV instead. :func:`make_activator` picks one from the LVM config.

Activation is host-local state; it is allowed on every host, manager or not.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from . import devmapper
from .command import Runner
from .loopdev import LoopActivator
from .lvm import Lvm

log = logging.getLogger(__name__)


class Activator(Protocol):
    def activate(self, vg_name: str, lv_name: str) -> str: ...
    def deactivate(self, vg_name: str, lv_name: str) -> None: ...
    def refresh(self, vg_name: str, lv_name: str) -> str: ...
    def path(self, vg_name: str, lv_name: str) -> str | None: ...
    def active(self, vg_name: str) -> list[str]: ...


class DeviceMapperActivator:
    def __init__(self, lvm: Lvm, runner: Runner) -> None:
        self.lvm = lvm
        self.runner = runner

    def activate(self, vg_name: str, lv_name: str) -> str:
        """Activate, or refresh an LV that is already active here: `lvchange -ay` does
        not reload the table of an active LV, so without the refresh a host would keep
        using the size it saw before the manager extended the LV (rule 4)."""
        if devmapper.is_active(vg_name, lv_name):
            return self.refresh(vg_name, lv_name)
        self.lvm.activate(vg_name, lv_name)
        return f"/dev/{vg_name}/{lv_name}"

    def deactivate(self, vg_name: str, lv_name: str) -> None:
        # Not active here (the usual case of a delete on the manager): no LVM command.
        # Nothing activates it meanwhile: activation needs the volume's lease.
        if devmapper.is_active(vg_name, lv_name):
            self.lvm.deactivate(vg_name, lv_name)

    def refresh(self, vg_name: str, lv_name: str) -> str:
        """Reload the LV's table from its current segments (read fresh). The manager
        could use `lvchange --refresh`; readers cannot (locking_type=4), so every host
        does the same thing (devmapper.py)."""
        if self.lvm.writable:
            self.lvm.refresh(vg_name, lv_name)
        else:
            segments = self.lvm.segments(vg_name, lv_name)
            extent = self.lvm.vg(vg_name).extent_size
            pe_starts = {pv.name: pv.pe_start for pv in self.lvm.pvs()}
            name = devmapper.dm_name(vg_name, lv_name)
            wanted = devmapper.linear_table(segments, extent, pe_starts)
            if devmapper.table(self.runner, name).split() != wanted.split():
                devmapper.reload(self.runner, name, wanted)
        return f"/dev/{vg_name}/{lv_name}"

    def path(self, vg_name: str, lv_name: str) -> str | None:
        path = f"/dev/{vg_name}/{lv_name}"
        return path if devmapper.is_active(vg_name, lv_name) else None

    def active(self, vg_name: str) -> list[str]:
        return [lv.name for lv in self.lvm.lvs(vg_name)
                if devmapper.is_active(vg_name, lv.name)]


def set_read_only(runner: Runner, path: str, read_only: bool) -> None:
    """The block device's read-only flag (BLKROSET, on loop and dm devices alike):
    a holder of a shared lease gets a device it cannot write. Set after every
    activation or refresh: device-mapper resets it from the table when it loads one."""
    runner.run(["blockdev", "--setro" if read_only else "--setrw", path])


def make_activator(lvm: Lvm, runner: Runner, activations_dir: Path) -> Activator:
    if lvm.config.activation:
        return DeviceMapperActivator(lvm, runner)
    return LoopActivator(lvm, runner, activations_dir)
