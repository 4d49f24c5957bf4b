"""sanlock, behind one small module: the only place that knows its flags and errnos.

Delta leases (a host id in a lockspace) and Paxos resource leases on shared storage,
through Debian's ``python3-sanlock`` binding. Each process talks to the sanlock daemon
of its own host; on a machine with several simulated hosts that daemon is chosen by
``SANLOCK_RUN_DIR`` (:func:`use_run_dir`), which libsanlock reads once, at the
process's first connection: call it before any other sanlock call.

Errors are mapped to the project's errors at one place, :func:`_map`, from the table
:data:`ERRNO_MAP` (measured with sanlock 3.8.5; vdsm's clusterlock.py documents the
same codes).
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import errors

try:
    import sanlock
except ImportError:  # pragma: no cover - the Makefile installs python3-sanlock
    sanlock = None

T = TypeVar("T")

RUN_DIR_ENV = "SANLOCK_RUN_DIR"

# A registered connection (the fd of register()) carries one request and its answer
# at a time: two threads acquiring through the same fd get each other's answers (seen
# as a manager acquire answered with a volume lease's result). Calls through a
# registered fd are serialized; the others open their own connection.
_FD_LOCK = threading.Lock()

# sanlock's fixed watchdog term: a host that stopped renewing is reset by its
# watchdog this long after renewal failure, so others may take its leases only then.
WATCHDOG_FIRE_TIMEOUT = 60

# errno -> (error class, meaning). Negative values are sanlock's own SANLK_* codes.
ERRNO_MAP: dict[int, tuple[type[errors.Error], str]] = {
    -243: (errors.LeaseHeld, "held by another live host"),  # SANLK_ACQUIRE_IDLIVE
    -244: (errors.LeaseHeld, "held by another host"),  # SANLK_ACQUIRE_OWNED
    -245: (errors.LeaseHeld, "held by another host (retry later)"),  # SANLK_ACQUIRE_OTHER
    # another host held it for a moment while taking a shared lease, past sanlock's
    # own retries (several hosts acquiring it shared at once): acquire() retries
    -246: (errors.LeaseHeld, "briefly held by another host taking a shared lease"),  # SHRETRY
    -242: (errors.LeaseHeld, "held by another host, its lockspace is unknown"),  # IDDISK
    -247: (errors.LeaseHeld, "held by another host (retry later)"),  # OWNED_RETRY
    errno.EAGAIN: (errors.LeaseHeld, "held in a conflicting mode"),
    # being acquired or released by another process of this host right now (seen by
    # the fault harness under a restart race): a refusal, to retry
    errno.EBUSY: (errors.LeaseHeld, "being acquired or released on this host"),
    -223: (errors.LeaseError, "no lease initialized there"),  # SANLK_LEADER_MAGIC
    -226: (errors.LeaseError, "lease belongs to another lockspace"),  # LEADER_LOCKSPACE
    -227: (errors.LeaseError, "lease belongs to another resource"),  # LEADER_RESOURCE
    errno.ENOSPC: (errors.LockspaceError, "this host has not joined the lockspace"),
    errno.EEXIST: (errors.LockspaceError, "already held or joined by this host"),
    errno.EINPROGRESS: (errors.LockspaceError, "join or leave in progress"),
    errno.ENOENT: (errors.LockspaceError, "lockspace not found (or sanlock not running)"),
    errno.EPIPE: (errors.LeaseError, "the sanlock daemon went away"),
    errno.ESRCH: (errors.LeaseError, "no such process registered with sanlock"),
    errno.ECONNREFUSED: (errors.LeaseError, "the sanlock daemon is not running"),
    errno.EIO: (errors.LeaseError, "I/O error on lease storage"),
    errno.ETIMEDOUT: (errors.LeaseError, "lease storage timed out"),
}


def host_dead_seconds(io_timeout: int) -> int:
    """When other hosts may take a silent host's leases: renewal failure (8 x io
    timeout) plus the watchdog term (docs/design.md "Leases: sanlock")."""
    return 8 * io_timeout + WATCHDOG_FIRE_TIMEOUT


def align_for(sector_size: int) -> int:
    """sanlock's lease alignment for 2000 hosts: 1 MiB on 512 B, 8 MiB on 4 KiB."""
    return 1024 * 1024 if sector_size == 512 else 8 * 1024 * 1024


@dataclass(frozen=True)
class Disk:
    path: str
    offset: int

    def pair(self) -> tuple[str, int]:
        return (self.path, self.offset)


