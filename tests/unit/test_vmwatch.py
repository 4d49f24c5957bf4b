"""The VM watch's decisions (vmwatch.VmWatch) against a scripted monitor.

The monitor is a fake (a list of events, a recorded list of calls); the real QMP path
is tested with real qemu in tests/integration/test_vms.py. The fake's own behaviour is
tested first, below."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sharedlvm import errors, qmp, vmwatch
from sharedlvm.model import Allocation, VolumeFormat, VolumeInfo, VolumeState
from sharedlvm.paths import HostPaths
from sharedlvm.units import GiB, MiB

VOL = "0b6a5f3e-3c1f-4c1e-9a53-5d0d9f0e2a11"


class FakeMonitor:
    """Events to hand out, in order, then SHUTDOWN, then the monitor closes (as qemu
    does); every call recorded. ``state``: query-status."""

    def __init__(self, events: list[qmp.Event | None], highest: int = 0,
                 state: tuple[bool, str] = (True, "running"),
                 pause: str | None = None) -> None:
        self.events = list(events)
        self.pause = pause  # the run state an ENOSPC event puts the VM in, as qemu does
        self.nospace: set[str] = set()  # nodes of ENOSPC errors not resumed yet
        self.armed = -1
        self.migration = False
        self.other_errors: dict[str, str] = {}
        self.calls: list[tuple[str, object]] = []
        self.highest = highest
        self.state = state
        self.drained = threading.Event()

    def leaf_node(self, image_path: str) -> str:
        return "proto"

    def disk_nodes(self, image_path: str) -> set[str]:
        return {"proto", "fmt"}

    def arm_threshold(self, node: str, offset: int) -> None:
        self.calls.append(("arm", offset))
        self.armed = offset

    def highest_write(self, node: str) -> int:
        return self.highest

    def status(self) -> tuple[bool, str]:
        return self.state

    def io_errors(self) -> dict[str, str]:
        return {**{n: "nospace" for n in self.nospace}, **self.other_errors}

    def migrating(self) -> bool:
        return self.migration

    def resume(self) -> None:
        self.calls.append(("resume", None))
        self.state = (True, "running")
        self.nospace.clear()

    def next_event(self, timeout: float) -> qmp.Event | None:
        if not self.events:
            if self.drained.is_set():  # qemu gone: its monitor closed
                raise errors.MonitorError("the VM has gone (monitor closed)")
            self.drained.set()
            return qmp.Event(qmp.SHUTDOWN)
        event = self.events.pop(0)
        if event is not None and event.kind == qmp.THRESHOLD and event.offset == -1:
            event = qmp.Event(qmp.THRESHOLD, node=event.node, offset=self.armed)  # qemu's
        if event is not None and event.kind == qmp.IO_ERROR and event.nospace:
            self.nospace.add(event.node)
            if self.pause:
                self.state = (False, self.pause)
        return event

    def close(self) -> None:
        self.calls.append(("close", None))


def test_fake_monitor_hands_out_its_events_then_shutdown() -> None:
    m = FakeMonitor([qmp.Event(qmp.THRESHOLD, node="proto"),
                     qmp.Event(qmp.IO_ERROR, nospace=True)], pause="io-error")
    assert m.next_event(1) == qmp.Event(qmp.THRESHOLD, node="proto")
    assert m.status() == (True, "running")
    m.next_event(1)
    assert m.status() == (False, "io-error")
    assert m.next_event(1) == qmp.Event(qmp.SHUTDOWN) and m.drained.is_set()
    with pytest.raises(errors.MonitorError):
        m.next_event(1)
    m.resume()
    assert m.status() == (True, "running") and m.calls == [("resume", None)]


class FakeHost:
    def __init__(self, path: Path, size: int, capacity: int = 4 * GiB) -> None:
        self.path = path
        self.capacity = capacity
        self.grows: list[int] = []
        self.refuse = False
        path.write_bytes(b"")
        self._resize(size)

    def _resize(self, size: int) -> None:
        with self.path.open("r+b") as f:
            f.truncate(size)

    def volume_info(self, domain: str, volume: str) -> VolumeInfo:
        return VolumeInfo(uuid=volume, domain=domain, image=volume, parent=None,
                          format=VolumeFormat.QCOW2, alloc=Allocation.THIN,
                          capacity=self.capacity, size=self.path.stat().st_size,
                          state=VolumeState.READY, generation=1)

    def grow_thin(self, domain: str, volume: str, target: int) -> int:
        if self.refuse:
            raise errors.NoSpace(domain, target, 0)
        self.grows.append(target)
        self._resize(target)
        return target

    def refresh_thin(self, domain: str, volume: str) -> None:
        pass

    def observe(self, what: str, ok: bool, seconds: float) -> None:
        pass


def run_watch(tmp_path: Path, host: FakeHost, monitor: FakeMonitor,
              settings: vmwatch.ThinSettings | None = None) -> None:
    record = vmwatch.VmRecord(1, 1, "unused", "dom1", ((VOL, str(host.path)),))
    watch = vmwatch.VmWatch(record, host, settings or vmwatch.ThinSettings(fallback=3600),
                            threading.Event(), connect=lambda _: monitor)
    watch._run()  # in this thread: ends at the fake's SHUTDOWN


def test_a_vm_without_thin_volumes_is_watched_until_it_goes(tmp_path: Path) -> None:
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    host.volume_info = lambda d, v: replace(  # type: ignore[method-assign]
        FakeHost.volume_info(host, d, v), format=VolumeFormat.RAW, alloc=Allocation.PREALLOCATED)
    monitor = FakeMonitor([qmp.Event(qmp.THRESHOLD, node="proto")])
    run_watch(tmp_path, host, monitor)  # returns once the monitor closed
    assert monitor.drained.is_set() and monitor.calls == [("close", None)]


def test_threshold_event_grows_by_a_chunk_and_rearms(tmp_path: Path) -> None:
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    monitor = FakeMonitor([qmp.Event(qmp.THRESHOLD, node="proto"),
                           qmp.Event(qmp.THRESHOLD, node="other-node")])
    run_watch(tmp_path, host, monitor)
    assert host.grows == [2 * GiB]  # the other node's event is not this disk's
    assert monitor.calls == [("arm", 512 * MiB), ("arm", 2 * GiB - 512 * MiB),
                             ("close", None)]


def test_a_stale_threshold_event_is_not_grown_on(tmp_path: Path) -> None:
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    monitor = FakeMonitor([qmp.Event(qmp.THRESHOLD, node="proto", offset=12345)])
    run_watch(tmp_path, host, monitor)
    assert host.grows == []


def test_no_resume_when_a_migration_is_under_way_or_another_drive_failed(
        tmp_path: Path) -> None:
    for setup in ("migration", "eio"):
        host = FakeHost(tmp_path / f"dev-{setup}", 1 * GiB)
        monitor = FakeMonitor([qmp.Event(qmp.IO_ERROR, node="fmt", nospace=True)],
                              pause="io-error")
        if setup == "migration":
            monitor.migration = True
        else:
            monitor.other_errors = {"someone-elses-drive": "failed"}
        run_watch(tmp_path, host, monitor)
        assert host.grows == [2 * GiB], setup  # grown: the room is needed anyway
        assert ("resume", None) not in monitor.calls, setup


def test_room_added_after_the_error_resumes_without_another_grow(tmp_path: Path) -> None:
    """A write in flight past the old end fails while a threshold grow runs: the LV
    already has the room when the ENOSPC event is handled."""
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    monitor = FakeMonitor([qmp.Event(qmp.THRESHOLD, node="proto"),
                           qmp.Event(qmp.IO_ERROR, node="fmt", nospace=True, at=1.0)],
                          pause="io-error")
    run_watch(tmp_path, host, monitor)
    assert host.grows == [2 * GiB]  # the threshold's only
    assert ("resume", None) in monitor.calls


def test_written_past_the_threshold_grows_at_once(tmp_path: Path) -> None:
    """A daemon restarted after the event: the highest write says it is past."""
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    monitor = FakeMonitor([], highest=900 * MiB)
    run_watch(tmp_path, host, monitor)
    assert host.grows == [2 * GiB]
    assert ("arm", 2 * GiB - 512 * MiB) in monitor.calls


def test_enospc_grows_and_resumes_an_io_error_pause(tmp_path: Path) -> None:
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    monitor = FakeMonitor([qmp.Event(qmp.IO_ERROR, node="fmt", nospace=True)],
                          pause="io-error")
    run_watch(tmp_path, host, monitor)
    assert host.grows == [2 * GiB]
    assert ("resume", None) in monitor.calls and monitor.state == (True, "running")


@pytest.mark.parametrize("merging", [True, False])
def test_enospc_is_resumed_beside_a_live_merges_job_only(tmp_path: Path,
                                                         merging: bool) -> None:
    """A live merge holds the migration lock for its whole job (hours, for a large
    volume): an ENOSPC meanwhile is resumed (the merge pauses for its pivot only under
    the state lock, after a fresh look at the run state); beside any other step that
    holds the lock (a migration), it is not."""
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    monitor = FakeMonitor([qmp.Event(qmp.IO_ERROR, node="fmt", nospace=True)],
                          pause="io-error")
    record = vmwatch.VmRecord(1, 1, "unused", "dom1", ((VOL, str(host.path)),))
    watch = vmwatch.VmWatch(record, host, vmwatch.ThinSettings(fallback=3600),
                            threading.Event(), connect=lambda _: monitor)
    watch.merge_job = merging
    with watch.migration_lock:  # the merge's (or a migration's) step
        watch._run()
    assert host.grows == [2 * GiB]
    assert (("resume", None) in monitor.calls) == merging


def test_enospc_events_of_one_pause_grow_once(tmp_path: Path) -> None:
    """Requests in flight fail together, each with its event: the first one's grow and
    resume answer them all."""
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    event = qmp.Event(qmp.IO_ERROR, node="fmt", nospace=True)
    monitor = FakeMonitor([event, event, event], state=(False, "io-error"))
    run_watch(tmp_path, host, monitor)
    assert host.grows == [2 * GiB]
    assert [c for c in monitor.calls if c[0] == "resume"] == [("resume", None)]


@pytest.mark.parametrize("state", ["paused", "suspended", "inmigrate"])
def test_a_vm_paused_for_another_reason_is_never_resumed(tmp_path: Path, state: str) -> None:
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    monitor = FakeMonitor([qmp.Event(qmp.IO_ERROR, node="fmt", nospace=True)],
                          state=(False, state))
    run_watch(tmp_path, host, monitor)
    assert ("resume", None) not in monitor.calls


def test_enospc_on_a_disk_not_ours_changes_nothing(tmp_path: Path) -> None:
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    monitor = FakeMonitor([qmp.Event(qmp.IO_ERROR, node="someone-else", nospace=True)],
                          state=(False, "io-error"))
    run_watch(tmp_path, host, monitor)
    assert host.grows == [] and ("resume", None) not in monitor.calls


def test_at_its_largest_it_is_reported_not_grown_or_resumed(tmp_path: Path) -> None:
    """Capacity 1 GiB: the LV's largest size is 1 GiB + metadata (3 MiB here)."""
    host = FakeHost(tmp_path / "dev", 1 * GiB, capacity=1 * GiB)
    most = vmwatch.max_lv_size(host.volume_info("d", VOL))
    events = [qmp.Event(qmp.IO_ERROR, node="fmt", nospace=True, at=time.time() + i)
              for i in range(3)]  # qemu stamps its events; these come after the grow
    monitor = FakeMonitor(events, pause="io-error")
    run_watch(tmp_path, host, monitor)
    assert host.grows == [most]  # once, to the largest; then never again
    resumes = [c for c in monitor.calls if c[0] == "resume"]
    assert len(resumes) == 1  # after the one grow; not for the ENOSPC at the largest
    assert monitor.state == (False, "io-error")


