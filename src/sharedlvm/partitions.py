"""Shards on partitions of one LUN: a GPT table made by sfdisk, seen by every host.

A LUN larger than one shard needs (a shard is about 500 volumes: docs/design.md
"Shards") is split into equal GPT partitions at ``domain create --partitions N`` or
``domain extend --partitions N``, one shard VG on each. Every host must see the
partitions: the kernel of the host that wrote the table is told with ``partx
--update`` (it adds what is missing and leaves partitions in use alone, where
BLKRRPART would fail), and every other host does the same when it attaches or
meets a shard it cannot find. Which devices are a LUN's partitions is read from
sysfs (``/sys/class/block/<disk>/<partition>/partition``), whatever the naming
(``sdb1``, ``loop0p1``, ``nvme0n1p1``).

A multipath LUN is a device-mapper device (``/dev/mapper/<wwid>``, DM UUID
``mpath-<wwid>``): the kernel makes no partitions of it. kpartx makes them as
device-mapper devices of their own, linear maps on top of it whose DM UUID is
``part<N>-<the LUN's DM UUID>`` (the convention multipath-tools and LVM share). For
such a LUN every host runs ``kpartx -a`` where others run ``partx``, and its
partitions are the holders of the LUN's dm device with that UUID, named
``/dev/mapper/<their dm name>`` whatever delimiter kpartx used.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from . import errors
from .command import Runner
from .lvm import udev_running

MAX_PARTITIONS = 128  # a GPT's default table
_ALIGN = 1024 * 1024
_GPT_RESERVED = 2 * _ALIGN  # the primary table at the start, the backup at the end


SYS_BLOCK = Path("/sys/class/block")
_PART_UUID = re.compile(r"^part(\d+)-(.+)$")


def _sys_block(device: str) -> Path:
    """The device's directory in sysfs, found by its device number: without udev a
    /dev/mapper name is a node of its own, not a link to ``dm-N``."""
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        rdev = 0
    if rdev:
        by_number = Path("/sys/dev/block") / f"{os.major(rdev)}:{os.minor(rdev)}"
        if by_number.exists():
            return SYS_BLOCK / os.path.basename(os.path.realpath(by_number))
    return SYS_BLOCK / os.path.basename(os.path.realpath(device))


def _dm_uuid(block: Path) -> str | None:
    """The DM UUID of a device-mapper device's sysfs entry (None: not device-mapper,
    or a map without a UUID)."""
    try:
        return (block / "dm" / "uuid").read_text().strip() or None
    except OSError:
        return None


def _is_dm(device: str) -> bool:
    return (_sys_block(device) / "dm").is_dir()


def members(device: str) -> list[str]:
    """The partitions of ``device`` in partition order, or ``[device]`` when it has
    none (or is itself a partition)."""
    base = _sys_block(device)
    found: list[tuple[int, str]] = []
    if (base / "dm").is_dir():
        found = _dm_partitions(base)
    else:
        try:
            entries = list(base.iterdir())
        except OSError:
            return [device]
        for entry in entries:
            number = entry / "partition"
            if number.is_file():
                try:
                    found.append((int(number.read_text()), f"/dev/{entry.name}"))
                except (OSError, ValueError):
                    continue
    return [path for _, path in sorted(found)] or [device]


def _dm_partitions(base: Path) -> list[tuple[int, str]]:
    """kpartx's partitions of the dm device at ``base``: its holders whose DM UUID is
    ``part<N>-<its DM UUID>``."""
    parent = _dm_uuid(base)
    if parent is None:
        return []
    found = []
    try:
        holders = list((base / "holders").iterdir())
    except OSError:
        return []
    for holder in holders:
        block = SYS_BLOCK / holder.name
        match = _PART_UUID.match(_dm_uuid(block) or "")
        if match is None or match.group(2) != parent:
            continue
        try:
            name = (block / "dm" / "name").read_text().strip()
        except OSError:
            continue
        found.append((int(match.group(1)), f"/dev/mapper/{name}"))
    return found


def reread(runner: Runner, device: str) -> None:
    """Make this host's kernel see ``device``'s partitions (best effort: a device with
    no partition table, or whose partitions are known, is fine as it is)."""
    if (_sys_block(device) / "partition").exists():
        return  # a partition itself
    if _is_dm(device):
        if _PART_UUID.match(_dm_uuid(_sys_block(device)) or ""):
            return  # kpartx's partition itself
        runner.run(["kpartx", "-a", "-s", device], check=False)
        if not udev_running():  # nobody else makes the new maps' /dev/mapper nodes
            runner.run(["dmsetup", "mknodes"], check=False)
        return
    runner.run(["partx", "--update", device], check=False)


MIN_PARTITION = 8 * 1024 * 1024 * 1024  # a shard smaller than this is not worth one


def free_tail(runner: Runner, device: str) -> tuple[int, int] | None:
    """(bytes free after the last partition of ``device``, size of its first
    partition), or None when ``device`` is not partitioned. The free space is what a
    new partition may take: the LUN's end less the room of GPT's backup table."""
    parts = members(device)
    if parts == [device]:
        return None
    size = int(runner.run(["blockdev", "--getsize64", device]).out.strip())

    def extent(part: str) -> tuple[int, int]:
        block = _sys_block(part)
        return (int((block / "start").read_text()) * 512 if (block / "start").exists()
                else _dm_start(runner, part), int(runner.run(
                    ["blockdev", "--getsize64", part]).out.strip()))

    _, first_size = extent(parts[0])
    last_start, last_size = extent(parts[-1])
    end = -(-(last_start + last_size) // _ALIGN) * _ALIGN
    return max(0, size - _GPT_RESERVED // 2 - end), first_size


def _dm_start(runner: Runner, part: str) -> int:
    """Where kpartx's linear map of a partition starts on its LUN, in bytes."""
    table = runner.run(["dmsetup", "table", part]).out.split()
    # "0 SECTORS linear MAJ:MIN START"
    return int(table[4]) * 512


