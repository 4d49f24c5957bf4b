"""Lease actions run *inside* a guest by the fencing scenarios (:mod:`.fencing`).

Run as a script by the guest's own ``/usr/bin/python3`` (which has python3-sanlock),
with the project on PYTHONPATH through the /project share::

    python3 -P /project/sharedlvm_testbed/vmbed/lease_guest.py format DEVICE RESOURCE...
    python3 -P /project/sharedlvm_testbed/vmbed/lease_guest.py join DEVICE HOST_ID
    python3 -P /project/sharedlvm_testbed/vmbed/lease_guest.py hold DEVICE RESOURCE INDEX STATE_DIR
    python3 -P /project/sharedlvm_testbed/vmbed/lease_guest.py poll DEVICE RESOURCE INDEX STATE_DIR

``-P`` keeps this directory off sys.path (its ``errors.py`` would shadow nothing of
the standard library today, but nothing here should depend on that). Run by path, not
with ``-m``, so the guest does not import the host-side bed (qemu, image building).

Every sanlock call goes through :mod:`sharedlvm.leases`. The lockspace is at offset 0
of DEVICE and the resource of INDEX k (its place in the ``format`` list) at offset
(k+1) x align.

``hold`` and ``poll`` leave a daemon behind (the agent serves one request at a time
and waits for the command it started): the consumer that holds a lease and keeps
reading its disk, and the poller that tries to take a lease every
:data:`POLL_INTERVAL` seconds. Both report through files in STATE_DIR, which the host
reads through the agent:

- ``held-RES``: pid of the consumer holding RES;
- ``tries-RES``: failed acquire attempts of the poller and the last error;
- ``acquired-RES``: guest uptime (s) when the poller acquired RES.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sharedlvm import leases

LOCKSPACE = "slfence"
IO_TIMEOUT = 3
POLL_INTERVAL = 0.5
# Where the consumer reads its "disk": past the lockspace and the resource leases.
CONSUMER_IO_OFFSET = 64 * 1024 * 1024
CONSUMER_IO_SIZE = 4096
CONSUMER_IO_INTERVAL = 0.5
_BLKSSZGET = 0x1268


def sector_size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        buf = fcntl.ioctl(fd, _BLKSSZGET, struct.pack("i", 0))
    finally:
        os.close(fd)
    return int(struct.unpack("i", buf)[0])


def resource_disk(device: str, index: int) -> leases.Disk:
    return leases.Disk(device, (index + 1) * leases.align_for(sector_size(device)))


def lockspace_disk(device: str) -> leases.Disk:
    return leases.Disk(device, 0)


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def cmd_format(device: str, resources: Sequence[str]) -> None:
    size = sector_size(device)
    leases.init_lockspace(LOCKSPACE, lockspace_disk(device), size, IO_TIMEOUT)
    for index, name in enumerate(resources):
        leases.init_resource(LOCKSPACE, name, resource_disk(device, index), size)


def cmd_join(device: str, host_id: int) -> None:
    leases.join_lockspace(LOCKSPACE, host_id, lockspace_disk(device), IO_TIMEOUT)


def _daemonize(state_dir: Path) -> bool:
    """Fork a detached child; True in the child. The parent waits for the child's
    first word on a pipe (``ok`` or an error), prints it and exits with 0 or 1."""
    state_dir.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            word = pipe.read().strip()
        print(word)
        sys.exit(0 if word.startswith("ok") else 1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    log = os.open(state_dir / f"log-{os.getpid()}", os.O_WRONLY | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.set_inheritable(write_end, False)
    os.environ["SLFENCE_REPORT_FD"] = str(write_end)
    return True


def _report(word: str) -> None:
    fd = int(os.environ.pop("SLFENCE_REPORT_FD"))
    os.write(fd, word.encode())
    os.close(fd)


def cmd_hold(device: str, resource: str, index: int, state_dir: Path) -> None:
    """The consumer: hold the lease, then read the disk like a VM would.

    Its reads block in the kernel (state D) once the device is suspended, so
    sanlock's SIGKILL cannot end it and only the watchdog can fence the host.
    """
    _daemonize(state_dir)
    try:
        fd = leases.register()
        leases.acquire(LOCKSPACE, resource, [resource_disk(device, index)], shared=False,
                       fd=fd)
    except Exception as exc:
        _report(f"error {type(exc).__name__}: {exc}")
        raise
    (state_dir / f"held-{resource}").write_text(f"{os.getpid()}\n")
    _report(f"ok {os.getpid()}")
    disk = os.open(device, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, CONSUMER_IO_SIZE)  # page aligned, as O_DIRECT needs
    while True:
        os.preadv(disk, [buf], CONSUMER_IO_OFFSET)
        time.sleep(CONSUMER_IO_INTERVAL)


def cmd_poll(device: str, resource: str, index: int, state_dir: Path) -> None:
    """Try to take the lease every POLL_INTERVAL s; record the first success."""
    _daemonize(state_dir)
    try:
        disk = resource_disk(device, index)
        fd = leases.register()
    except Exception as exc:
        _report(f"error {type(exc).__name__}: {exc}")
        raise
    _report(f"ok {os.getpid()}")
    tries = 0
    while True:
        try:
            leases.acquire(LOCKSPACE, resource, [disk], shared=False, fd=fd)
        except Exception as exc:  # held: the expected answer until the owner is dead
            tries += 1
            (state_dir / f"tries-{resource}").write_text(f"{tries} {exc}\n")
            time.sleep(POLL_INTERVAL)
            continue
        (state_dir / f"acquired-{resource}").write_text(f"{uptime():.2f}\n")
        return


def main(argv: Sequence[str]) -> None:
    command, device, *rest = argv
    if command == "format":
        cmd_format(device, rest)
    elif command == "join":
        cmd_join(device, int(rest[0]))
    elif command in ("hold", "poll"):
        resource, index, state_dir = rest[0], int(rest[1]), Path(rest[2])
        action = cmd_hold if command == "hold" else cmd_poll
        action(device, resource, index, state_dir)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
