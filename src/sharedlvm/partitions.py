"""Shards on partitions of one LUN: a GPT table made by sfdisk, seen by every host.

A LUN larger than one shard needs (a shard is about 500 volumes: docs/design.md
"Shards") is split into equal GPT partitions at ``domain create --partitions N`` or
``domain extend --partitions N``, one shard VG on each. Every host must see the
partitions: the kernel of the host that wrote the table is told with ``partx
--update`` (it adds what is missing and leaves partitions in use alone, where
BLKRRPART would fail), and every other host does the same when it attaches or
meets a shard it cannot find. Which devices are a LUN's partitions is read from
sysfs (``/sys/class/block/<disk>/<partition>/partition``), whatever the naming
(``sdb1``, ``loop0p1``, ``nvme0n1p1``). Not handled: partitions of device-mapper
multipath LUNs, which are device-mapper devices of their own (kpartx).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import errors
from .command import Runner

MAX_PARTITIONS = 128  # a GPT's default table
_ALIGN = 1024 * 1024
_GPT_RESERVED = 2 * _ALIGN  # the primary table at the start, the backup at the end


def _sys_block(device: str) -> Path:
    return Path("/sys/class/block") / os.path.basename(os.path.realpath(device))


def members(device: str) -> list[str]:
    """The partitions of ``device`` in partition order, or ``[device]`` when it has
    none (or is itself a partition)."""
    base = _sys_block(device)
    found: list[tuple[int, str]] = []
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


def reread(runner: Runner, device: str) -> None:
    """Make this host's kernel see ``device``'s partitions (best effort: a device with
    no partition table, or whose partitions are known, is fine as it is)."""
    if (_sys_block(device) / "partition").exists():
        return  # a partition itself
    runner.run(["partx", "--update", device], check=False)


def split(runner: Runner, device: str, count: int) -> list[str]:
    """Write a GPT of ``count`` equal partitions on the empty ``device`` and return
    their device paths, once this host's kernel shows them."""
    if not 2 <= count <= MAX_PARTITIONS:
        raise errors.InvalidArgument(f"invalid partition count {count}: 2..{MAX_PARTITIONS}")
    size = int(runner.run(["blockdev", "--getsize64", device]).out.strip())
    each = (size - _GPT_RESERVED) // count // _ALIGN * _ALIGN
    if each < 8 * 1024 * 1024 * 1024:
        raise errors.InvalidArgument(
            f"{device} is {size} bytes: {count} partitions would be under 8 GiB each")
    script = "label: gpt\n" + "".join(f",{each // 512}\n" for _ in range(count))
    runner.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", device],
               input=script)
    runner.run(["partx", "--update", device], check=False)
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
    runner.run(["wipefs", "--all", "--quiet", device], check=False)
    runner.run(["partx", "--delete", device], check=False)
