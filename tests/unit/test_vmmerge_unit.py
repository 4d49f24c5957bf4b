"""Live merge's steps on the VM's host (vmlive.merge) against fakes: qemu's monitor
(a commit job whose states the test sets), the manager (ctx.ask), the leases and the
activation, each recorded in one list so the order is checked. The rules: no guest
write reaches the base before the manager marks the merged volume stale (the VM is
paused from before the pivot until the mark); a failure before the pivot cancels the
job and gives the base back as it was; a pivot with no answer, or a mark the manager
refused, leaves the VM paused and nothing let go; `vm merge` again finishes. The real
path: tests/integration/test_vms.py."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from sharedlvm import errors, leases, vmlive, vmwatch
from sharedlvm.model import Allocation, VolumeFormat, VolumeInfo, VolumeRole, VolumeState
from sharedlvm.paths import HostPaths
from sharedlvm.requests import ExtendVolume, LiveMergeVolume, MergeVolume
from sharedlvm.units import GiB

BASE = "0a0b0c0d-0000-4000-8000-000000000001"
TOP = "0a0b0c0d-0000-4000-8000-000000000002"
LEAF = "0a0b0c0d-0000-4000-8000-000000000003"
PID = 4343
DEV = {BASE: "/dev/base", TOP: "/dev/top", LEAF: "/dev/leaf"}


def info(uuid: str, state: VolumeState = VolumeState.READY,
         role: VolumeRole = VolumeRole.INTERNAL) -> VolumeInfo:
    parent = {TOP: BASE, LEAF: TOP}.get(uuid)
    return VolumeInfo(uuid=uuid, domain="dom1", image="img", parent=parent,
                      format=VolumeFormat.QCOW2, alloc=Allocation.THIN, capacity=4 * GiB,
                      size=GiB, state=state, generation=1, lease=3, role=role)


class Monitor:
    """qemu: a drive whose chain is ``files``; a commit job that goes "running" ->
    "ready" (active) or "concluded" (intermediate) unless ``fail`` says otherwise."""

    def __init__(self, log: list[Any], files: list[str]) -> None:
        self.log, self.files = log, files
        self.jobs: dict[str, tuple[str, str]] = {}
        self.fail_commit = ""  # the job concludes with this error
        self.complete_error: Exception | None = None
        self.pivot_then_fail = False  # qemu pivots, its answer is lost
        self.gone = False  # qemu answers nothing more
        self.nodes = {path: {f"n-{path}"} for path in files}

    def chain(self, path: str) -> list[str]:
        if path != self.files[0]:
            raise errors.MonitorError(f"no drive on {path}")
        return list(self.files)

    def active_node(self, path: str) -> str:
        return f"n-{self.chain(path)[0]}"

    def format_node(self, path: str) -> str:
        if path not in self.nodes:
            raise errors.MonitorError(f"no node on {path}")
        return f"n-{path}"

    def disk_nodes(self, path: str) -> set[str]:
        return self.nodes.get(path, set())

    def commit(self, job: str, device: str, top: str, base: str,
               backing_file: str | None) -> None:
        self.log.append(("commit", top, base, backing_file))
        self.active = top == device
        if self.fail_commit:
            self.jobs[job] = ("concluded", self.fail_commit)
        elif self.active:
            self.jobs[job] = ("ready", "")
        else:
            self.jobs[job] = ("concluded", "")
            self.files.remove(top[2:])

    def job(self, job: str) -> tuple[str, str] | None:
        if self.gone:
            raise errors.MonitorError("qemu is gone")
        return self.jobs.get(job)

    def complete_job(self, job: str) -> None:
        self.log.append(("complete",))
        if self.complete_error and not self.pivot_then_fail:
            raise self.complete_error
        self.jobs[job] = ("concluded", "")
        self.files.pop(0)  # pivoted: the base is the active layer
        if self.complete_error:
            raise self.complete_error

    def cancel_job(self, job: str) -> None:
        self.log.append(("cancel",))
        self.jobs[job] = ("concluded", "")

    def dismiss_job(self, job: str) -> None:
        self.jobs.pop(job, None)

    def status(self) -> tuple[bool, str]:
        return True, "running"

    def pause(self) -> None:
        self.log.append(("pause",))

    def resume(self) -> None:
        self.log.append(("resume",))

    def remove_node(self, node: str) -> None:
        self.log.append(("remove-node", node))
        self.nodes.pop(node[2:], None)

    def read_only(self, node: str) -> bool:
        return True


class Layout:
    def __init__(self, log: list[Any], held: dict[str, bool]) -> None:
        self.log, self.held = log, held
        self.lockspace = "ls"

    def acquire_volume(self, vol: VolumeInfo, shared: bool, pid: int) -> None:
        self.log.append(("acquire", vol.uuid, "shared" if shared else "exclusive"))
        self.held[vol.uuid] = shared

    def release_volume(self, vol: VolumeInfo, pid: int) -> None:
        self.log.append(("release", vol.uuid))
        self.held.pop(vol.uuid)


class Activator:
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def path(self, vg: str, uuid: str) -> str:
        return DEV[uuid]

    def refresh(self, vg: str, uuid: str) -> None:
        self.log.append(("refresh", uuid))


class Domain:
    host_id = 2
    runner = None
    record = type("Record", (), {"extent_size": 128 * 1024**2})()

    def __init__(self, log: list[Any]) -> None:
        self.log = log
        self.shard = type("Shard", (), {"vg_name": "vg", "activator": Activator(log)})()

    def volume_shard(self, uuid: str) -> Any:
        return self.shard

    def deactivate_volume(self, uuid: str) -> None:
        self.log.append(("deactivate", uuid))


class Ctx:
    def __init__(self, tmp_path: Path, log: list[Any], monitor: Monitor,
                 writes: str, states: dict[str, VolumeState]) -> None:
        self.paths = HostPaths(tmp_path)
        self.log, self.states = log, states
        record = vmwatch.VmRecord(PID, 1, "m", "dom1", ((writes, DEV[writes]),))
        self.watch = vmwatch.VmWatch(record, None, vmwatch.ThinSettings(),  # type: ignore
                                     threading.Event())
        self.watch.monitor = monitor  # type: ignore[assignment]
        self.vms = type("Vms", (), {"watch_of": lambda _, pid: self.watch})()
        self._domain = Domain(log)
        self.refuse_mark: Exception | None = None

    def domain(self, name: str) -> Domain:
        return self._domain

    def ask(self, request: Any) -> Any:
        self.log.append(("ask", type(request).__name__))
        if isinstance(request, LiveMergeVolume):
            assert request.host_id == 2
            if self.refuse_mark:
                raise self.refuse_mark
            self.states[request.volume] = VolumeState.MERGED
            return info(request.volume, VolumeState.MERGED)
        if isinstance(request, MergeVolume):
            assert self.states[request.volume] == VolumeState.MERGED
            return info(BASE)
        assert isinstance(request, ExtendVolume) and request.volume == BASE
        return info(BASE)


def setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, active: bool
          ) -> tuple[Ctx, Monitor, dict[str, bool], list[Any]]:
    log: list[Any] = []
    held = {BASE: True, TOP: False} if active else {BASE: True, TOP: True, LEAF: False}
    files = [DEV[TOP], DEV[BASE]] if active else [DEV[LEAF], DEV[TOP], DEV[BASE]]
    monitor = Monitor(log, files)
    states = {BASE: VolumeState.READY, TOP: VolumeState.READY, LEAF: VolumeState.READY}
    ctx = Ctx(tmp_path, log, monitor, TOP if active else LEAF, states)
    monkeypatch.setattr(vmlive, "LeaseLayout", lambda d: Layout(log, held))
    monkeypatch.setattr(leases, "inquire", lambda pid: [
        leases.Held("ls", uuid, 5, shared) for uuid, shared in held.items()])
    monkeypatch.setattr(vmlive.volume_mod, "get_volume",
                        lambda d, uuid: info(uuid, states[uuid]))
    monkeypatch.setattr(vmlive.volume_mod, "children", lambda d, uuid: {
        BASE: [TOP], TOP: [] if active else [LEAF], LEAF: []}[uuid])
    monkeypatch.setattr(vmlive.qemu_img, "end_offset", lambda runner, node: GiB // 2)
    monkeypatch.setattr(vmlive, "set_read_only",
                        lambda runner, path, ro: log.append(("ro" if ro else "rw", path)))
    monkeypatch.setattr(vmlive.time, "sleep", lambda s: None)
    return ctx, monitor, held, log


def names(log: list[Any]) -> list[str]:
    return [entry[0] if entry[0] != "ask" else entry[1] for entry in log]


def test_an_active_merge_pauses_from_before_the_pivot_until_the_mark(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ctx, monitor, held, log = setup(monkeypatch, tmp_path, active=True)
    result = vmlive.merge(ctx, PID, TOP, None)
    assert result.uuid == BASE
    assert names(log) == [
        "ExtendVolume", "refresh", "ro",  # room in the base first, still read-only
        "release", "acquire",  # its lease exclusive: nobody else reads what is written
        "rw", "commit", "pause", "complete",
        "LiveMergeVolume", "resume",  # marked stale before any guest write reaches it
        "remove-node", "deactivate", "release",  # the mapping before the lease
        "MergeVolume"]
    assert ("acquire", BASE, "exclusive") in log
    assert ("commit", f"n-{DEV[TOP]}", f"n-{DEV[BASE]}", None) in log
    assert held == {BASE: False}
    record = ctx.watch.record
    assert record.volumes == ((BASE, DEV[BASE]),) and not record.merge_pause
    assert ctx.watch.reload.is_set()


def test_an_intermediate_merge_names_the_base_in_the_leaf_and_shares_it_again(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ctx, monitor, held, log = setup(monkeypatch, tmp_path, active=False)
    vmlive.merge(ctx, PID, TOP, None)
    assert ("commit", f"n-{DEV[TOP]}", f"n-{DEV[BASE]}", BASE) in log
    assert "pause" not in names(log) and "resume" not in names(log)
    assert names(log)[names(log).index("LiveMergeVolume"):] == [
        "LiveMergeVolume", "remove-node", "deactivate", "release",
        "ro", "release", "acquire",  # the base read-only and shared again
        "MergeVolume"]
    assert held == {BASE: True, LEAF: False}
    assert ctx.watch.record.volumes == ((LEAF, DEV[LEAF]),)


def test_a_commit_that_fails_is_cancelled_and_gives_the_base_back(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ctx, monitor, held, log = setup(monkeypatch, tmp_path, active=True)
    monitor.fail_commit = "No space left on device"
    with pytest.raises(errors.MonitorRefused, match="No space left"):
        vmlive.merge(ctx, PID, TOP, None)
    assert held == {BASE: True, TOP: False}  # as before
    assert names(log)[-3:] == ["ro", "release", "acquire"] and log[-1][2] == "shared"
    assert "LiveMergeVolume" not in names(log) and "pause" not in names(log)
    assert ctx.states[TOP] == VolumeState.READY and not monitor.jobs


def test_a_pivot_with_no_answer_is_undone_only_once_qemu_shows_it_did_not_happen(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ctx, monitor, held, log = setup(monkeypatch, tmp_path, active=True)
    monitor.complete_error = errors.MonitorError("no answer in 30 s")
    with pytest.raises(errors.MonitorError):
        vmlive.merge(ctx, PID, TOP, None)
    # the job cancelled, qemu still reads the volume: undone, the merge's pause lifted
    assert names(log)[-7:] == ["pause", "complete", "cancel", "ro", "release", "acquire",
                               "resume"]
    assert held == {BASE: True, TOP: False} and not ctx.watch.record.merge_pause


def test_a_pivot_whose_answer_was_lost_is_finished(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    ctx, monitor, held, log = setup(monkeypatch, tmp_path, active=True)
    monitor.complete_error = errors.MonitorError("no answer in 30 s")
    monitor.pivot_then_fail = True
    assert vmlive.merge(ctx, PID, TOP, None).uuid == BASE
    steps = names(log)
    assert steps.index("LiveMergeVolume") < steps.index("resume")  # never before the mark
    assert steps[-1] == "MergeVolume" and held == {BASE: False}
    assert ctx.watch.record.volumes == ((BASE, DEV[BASE]),)


def test_when_qemu_cannot_tell_whether_it_pivoted_nothing_is_undone(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ctx, monitor, held, log = setup(monkeypatch, tmp_path, active=True)
    monitor.complete_error = errors.MonitorError("the socket closed")
    real = monitor.complete_job

    def complete(job: str) -> None:
        monitor.gone = True
        real(job)

    monitor.complete_job = complete  # type: ignore[method-assign]
    with pytest.raises(errors.MonitorError):
        vmlive.merge(ctx, PID, TOP, None)
    assert names(log)[-2:] == ["pause", "complete"]  # not resumed, nothing undone
    assert held == {BASE: False, TOP: False}
    assert ctx.watch.record.merge_pause == TOP
    assert vmwatch.read_records(ctx.paths)[0].merge_pause == TOP


def test_a_vm_paused_by_someone_else_is_not_pivoted(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    ctx, monitor, held, log = setup(monkeypatch, tmp_path, active=True)
    monitor.status = lambda: (False, "paused")  # type: ignore[method-assign]
    with pytest.raises(errors.Busy, match="not running"):
        vmlive.merge(ctx, PID, TOP, None)
    assert "pause" not in names(log) and "complete" not in names(log)
    assert names(log)[-4:] == ["cancel", "ro", "release", "acquire"]
    assert held == {BASE: True, TOP: False}


def test_a_mark_the_manager_refused_leaves_the_vm_paused_until_merge_again(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ctx, monitor, held, log = setup(monkeypatch, tmp_path, active=True)
    ctx.refuse_mark = errors.Timeout("no manager answered")
    with pytest.raises(errors.Timeout):
        vmlive.merge(ctx, PID, TOP, None)
    assert names(log)[-1] == "LiveMergeVolume" and "resume" not in names(log)
    assert ctx.watch.record.merge_pause == TOP and held == {BASE: False, TOP: False}
    # qemu pivoted: asked again, the merge finds the volume out of qemu's chain, has it
    # marked, lifts its own pause and finishes
    ctx.refuse_mark = None
    del log[:]
    vmlive.merge(ctx, PID, TOP, None)
    assert names(log) == ["LiveMergeVolume", "resume", "remove-node", "deactivate",
                          "release", "MergeVolume"]
    assert held == {BASE: False} and not ctx.watch.record.merge_pause


def test_refused_merges_change_nothing(monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    ctx, monitor, held, log = setup(monkeypatch, tmp_path, active=False)
    with pytest.raises(errors.InvalidArgument, match="base of its chain"):
        vmlive.merge(ctx, PID, BASE, None)
    with pytest.raises(errors.Unsupported, match="neither"):  # under the leaf's parent
        monkeypatch.setattr(vmlive.volume_mod, "children", lambda d, uuid: [TOP, LEAF])
        vmlive.merge(ctx, PID, TOP, None)
    monkeypatch.setattr(vmlive.volume_mod, "get_volume", lambda d, uuid: info(
        uuid, role=VolumeRole.TEMPLATE if uuid == BASE else VolumeRole.INTERNAL))
    monkeypatch.setattr(vmlive.volume_mod, "children", lambda d, uuid: {
        BASE: [TOP], TOP: [LEAF], LEAF: []}[uuid])
    with pytest.raises(errors.ReadOnlyVolume):
        vmlive.merge(ctx, PID, TOP, None)
    held.pop(TOP)
    with pytest.raises(errors.InvalidArgument, match="does not read"):
        vmlive.merge(ctx, PID, TOP, None)
    assert log == [] and monitor.jobs == {}


def test_a_node_named_by_a_json_pseudo_filename_is_found_by_its_device(
        tmp_path: Path) -> None:
    """qemu names a live snapshot's overlay (added with its backing given) by a json:
    pseudo-filename: its protocol node's filename is the device (measured, qemu 7.2).
    Before this was read, a second live snapshot on the same host found no drive."""
    from sharedlvm import qmp

    overlay = ('json:{"backing": {"driver": "qcow2", "file": {"driver": "host_device", '
               '"filename": "/dev/loop5"}}, "driver": "qcow2", "file": {"driver": '
               '"host_device", "filename": "/dev/loop6"}}')
    assert qmp._plain(overlay) == "/dev/loop6"
    assert qmp._names(overlay, "/dev/loop6") and not qmp._names(overlay, "/dev/loop5")
    link = tmp_path / "vol"
    link.symlink_to("/dev/loop6")
    assert qmp._names(overlay, str(link)) and qmp._names("/dev/loop6", str(link))
    assert qmp._plain("json:{not json") == "json:{not json"
