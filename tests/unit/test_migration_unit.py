"""The live migration's orchestration (client.migrate_vm) against fake daemons, the
destination's watch before its handoff, and the QMP client's event wait beside a
command (vmmigrate.py, vmwatch.py, qmp.py). Real qemu and sanlock:
tests/integration/test_migration.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_vmwatch import VOL, FakeHost, FakeMonitor

from sharedlvm import errors, qmp, vmwatch
from sharedlvm.client import migrate_vm
from sharedlvm.model import MigratedOut, TakenOver
from sharedlvm.units import GiB


class FakeDaemon:
    """A host's daemon as migrate_vm sees it: each step recorded, failures scripted."""

    def __init__(self, name: str, log: list[tuple[str, str, Any]],
                 fail: dict[str, errors.Error] | None = None) -> None:
        self.name = name
        self.log = log
        self.fail = fail or {}

    def _step(self, step: str, arg: Any) -> None:
        self.log.append((self.name, step, arg))
        if step in self.fail:
            raise self.fail[step]

    def vm_incoming(self, pid: int) -> None:
        self._step("incoming", pid)

    def vm_migrate_out(self, pid: int, uri: str, timeout: float = 600) -> MigratedOut:
        self._step("migrate-out", pid)
        return MigratedOut(pid, {VOL: 5}, 30)

    def vm_take_over(self, pid: int, versions: dict[str, int]) -> TakenOver:
        self._step("take-over", versions)
        return TakenOver(pid, {VOL: 6}, 12.0)

    def vm_resume(self, pid: int, versions: dict[str, int]) -> None:
        self._step("resume", versions)

    def vm_quit(self, pid: int) -> None:
        self._step("quit", pid)


def run(fail_source: dict[str, errors.Error] | None = None,
        fail_dest: dict[str, errors.Error] | None = None) -> list[tuple[str, str, Any]]:
    log: list[tuple[str, str, Any]] = []
    source = FakeDaemon("A", log, fail_source)
    dest = FakeDaemon("B", log, fail_dest)
    try:
        done = migrate_vm(source, 11, dest, 22, "unix:/m")  # type: ignore[arg-type]
        assert done.versions == {VOL: 6} and done.downtime_ms == 30
    except errors.Error as exc:
        log.append(("client", "raised", type(exc).__name__))
    return log


def test_a_migration_runs_its_steps_in_order() -> None:
    assert run() == [("B", "incoming", 22), ("A", "migrate-out", 11),
                     ("B", "take-over", {VOL: 5}), ("A", "quit", 11)]


def test_a_failed_qemu_migration_ends_the_destination_and_resumes_nothing() -> None:
    log = run(fail_source={"migrate-out": errors.MigrationFailed(11, "broken pipe")})
    assert log == [("B", "incoming", 22), ("A", "migrate-out", 11), ("B", "quit", 22),
                   ("client", "raised", "MigrationFailed")]


def test_a_failed_handoff_resumes_the_source_at_the_versions_on_disk() -> None:
    log = run(fail_dest={"take-over": errors.HandoffFailed(22, "refresh", {VOL: 6})})
    assert log[-2:] == [("A", "resume", {VOL: 6}), ("client", "raised", "HandoffFailed")]


def test_a_destination_that_may_have_run_leaves_the_source_stopped() -> None:
    log = run(fail_dest={"take-over": errors.HandoffFailed(22, "cont failed", {})})
    assert ("A", "resume", {}) not in log and not any(s == "resume" for _, s, _ in log)
    assert log[-1] == ("client", "raised", "HandoffFailed")


def test_an_unanswered_handoff_resumes_the_source_only_at_its_own_versions() -> None:
    """The destination's daemon gone: maybe it acquired; the source asks for the
    version it released at, which sanlock refuses if anyone acquired since."""
    log = run(fail_dest={"take-over": errors.DaemonNotRunning("no daemon")})
    assert log[-3:] == [("A", "resume", {VOL: 5}), ("B", "quit", 22),
                        ("client", "raised", "DaemonNotRunning")]


def test_an_unanswered_handoff_the_source_cannot_undo_leaves_the_destination() -> None:
    """The source's resume refused (the destination acquired): the destination may be
    running the VM, so it is not ended, and the error says so."""
    log = run(fail_source={"resume": errors.LeaseError("lease version changed")},
              fail_dest={"take-over": errors.Timeout("no answer")})
    assert not any(step == "quit" for _, step, _ in log)
    assert log[-1] == ("client", "raised", "HandoffFailed")


def test_the_destinations_watch_grows_nothing_before_its_handoff(tmp_path: Path) -> None:
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    monitor = FakeMonitor([qmp.Event(qmp.THRESHOLD, node="proto", offset=-1)],
                          highest=GiB)  # written past any threshold
    record = vmwatch.VmRecord(1, 1, "unused", "dom1", ((VOL, str(host.path)),),
                              incoming="unix:/m")
    watch = vmwatch.VmWatch(record, host, vmwatch.ThinSettings(fallback=3600),
                            threading.Event(), connect=lambda _: monitor)
    waited = threading.Event()
    real_next = monitor.next_event

    def next_event(timeout: float) -> qmp.Event | None:
        if not watch.handed_over.is_set():
            waited.set()
            time.sleep(0.01)
            return None
        return real_next(timeout)

    monitor.next_event = next_event  # type: ignore[method-assign]
    thread = threading.Thread(target=watch._run, daemon=True)
    thread.start()
    assert waited.wait(5) and watch.connected.wait(5)
    time.sleep(0.2)
    assert monitor.calls == [] and host.grows == []  # nothing armed, nothing grown
    watch.handed_over.set()
    thread.join(10)
    assert not thread.is_alive() and host.grows  # grown once handed over


