"""Running VMs: their thin disks grown before the guest notices, and resumed after
ENOSPC (docs/design.md, "Disks of running VMs").

``sharedlvm run --image I -- qemu-system-...`` gives qemu a monitor for sharedlvm
(qmp.monitor_argv) and leaves a record of the VM in ``run/sharedlvm/vms/PID.json``
(the pid, its start time, the monitor's socket, the domain, each writable volume and
the path qemu opens it by). The daemon scans that directory (:class:`VmWatcher`), so a
restarted daemon finds every VM again; each VM gets a thread (:class:`VmWatch`) that:

- finds each thin qcow2 volume's protocol node, and arms a write threshold ``free``
  bytes below the end of its LV (the threshold fires once, then disarms itself);
- on the event (or, every ``fallback`` seconds, when the highest offset written is
  past the threshold: an event missed while the daemon was down), asks the manager to
  grow the LV by ``chunk`` (ExtendVolume ``allocation``, with a request id naming the
  target: repeated by a restarted daemon, it is answered, not done twice), refreshes
  the LV on this host, checks the device's new size and re-arms;
- on a write that failed for lack of space (the drive's ``werror=enospc`` paused the
  VM instead of failing the guest), grows the volume the same way and resumes the VM
  only if it is paused for that I/O error (never a VM paused for any other reason);
  a volume at its largest size (capacity + qcow2 metadata) is reported, not grown
  again and the VM not resumed into the same error.

Every extend logs and records its steps (event seen, manager done, refreshed,
re-armed) in the daemon's metrics. The watch ends when qemu exits (its monitor
closes); the record is the ``run`` parent's to remove (a stale one, whose process is
gone, is removed by the scan).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from . import errors, qemu_img
from .domain import device_size
from .errors import MonitorError
from .model import Allocation, VmInfo, VolumeFormat, VolumeInfo
from .paths import HostPaths
from .qmp import IO_ERROR, RESUMED, THRESHOLD, Event, QmpMonitor
from .units import GiB, MiB, round_up

log = logging.getLogger(__name__)

# How often the daemon looks for new VM records.
SCAN_INTERVAL = 0.5
# How long a new VM's monitor may take to appear (qemu's start under TCG).
CONNECT_TIMEOUT = 60.0
# A watch that ended while its VM lives is started again after this long.
RESTART_DELAY = 10.0


@dataclass(frozen=True)
class ThinSettings:
    """When and by how much a running VM's thin volume grows.

    vdsm extends a thin block volume by a 2.5 GiB chunk when less than about half a
    chunk is free; sharedlvm's defaults are smaller because its LVs start at 1 GiB
    (volume.THIN_INITIAL_SIZE): a 512 MiB threshold margin is what a guest writing
    250 MB/s uses in 2 s, the slowest answer of an idle manager's mailbox sweep.
    """

    chunk: int = 1 * GiB  # grown by this much at a time, at least
    free: int = 512 * MiB  # grown when less than this is left in the LV, at least
    fallback: float = 2.0  # seconds between highest-write checks (a missed event)

    def sized(self, rate: float, latency: float) -> tuple[int, int]:
        """(free margin, chunk) for a guest writing ``rate`` bytes/s whose extends take
        ``latency`` s: the margin holds 4 extends' worth of writing (the next extend
        must land before the guest reaches the end, with room for a slower one), the
        chunk twice the margin, so that a steady writer asks at most every few
        extend latencies; never below the settings."""
        want = round_up(int(rate * latency * 4), MiB)
        return max(self.free, want), max(self.chunk, 2 * want)


class VmMonitor(Protocol):
    """What the watcher needs of a VM (qmp.QmpMonitor; a libvirt backend later)."""

    def leaf_node(self, image_path: str) -> str: ...
    def disk_nodes(self, image_path: str) -> set[str]: ...
    def arm_threshold(self, node: str, offset: int) -> None: ...
    def highest_write(self, node: str) -> int: ...
    def io_errors(self) -> dict[str, str]: ...
    def migrating(self) -> bool: ...
    def status(self) -> tuple[bool, str]: ...
    def resume(self) -> None: ...
    def pause(self) -> None: ...
    def next_event(self, timeout: float) -> Event | None: ...
    def close(self) -> None: ...
    # live migration (vmmigrate.py)
    def listen_incoming(self, uri: str) -> None: ...
    def migrate(self, uri: str) -> None: ...
    def migration(self) -> tuple[str, int | None, str]: ...
    def cancel_migration(self) -> None: ...
    def quit(self) -> None: ...
    # live snapshot (vmlive.py)
    def active_node(self, image_path: str) -> str: ...
    def add_overlay(self, node: str, image_path: str) -> None: ...
    def snapshot(self, active: str, overlay: str) -> None: ...
    def remove_node(self, node: str) -> None: ...
    def read_only(self, node: str) -> bool: ...
    # live merge (vmlive.py)
    def chain(self, image_path: str) -> list[str]: ...
    def format_node(self, image_path: str) -> str: ...
    def commit(self, job: str, device: str, top: str, base: str,
               backing_file: str | None) -> None: ...
    def job(self, job: str) -> tuple[str, str] | None: ...
    def complete_job(self, job: str) -> None: ...
    def cancel_job(self, job: str) -> None: ...
    def dismiss_job(self, job: str) -> None: ...


# Records

@dataclass(frozen=True)
class VmRecord:
    pid: int
    started: int  # the process's start time (/proc/PID/stat), against pid reuse
    monitor: str  # the socket of sharedlvm's monitor
    domain: str
    volumes: tuple[tuple[str, str], ...]  # (uuid, the path qemu opens it by), writable
    # A migration's destination (``run --incoming URI``): qemu waits for the stream and
    # holds no lease of ``volumes`` until the handoff (vmmigrate.take_over) clears it.
    incoming: str = ""
    # A migration's source that completed and released its leases, at these versions
    # (vmmigrate.migrate_out): only ``vm resume`` at exactly these may run it again.
    released: tuple[tuple[str, int], ...] = ()
    # Volumes the VM reads that ``run`` did not activate (the leaves it had before a
    # live snapshot): deactivated with the rest when it ends.
    others: tuple[str, ...] = ()
    # The volume whose live merge paused the VM for its pivot (vmlive.merge): that
    # pause is sharedlvm's own, lifted by the merge (or by 'vm merge' again) once the
    # manager knows the volume is merged. Any other pause is never lifted here.
    merge_pause: str = ""
    # A libvirt domain's (monitor ``libvirt:UUID``): the version of each leaf's lease
    # as the VM holds it (or, not acquired yet, one below what libvirt's acquire will
    # make it), kept up to date by the watch (vmwatch_libvirt.py).
    held: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmRecord:
        return cls(int(data["pid"]), int(data["started"]), str(data["monitor"]),
                   str(data["domain"]),
                   tuple((str(v[0]), str(v[1])) for v in data["volumes"]),
                   str(data.get("incoming", "")),
                   tuple((str(v[0]), int(v[1])) for v in data.get("released", ())),
                   tuple(str(v) for v in data.get("others", ())),
                   str(data.get("merge_pause", "")),
                   tuple((str(v[0]), int(v[1])) for v in data.get("held", ())))


def vm_dir(paths: HostPaths) -> Path:
    return paths.run_dir / "vms"


def monitor_path(paths: HostPaths, pid: int) -> str:
    return str(vm_dir(paths) / f"{pid}.qmp")


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot, None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after it
    return int(stat[stat.rindex(")") + 2:].split()[19])


def write_record(paths: HostPaths, record: VmRecord) -> None:
    directory = vm_dir(paths)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{record.pid}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record)))
    os.replace(tmp, path)


def remove_record(paths: HostPaths, pid: int, started: int | None = None) -> None:
    """Remove the record of ``pid`` and its monitor socket; with ``started``, only if
    the record is still that process's (a pid reused since has its own)."""
    path = vm_dir(paths) / f"{pid}.json"
    if started is not None:
        try:
            if VmRecord.from_json(json.loads(path.read_text())).started != started:
                return
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            pass
    path.unlink(missing_ok=True)
    Path(monitor_path(paths, pid)).unlink(missing_ok=True)


