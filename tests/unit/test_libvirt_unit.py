"""libvirt.py's XML handling and configuration, the hook's phases that need no daemon,
and vmwatch_libvirt's lease-version guard against a fake libvirt connection (the real
path runs in tests/integration/test_libvirt.py). The fake keeps libvirt-python's own
constants; its behaviour is checked first."""

from __future__ import annotations

import io
import signal
import subprocess
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from sharedlvm import libvirt, libvirt_hook, vmwatch_libvirt
from sharedlvm.errors import MonitorError
from sharedlvm.paths import HostPaths

real = pytest.importorskip("libvirt")

IMG = "11111111-2222-4333-8444-555555555555"
VOL = "66666666-7777-4888-9999-aaaaaaaaaaaa"
VM = "0b7c3d5e-1111-4222-8333-444455556666"


def domain_xml(source: str, lease: bool = True) -> str:
    lease_xml = (f"<lease><lockspace>ls1</lockspace><key>{VOL}</key>"
                 "<target path='/dev/sdb' offset='1048576'/></lease>") if lease else ""
    return (f"<domain type='qemu'><name>web1</name><uuid>{VM}</uuid><devices>"
            f"<disk type='block' device='disk'><source dev='{source}'/>"
            f"<target dev='vda' bus='virtio'/></disk>"
            "<disk type='file' device='cdrom'><source file='/tmp/x.iso'/>"
            "<target dev='sda' bus='sata'/><readonly/></disk>"
            f"{lease_xml}</devices></domain>")


def test_disks_found_directly_and_through_a_cloud_managers_links(tmp_path: Path) -> None:
    entry = f"{tmp_path}/root/run/sharedlvm/dom1/{IMG}/{VOL}"  # need not exist yet
    vmdir = tmp_path / "one" / "42"
    vmdir.mkdir(parents=True)
    (vmdir / VOL).symlink_to(entry)
    (vmdir / "disk.0").symlink_to(VOL)  # relative, as OpenNebula's driver makes it
    for source in (entry, str(vmdir / "disk.0")):
        disks = libvirt.sharedlvm_disks(ET.fromstring(domain_xml(source)))
        assert [(d.target, d.domain, d.image, d.volume, d.read_only) for d in disks] == \
            [("vda", "dom1", IMG, VOL, False)]
    assert libvirt.sharedlvm_disks(ET.fromstring(domain_xml("/dev/sdc"))) == []
    assert libvirt.leases_of(ET.fromstring(domain_xml(entry))) == [
        libvirt.Lease("ls1", VOL, "/dev/sdb", 1048576)]


def test_migration_rewrites_image_paths_to_this_hosts_root_only() -> None:
    xml = domain_xml(f"/bed/host2/run/sharedlvm/dom1/{IMG}/{VOL}")
    out = libvirt.rewrite_root(xml, "/bed/host3")
    assert f"/bed/host3/run/sharedlvm/dom1/{IMG}/{VOL}" in out
    assert "/bed/host2" not in out and "/tmp/x.iso" in out
    assert libvirt.rewrite_root(out, "/bed/host3") == out
    prod = domain_xml(f"/run/sharedlvm/dom1/{IMG}/{VOL}")
    assert libvirt.rewrite_root(prod, "/") == prod


def test_install_sets_the_lock_manager_once_and_writes_the_hook(tmp_path: Path) -> None:
    (tmp_path / "qemu.conf").write_text('user = "root"\nlock_manager = "lockd"\n')
    libvirt.install(tmp_path, "/srv/host1", python="/usr/bin/python3")
    libvirt.install(tmp_path, "/srv/host1", python="/usr/bin/python3")
    conf = (tmp_path / "qemu.conf").read_text()
    assert conf.count("lock_manager") == 1 and 'lock_manager = "sanlock"' in conf
    assert 'user = "root"' in conf
    assert "auto_disk_leases = 0" in (tmp_path / "qemu-sanlock.conf").read_text()
    hook = tmp_path / "hooks" / "qemu"
    assert hook.stat().st_mode & 0o111
    assert "root='/srv/host1'" in hook.read_text()
    assert hook.read_text().startswith("#!/usr/bin/python3\n")


