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
                                         lambda: dict(versions), {}, lambda v: None)
    assert mon.dom is fake.dom and set(fake.callbacks) == {
        real.VIR_DOMAIN_EVENT_ID_BLOCK_THRESHOLD, real.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON,
        real.VIR_DOMAIN_EVENT_ID_LIFECYCLE}
    assert mon.status() == (True, "running") and mon.versions == {VOL: 4}


def test_threshold_event_for_vda_and_its_index_is_passed_on_once(fake: FakeConn) -> None:
    mon = vmwatch_libvirt.LibvirtMonitor("qemu:///x", f"libvirt:{VM}", 4242,
                                         lambda: {VOL: 5}, {VOL: 4}, lambda v: None)
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


def resume_event(fake: FakeConn, detail: int = real.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED
                 ) -> None:
    fake.callbacks[real.VIR_DOMAIN_EVENT_ID_LIFECYCLE](
        None, None, real.VIR_DOMAIN_EVENT_RESUMED, detail, None)


def drain(mon: vmwatch_libvirt.LibvirtMonitor) -> None:
    """The watch's loop: events taken until the settled check ran."""
    while mon.next_event(0.01) is not None or mon.check_at:
        pass


@pytest.fixture
def victim() -> Any:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def killed(proc: subprocess.Popen[bytes]) -> bool:
    try:
        return proc.wait(2) == -signal.SIGKILL
    except subprocess.TimeoutExpired:
        return False


def test_enospc_resume_refused_and_vm_killed_when_the_lease_moved_while_paused(
        fake: FakeConn, victim: subprocess.Popen[bytes]) -> None:
    versions = {VOL: 4}
    saved: list[dict[str, int]] = []
    mon = vmwatch_libvirt.LibvirtMonitor("qemu:///x", f"libvirt:{VM}", victim.pid,
                                         lambda: dict(versions), {VOL: 4}, saved.append)
    fake.dom.state_ = (real.VIR_DOMAIN_PAUSED, real.VIR_DOMAIN_PAUSED_IOERROR)
    assert mon.status() == (False, "io-error")
    versions[VOL] = 5  # another host acquired it while libvirt had let it go
    with pytest.raises(MonitorError, match="another holder took its lease"):
        mon.resume()
    assert fake.dom.resumed == 0 and killed(victim)


def test_enospc_resume_when_untouched_and_its_own_acquire_accepted(
        fake: FakeConn, victim: subprocess.Popen[bytes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmwatch_libvirt.LibvirtMonitor, "SETTLE", 0.0)
    versions = {VOL: 4}
    saved: list[dict[str, int]] = []
    mon = vmwatch_libvirt.LibvirtMonitor("qemu:///x", f"libvirt:{VM}", victim.pid,
                                         lambda: dict(versions), {VOL: 4}, saved.append)
    mon.resume()
    assert fake.dom.resumed == 1
    versions[VOL] = 5  # libvirt's acquire at that resume
    resume_event(fake)
    drain(mon)
    assert saved == [{VOL: 5}] and mon.versions == {VOL: 5} and victim.poll() is None


@pytest.mark.parametrize("resumes, after, kill", [
    (1, 5, False),  # libvirt's own acquire
    (2, 6, False),  # two quick suspend/resume cycles, events handled late
    (1, 6, True),  # someone else's acquire in between
    (0, 4, False),  # nothing happened
])
def test_a_resume_past_a_stolen_lease_kills_the_vm(
        fake: FakeConn, victim: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch,
        resumes: int, after: int, kill: bool) -> None:
    monkeypatch.setattr(vmwatch_libvirt.LibvirtMonitor, "SETTLE", 0.0)
    versions = {VOL: 4}
    saved: list[dict[str, int]] = []
    mon = vmwatch_libvirt.LibvirtMonitor("qemu:///x", f"libvirt:{VM}", victim.pid,
                                         lambda: dict(versions), {VOL: 4}, saved.append)
    versions[VOL] = after
    for _ in range(resumes):
        resume_event(fake)
    drain(mon)
    assert killed(victim) is kill
    assert saved == ([{VOL: after}] if resumes else [])


def test_a_restarted_watch_starts_from_the_recorded_version(
        fake: FakeConn, victim: subprocess.Popen[bytes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The version another holder left is not taken as the VM's own by a watch that
    (re)connects while the VM is paused: the record's is."""
    monkeypatch.setattr(vmwatch_libvirt.LibvirtMonitor, "SETTLE", 0.0)
    versions = {VOL: 6}  # the VM held 4; someone took it while the watch was away
    mon = vmwatch_libvirt.LibvirtMonitor("qemu:///x", f"libvirt:{VM}", victim.pid,
                                         lambda: dict(versions), {VOL: 4}, lambda v: None)
    versions[VOL] = 7
    resume_event(fake)
    drain(mon)
    assert killed(victim)


def test_hook_refuses_what_it_cannot_lease_before_reaching_the_daemon(
        tmp_path: Path) -> None:
    """A read-only or shareable disk (its lease would be shared: a <lease> cannot be),
    one image on two disks, disks of two domains: refused at prepare, before any
    request (no daemon runs here: reaching one would fail differently)."""
    paths = HostPaths(tmp_path)
    entry = f"{tmp_path}/run/sharedlvm/dom1/{IMG}/{VOL}"
    other = f"{tmp_path}/run/sharedlvm/dom2/{VM}/{VOL}"

    def xml(*disks: str) -> str:
        return (f"<domain><name>w</name><uuid>{VM}</uuid><devices>" + "".join(disks)
                + "</devices></domain>")

    def disk(path: str, dev: str, extra: str = "") -> str:
        return (f"<disk type='block'><source dev='{path}'/><target dev='{dev}'/>"
                f"{extra}</disk>")

    for bad, why in ((xml(disk(entry, "vda", "<readonly/>")), "read-only or shareable"),
                     (xml(disk(entry, "vda", "<shareable/>")), "read-only or shareable"),
                     (xml(disk(entry, "vda"), disk(entry, "vdb")), "more than one disk"),
                     (xml(disk(entry, "vda"), disk(other, "vdb")), "several sharedlvm")):
        with pytest.raises(libvirt_hook.errors.Error, match=why):
            libvirt_hook.run_hook(paths, ["w", "prepare", "begin", "-"], bad, io.StringIO())