def read_records(paths: HostPaths) -> list[VmRecord]:
    found = []
    for path in sorted(vm_dir(paths).glob("*.json")):
        try:
            found.append(VmRecord.from_json(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("ignoring VM record %s: %s", path, exc)
    return found


def alive(record: VmRecord) -> bool:
    return process_start(record.pid) == record.started


def max_lv_size(info: VolumeInfo) -> int:
    """The largest LV a thin qcow2 volume can need: its capacity and full metadata."""
    return round_up(info.capacity + qemu_img.metadata_overhead(info.capacity), MiB)


# The watch

@dataclass
class _Disk:
    uuid: str
    path: str
    node: str  # its protocol node: thresholds and highest writes count in the LV
    nodes: set[str]  # every node on its path (BLOCK_IO_ERROR names the format node)
    size: int  # the LV as this host maps it
    most: int  # max_lv_size
    armed: bool = False
    full_reported: bool = False
    # Measured: how fast the guest fills the LV and how long an extend takes; the
    # margin and the chunk grow with their product (ThinSettings.margin_for).
    rate: float = 0.0  # bytes/s the guest wrote (highest offset) between two extends
    latency: float = 0.0  # seconds, the last extend from its start to re-armed
    seen_at: float = 0.0  # monotonic time of the last extend's highest-write reading
    seen: int = 0  # that reading
    armed_at: int = -1  # the threshold armed now (an event of another is stale)
    want: int = 0  # a target asked and not reached (kept for the retry)
    # (wall time, size) of each refresh: the LV's size when an ENOSPC happened
    history: list[tuple[float, int]] = field(default_factory=list)
    error_at: float = 0.0  # wall time of its last ENOSPC event

    def size_at(self, when: float) -> int:
        """The LV's size on this host at wall time ``when`` (as far as known)."""
        sizes = [size for at, size in self.history if at <= when]
        return sizes[-1] if sizes else self.history[0][1]


class Host(Protocol):
    """The daemon, as a VM watch uses it."""

    def volume_info(self, domain: str, volume: str) -> VolumeInfo: ...
    def grow_thin(self, domain: str, volume: str, target: int) -> int: ...
    def refresh_thin(self, domain: str, volume: str) -> None: ...
    def lease_versions(self, domain: str, volumes: list[str]) -> dict[str, int]: ...
    def observe(self, what: str, ok: bool, seconds: float) -> None: ...


class VmWatch:
    def __init__(self, record: VmRecord, host: Host, settings: ThinSettings,
                 stopping: threading.Event,
                 connect: Callable[[str], VmMonitor] | None = None) -> None:
        self.record = record
        self.host = host
        self.settings = settings
        self.stopping = stopping
        self._connect: Callable[[str], VmMonitor] = connect or QmpMonitor
        self.disks: list[_Disk] = []
        self.ended = 0.0  # monotonic time the thread ended
        # The connected monitor, for a migration's steps (vmmigrate.py), which run on
        # the daemon's request threads beside this watch (the QMP client is
        # thread-safe) one at a time (``migration_lock``).
        self.monitor: VmMonitor | None = None
        self.connected = threading.Event()
        self.migration_lock = threading.Lock()
        self.listening = False  # a destination's migrate-incoming was sent
        # A destination's watch grows nothing before the handoff: its disks are sized
        # after the refresh that follows the lease's acquisition.
        self.handed_over = threading.Event()
        if not record.incoming:
            self.handed_over.set()
        # The VM writes other volumes now (a live snapshot's new leaf): the watch
        # finds its disks again from ``record``.
        self.reload = threading.Event()
        # Held by a grow (manager, then refresh) and by a live snapshot's change of the
        # old leaf to read-only: a refresh in flight must not undo that.
        self.grow_lock = threading.Lock()
        # A live merge's job runs (vmlive.merge, which holds the migration lock for
        # it, maybe for hours): an ENOSPC may be resumed meanwhile. The merge's pause
        # for its pivot and such a resume each check the run state and act under
        # ``state_lock``, so neither comes between the other's check and act.
        self.state_lock = threading.Lock()
        self.merge_job = False
        self.thread = threading.Thread(target=self._run, name=f"vm-{record.pid}",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def connected_monitor(self) -> VmMonitor:
        """The monitor, for a step beside the watch (the VM's migration lock held)."""
        monitor = self.monitor
        if monitor is None:
            raise MonitorError(f"VM {self.record.pid}: its monitor is not connected")
        return monitor

    def _run(self) -> None:
        try:
            self._run_once()
        finally:
            self.ended = time.monotonic()

    def _run_once(self) -> None:
        try:
            monitor = self._open()
        except (errors.Error, OSError, RecursionError) as exc:
            if alive(self.record):
                log.error("VM %d: cannot watch it: %s", self.record.pid, exc)
            return
        self.monitor = monitor
        self.connected.set()
        try:
            while not self.handed_over.is_set():
                if self.stopping.is_set():
                    return
                monitor.next_event(0.2)  # qemu gone: MonitorError
            self._watch(monitor)
        except MonitorError as exc:
            log.info("VM %d: watch ended: %s", self.record.pid, exc)
        except Exception:
            log.exception("VM %d: watch failed", self.record.pid)
        finally:
            self.connected.clear()
            self.monitor = None
            monitor.close()

    def _open(self) -> VmMonitor:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            try:
                return self._connect(self.record.monitor)
            except (OSError, errors.Error):
                if not alive(self.record) or time.monotonic() > deadline \
                        or self.stopping.is_set():
                    raise
            time.sleep(0.1)

    def _load(self, monitor: VmMonitor) -> None:
        self.disks = []
        for uuid, path in self.record.volumes:
            info = self.host.volume_info(self.record.domain, uuid)
            if info.format != VolumeFormat.QCOW2 or info.alloc != Allocation.THIN:
                continue  # its LV already holds all it can ever need
            try:
                size = device_size(path)
                node = monitor.leaf_node(path)
            except (OSError, MonitorError) as exc:  # recorded, not (yet) opened by qemu
                log.warning("VM %d: volume %s not watched: %s", self.record.pid, uuid, exc)
                continue
            # the first extend's rate: what was written since the watch began
            self.disks.append(_Disk(uuid, path, node, monitor.disk_nodes(path), size,
                                    max_lv_size(info), history=[(0.0, size)],
                                    seen_at=time.monotonic(),
                                    seen=monitor.highest_write(node)))

    def _watch(self, monitor: VmMonitor) -> None:
        self._load(monitor)
        if not self.disks and not self.reload.is_set():
            # Nothing to grow; stay connected until qemu goes (MonitorError), rather
            # than end and be started again by the scan every RESTART_DELAY.
            log.info("VM %d: no thin volume to watch", self.record.pid)
            while not self.stopping.is_set() and not self.reload.is_set():
                monitor.next_event(1.0)
        log.info("VM %d: watching %s", self.record.pid,
                 ", ".join(f"{d.uuid} ({d.size} of {d.most} bytes)" for d in self.disks))
        checked = 0.0
        while not self.stopping.is_set():
            if self.reload.is_set():
                self.reload.clear()
                self._load(monitor)
                log.info("VM %d: now watching %s", self.record.pid,
                         ", ".join(d.uuid for d in self.disks) or "no thin volume")
            for disk in self.disks:
                if not disk.armed:
                    self._arm(monitor, disk)
            # SHUTDOWN is not the end: with -no-shutdown qemu stays (a reset, then
            # cont); the watch ends when the monitor closes (MonitorError).
            event = monitor.next_event(self.settings.fallback)
            if self.reload.is_set():  # a live snapshot's new leaf: before its event
                self.reload.clear()
                self._load(monitor)
                for disk in self.disks:
                    self._arm(monitor, disk)
            if event is not None and event.kind == THRESHOLD:
                for disk in self.disks:
                    # an event of a threshold armed before (the highest-write check
                    # already grew past it) is stale: growing again would double
                    if event.node == disk.node and event.offset == disk.armed_at:
                        disk.armed = False
                        self._grow(monitor, disk, "threshold")
            elif event is not None and event.kind == IO_ERROR and event.nospace:
                self._no_space(monitor, event)
            elif event is not None and event.kind == RESUMED and event.reason == "migrated":
                self._refresh_all(monitor)
            if time.monotonic() - checked >= self.settings.fallback:
                checked = time.monotonic()
                # Still paused for lack of space on one of ours: its grow failed (a
                # manager failing over, the mailbox timing out): try again.
                for node, why in monitor.io_errors().items():
                    if why == "nospace" and any(node in d.nodes for d in self.disks):
                        self._no_space(monitor, Event(IO_ERROR, node=node, nospace=True))
                        break
                for disk in self.disks:
                    if disk.size < disk.most and \
                            monitor.highest_write(disk.node) > self._threshold(disk):
                        disk.armed = False
                        self._grow(monitor, disk, "highest write")

    def _refresh_all(self, monitor: VmMonitor) -> None:
        """A libvirt migration's destination at its resume: its mappings were made when
        the migration began, and the source may have grown an LV since."""
        for disk in self.disks:
            try:
                with self.grow_lock:
                    self.host.refresh_thin(self.record.domain, disk.uuid)
                    size = device_size(disk.path)
            except (errors.Error, OSError) as exc:
                log.error("VM %d: refreshing volume %s after its migration failed: %s",
                          self.record.pid, disk.uuid, exc)
                continue
            if size != disk.size:
                log.info("VM %d: volume %s is %d bytes here after the migration (was %d)",
                         self.record.pid, disk.uuid, size, disk.size)
                disk.size = size
            self._arm(monitor, disk)

    def _threshold(self, disk: _Disk) -> int:
        free, _ = self.settings.sized(disk.rate, disk.latency)
        return max(disk.size - free, 0)

    def _arm(self, monitor: VmMonitor, disk: _Disk) -> None:
        if disk.size >= disk.most:
            return  # nothing left to grow into: no event to wait for
        if monitor.highest_write(disk.node) > self._threshold(disk):
            self._grow(monitor, disk, "written past the threshold")
            return
        disk.armed_at = self._threshold(disk)
        monitor.arm_threshold(disk.node, disk.armed_at)
        disk.armed = True

    def _grow(self, monitor: VmMonitor, disk: _Disk, why: str) -> bool:
        """Grow ``disk`` by a chunk, refresh it here and re-arm; False when it could
        not grow (at its largest, or the manager refused: logged)."""
        if disk.size >= disk.most:
            if not disk.full_reported:
                log.error("VM %d: volume %s is at its largest size (%d bytes) and its VM "
                          "still writes past it", self.record.pid, disk.uuid, disk.size)
                disk.full_reported = True
            return False
        if not getattr(monitor, "grows_while_migrating", True) and monitor.migrating():
            # libvirt: the destination's mapping could not be refreshed before its
            # guest runs; the VM may pause at the LV's end and is grown there after
            log.info("VM %d: volume %s not grown while libvirt migrates it",
                     self.record.pid, disk.uuid)
            return False
        start = time.monotonic()
        # The manager is asked first; qemu's highest write (the rate) is read after
        # the refresh: a monitor command can wait behind qemu's main loop.
        _, chunk = self.settings.sized(disk.rate, disk.latency)
        # a target asked before and not reached is asked again, never a smaller one
        target = min(max(disk.size + chunk, disk.want), disk.most)
        disk.want = target
        try:
            with self.grow_lock:
                if self.reload.is_set():  # a live snapshot changed the VM's volumes
                    return False
                grown = self.host.grow_thin(self.record.domain, disk.uuid, target)
                done = time.monotonic()
                self.host.refresh_thin(self.record.domain, disk.uuid)
                refreshed = time.monotonic()
                size = device_size(disk.path)
        except (errors.Error, OSError) as exc:
            self.host.observe("vm.extend", False, time.monotonic() - start)
            log.error("VM %d: growing volume %s to %d bytes failed: %s", self.record.pid,
                      disk.uuid, target, exc)
            return False
        if size < grown:
            self.host.observe("vm.extend", False, time.monotonic() - start)
            log.error("VM %d: volume %s is %d bytes on this host after its refresh, "
                      "expected %d", self.record.pid, disk.uuid, size, grown)
            return False
        disk.size = size
        disk.want = 0
        disk.history = [*disk.history[-15:], (time.time(), size)]
        seen, seen_at = monitor.highest_write(disk.node), time.monotonic()
        if disk.seen_at and seen > disk.seen:  # what the guest wrote since the last one
            disk.rate = (seen - disk.seen) / max(seen_at - disk.seen_at, 0.5)
        disk.seen_at, disk.seen = seen_at, seen
        self._arm(monitor, disk)
        armed = time.monotonic()
        self.host.observe("vm.extend", True, armed - start)
        self.host.observe("vm.extend.manager", True, done - start)
        disk.latency = armed - start
        log.info("VM %d: volume %s grown to %d bytes (%s): manager %.0f ms, refreshed "
                 "%.0f ms, re-armed %.0f ms; writes at %.0f MB/s", self.record.pid,
                 disk.uuid, size, why, (done - start) * 1000, (refreshed - start) * 1000,
                 (armed - start) * 1000, disk.rate / 1e6)
        return True

    def _no_space(self, monitor: VmMonitor, event: Event) -> None:
        running, _ = monitor.status()
        if running:
            # Several requests in flight fail at once, each with its event: the first
            # one's grow and resume answered them all (measured: one chunk too many
            # per extra event, before this check).
            return
        mine = [d for d in self.disks if event.node in d.nodes or not event.node]
        if not mine:
            log.warning("VM %d: ENOSPC on %s, which is not a sharedlvm thin volume: "
                        "left paused", self.record.pid, event.node)
            return
        # The failed write did not fit the LV as it was when it failed: room added
        # since (a threshold grow that finished after it) is enough to go on with.
        for disk in mine:
            disk.error_at = event.at or disk.error_at
        for disk in mine:
            if disk.size <= disk.size_at(disk.error_at):
                self._grow(monitor, disk, "ENOSPC")
        if not any(d.size > d.size_at(d.error_at) for d in mine):
            if not all(d.size >= d.most for d in mine):  # at the largest: said once
                log.error("VM %d stays paused: no space could be added for it (tried "
                          "again every %g s)", self.record.pid, self.settings.fallback)
            return
        # Never beside a migration's step (vmmigrate.py holds the lock for a whole
        # migration): checked and resumed under the lock, so a migration cannot start,
        # complete and release the leases between the check and the cont.
        if not self.migration_lock.acquire(blocking=False):
            with self.state_lock:
                if self.merge_job:  # a live merge's job, before its pivot: no conflict
                    self._resume_if_no_space(monitor)
                    return
            log.info("VM %d: a migration step runs: not resumed now", self.record.pid)
            return
        try:
            with self.state_lock:
                self._resume_if_no_space(monitor)
        finally:
            self.migration_lock.release()

    def _resume_if_no_space(self, monitor: VmMonitor) -> None:
        if self.record.released:
            log.info("VM %d migrated out: only 'vm resume' runs it again", self.record.pid)
            return
        # The grow may have taken seconds: what the VM is now decides, read just before
        # cont. Resumed only when paused for an I/O error (not by a user, not a
        # migration's end: a source resumed after its lease moved would be a second
        # writer) and every failed drive failed for lack of space on one of ours (an
        # EIO is the administrator's to handle).
        running, state = monitor.status()
        if running or state != "io-error" or monitor.migrating():
            log.info("VM %d is %s, not paused for an I/O error: not resumed",
                     self.record.pid, "running" if running else state)
            return
        failed = monitor.io_errors()
        ours = set().union(*(d.nodes for d in self.disks))
        others = {n: s for n, s in failed.items() if s != "nospace" or n not in ours}
        if others:
            log.warning("VM %d stays paused: drive errors not sharedlvm's to resolve: %s",
                        self.record.pid, ", ".join(f"{n} {s}" for n, s in sorted(others.items())))
            return
        monitor.resume()
        log.info("VM %d resumed after ENOSPC", self.record.pid)


class VmWatcher:
    """The daemon's VM watches: one per VM record whose process lives."""

    def __init__(self, paths: HostPaths, host: Host, settings: ThinSettings,
                 stopping: threading.Event, libvirt_uri: str = "qemu:///system") -> None:
        self.paths = paths
        self.host = host
        self.settings = settings
        self.stopping = stopping
        self.libvirt_uri = libvirt_uri
        self.watches: dict[int, VmWatch] = {}
        self.thread = threading.Thread(target=self._run, name="vm-watcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(SCAN_INTERVAL):
            try:
                self.scan()
            except Exception:
                log.exception("VM watcher: scan failed")

    def watch_of(self, pid: int, timeout: float = CONNECT_TIMEOUT) -> VmWatch:
        """The watch of VM ``pid`` with its monitor connected (waiting up to
        ``timeout`` for a VM just started); NotFound when no VM of this host has that
        pid."""
        deadline = time.monotonic() + timeout
        while True:
            watch = self.watches.get(pid)
            if watch is None and not (vm_dir(self.paths) / f"{pid}.json").exists():
                raise errors.NotFound(f"no VM with pid {pid} runs on this host through "
                                      "'sharedlvm run'")
            if watch is not None and watch.connected.wait(0.1) and watch.monitor:
                return watch
            if time.monotonic() > deadline:
                raise errors.Timeout(f"VM {pid}: its monitor did not answer within "
                                     f"{timeout:g} s")
            time.sleep(0.1)

    def scan(self) -> None:
        seen = set()
        for record in read_records(self.paths):
            seen.add(record.pid)
            if not alive(record):
                with contextlib.suppress(OSError):
                    remove_record(self.paths, record.pid, record.started)
                self.watches.pop(record.pid, None)
                continue
            watch = self.watches.get(record.pid)
            # A watch that ended while its qemu lives (a stalled monitor, a transient
            # error) starts again, at most every RESTART_DELAY: a VM left unwatched
            # would pause at its LV's end for good.
            if watch is None or (not watch.thread.is_alive()
                                 and time.monotonic() - watch.ended >= RESTART_DELAY):
                watch = VmWatch(record, self.host, self.settings, self.stopping,
                                self._connector(record))
                self.watches[record.pid] = watch
                watch.start()
        for pid in set(self.watches) - seen:
            self.watches.pop(pid)

    def _connector(self, record: VmRecord) -> Callable[[str], VmMonitor] | None:
        """A libvirt domain's (recorded by libvirt's hook): through libvirt."""
        if not record.monitor.startswith("libvirt:"):
            return None  # qemu's own monitor
        volumes = [uuid for uuid, _ in record.volumes]
        paths = self.paths

        def save(versions: dict[str, int]) -> None:
            current = next((r for r in read_records(paths) if r.pid == record.pid
                            and r.started == record.started), None)
            if current is not None:
                write_record(paths, replace(current, held=tuple(sorted(versions.items()))))

        def connect(monitor: str) -> VmMonitor:
            from .vmwatch_libvirt import LibvirtMonitor

            current = next((r for r in read_records(paths) if r.pid == record.pid
                            and r.started == record.started), record)
            return LibvirtMonitor(self.libvirt_uri, monitor, record.pid,
                                  lambda: self.host.lease_versions(record.domain, volumes),
                                  dict(current.held), save)

        return connect


def list_vms(ctx: Any) -> list[VmInfo]:
    """The VMs of this host whose qemu lives, as their records and watches say."""
    found = []
    for record in read_records(ctx.paths):
        if not alive(record):
            continue
        watch = ctx.vms.watches.get(record.pid)
        state = ("incoming" if record.incoming else
                 "migrated-out" if record.released else "running")
        found.append(VmInfo(record.pid, record.domain, [u for u, _ in record.volumes],
                            list(record.others), state,
                            bool(watch is not None and watch.connected.is_set())))
    return found