def test_hook_leaves_other_domains_and_phases_alone(tmp_path: Path) -> None:
    """No daemon is reachable here: a phase or domain that is not sharedlvm's must
    not try to reach one."""
    paths = HostPaths(tmp_path)
    out = io.StringIO()
    plain = domain_xml("/dev/sdc")
    for phase in ("prepare", "started", "release", "stopped", "start", "reconnect"):
        assert libvirt_hook.run_hook(paths, ["web1", phase, "begin", "-"], plain, out) == 0
    ours = domain_xml(f"{tmp_path}/run/sharedlvm/dom1/{IMG}/{VOL}")
    assert libvirt_hook.run_hook(paths, ["web1", "stopped", "end", "-"], ours, out) == 0
    assert out.getvalue() == ""


def test_hook_migrate_prints_the_xml_under_this_root_and_marks_incoming(
        tmp_path: Path) -> None:
    paths = HostPaths(tmp_path / "host3")
    out = io.StringIO()
    xml = domain_xml(f"/bed/host2/run/sharedlvm/dom1/{IMG}/{VOL}")
    assert libvirt_hook.run_hook(paths, ["web1", "migrate", "begin", "-"], xml, out) == 0
    assert f"{tmp_path}/host3/run/sharedlvm/dom1/{IMG}/{VOL}" in out.getvalue()
    assert (paths.run_dir / "libvirt" / f"{VM}.incoming").exists()


def test_hook_refuses_bad_input_with_one_line() -> None:
    with pytest.raises(libvirt_hook.errors.InvalidArgument):
        libvirt_hook.run_hook(HostPaths(Path("/nonexistent")), ["web1", "prepare"],
                              "<domain", io.StringIO())


# vmwatch_libvirt against a fake connection


class FakeDom:
    def __init__(self) -> None:
        self.state_ = (real.VIR_DOMAIN_RUNNING, real.VIR_DOMAIN_RUNNING_BOOTED)
        self.resumed = 0
        self.thresholds: list[tuple[str, int]] = []

    def state(self) -> list[int]:
        return list(self.state_)

    def resume(self) -> int:
        self.resumed += 1
        self.state_ = (real.VIR_DOMAIN_RUNNING, real.VIR_DOMAIN_RUNNING_UNPAUSED)
        return 0

    def setBlockThreshold(self, dev: str, threshold: int, flags: int) -> int:
        self.thresholds.append((dev, threshold))
        return 0


class FakeConn:
    def __init__(self) -> None:
        self.dom = FakeDom()
        self.callbacks: dict[int, Any] = {}

    def lookupByUUIDString(self, uuid: str) -> FakeDom:
        return self.dom

    def registerCloseCallback(self, cb: Any, opaque: Any) -> None:
        pass

    def domainEventRegisterAny(self, dom: Any, event: int, cb: Any, opaque: Any) -> int:
        self.callbacks[event] = cb
        return event


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeConn:
    conn = FakeConn()
    module = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real)
                                      if k.startswith("VIR_")},
                                   libvirtError=real.libvirtError, open=lambda uri: conn)
    monkeypatch.setattr(vmwatch_libvirt, "_libvirt", lambda: module)
    monkeypatch.setattr(vmwatch_libvirt, "_start_event_loop", lambda: None)
    return conn


def test_the_fake_connection_hands_out_its_domain_and_callbacks(fake: FakeConn) -> None:
    versions = {VOL: 4}
    mon = vmwatch_libvirt.LibvirtMonitor("qemu:///x", f"libvirt:{VM}", 4242,
                                         lambda: dict(versions))
    assert mon.dom is fake.dom and set(fake.callbacks) == {
        real.VIR_DOMAIN_EVENT_ID_BLOCK_THRESHOLD, real.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON,
        real.VIR_DOMAIN_EVENT_ID_LIFECYCLE}
    assert mon.status() == (True, "running") and mon.versions == {VOL: 4}


def test_threshold_event_for_vda_and_its_index_is_passed_on_once(fake: FakeConn) -> None:
    mon = vmwatch_libvirt.LibvirtMonitor("qemu:///x", f"libvirt:{VM}", 4242,
                                         lambda: {VOL: 4})
    mon.arm_threshold("vda", 1000)
    cb = fake.callbacks[real.VIR_DOMAIN_EVENT_ID_BLOCK_THRESHOLD]
    cb(None, None, "vda", "/p", 1000, 5, None)
    cb(None, None, "vda[1]", "/p", 1000, 5, None)
    first = mon.next_event(0.1)
    assert first is not None and (first.node, first.offset) == ("vda", 1000)
    assert mon.next_event(0.05) is None
    # not carried over a migration: armed again at the destination's resume
    fake.callbacks[real.VIR_DOMAIN_EVENT_ID_LIFECYCLE](
        None, None, real.VIR_DOMAIN_EVENT_RESUMED, real.VIR_DOMAIN_EVENT_RESUMED_MIGRATED,
        None)
    mon.arm_threshold("vda", 2000)
    fake.callbacks[real.VIR_DOMAIN_EVENT_ID_LIFECYCLE](
        None, None, real.VIR_DOMAIN_EVENT_RESUMED, real.VIR_DOMAIN_EVENT_RESUMED_MIGRATED,
        None)
    while mon.next_event(0.05) is not None:
        pass
    assert fake.dom.thresholds[-1] == ("vda", 2000)


