"""device-mapper, for what LVM will not do on a read-only host.

Under ``locking_type = 4`` (every host but the manager) LVM activates LVs but refuses
``lvchange --refresh`` ("Operation prohibited while --readonly is set", seen on LVM
2.03.16 in the VM test bed) and reports the activation state as unknown ("X"). A
refresh of a linear LV is only a new table built from its current segments, which a
reader can read: this module loads that table and swaps it in (``dmsetup reload`` +
``resume``; the kernel suspends the device for the swap, in-flight I/O is queued, not
failed). The only module that knows dmsetup's arguments.

It also decides whether this host has device-mapper at all (:func:`available`): by
asking the kernel, never by the existence of ``/dev/mapper/control``, which any
``lvm version``, ``dmsetup`` or libdevmapper call creates even on a kernel without
device-mapper (issue 9 item 13).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import struct
from collections.abc import Callable, Sequence

from .command import Runner
from .lvm import Segment

log = logging.getLogger(__name__)

SECTOR = 512

CONTROL = "/dev/mapper/control"
PROC_MISC = "/proc/misc"

# struct dm_ioctl of linux/dm-ioctl.h (interface version 4), 312 bytes: u32 version[3],
# data_size, data_start, target_count, s32 open_count, u32 flags, event_nr, padding,
# u64 dev, char name[128], uuid[129], data[7]. No implicit padding (dev is at offset 40).
_DM_IOCTL = struct.Struct("=3I3Ii3IQ128s129s7s")
# DM_VERSION = _IOWR(0xfd, 0, struct dm_ioctl): read/write (3 << 30), the struct size,
# type 0xfd, command 0. The kernel (drivers/md/dm-ioctl.c, ctl_ioctl) requires
# CAP_SYS_ADMIN (else EACCES), checks that version[0] is its major (4) and its minor
# is not older than ours (else EINVAL), writes its own version back into version[]
# and, for this command, does nothing else.
DM_VERSION = (3 << 30) | (_DM_IOCTL.size << 16) | (0xFD << 8) | 0
DM_VERSION_MAJOR = 4

Version = tuple[int, int, int]


def ioctl_version(fd: int) -> Version:
    """The kernel's device-mapper interface version, asked with DM_VERSION on an open
    control node. OSError when no device-mapper driver answers (ENOTTY on another
    device, EACCES without CAP_SYS_ADMIN)."""
    size = _DM_IOCTL.size
    buf = bytearray(_DM_IOCTL.pack(DM_VERSION_MAJOR, 0, 0, size, size, 0, 0, 0, 0, 0, 0,
                                   b"", b"", b""))
    fcntl.ioctl(fd, DM_VERSION, buf, True)
    major, minor, patch = _DM_IOCTL.unpack_from(buf)[:3]
    return major, minor, patch


def misc_registered(proc_misc: str = PROC_MISC) -> bool:
    """Whether the kernel lists a ``device-mapper`` misc device (built in or loaded)."""
    try:
        with open(proc_misc) as f:
            return any(line.split()[1:] == ["device-mapper"] for line in f)
    except OSError:
        return False


def ask_kernel(control: str = CONTROL, proc_misc: str = PROC_MISC,
               version: Callable[[int], Version] = ioctl_version) -> bool:
    """True only if the kernel has a working device-mapper driver (uncached).

    An existing control node is opened (which also makes the kernel load dm-mod if
    it is a module) and asked for its version: only an answer counts, so a node left
    by a tool on a kernel without device-mapper (its open fails with ENODEV) says no.
    Without a node to ask, or without the right to open it, the kernel's list of misc
    devices decides: libdevmapper creates the node from it the first time LVM runs.
    A dm-mod module that is neither loaded nor has a node is not found (modprobe it).
    """
    try:
        fd = os.open(control, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return misc_registered(proc_misc)
    except OSError as exc:
        log.debug("device-mapper: cannot open %s: %s", control,
                  errno.errorcode.get(exc.errno or 0, exc))
        return False
    try:
        found = version(fd)
    except OSError as exc:
        log.debug("device-mapper: no answer from %s: %s", control, exc)
        return False
    finally:
        os.close(fd)
    return found[0] == DM_VERSION_MAJOR


@functools.cache
def available() -> bool:
    """Whether this host has device-mapper, asked of the kernel once per process (it
    cannot change while we run). False selects the loop data path (loopdev.py) and
    ``activation = 0`` for LVM."""
    return ask_kernel()


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
