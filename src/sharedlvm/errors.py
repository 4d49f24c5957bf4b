"""Every error sharedlvm raises on purpose, with its fields.

Each class formats a one-line message from its fields. An error keeps its class and
its fields across every boundary it crosses (the daemon's socket, the storage
mailbox, a request id replayed from the journal): :meth:`Error.to_wire` and
:func:`from_wire` carry ``{"kind", "message", "fields"}``, so a repeated request
that first failed with :class:`NoSpace` raises :class:`NoSpace` again, with the same
``requested`` and ``free``. Lower-layer failures (a command that failed, an errno
from sanlock, an LVM message) are mapped to these at one boundary each
(``command.py``, ``lvm.py``, ``leases.py``) with ``raise ... from exc``; the CLI
(exit code) and the HTTP API (status) map these at one place each, and a test fails
if a class is missing there.

    Error
    ├── CommandError          an external command failed (argv, rc, out, err)
    │   └── CommandTimeout    ... or did not finish in time
    ├── InvalidArgument       bad input; nothing was changed
    ├── NotFound              unknown ...
    │   ├── DomainNotFound    ... domain (name)
    │   └── VolumeNotFound    ... volume (volume, domain)
    ├── AlreadyExists         a name or LUN is taken
    ├── NoSpace               not enough free extents (domain, requested, free)
    ├── NotManager            this host may not change metadata (host_id, domain, manager)
    ├── Fenced                this host lost the manager role while working (domain)
    ├── ReadOnlyDenied        LVM itself refused a write (locking_type=4)
    ├── CorruptRecord         a checksummed on-disk record did not verify
    ├── Unsupported           valid, but cannot be served here
    ├── LvmError              an LVM command failed for another reason
    ├── ImageError            qemu-img failed (subcommand)
    ├── LeaseError            sanlock refused or failed
    │   ├── LeaseHeld         a lease is held by another host
    │   │   └── VolumeHeld    ... a volume's lease (volume, hosts, mode)
    │   └── LockspaceError    joining, leaving or using a lockspace failed
    ├── Busy                  the object is in use
    │   └── VolumeInUse       a live host holds the volume (volume, hosts)
    ├── DaemonNotRunning      no daemon answers on this host (socket)
    ├── StorageIOError        I/O on the journal or mailbox failed
    ├── MonitorError          a VM's monitor (QMP) refused a command, or the VM is gone
    │   ├── MonitorRefused    ... qemu answered with an error: the command was not done
    │   └── MigrationFailed   ... qemu's migration failed (pid, reason): the source runs on
    ├── HandoffFailed         a migration's destination could not take the VM over
    │                         (pid, reason, versions: what the source may resume at)
    └── Timeout               no answer in time (what, seconds)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

from .sizes import format_size

# The longest message or command output an error carries across the wire.
MAX_MESSAGE = 1000


class Error(Exception):
    """Base of all sharedlvm errors. ``str(err)`` is a one-line message; the fields
    are the instance attributes set by the subclass's constructor.

    ``final``: the same request would fail the same way again (bad input, an unknown
    object). Only final errors are recorded as the answer of a request id; any other
    failure (a lost role, a held lease, no space that may be freed, an I/O error)
    leaves the request pending, so that its retry tries again."""

    final: ClassVar[bool] = False
    # Raised only before an operation changed anything (checked at its start, or by an
    # LVM command that failed as a whole): the request can be forgotten.
    changes_nothing: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def to_wire(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, "message": str(self), "fields": self.fields()}


class CommandError(Error):
    def __init__(self, argv: Sequence[str], rc: int, out: str, err: str) -> None:
        self.argv = list(argv)
        self.rc = rc
        self.out = out
        self.err = err
        super().__init__(self._text())

    def last_line(self) -> str:
        """The line of stderr that says what went wrong: the last one that is not a
        warning, a usage footer or a usage header.

        LVM ends every command-line failure with lines that only point elsewhere
        (lvm2 tools/lvmcmdline.c, read at d804677c): "Run `lvcreate --help' for more
        information." after any EINVALID_CMD_LINE (also when a check inside the
        command failed, e.g. "striped: Required device-mapper target(s) not
        detected in your kernel." just above it); "No command with matching syntax
        recognised.  Run 'lvcreate --help' for more information." followed by
        "Correct command syntax is:" or "Nearest similar command has syntax:" (the
        syntax itself goes to stdout); "Error during parsing of command line." after
        the line naming the bad option or value. Those pointers are dropped, from
        within a line too; if nothing else is left, the last line is still returned.
        """
        import re

        lines = [ln.strip() for ln in self.err.splitlines() if ln.strip()]
        pointer = re.compile(r"\s*\b(?:Run|Use|Try) [`'][^`']*' for more information\.?")
        noise = {"Error during parsing of command line.", "Correct command syntax is:",
                 "Nearest similar command has syntax:"}
        cleaned = [c for c in (pointer.sub("", ln).strip() for ln in lines) if c]
        useful = [ln for ln in cleaned if not ln.startswith("WARNING") and ln not in noise]
        return (useful or cleaned or lines or [""])[-1]

    def _text(self) -> str:
        return f"command {self.argv[0]} failed (rc={self.rc}): {self.last_line()}"

    def fields(self) -> dict[str, Any]:
        """The command's output is kept to its end: it travels and is recorded."""
        out = super().fields()
        out["out"], out["err"] = self.out[-MAX_MESSAGE:], self.err[-MAX_MESSAGE:]
        return out

    def __str__(self) -> str:
        return self._text()