@dataclass(frozen=True)
class HostState:
    host_id: int
    state: str  # live | failing | dead | free | unknown
    generation: int
    timestamp: int


@dataclass(frozen=True)
class Held:
    lockspace: str
    resource: str
    version: int
    shared: bool


@dataclass(frozen=True)
class Owner:
    host_id: int
    generation: int


def use_run_dir(path: Path) -> None:
    """Talk to the sanlock daemon whose run dir is ``path`` (this host's)."""
    os.environ[RUN_DIR_ENV] = str(path)


def _errno(exc: BaseException | None) -> Any:
    code = getattr(exc, "errno", None)
    if code is None and getattr(exc, "args", None):
        code = exc.args[0]  # type: ignore[union-attr]
    return code


def _map(exc: Exception, what: str) -> errors.Error:
    code = _errno(exc)
    cls, meaning = ERRNO_MAP.get(int(code) if isinstance(code, int) else 0,
                                 (errors.LeaseError, str(exc)))
    return cls(f"{what}: {meaning} (sanlock error {code})")


def _call(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    if sanlock is None:
        raise errors.Unsupported("python3-sanlock is not installed")
    try:
        return fn(*args, **kwargs)
    except sanlock.SanlockException as exc:
        raise _map(exc, what) from exc


def _disks(disks: Sequence[Disk]) -> list[tuple[str, int]]:
    return [d.pair() for d in disks]


def _geometry(sector_size: int) -> dict[str, int]:
    return {"align": align_for(sector_size), "sector": sector_size}


# Formatting

def init_lockspace(name: str, disk: Disk, sector_size: int, io_timeout: int) -> None:
    _call(f"cannot write lockspace {name}", sanlock.write_lockspace, name.encode(),
          disk.path, offset=disk.offset, iotimeout=io_timeout, **_geometry(sector_size))


def init_resource(lockspace: str, resource: str, disk: Disk, sector_size: int) -> None:
    _call(f"cannot write lease {resource}", sanlock.write_resource, lockspace.encode(),
          resource.encode(), [disk.pair()], **_geometry(sector_size))


# Lockspace membership (daemon-wide: survives the calling process)

def join_lockspace(name: str, host_id: int, disk: Disk, io_timeout: int) -> None:
    """Acquire host id ``host_id`` in the lockspace; blocks until done (about
    3 x io_timeout for a free id, longer if the id was used recently)."""
    try:
        _call(f"host {host_id} cannot join lockspace {name}", sanlock.add_lockspace,
              name.encode(), host_id, disk.path, offset=disk.offset, iotimeout=io_timeout)
    except errors.LockspaceError as exc:
        if "already held or joined" not in str(exc):
            raise


def leave_lockspace(name: str, host_id: int, disk: Disk) -> None:
    _call(f"host {host_id} cannot leave lockspace {name}", sanlock.rem_lockspace,
          name.encode(), host_id, disk.path, offset=disk.offset)


def lockspace_joined(name: str, host_id: int, disk: Disk) -> bool:
    """False only when sanlock does not have the host id (None, "being added or
    removed", counts as joined: it settles by itself)."""
    answer = _call("cannot inquire lockspace", sanlock.inq_lockspace, name.encode(),
                   host_id, disk.path, offset=disk.offset)
    return answer is not False


_HOST_STATES = {1: "unknown", 2: "free", 3: "live", 4: "failing", 5: "dead"}


def host_states(name: str, retries: int = 10) -> dict[int, HostState]:
    """Every host id sanlock has seen in the lockspace, with its state. Right after
    joining sanlock answers EAGAIN until it has read the lockspace once: retried."""
    for attempt in range(retries):
        try:
            hosts = _call(f"cannot list hosts of {name}", sanlock.get_hosts, name.encode())
            break
        except errors.LeaseHeld:  # EAGAIN
            if attempt == retries - 1:
                raise
            time.sleep(0.5)
    result = {}
    for h in hosts:
        state = _HOST_STATES.get(h["flags"] & 0x7, "unknown")
        result[int(h["host_id"])] = HostState(int(h["host_id"]), state,
                                              int(h["generation"]), int(h["timestamp"]))
    return result


# Resource leases, held by a process

def register() -> int:
    """Connect this process to its host's sanlock daemon; leases acquired through the
    returned fd belong to this process and are released when it exits."""
    return int(_call("cannot register with sanlock", sanlock.register))


def _owner(fd: int | None, pid: int | None) -> dict[str, int]:
    """Who a lease is for: this process (its registered ``fd``) or another registered
    process (``pid``: sanlock acquires and releases on its behalf; the lease is that
    process's, it dies with it and survives the caller)."""
    if (fd is None) == (pid is None):
        raise ValueError("give exactly one of fd and pid")
    return {"slkfd": fd} if fd is not None else {"pid": int(pid or 0)}


# A shared acquire that met another host's short exclusive hold (SANLK_ACQUIRE_SHRETRY:
# sanlock takes the paxos lease exclusively for a moment to add a shared holder, and
# its own 8 retries can run out when several hosts do it at once, under load) is
# tried again this many times, after a random pause of up to SHARED_RETRY_PAUSE s.
SHRETRY = -246
SHARED_RETRIES = 5
SHARED_RETRY_PAUSE = 1.0


def acquire(lockspace: str, resource: str, disks: Sequence[Disk], *, shared: bool,
            fd: int | None = None, pid: int | None = None,
            version: int | None = None) -> None:
    """``version``: acquire only if the lease is still at that version, i.e. nobody
    acquired it since the holder of that version (a migration's source) released it;
    sanlock refuses otherwise (SANLK_ACQUIRE_LVER). A shared acquire contended by
    other shared acquirers is tried again (SHRETRY), never an exclusive one."""
    for attempt in range(SHARED_RETRIES + 1):
        try:
            _acquire_once(lockspace, resource, disks, shared=shared, fd=fd, pid=pid,
                          version=version)
            return
        except errors.LeaseHeld as exc:
            if not shared or _errno(exc.__cause__) != SHRETRY or attempt == SHARED_RETRIES:
                raise
        time.sleep(random.uniform(0.05, SHARED_RETRY_PAUSE))  # outside _FD_LOCK


def _acquire_once(lockspace: str, resource: str, disks: Sequence[Disk], *,
                  shared: bool, fd: int | None, pid: int | None,
                  version: int | None) -> None:
    with _FD_LOCK:
        try:
            _call(f"cannot acquire lease {resource}", sanlock.acquire, lockspace.encode(),
                  resource.encode(), _disks(disks), shared=shared, version=version,
                  **_owner(fd, pid))
        except errors.LockspaceError as exc:
            # EEXIST from acquire: another process of this host holds the resource
            # (sanlock keeps one token per resource per host daemon).
            if _errno(exc.__cause__) != errno.EEXIST:
                raise
            raise errors.LeaseHeld(f"cannot acquire lease {resource}: held by another "
                                   "process on this host (sanlock error 17)") from exc


def release(lockspace: str, resource: str, disks: Sequence[Disk], *,
            fd: int | None = None, pid: int | None = None) -> None:
    with _FD_LOCK:
        _call(f"cannot release lease {resource}", sanlock.release, lockspace.encode(),
              resource.encode(), _disks(disks), **_owner(fd, pid))


def killpath(fd: int, argv: Sequence[str]) -> None:
    """What sanlock runs instead of killing this registered process when its
    lockspace fails (argv[0] absolute): ours kills the whole process group."""
    with _FD_LOCK:
        _call("cannot set the killpath", sanlock.killpath, argv[0], list(argv[1:]),
              slkfd=fd)


def inquire(fd: int | None = None, pid: int | None = None) -> list[Held]:
    """The leases a process holds now, with their versions (the fencing token)."""
    with _FD_LOCK:
        held = _call("cannot inquire leases", sanlock.inquire, **_owner(fd, pid))
    return [Held(h["lockspace"].decode(), h["resource"].decode(), int(h["version"]),
                 bool(h["flags"] & sanlock.RES_SHARED)) for h in held]


def read_version(disk: Disk, sector_size: int) -> int:
    """The version of the lease at ``disk`` as written on the disk (each acquire
    raises it by one; a release leaves it)."""
    data = _call("cannot read a lease", sanlock.read_resource, disk.path, disk.offset,
                 **_geometry(sector_size))
    return int(data["version"])


def read_resource_owners(lockspace: str, resource: str, disks: Sequence[Disk],
                         sector_size: int) -> list[Owner]:
    """Hosts that hold the lease according to the lease on disk (not filtered by
    liveness: combine with host_states)."""
    owners = _call(f"cannot read owners of {resource}", sanlock.read_resource_owners,
                   lockspace.encode(), resource.encode(), _disks(disks),
                   **_geometry(sector_size))
    return [Owner(int(o["host_id"]), int(o["generation"])) for o in owners]