def test_a_failed_extend_is_tried_again_while_the_vm_waits(tmp_path: Path) -> None:
    """The first grow fails (the manager failing over); the VM stays paused for
    ENOSPC; the next highest-write check finds it so, grows and resumes it."""
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    host.refuse = True
    real = host.grow_thin

    def once_refused(domain: str, volume: str, target: int) -> int:
        host.refuse = False
        host.grow_thin = real  # type: ignore[method-assign]
        raise errors.Timeout("no answer from the manager")

    host.grow_thin = once_refused  # type: ignore[method-assign]
    monitor = FakeMonitor([qmp.Event(qmp.IO_ERROR, node="fmt", nospace=True), None, None],
                          pause="io-error")
    run_watch(tmp_path, host, monitor, vmwatch.ThinSettings(fallback=0.0))
    assert host.grows == [2 * GiB]
    assert ("resume", None) in monitor.calls and monitor.state == (True, "running")


def test_a_refused_extend_leaves_the_vm_paused(tmp_path: Path) -> None:
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    host.refuse = True
    monitor = FakeMonitor([qmp.Event(qmp.IO_ERROR, node="fmt", nospace=True)],
                          state=(False, "io-error"))
    run_watch(tmp_path, host, monitor)
    assert ("resume", None) not in monitor.calls