class CommandTimeout(CommandError):
    def __init__(self, argv: Sequence[str], timeout: float, out: str, err: str) -> None:
        self.timeout = timeout
        super().__init__(argv, -1, out, err)

    def _text(self) -> str:
        return f"command {self.argv[0]} timed out after {self.timeout:g} s"


class InvalidArgument(Error):
    final = True


class NotFound(Error):
    final = True


class DomainNotFound(NotFound):
    pass


class VolumeNotFound(NotFound):
    def __init__(self, volume: str, domain: str) -> None:
        self.volume = volume
        self.domain = domain
        super().__init__(f"volume {volume} not found in domain {domain}")


class AlreadyExists(Error):
    final = True


class NoSpace(Error):
    changes_nothing = True

    def __init__(self, domain: str, requested: int, free: int) -> None:
        self.domain = domain
        self.requested = requested
        self.free = free
        super().__init__(f"not enough free space in domain {domain}: need "
                         f"{format_size(requested)}, free {format_size(free)}")


class NotManager(Error):
    def __init__(self, host_id: int, domain: str, manager: int | None) -> None:
        self.host_id = host_id
        self.domain = domain
        self.manager = manager
        who = f"host {manager}" if manager else "none yet"
        super().__init__(
            f"host {host_id} is not the manager of domain {domain} (manager: {who})")


class Fenced(Error):
    """This host lost the manager role; it must not write."""


class ReadOnlyDenied(Error):
    pass


class CorruptRecord(Error):
    pass


class Unsupported(Error):
    final = True


class LvmError(Error):
    pass


class ImageError(Error):
    pass


class LeaseError(Error):
    pass


class LeaseHeld(LeaseError):
    changes_nothing = True


class VolumeHeld(LeaseHeld):
    def __init__(self, volume: str, hosts: Sequence[int], mode: str) -> None:
        self.volume = volume
        self.hosts = list(hosts)
        self.mode = mode
        if hosts:
            who = ", ".join(f"host {h}" for h in hosts)
            super().__init__(f"volume {volume} is held by {who} ({mode})")
        else:
            super().__init__(f"volume {volume} is held by another host")


class LockspaceError(LeaseError):
    pass


class Busy(Error):
    pass


class VolumeInUse(Busy):
    changes_nothing = True

    def __init__(self, volume: str, hosts: Sequence[int]) -> None:
        self.volume = volume
        self.hosts = list(hosts)
        super().__init__(f"volume {volume} is in use by "
                         f"{', '.join(f'host {h}' for h in hosts)}")


