"""Live snapshot's steps on the VM's host (vmlive.snapshot) against fakes: qemu's
monitor, the manager (ctx.ask), the leases and the activation, each recorded in one
list so the order is checked. What a failure leaves depends on whether qemu may have
switched: refused (undone, deactivated before released), no answer (nothing undone:
both volumes stay the VM's). The real path: tests/integration/test_vms.py."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_vmwatch import VOL

from sharedlvm import errors, leases, vmlive, vmwatch
from sharedlvm.model import Allocation, VolumeFormat, VolumeInfo, VolumeState
from sharedlvm.paths import HostPaths
from sharedlvm.requests import DeleteVolume, LiveSnapshotVolume
from sharedlvm.units import GiB

NEW = "1c2d3e4f-0000-4000-8000-000000000001"
PID = 4242


def info(uuid: str, parent: str | None = None) -> VolumeInfo:
    return VolumeInfo(uuid=uuid, domain="dom1", image="img", parent=parent,
                      format=VolumeFormat.QCOW2, alloc=Allocation.THIN, capacity=4 * GiB,
                      size=GiB, state=VolumeState.READY, generation=1, lease=3)


class Monitor:
    def __init__(self, log: list[Any], switch: Exception | None = None,
                 ro: bool = True, add: Exception | None = None) -> None:
        self.log, self.switch, self.ro, self.add = log, switch, ro, add

    def active_node(self, path: str) -> str:
        return "old-top"

    def add_overlay(self, node: str, path: str) -> None:
        self.log.append(("add", node, path))
        if self.add:
            raise self.add

    def pause(self) -> None:
        self.log.append(("pause",))

    def snapshot(self, active: str, overlay: str) -> None:
        self.log.append(("switch", active, overlay))
        if self.switch:
            raise self.switch

    def remove_node(self, node: str) -> None:
        self.log.append(("remove", node))

    def read_only(self, node: str) -> bool:
        return self.ro


class Layout:
    refuse_again = False  # the old leaf's lease cannot be taken back

    def __init__(self, log: list[Any]) -> None:
        self.log = log
        self.lockspace = "ls"

    def acquire_volume(self, vol: VolumeInfo, shared: bool, pid: int) -> None:
        self.log.append(("acquire", vol.uuid, "shared" if shared else "exclusive"))
        if vol.uuid == VOL and Layout.refuse_again:
            raise errors.LeaseError("held")

    def release_volume(self, vol: VolumeInfo, pid: int) -> None:
        self.log.append(("release", vol.uuid))


class Domain:
    host_id = 2
    runner = None

    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def deactivate_volume(self, uuid: str) -> None:
        self.log.append(("deactivate", uuid))


class Ctx:
    def __init__(self, tmp_path: Path, log: list[Any], monitor: Monitor) -> None:
        self.paths = HostPaths(tmp_path)
        self.log = log
        record = vmwatch.VmRecord(PID, 1, "m", "dom1", ((VOL, "/dev/old"),))
        self.watch = vmwatch.VmWatch(record, None, vmwatch.ThinSettings(),  # type: ignore
                                     threading.Event())
        self.watch.monitor = monitor  # type: ignore[assignment]
        self.vms = type("Vms", (), {"watch_of": lambda _, pid: self.watch})()
        self._domain = Domain(log)

    def domain(self, name: str) -> Domain:
        return self._domain

    def ask(self, request: Any) -> Any:
        self.log.append(("ask", type(request).__name__))
        if isinstance(request, LiveSnapshotVolume):
            assert request.host_id == 2 and request.volume == VOL
            return info(NEW, parent=VOL)
        assert isinstance(request, DeleteVolume) and request.volume == NEW
        return None


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    log: list[Any] = []
    monkeypatch.setattr(vmlive, "LeaseLayout", lambda d: Layout(log))
    monkeypatch.setattr(leases, "inquire", lambda pid: [
        leases.Held("ls", VOL, 5, False)])
    monkeypatch.setattr(vmlive.volume_mod, "volume_path",
                        lambda d, uuid, info: log.append(("activate", uuid)) or "/dev/new")
    monkeypatch.setattr(vmlive.volume_mod, "get_volume", lambda d, uuid: info(uuid))
    monkeypatch.setattr(vmlive, "set_read_only",
                        lambda runner, path, ro: log.append(("setro", path)))
    monkeypatch.setattr(vmlive, "alive", lambda record: True)
    return log


def steps(log: list[Any]) -> list[str]:
    return [entry[0] for entry in log]


def test_a_switch_makes_the_new_leaf_the_vms_and_the_old_one_shared(
        tmp_path: Path, fakes: list[Any]) -> None:
    ctx = Ctx(tmp_path, fakes, Monitor(fakes))
    new = vmlive.snapshot(ctx, PID, None, {}, None)
    assert new.uuid == NEW
    assert steps(fakes) == ["ask", "acquire", "activate", "add", "switch", "setro",
                            "release", "acquire"]
    assert fakes[-1] == ("acquire", VOL, "shared") and fakes[-3] == ("setro", "/dev/old")
    (saved,) = vmwatch.read_records(ctx.paths)
    assert saved.volumes == ((NEW, "/dev/new"),) and saved.others == (VOL,)
    assert ctx.watch.reload.is_set()


def test_an_old_leaf_qemu_keeps_read_write_keeps_its_exclusive_lease(
        tmp_path: Path, fakes: list[Any]) -> None:
    vmlive.snapshot(Ctx(tmp_path, fakes, Monitor(fakes, ro=False)), PID, None, {}, None)
    assert steps(fakes)[-1] == "switch"  # no setro, no release of the old leaf


def test_a_refused_switch_is_undone_deactivated_before_released(
        tmp_path: Path, fakes: list[Any]) -> None:
    ctx = Ctx(tmp_path, fakes, Monitor(fakes, switch=errors.MonitorRefused("no")))
    with pytest.raises(errors.MonitorRefused):
        vmlive.snapshot(ctx, PID, None, {}, None)
    assert steps(fakes) == ["ask", "acquire", "activate", "add", "switch", "remove",
                            "deactivate", "release", "ask"]
    (saved,) = vmwatch.read_records(ctx.paths)
    assert saved.volumes == ((VOL, "/dev/old"),) and saved.others == ()


def test_a_switch_without_an_answer_is_never_undone(tmp_path: Path,
                                                     fakes: list[Any]) -> None:
    """qemu may have switched: the new leaf keeps its lease (qemu's, it dies with it)
    and its mapping, both volumes are watched, and both deactivated at the VM's end."""
    ctx = Ctx(tmp_path, fakes, Monitor(fakes, switch=errors.Timeout("no answer")))
    with pytest.raises(errors.MonitorError, match="may write either"):
        vmlive.snapshot(ctx, PID, None, {}, None)
    assert steps(fakes) == ["ask", "acquire", "activate", "add", "switch"]
    (saved,) = vmwatch.read_records(ctx.paths)
    assert saved.volumes == ((VOL, "/dev/old"), (NEW, "/dev/new"))
    assert saved.others == (NEW,) and ctx.watch.reload.is_set()


def test_a_leaf_not_held_exclusively_by_the_vm_is_refused_before_anything(
        tmp_path: Path, fakes: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leases, "inquire", lambda pid: [leases.Held("ls", VOL, 5, True)])
    ctx = Ctx(tmp_path, fakes, Monitor(fakes))
    with pytest.raises(errors.Busy):
        vmlive.snapshot(ctx, PID, None, {}, None)
    assert fakes == [] and vmwatch.read_records(ctx.paths) == []
    with pytest.raises(errors.InvalidArgument):
        vmlive.snapshot(ctx, PID, NEW, {}, None)  # a volume the VM does not write
    ctx.watch.record = replace(ctx.watch.record, volumes=())
    with pytest.raises(errors.InvalidArgument, match="give --volume"):
        vmlive.snapshot(ctx, PID, None, {}, None)


def test_grow_thin_asks_the_manager_first_and_reads_only_when_refused(
        tmp_path: Path) -> None:
    """The hot path is one request; the volume is read only when the manager refuses
    the target (the LV already larger: grown by a daemon that died before its refresh)
    and a real refusal is raised."""
    from sharedlvm.command import Runner
    from sharedlvm.daemon import Daemon

    daemon = Daemon(HostPaths(tmp_path), Runner())
    asked: list[Any] = []
    lv = {"size": 3 * GiB}

    def dispatch(request: Any) -> VolumeInfo:
        asked.append(request.request_id)
        if int(request.allocation) < lv["size"]:
            raise errors.InvalidArgument("cannot shrink")
        return replace(info(VOL), size=int(request.allocation))

    daemon.dispatch = dispatch  # type: ignore[method-assign]
    daemon.volume_info = lambda d, v: replace(info(v), size=lv["size"])  # type: ignore
    assert daemon.grow_thin("dom1", VOL, 4 * GiB) == 4 * GiB
    assert daemon.grow_thin("dom1", VOL, 2 * GiB) == 3 * GiB  # already larger: as is
    assert asked == [f"thin-{VOL}-{4 * GiB}", f"thin-{VOL}-{2 * GiB}"]
    daemon.volume_info = lambda d, v: replace(info(v), size=GiB)  # type: ignore
    with pytest.raises(errors.InvalidArgument):
        daemon.grow_thin("dom1", VOL, 2 * GiB)


def test_a_lost_answer_to_the_node_is_never_undone(tmp_path: Path,
                                                   fakes: list[Any]) -> None:
    ctx = Ctx(tmp_path, fakes, Monitor(fakes, add=errors.Timeout("no answer")))
    with pytest.raises(errors.MonitorError, match="may write either"):
        vmlive.snapshot(ctx, PID, None, {}, None)
    assert steps(fakes) == ["ask", "acquire", "activate", "add"]
    assert ctx.watch.record.others == (NEW,) and ctx.watch.reload.is_set()


def test_the_watch_follows_the_switch_when_the_record_cannot_be_written(
        tmp_path: Path, fakes: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = Ctx(tmp_path, fakes, Monitor(fakes))
    real = vmlive.write_record
    writes = []

    def write(paths: HostPaths, record: Any) -> None:
        writes.append(record)
        if len(writes) == 3:  # the one after the switch
            raise OSError(28, "No space left on device")
        real(paths, record)

    monkeypatch.setattr(vmlive, "write_record", write)
    vmlive.snapshot(ctx, PID, None, {}, None)
    assert ctx.watch.record.volumes == ((NEW, "/dev/new"),) and ctx.watch.reload.is_set()


def test_an_old_leaf_whose_lease_cannot_be_taken_back_pauses_the_vm(
        tmp_path: Path, fakes: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Layout, "refuse_again", True)
    monkeypatch.setattr(vmlive.time, "sleep", lambda s: None)
    vmlive.snapshot(Ctx(tmp_path, fakes, Monitor(fakes)), PID, None, {}, None)
    retakes = [e[2] for e in fakes if e[0] == "acquire" and e[1] == VOL]
    assert retakes == ["shared"] * 3 + ["exclusive"] * 2
    assert fakes[-1] == ("pause",)