def test_monitor_argv_refuses_what_qemu_would_misread() -> None:
    assert qmp.monitor_argv("/run/a.qmp") == ["-qmp", "unix:/run/a.qmp,server=on,wait=off"]
    for bad in ("/run/a,b.qmp", "/" + "x" * 120):
        with pytest.raises(Exception, match="monitor socket"):
            qmp.monitor_argv(bad)
    assert qmp.is_qemu("/usr/bin/qemu-system-x86_64") and not qmp.is_qemu("qemu-img")


def test_records_round_trip_and_stale_ones_are_not_alive(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    me = os.getpid()
    record = vmwatch.VmRecord(me, vmwatch.process_start(me) or 0, "m", "dom1",
                              ((VOL, "/dev/x"),))
    vmwatch.write_record(paths, record)
    (vmwatch.vm_dir(paths) / "junk.json").write_text("{")
    assert vmwatch.read_records(paths) == [record]
    assert vmwatch.alive(record)
    assert not vmwatch.alive(vmwatch.VmRecord(me, record.started + 1, "m", "d", ()))
    vmwatch.remove_record(paths, me)
    assert vmwatch.read_records(paths) == []


def test_margin_and_chunk_follow_write_rate_times_extend_latency() -> None:
    s = vmwatch.ThinSettings()
    assert s.sized(0.0, 0.0) == (512 * MiB, 1 * GiB)  # nothing measured: the settings
    assert s.sized(100e6, 0.15) == (512 * MiB, 1 * GiB)  # 60 MB of need: the settings
    free, chunk = s.sized(1e9, 0.5)  # 1 GB/s, extends of 0.5 s: 2 GB of margin
    assert free == 1908 * MiB and chunk == 2 * free


def test_qemu_that_would_leave_its_leases_is_refused() -> None:
    assert qmp.is_qemu("/usr/libexec/qemu-kvm")
    qmp.check_argv(["qemu-system-x86_64", "-m", "512"])
    for flag in ("-daemonize", "--daemonize"):
        with pytest.raises(errors.InvalidArgument, match="daemonize"):
            qmp.check_argv(["qemu-system-x86_64", flag])


def test_a_record_is_removed_only_for_its_own_process(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    record = vmwatch.VmRecord(4242, 100, "m", "dom1", ())
    vmwatch.write_record(paths, record)
    vmwatch.remove_record(paths, 4242, started=99)  # a pid reused since: not ours
    assert vmwatch.read_records(paths) == [record]
    vmwatch.remove_record(paths, 4242, started=100)
    assert vmwatch.read_records(paths) == []


def test_thin_settings_that_would_grow_forever_are_refused(tmp_path: Path) -> None:
    from sharedlvm.daemon import DaemonConfig

    paths = HostPaths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    (paths.config_dir / "daemon.toml").write_text(
        "[daemon]\nthin_chunk_mib = 256\nthin_free_mib = 256\n")
    with pytest.raises(errors.InvalidArgument, match="thin_free_mib"):
        DaemonConfig.load(paths)


def test_qmp_client_reads_what_qemu_sends(tmp_path: Path) -> None:
    """A scripted QMP peer: a greeting with oob, an event before an answer, a message
    split over two sends, an answer to an old command id skipped, then EOF mid-line."""
    import json
    import socket

    path = str(tmp_path / "q.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def peer() -> None:
        conn, _ = server.accept()
        f = conn.makefile("rb")

        def send(*parts: bytes) -> None:
            for part in parts:
                conn.sendall(part)
                time.sleep(0.01)

        send(b'{"QMP": {"version": {}, "capabilities": ["oob"]}}\r\n')
        req = json.loads(f.readline())
        send(json.dumps({"return": {}, "id": req["id"]}).encode() + b"\n")
        req = json.loads(f.readline())
        event = {"event": "BLOCK_WRITE_THRESHOLD", "timestamp": {"seconds": 5,
                 "microseconds": 500000}, "data": {"node-name": "n", "write-threshold": 7}}
        answer = json.dumps({"return": {"running": False, "status": "io-error"},
                             "id": req["id"]}).encode() + b"\n"
        send(b'{"return": {}, "id": 999}\n', json.dumps(event).encode() + b"\n",
             answer[:10], answer[10:])
        send(b'{"event": "STOP", "timest')
        conn.close()

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    monitor = qmp.QmpMonitor(path, timeout=5)
    assert monitor.status() == (False, "io-error")
    assert monitor.next_event(1) == qmp.Event(qmp.THRESHOLD, node="n", offset=7, at=5.5)
    with pytest.raises(errors.MonitorError, match="gone"):
        monitor.next_event(5)
    monitor.close()
    server.close()


class LibvirtLikeMonitor(FakeMonitor):
    """A monitor whose destination cannot be refreshed before its guest runs (the
    libvirt backend's ``grows_while_migrating = False``)."""

    grows_while_migrating = False


def test_no_grow_while_libvirt_migrates_the_vm(tmp_path: Path) -> None:
    """The destination's mapping was made as the migration began and nothing can
    refresh it before libvirt resumes the guest there: no grow meanwhile."""
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    monitor = LibvirtLikeMonitor([qmp.Event(qmp.THRESHOLD, node="proto")])
    monitor.migration = True
    run_watch(tmp_path, host, monitor)
    assert host.grows == []
    plain = FakeMonitor([qmp.Event(qmp.THRESHOLD, node="proto")])  # sharedlvm's own
    plain.migration = True  # migration refreshes at its take-over: grown
    host2 = FakeHost(tmp_path / "dev2", 1 * GiB)
    run_watch(tmp_path, host2, plain)
    assert host2.grows == [2 * GiB]


def test_a_migrations_destination_refreshes_every_volume_at_its_resume(
        tmp_path: Path) -> None:
    """At the handoff's resume (a RESUMED event with reason 'migrated') every volume is
    refreshed and its size read again: the source may have grown an LV after this
    host mapped it."""
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    refreshed: list[str] = []

    def refresh(domain: str, volume: str) -> None:
        refreshed.append(volume)
        host._resize(2 * GiB)  # the LV the source grew, mapped again here

    host.refresh_thin = refresh  # type: ignore[method-assign]
    monitor = LibvirtLikeMonitor([qmp.Event(qmp.RESUMED, reason="migrated")])
    run_watch(tmp_path, host, monitor)
    assert refreshed == [VOL] and host.grows == []
    assert monitor.calls[-2] == ("arm", 2 * GiB - 512 * MiB)  # armed at the new size