def test_a_command_is_answered_while_another_thread_waits_for_events(
        tmp_path: Path) -> None:
    """The watch waits for events for seconds at a time; a migration's ``cont`` from a
    request thread must not wait behind it."""
    path = str(tmp_path / "q.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def peer() -> None:
        conn, _ = server.accept()
        f = conn.makefile("rb")
        conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        for _ in range(2):
            req = json.loads(f.readline())
            conn.sendall(json.dumps({"return": {}, "id": req["id"]}).encode() + b"\n")
        time.sleep(1)
        conn.sendall(b'{"event": "RESUME", "timestamp": {"seconds": 1, '
                     b'"microseconds": 0}}\n')
        time.sleep(5)
        conn.close()

    threading.Thread(target=peer, daemon=True).start()
    client = qmp.Qmp(path, timeout=5)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(client.next_event(5)))
    waiter.start()
    time.sleep(0.1)
    start = time.monotonic()
    client.execute("cont")
    assert time.monotonic() - start < 0.5
    waiter.join(5)
    assert got and got[0]["event"] == "RESUME"
    client.close()
    server.close()


@pytest.mark.parametrize("argv", [["-incoming", "tcp:0:4444"], ["--incoming", "defer"]])
def test_qemus_own_incoming_is_refused(argv: list[str]) -> None:
    with pytest.raises(errors.InvalidArgument, match="run --incoming"):
        qmp.check_argv(["qemu-system-x86_64", *argv])
    qmp.check_argv(["qemu-system-x86_64", "-name", "incoming"])


def test_a_completed_migration_is_not_one_under_way() -> None:
    """qemu 7.2 keeps "completed" on a destination for good (and on a source resumed
    after a failed handoff): only a migration in progress stops an ENOSPC resume."""
    monitor = qmp.QmpMonitor.__new__(qmp.QmpMonitor)
    for status, under_way in (("completed", False), ("active", True), ("failed", False),
                              ("pre-switchover", True), ("none", False)):
        monitor.qmp = type("Q", (), {"execute": lambda self, c, a=None, s=status:
                                     {"status": s}})()
        assert monitor.migrating() is under_way, status


def test_no_enospc_resume_while_a_migration_step_runs(tmp_path: Path) -> None:
    """A migration step holds the watch's migration lock: the check and the cont of an
    ENOSPC resume never run beside it (the source could complete and release its
    leases between them, and a cont in postmigrate runs the guest again)."""
    host = FakeHost(tmp_path / "dev", 1 * GiB)
    monitor = FakeMonitor([qmp.Event(qmp.IO_ERROR, node="fmt", nospace=True)],
                          pause="io-error")
    record = vmwatch.VmRecord(1, 1, "unused", "dom1", ((VOL, str(host.path)),))
    watch = vmwatch.VmWatch(record, host, vmwatch.ThinSettings(fallback=3600),
                            threading.Event(), connect=lambda _: monitor)
    with watch.migration_lock:
        watch._run()
    assert host.grows and ("resume", None) not in monitor.calls
    monitor2 = FakeMonitor([qmp.Event(qmp.IO_ERROR, node="fmt", nospace=True)],
                           pause="io-error")
    host2 = FakeHost(tmp_path / "dev2", 1 * GiB)
    watch2 = vmwatch.VmWatch(
        vmwatch.VmRecord(1, 1, "unused", "dom1", ((VOL, str(host2.path)),)), host2,
        vmwatch.ThinSettings(fallback=3600), threading.Event(), connect=lambda _: monitor2)
    watch2._run()
    assert ("resume", None) in monitor2.calls  # the same without a migration step


def test_vm_list_shows_live_vms_and_their_state(tmp_path: Path) -> None:
    """`vm list`: the pids the `vm` commands take, from the records of live qemus (a
    record of a process gone is not shown)."""
    import os

    from sharedlvm.paths import HostPaths

    paths = HostPaths(tmp_path)
    me = os.getpid()
    start = vmwatch.process_start(me) or 0
    vmwatch.write_record(paths, vmwatch.VmRecord(me, start, "m", "dom1", ((VOL, "/dev/x"),),
                                                 released=((VOL, 4),), others=("o",)))
    vmwatch.write_record(paths, vmwatch.VmRecord(2**22 - 1, 1, "m", "dom1", ()))
    ctx = type("Ctx", (), {"paths": paths,
                           "vms": type("V", (), {"watches": {}})()})()
    (vm,) = vmwatch.list_vms(ctx)
    assert (vm.pid, vm.writes, vm.reads, vm.state, vm.watched) == (
        me, [VOL], ["o"], "migrated-out", False)
