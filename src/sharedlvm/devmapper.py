"""device-mapper, for what LVM will not do on a read-only host.

Under ``locking_type = 4`` (every host but the manager) LVM activates LVs but refuses
``lvchange --refresh`` ("Operation prohibited while --readonly is set", seen on LVM
2.03.16 in the VM test bed) and reports the activation state as unknown ("X"). A
refresh of a linear LV is only a new table built from its current segments, which a
reader can read: this module loads that table and swaps it in (``dmsetup reload`` +
``resume``; the kernel suspends the device for the swap, in-flight I/O is queued, not
failed). The only module that knows dmsetup's arguments.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .command import Runner
from .lvm import Segment

SECTOR = 512


def dm_name(vg_name: str, lv_name: str) -> str:
    """LVM's device-mapper name: hyphens doubled, VG and LV joined by one hyphen."""
    return f"{vg_name.replace('-', '--')}-{lv_name.replace('-', '--')}"


def is_active(vg_name: str, lv_name: str) -> bool:
    return os.path.exists(f"/dev/mapper/{dm_name(vg_name, lv_name)}")


def linear_table(segments: Sequence[Segment], extent_size: int,
                 pe_starts: dict[str, int]) -> str:
    lines = []
    for seg in segments:
        rdev = os.stat(seg.pv).st_rdev
        start = seg.start * extent_size // SECTOR
        length = seg.count * extent_size // SECTOR
        offset = (pe_starts[seg.pv] + seg.pv_start * extent_size) // SECTOR
        lines.append(f"{start} {length} linear {os.major(rdev)}:{os.minor(rdev)} {offset}")
    return "\n".join(lines) + "\n"


def reload(runner: Runner, name: str, table: str) -> None:
    runner.run(["dmsetup", "reload", name], input=table)
    runner.run(["dmsetup", "resume", name])


def table(runner: Runner, name: str) -> str:
    return runner.run(["dmsetup", "table", name]).out