class HasChildren(Busy):
    """A volume that other volumes are read through (their backing file) cannot be
    deleted, snapshotted over or written."""

    changes_nothing = True

    def __init__(self, volume: str, children: Sequence[str], doing: str) -> None:
        self.volume = volume
        self.children = list(children)
        self.doing = doing
        super().__init__(f"cannot {doing} volume {volume}: volume(s) "
                         f"{', '.join(children)} are on top of it")


class ReadOnlyVolume(Error):
    """A template or an internal volume of a chain: never written."""

    changes_nothing = True

    def __init__(self, volume: str, role: str, doing: str, hint: str = "") -> None:
        self.volume = volume
        self.role = role
        self.doing = doing
        self.hint = hint
        what = {"template": "a template", "internal": "below a snapshot in its chain"}
        super().__init__(f"cannot {doing} volume {volume}: it is {what.get(role, role)}, "
                         f"read-only" + (f" ({hint})" if hint else ""))


class DaemonNotRunning(Error):
    pass


class StorageIOError(Error):
    """Reading or writing a special LV (journal, mailbox) failed: the LUN or the
    path to it is failing."""


class Timeout(Error):
    pass


class MonitorError(Error):
    """A running VM's monitor (qmp.py) refused a command, or the VM is gone."""


class MonitorRefused(MonitorError):
    """qemu answered a command with an error: it did not do it (unlike a command
    whose answer never came, which qemu may have done)."""


class MigrationFailed(MonitorError):
    """qemu's live migration failed or was cancelled before it completed: the source VM
    keeps its leases and runs on (qemu resumes it by itself)."""

    def __init__(self, pid: int, reason: str) -> None:
        self.pid = pid
        self.reason = reason
        super().__init__(f"the migration of VM {pid} failed: {reason}; it runs on at "
                         "its source")


class HandoffFailed(Error):
    """A migration's destination could not take the VM over (the lease, a refresh,
    ``cont``): its qemu was ended. ``versions``: the lease version of each volume the
    source may re-acquire them at and resume (the destination never ran); empty when
    the destination may have run the VM: then the source must not be resumed."""

    def __init__(self, pid: int, reason: str, versions: dict[str, int]) -> None:
        self.pid = pid
        self.reason = reason
        self.versions = dict(versions)
        then = ("the source may resume" if versions else
                "the source must not be resumed: the destination may have run it")
        super().__init__(f"VM {pid} could not be taken over: {reason}; {then}")


def error_classes() -> dict[str, type[Error]]:
    """Every error class of this module, by name."""
    return {name: cls for name, cls in globals().items()
            if isinstance(cls, type) and issubclass(cls, Error)}


def _message_only(cls: type[Error]) -> type[Error]:
    """``cls`` or its nearest ancestor whose constructor takes just a message."""
    for base in cls.__mro__:
        if isinstance(base, type) and issubclass(base, Error) and \
                list(inspect.signature(base.__init__).parameters)[1:] == ["message"]:
            return base
    return Error


def from_wire(data: Any) -> Error:
    """The error :meth:`Error.to_wire` sent, rebuilt through its class's constructor
    from the fields it names, so its message always matches its fields. What cannot be
    rebuilt (an unknown kind from a newer peer, missing or odd fields: the data comes
    from the LUN, which any host can write) becomes the nearest class that takes only
    a message, with the message it carried; this never raises."""
    if not isinstance(data, dict):
        return Error(f"malformed error answer: {str(data)[:200]}")
    message = data.get("message")
    message = (message if isinstance(message, str) else repr(message))[:MAX_MESSAGE]
    kind = data.get("kind")
    cls = error_classes().get(kind if isinstance(kind, str) else "", Error)
    raw = data.get("fields")
    fields: dict[str, Any] = raw if isinstance(raw, dict) else {}
    params = list(inspect.signature(cls.__init__).parameters)[1:]
    if params != ["message"] and all(p in fields for p in params):
        try:
            exc = cls(**{p: fields[p] for p in params})
            str(exc)
            return exc
        except Exception:
            pass
    return _message_only(cls)(message)
