"""The project's errors.

Everything sharedlvm raises on purpose derives from :class:`Error`; the CLI prints
``sharedlvm: <message>`` and exits 1 for any of them. Lower-layer failures (a command
that failed, an errno from sanlock, an LVM message) are mapped to these at one
boundary each (``command.py``, ``lvm.py``, ``leases.py``) with ``raise ... from exc``.

    Error
    ├── CommandError          an external command failed (argv, rc, stdout, stderr)
    │   └── CommandTimeout    ... or did not finish in time
    ├── InvalidArgument       bad input from the user; nothing was changed
    ├── NotFound              unknown domain, volume, LUN
    │   ├── DomainNotFound
    │   └── VolumeNotFound
    ├── AlreadyExists         a name or LUN is taken
    ├── NoSpace               the domain has not enough free extents
    ├── NotManager            this host may not change metadata of the domain
    ├── ReadOnlyDenied        LVM itself refused a write (locking_type=4)
    ├── CorruptRecord         a checksummed on-disk record did not verify
    ├── Unsupported           the request is valid but cannot be served here
    ├── LvmError              an LVM command failed for another reason
    ├── LeaseError            sanlock refused or failed (see leases.py)
    │   ├── LeaseHeld         the lease is held by another host
    │   └── LockspaceError    joining or leaving a lockspace failed
    └── Busy                  the object is in use
"""

from __future__ import annotations

from collections.abc import Sequence


class Error(Exception):
    """Base of all sharedlvm errors. ``str(err)`` is a one-line message."""


class CommandError(Error):
    def __init__(self, argv: Sequence[str], rc: int, out: str, err: str) -> None:
        self.argv = list(argv)
        self.rc = rc
        self.out = out
        self.err = err
        super().__init__(argv, rc, out, err)

    def last_line(self) -> str:
        """The most useful line of stderr: the last non-empty, non-warning line."""
        lines = [ln.strip() for ln in self.err.splitlines() if ln.strip()]
        useful = [ln for ln in lines if not ln.startswith("WARNING")]
        return (useful or lines or [""])[-1]

    def __str__(self) -> str:
        return f"command {self.argv[0]} failed (rc={self.rc}): {self.last_line()}"


class CommandTimeout(CommandError):
    def __init__(self, argv: Sequence[str], timeout: float, out: str, err: str) -> None:
        super().__init__(argv, -1, out, err)
        self.timeout = timeout

    def __str__(self) -> str:
        return f"command {self.argv[0]} timed out after {self.timeout:g} s"


class InvalidArgument(Error):
    pass


class NotFound(Error):
    pass


class DomainNotFound(NotFound):
    pass


class VolumeNotFound(NotFound):
    pass


class AlreadyExists(Error):
    pass


class NoSpace(Error):
    pass


class NotManager(Error):
    def __init__(self, host_id: int, domain: str, manager: int | None) -> None:
        self.host_id = host_id
        self.domain = domain
        self.manager = manager
        who = f"host {manager}" if manager else "none yet"
        super().__init__(
            f"host {host_id} is not the manager of domain {domain} (manager: {who})")


class ReadOnlyDenied(Error):
    pass


class CorruptRecord(Error):
    pass


class Unsupported(Error):
    pass


class LvmError(Error):
    pass


class LeaseError(Error):
    pass


class LeaseHeld(LeaseError):
    pass


class LockspaceError(LeaseError):
    pass


class Busy(Error):
    pass