def append(runner: Runner, device: str, size: int) -> str:
    """Add a partition of ``size`` bytes after the last one of the partitioned
    ``device`` (the GPT's backup table moved to the end first, for a LUN that grew)
    and return its path, once this host's kernel shows it."""
    before = members(device)
    runner.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--relocate",
                "gpt-bak-std", device])
    runner.run(["sfdisk", "--quiet", "--append", "--no-reread", "--no-tell-kernel",
                device], input=f",{size // _ALIGN}MiB\n")  # (a bare number: sectors)
    reread(runner, device)
    deadline = time.monotonic() + 10
    while True:
        found = members(device)
        if len(found) == len(before) + 1 and os.path.exists(found[-1]):
            return found[-1]
        if time.monotonic() > deadline:
            raise errors.StorageIOError(f"the new partition of {device} did not appear: "
                                        f"{found}")
        time.sleep(0.1)


def split(runner: Runner, device: str, count: int) -> list[str]:
    """Write a GPT of ``count`` equal partitions on the empty ``device`` and return
    their device paths, once this host's kernel shows them."""
    if not 2 <= count <= MAX_PARTITIONS:
        raise errors.InvalidArgument(f"invalid partition count {count}: 2..{MAX_PARTITIONS}")
    size = int(runner.run(["blockdev", "--getsize64", device]).out.strip())
    each = (size - _GPT_RESERVED) // count // _ALIGN * _ALIGN
    if each < MIN_PARTITION:
        raise errors.InvalidArgument(
            f"{device} is {size} bytes: {count} partitions would be under 8 GiB each")
    # sizes in MiB: a bare number is in the device's sectors, 512 B or 4 KiB
    script = "label: gpt\n" + "".join(f",{each // _ALIGN}MiB\n" for _ in range(count))
    runner.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", device],
               input=script)
    reread(runner, device)
    deadline = time.monotonic() + 10
    while True:
        found = members(device)
        if len(found) == count and all(os.path.exists(p) for p in found):
            return found
        if time.monotonic() > deadline:
            raise errors.StorageIOError(f"the partitions of {device} did not appear: "
                                        f"{found}")
        time.sleep(0.1)


def forget(runner: Runner, device: str) -> None:
    """Erase the partition table (domain remove) and drop the partitions from this
    host's kernel."""
    if _is_dm(device):
        runner.run(["kpartx", "-d", device], check=False)  # before their table goes
        runner.run(["wipefs", "--all", "--quiet", device], check=False)
        return
    runner.run(["wipefs", "--all", "--quiet", device], check=False)
    runner.run(["partx", "--delete", device], check=False)