def test_enospc_resume_refused_when_the_lease_moved_while_paused(fake: FakeConn) -> None:
    versions = {VOL: 4}
    mon = vmwatch_libvirt.LibvirtMonitor("qemu:///x", f"libvirt:{VM}", 4242,
                                         lambda: dict(versions))
    fake.dom.state_ = (real.VIR_DOMAIN_PAUSED, real.VIR_DOMAIN_PAUSED_IOERROR)
    assert mon.status() == (False, "io-error")
    versions[VOL] = 5  # another host acquired it while libvirt had let it go
    with pytest.raises(MonitorError, match="another holder took its lease"):
        mon.resume()
    assert fake.dom.resumed == 0
    versions[VOL] = 4
    mon.resume()  # untouched: resumed (libvirt acquires again, one version later)
    assert fake.dom.resumed == 1


@pytest.mark.parametrize("after, killed", [(5, False), (6, True)])
def test_a_resume_past_a_stolen_lease_kills_the_vm(fake: FakeConn, after: int,
                                                   killed: bool) -> None:
    victim = subprocess.Popen(["sleep", "60"])
    try:
        versions = {VOL: 4}
        mon = vmwatch_libvirt.LibvirtMonitor("qemu:///x", f"libvirt:{VM}", victim.pid,
                                             lambda: dict(versions))
        versions[VOL] = after  # 5: libvirt's own acquire; 6: someone's in between
        fake.callbacks[real.VIR_DOMAIN_EVENT_ID_LIFECYCLE](
            None, None, real.VIR_DOMAIN_EVENT_RESUMED,
            real.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED, None)
        try:
            code = victim.wait(2)
        except subprocess.TimeoutExpired:
            code = None
        assert (code == -signal.SIGKILL) is killed
        assert mon.versions == {VOL: after}
    finally:
        victim.kill()
        victim.wait()


def test_add_leases_refuses_a_disk_that_is_not_its_images_leaf(
        monkeypatch: pytest.MonkeyPatch) -> None:
    found = libvirt.DiskXml(IMG, "99999999-7777-4888-9999-aaaaaaaaaaaa", "p", "qcow2",
                            "ls1", "/dev/sdb", 0, "<disk/>", "<lease/>")
    monkeypatch.setattr(libvirt, "disk_xml", lambda d, image: found)
    xml = domain_xml(f"/r/run/sharedlvm/dom1/{IMG}/{VOL}", lease=False)
    with pytest.raises(libvirt.errors.InvalidArgument, match="not image .*'s leaf"):
        libvirt.add_leases(xml, lambda name: None)  # type: ignore[arg-type,return-value]


def test_add_leases_adds_the_leaf_lease_once(monkeypatch: pytest.MonkeyPatch) -> None:
    lease = (f"<lease><lockspace>ls1</lockspace><key>{VOL}</key>"
             "<target path='/dev/sdb' offset='1048576'/></lease>")
    monkeypatch.setattr(libvirt, "disk_xml", lambda d, image: libvirt.DiskXml(
        IMG, VOL, "p", "qcow2", "ls1", "/dev/sdb", 1048576, "<disk/>", lease))
    bare = domain_xml(f"/r/run/sharedlvm/dom1/{IMG}/{VOL}", lease=False)
    added = libvirt.add_leases(bare, lambda name: None)  # type: ignore[arg-type,return-value]
    assert libvirt.leases_of(ET.fromstring(added)) == [
        libvirt.Lease("ls1", VOL, "/dev/sdb", 1048576)]
    assert libvirt.add_leases(added, lambda name: None) == added  # type: ignore[arg-type,return-value]
    assert libvirt.add_leases(domain_xml("/dev/sdc"), lambda name: None) == \
        domain_xml("/dev/sdc")  # type: ignore[arg-type,return-value]
