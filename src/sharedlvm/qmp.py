"""A running qemu's machine protocol (QMP): the only module that knows its commands,
events and command-line options.

The daemon watches each VM it runs (vmwatch.py) through a monitor of its own: ``run``
adds ``-qmp unix:SOCKET,server=on,wait=off`` to a qemu command line (qemu takes several
monitors, so a management layer's own is untouched) and the daemon connects to it. The
watcher speaks to a :class:`VmMonitor` (below) in terms of its own: the leaf's node, a
write threshold, the highest offset written, a VM stopped for lack of space. A libvirt
backend (libvirt-python's events and ``setBlockThreshold``) can stand beside
:class:`QmpMonitor` behind the same methods.

The protocol, as qemu 7.2 speaks it (docs/interop/qmp-spec): one JSON object per line;
a greeting ``{"QMP": ...}`` first, then ``qmp_capabilities`` before any other command;
each command answered by ``{"return": ...}`` or ``{"error": {"class", "desc"}}`` with
the ``id`` it was sent with; events (``{"event", "data", "timestamp"}``) arrive between
answers at any time. Facts measured here: ``block-set-write-threshold`` on the protocol
node (offsets in the image *file*, what the LV must hold) fires
``BLOCK_WRITE_THRESHOLD`` once within milliseconds and disarms itself; an HMP command
(``qemu-io``) holds the main loop, so this monitor's commands wait until it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from . import errors
from .errors import MonitorError

# How long one command may take: every command used here answers at once.
COMMAND_TIMEOUT = 30.0
# The longest line qemu may send (query-named-block-nodes of a deep chain is the
# largest; a qemu that sends more is not trusted further).
MAX_LINE = 8 * 1024 * 1024

# Event kinds, as the watcher knows them (QMP's names stay in this module).
THRESHOLD = "threshold"  # a write went past the armed offset (the threshold disarmed)
IO_ERROR = "io_error"  # a request failed; ``nospace``: ENOSPC, the VM paused for it
STOPPED = "stopped"  # the VM paused (any reason)
RESUMED = "resumed"
SHUTDOWN = "shutdown"  # qemu is going away

_EVENTS = {"BLOCK_WRITE_THRESHOLD": THRESHOLD, "BLOCK_IO_ERROR": IO_ERROR, "STOP": STOPPED,
           "RESUME": RESUMED, "SHUTDOWN": SHUTDOWN}
# Block drivers of a protocol node over a file or a block device.
_PROTOCOL_DRIVERS = ("host_device", "file")
# ... and of an image's format node (filters over it, such as a commit job's, report
# their child's filename too).
_FORMAT_DRIVERS = ("qcow2", "raw")


def _plain(filename: object) -> str:
    """The path of the image a node of qemu reads: its ``filename``, or for a ``json:``
    pseudo-filename (what qemu reports for a node whose options it cannot write as a
    plain name: a live snapshot's overlay, added with its backing given) the filename
    of its protocol node."""
    name = str(filename)
    if not name.startswith("json:"):
        return name
    try:
        node = json.loads(name[5:])
    except ValueError:
        return name
    while isinstance(node, dict) and isinstance(node.get("file"), dict):
        node = node["file"]
    if isinstance(node, dict) and isinstance(node.get("filename"), str):
        return str(node["filename"])
    return name


def _names(filename: object, path: str) -> bool:
    """qemu's ``filename`` of a node is the image ``path`` (itself, or a link to the
    same device)."""
    name = _plain(filename)
    return name == path or os.path.realpath(name) == os.path.realpath(path)


@dataclass(frozen=True)
class Event:
    kind: str
    node: str = ""  # the node (threshold) or the drive (io_error) it is about
    nospace: bool = False  # io_error: ENOSPC
    reason: str = ""  # io_error: the error's text; stopped: why, when qemu says
    offset: int = -1  # threshold: the threshold that fired
    at: float = 0.0  # when qemu sent it (wall clock, seconds)


def monitor_argv(socket_path: str) -> list[str]:
    """The options that give qemu a monitor for sharedlvm at ``socket_path`` (qemu
    listens; it does not wait for the daemon to connect)."""
    if "," in socket_path:
        raise errors.InvalidArgument(f"invalid monitor socket {socket_path!r}: a comma "
                                     "would end qemu's option")
    if len(os.fsencode(socket_path)) > 107:
        raise errors.InvalidArgument(f"the monitor socket {socket_path} is longer than a "
                                     "unix socket path may be (107 bytes): use a shorter "
                                     "SHAREDLVM_ROOT")
    return ["-qmp", f"unix:{socket_path},server=on,wait=off"]


def is_qemu(argv0: str) -> bool:
    """A qemu system emulator, by its program name (``qemu-system-*``, RHEL's
    ``qemu-kvm``). A wrapper (taskset, numactl, a shell) hides it: give qemu itself."""
    name = os.path.basename(argv0)
    return name.startswith("qemu-system-") or name == "qemu-kvm"


def incoming_argv() -> list[str]:
    """The options of a migration's destination qemu: stopped (``-S``) and waiting for
    ``migrate-incoming`` (QmpMonitor.listen_incoming), so that sharedlvm can set its
    capabilities before the stream arrives and resume it after the lease handoff."""
    return ["-S", "-incoming", "defer"]


def check_argv(argv: list[str]) -> None:
    """Refuse what would take qemu away from the leases' process: ``-daemonize`` forks
    it out of the process group sanlock kills and ends the pid that holds them."""
    if any(arg.lstrip("-") == "daemonize" for arg in argv[1:]):
        raise errors.InvalidArgument("qemu's -daemonize takes the VM out of the process "
                                     "that holds its leases: run qemu in the foreground "
                                     "(sharedlvm run detaches nothing)")
    if any(arg in ("-incoming", "--incoming") for arg in argv[1:]):
        raise errors.InvalidArgument("give 'sharedlvm run --incoming' instead of qemu's "
                                     "-incoming: the destination's lease handoff needs "
                                     "the options sharedlvm adds")


class Qmp:
    """One QMP connection. Thread-safe: a command and an event wait may come from two
    threads; events read while a command waits for its answer are kept for
    :meth:`next_event`."""

    def __init__(self, path: str, timeout: float = COMMAND_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = bytearray()
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._next_id = 0
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            greeting = self._read(time.monotonic() + timeout)
            if "QMP" not in greeting:
                raise MonitorError(f"{path} is not a QMP monitor")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _read(self, deadline: float) -> dict[str, Any]:
        """The next message, or MonitorError when qemu went away or stayed silent."""
        scanned = 0  # the buffer before this holds no newline: search only what is new
        while (end := self._buf.find(b"\n", scanned)) < 0:
            scanned = len(self._buf)
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.Timeout(f"the monitor {self.path} did not answer in time")
            ready, _, _ = select.select([self._sock], [], [], left)
            if not ready:
                continue
            try:
                chunk = self._sock.recv(65536)
            except OSError as exc:
                raise MonitorError(f"the monitor {self.path} failed: {exc}") from None
            if not chunk:
                raise MonitorError(f"the VM of {self.path} has gone (monitor closed)")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise MonitorError(f"the monitor {self.path} sent an oversized message")
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            raise MonitorError(f"the monitor {self.path} sent {line[:80]!r}") from None
        if not isinstance(message, dict):
            raise MonitorError(f"the monitor {self.path} sent {line[:80]!r}")
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            message: dict[str, Any] = {"execute": command, "id": ident}
            if arguments:
                message["arguments"] = arguments
            try:
                self._sock.sendall(json.dumps(message).encode() + b"\n")
            except OSError as exc:
                raise MonitorError(f"the VM of {self.path} has gone ({exc.strerror})") \
                    from None
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            while True:
                answer = self._read(deadline)
                if "event" in answer:
                    self._events.append(answer)
                    continue
                if answer.get("id") != ident:
                    continue  # an answer to a command that timed out before
                if "error" in answer:
                    err = answer["error"]
                    raise errors.MonitorRefused(
                        f"qemu refused {command}: {err.get('class')}: {err.get('desc')}")
                return answer.get("return")

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event within ``timeout`` seconds, or None. The wait itself holds no
        lock: a command from another thread (a migration's ``cont``) goes at once."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._events:
                    return self._events.pop(0)
                if b"\n" in self._buf or select.select([self._sock], [], [], 0)[0]:
                    try:  # a message is there or arriving: read it whole
                        message = self._read(time.monotonic() + self.timeout)
                    except errors.Timeout:
                        raise MonitorError(f"the monitor {self.path} stopped in the "
                                           "middle of a message") from None
                    if "event" in message:
                        self._events.append(message)
                    continue  # else an answer to a command that timed out: dropped
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            select.select([self._sock], [], [], min(left, 0.1))


class QmpMonitor:
    """The watcher's view of a VM through QMP (vmwatch.VmMonitor)."""

    def __init__(self, path: str, timeout: float = COMMAND_TIMEOUT) -> None:
        self.qmp = Qmp(path, timeout)

    def close(self) -> None:
        self.qmp.close()

    def leaf_node(self, image_path: str) -> str:
        """The protocol node reading and writing ``image_path`` (the device of the
        leaf: where a write threshold counts offsets in the LV)."""
        for node in self.qmp.execute("query-named-block-nodes", {"flat": True}):
            if node.get("drv") in _PROTOCOL_DRIVERS and _names(node.get("file"), image_path):
                return str(node["node-name"])
        raise MonitorError(f"the VM of {self.qmp.path} has no node on {image_path}")

    def disk_nodes(self, image_path: str) -> set[str]:
        """Every node opened on ``image_path``: its protocol node and the format node
        over it (the one BLOCK_IO_ERROR names)."""
        return {str(node["node-name"])
                for node in self.qmp.execute("query-named-block-nodes", {"flat": True})
                if _names(node.get("file"), image_path)}

    def arm_threshold(self, node: str, offset: int) -> None:
        """BLOCK_WRITE_THRESHOLD once a write reaches past ``offset`` on ``node``."""
        self.qmp.execute("block-set-write-threshold",
                         {"node-name": node, "write-threshold": int(offset)})

    def highest_write(self, node: str) -> int:
        """The highest offset written on ``node`` since qemu started (0 when unknown):
        the fallback when an event is missed."""
        for entry in self.qmp.execute("query-blockstats", {"query-nodes": True}):
            if entry.get("node-name") == node:
                return int(entry.get("stats", {}).get("wr_highest_offset", 0))
        return 0

    def io_errors(self) -> dict[str, str]:
        """The top node of each drive whose last request failed and that is not yet
        resumed, and why: "nospace" or "failed" (query-block io-status)."""
        return {str((dev.get("inserted") or {}).get("node-name", "")): str(dev["io-status"])
                for dev in self.qmp.execute("query-block")
                if dev.get("io-status") not in (None, "ok")}

    def migrating(self) -> bool:
        """A migration is under way (its source must not be resumed). Not "completed":
        qemu 7.2 keeps saying so for good on a destination and on a source resumed
        after a failed handoff; a source that completed is in run state
        ``postmigrate``, which nothing resumes but the handoff's ``vm resume``."""
        status = (self.qmp.execute("query-migrate") or {}).get("status")
        return status not in (None, "none", "cancelled", "failed", "completed")

    def status(self) -> tuple[bool, str]:
        """(running, qemu's run state: "running", "paused", "io-error", ...)."""
        answer = self.qmp.execute("query-status")
        return bool(answer.get("running")), str(answer.get("status", ""))

    def resume(self) -> None:
        self.qmp.execute("cont")

    def pause(self) -> None:
        self.qmp.execute("stop")

    # Live migration (vmmigrate.py). The destination qemu runs with ``-S -incoming
    # defer`` (incoming_argv): ``late-block-activate`` keeps its images inactive (no
    # write; opening them read the qcow2 headers) until ``cont``, which sharedlvm sends
    # only once the leaf's lease is its own. Measured here (qemu 7.2): a write through
    # an inactive node is refused ("Block node is read-only"); the source's status is
    # ``postmigrate`` after ``completed``, its images inactivated and flushed.

    def listen_incoming(self, uri: str) -> None:
        """Make a qemu started with incoming_argv() listen for the migration stream."""
        self.qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "late-block-activate", "state": True}]})
        self.qmp.execute("migrate-incoming", {"uri": uri})

    def migrate(self, uri: str) -> None:
        """Start migrating this VM to a destination listening on ``uri``."""
        self.qmp.execute("migrate", {"uri": uri})

    def migration(self) -> tuple[str, int | None, str]:
        """(status, qemu's downtime in ms when completed, the error when failed): status
        is "none", "setup", "active", ..., "completed", "failed" or "cancelled"."""
        answer = self.qmp.execute("query-migrate") or {}
        downtime = answer.get("downtime")
        return (str(answer.get("status", "none")),
                int(downtime) if downtime is not None else None,
                str(answer.get("error-desc", "")))

    def cancel_migration(self) -> None:
        self.qmp.execute("migrate_cancel")

    # Live snapshot (vmlive.py): a new qcow2 node on the new leaf's device, its backing
    # the drive's active layer (blockdev-add with no backing, then blockdev-snapshot).

    def active_node(self, image_path: str) -> str:
        """The top node of the drive whose active layer is ``image_path``."""
        for dev in self.qmp.execute("query-block"):
            top = dev.get("inserted") or {}
            if top and _names(top.get("file"), image_path):
                return str(top["node-name"])
        raise MonitorError(f"the VM of {self.qmp.path} has no drive on {image_path}")

    def add_overlay(self, node: str, image_path: str) -> None:
        """A qcow2 node ``node`` on the device ``image_path`` (O_DIRECT, as cache=none),
        its backing left to blockdev-snapshot."""
        self.qmp.execute("blockdev-add", {
            "driver": "qcow2", "node-name": node, "backing": None,
            "cache": {"direct": True},
            "file": {"driver": "host_device", "filename": image_path,
                     "cache": {"direct": True}}})

    def snapshot(self, active: str, overlay: str) -> None:
        """Make ``overlay`` the drive's active layer, backed by ``active``."""
        self.qmp.execute("blockdev-snapshot", {"node": active, "overlay": overlay})

    def remove_node(self, node: str) -> None:
        self.qmp.execute("blockdev-del", {"node-name": node})

    def read_only(self, node: str) -> bool:
        """qemu opened ``node`` read-only (it writes nothing through it)."""
        for entry in self.qmp.execute("query-named-block-nodes", {"flat": True}):
            if entry.get("node-name") == node:
                return bool(entry.get("ro"))
        raise MonitorError(f"the VM of {self.qmp.path} has no node {node}")

    # Live merge (vmlive.merge): ``block-commit`` of a volume into the one below it,
    # the job kept after it ends (``auto-dismiss`` off) so that its outcome is read,
    # not missed as an event the watcher consumed.

    def chain(self, image_path: str) -> list[str]:
        """The files of the chain of the drive whose active layer is ``image_path``,
        as qemu names them (see _names), the active layer first."""
        for dev in self.qmp.execute("query-block"):
            image = (dev.get("inserted") or {}).get("image")
            if not image or not _names(image.get("filename"), image_path):
                continue
            files = []
            while image:
                files.append(_plain(image.get("filename")))
                image = image.get("backing-image")
            return files
        raise MonitorError(f"the VM of {self.qmp.path} has no drive on {image_path}")

    def format_node(self, image_path: str) -> str:
        """The format node (qcow2, raw; not a filter over it) qemu reads
        ``image_path`` through."""
        for node in self.qmp.execute("query-named-block-nodes", {"flat": True}):
            if node.get("drv") in _FORMAT_DRIVERS and _names(node.get("file"), image_path):
                return str(node["node-name"])
        raise MonitorError(f"the VM of {self.qmp.path} has no node on {image_path}")

    def commit(self, job: str, device: str, top: str, base: str,
               backing_file: str | None) -> None:
        """Start committing node ``top`` into node ``base`` in the drive whose root
        node is ``device``: an active commit (``top`` the active layer, pivoted by
        complete_job once ready) or an intermediate one, whose ``backing_file`` is
        written into the header of the image above ``top``."""
        arguments: dict[str, Any] = {"job-id": job, "device": device, "top-node": top,
                                     "base-node": base, "auto-dismiss": False}
        if backing_file is not None:
            arguments["backing-file"] = backing_file
        self.qmp.execute("block-commit", arguments)

    def job(self, job: str) -> tuple[str, str] | None:
        """(status, error) of block job ``job``, None when qemu has no such job:
        status "running", "ready" (an active commit in sync), "concluded", ..."""
        for entry in self.qmp.execute("query-jobs"):
            if entry.get("id") == job:
                return str(entry.get("status", "")), str(entry.get("error", ""))
        return None

    def complete_job(self, job: str) -> None:
        self.qmp.execute("job-complete", {"id": job})

    def cancel_job(self, job: str) -> None:
        self.qmp.execute("job-cancel", {"id": job})

    def dismiss_job(self, job: str) -> None:
        self.qmp.execute("job-dismiss", {"id": job})

    def quit(self) -> None:
        """End qemu (the VM moved away, or must not run)."""
        with contextlib.suppress(MonitorError):  # qemu may close before it answers
            self.qmp.execute("quit")

    def next_event(self, timeout: float) -> Event | None:
        """The next event the watcher cares about within ``timeout`` (others are
        skipped), or None."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            message = self.qmp.next_event(left)
            if message is None:
                return None
            kind = _EVENTS.get(str(message.get("event")))
            if kind is None:
                continue
            data = message.get("data") or {}
            stamp = message.get("timestamp") or {}
            at = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
            if kind == THRESHOLD:
                return Event(kind, node=str(data.get("node-name", "")),
                             offset=int(data.get("write-threshold", -1)), at=at)
            if kind == IO_ERROR:
                return Event(kind, node=str(data.get("node-name") or data.get("device", "")),
                             nospace=bool(data.get("nospace")),
                             reason=str(data.get("reason", "")), at=at)
            return Event(kind, at=at)
