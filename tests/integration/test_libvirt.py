"""VMs run by libvirt (libvirt.py, libvirt_hook.py, vmwatch_libvirt.py): a libvirtd per
simulated host (hosts 2 and 3, sharedlvm_testbed.libvirtbed) configured by ``sharedlvm
libvirt install``, TCG domains whose disks and leases are what ``sharedlvm libvirt
disk-xml`` prints. Writes go through the disk's virtio backend with HMP ``qemu-io``
(qemu prints each outcome in the domain's log); checks read the LUN: leases and their
versions with sanlock, LV sizes with LVM."""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bed import Cluster, Host
from qemu_vm import lv_size, wait_for

from sharedlvm import vmwatch
from sharedlvm.command import Runner
from sharedlvm.lease_layout import LeaseLayout
from sharedlvm.units import GiB, MiB
from sharedlvm.volume import get_volume
from sharedlvm_testbed.libvirtbed import Libvirtd
from sharedlvm_testbed.vmbed import writer
from sharedlvm_testbed.vmbed.image import build_image

pytestmark = pytest.mark.integration

PIECE = 64 * MiB


@pytest.fixture(scope="module")
def libvirtds(shared_cluster: Cluster) -> Iterator[dict[int, Libvirtd]]:
    """A libvirtd on hosts 2 and 3; their sharedlvm daemons watch libvirt's VMs
    through it (thin volumes grown with the default settings: 1 GiB when less than
    512 MiB is left)."""
    started: dict[int, Libvirtd] = {}
    hosts = shared_cluster.hosts[1:]
    try:
        for host in hosts:  # both at once: each takes seconds probing the machine
            started[host.index] = Libvirtd(host.paths)
            started[host.index].spawn()
        for host in hosts:
            started[host.index].wait()
            _configure(host, started[host.index])
        yield started
    finally:
        for daemon in started.values():
            daemon.stop()
        for host in hosts:
            (host.paths.config_dir / "daemon.toml").unlink(missing_ok=True)
            host.restart_daemon()


@pytest.fixture(autouse=True)
def no_domains_left(cluster: Cluster, libvirtds: dict[int, Libvirtd]) -> Iterator[None]:
    """Every domain destroyed and undefined after each test (a failed one's too),
    before the cluster is cleaned: a libvirt VM's image is libvirt's to stop."""
    yield
    for daemon in libvirtds.values():
        for name in daemon.virsh("list", "--all", "--name", check=False).stdout.split():
            daemon.virsh("destroy", name, check=False)
            daemon.virsh("undefine", name, check=False)


def _configure(host: Host, daemon: Libvirtd, chunk: int = 0, free: int = 0) -> None:
    thin = f"thin_chunk_mib = {chunk}\nthin_free_mib = {free}\n" if chunk else ""
    (host.paths.config_dir / "daemon.toml").write_text(
        f'[daemon]\nlibvirt_uri = "{daemon.uri}"\n{thin}')
    host.restart_daemon()


class Domain:
    """A libvirt domain on one host's libvirtd, with disks from ``disk-xml``."""

    def __init__(self, host: Host, daemon: Libvirtd, name: str, image: str,
                 os_xml: str = "<os><type arch='x86_64' machine='pc'>hvm</type></os>",
                 memory_mib: int = 128, extra: str = "") -> None:
        self.host, self.daemon, self.name, self.image = host, daemon, name, image
        self.disk = host.cli_json("libvirt", "disk-xml", image)
        self.xml = (
            f"<domain type='qemu'><name>{name}</name>"
            f"<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>{os_xml}"
            "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
            f"{self.disk['disk']}{self.disk['lease']}{extra}</devices></domain>")

    @property
    def alias(self) -> str:
        return f"ua-sharedlvm-{self.image}"

    @property
    def log(self) -> Path:
        return self.daemon.base / "log" / "qemu" / f"{self.name}.log"

    def define(self) -> None:
        path = self.daemon.base / f"{self.name}.xml"
        path.write_text(self.xml)
        self.daemon.virsh("define", str(path))

    def start(self, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.daemon.virsh("start", self.name, check=check)

    def state(self) -> str:
        return self.daemon.virsh("domstate", self.name, check=False).stdout.strip()

    def pid(self) -> int:
        return int((self.daemon.base / "run" / "qemu" / f"{self.name}.pid").read_text())

    def io(self, command: str) -> None:
        """qemu-io on the disk's backend; qemu prints the outcome in the domain's log:
        the last one must be a success and none may have failed."""
        self.daemon.virsh("qemu-monitor-command", "--hmp", self.name,
                          f'qemu-io -d {self.alias}/virtio-backend "{command}"')
        ok = "wrote " if command.startswith("write") else "read "
        lines = [ln for ln in self.log.read_text().splitlines()
                 if ln.startswith(("wrote ", "read ")) or "fail" in ln.lower()]
        if not (lines and lines[-1].startswith(ok)):
            log = (self.host.root / "daemon.log").read_text().splitlines()
            raise AssertionError(f"{lines[-3:]}; host{self.host.index}'s daemon: "
                                 + "\n".join(ln for ln in log[-30:] if "VM " in ln))


def fill(cluster: Cluster, vm: Domain, leaf: str, start: int, end: int, base: int) -> None:
    """Write ``start``..``end`` in 64 MiB pieces (pattern ``base`` + piece), never more
    than two pieces ahead of the LV's end: an idle host's first extend may wait up to
    2 s for the manager's mailbox sweep, longer than qemu-io takes for 128 MiB."""
    for i, offset in enumerate(range(start, end, PIECE)):
        wait_for(lambda o=offset: o + 2 * PIECE <= lv_size(cluster, leaf), 30,  # type: ignore[misc]
                 f"the LV grown past {offset + 2 * PIECE}")
        vm.io(f"write -P {base + i % 32:#x} {offset} {PIECE}")


def _device_size(path: Path) -> int:
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def holders(host: Host, image: str) -> dict[str, list[int]]:
    """Who holds each volume's lease, read from the leases on the LUN."""
    info: dict[str, Any] = host.cli_json("image", "info", image)
    return {vol: sorted(hosts) for vol, hosts in info["holders"].items()}


def lease_version(host: Host, volume: str) -> int:
    """The version of the volume's lease as written on the LUN (sanlock direct dump)."""
    d = host.domain()
    layout = LeaseLayout(d)
    slot = layout.slot_disk(get_volume(d, volume).lease or 0)
    out = subprocess.run(["sanlock", "direct", "dump", f"{slot.path}:{slot.offset}"],
                         capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if volume in ln)
    return int(line.split()[-1])


def linked_clone(host: Host) -> tuple[str, str, str]:
    """A template (thin qcow2, 4 GiB) and a linked clone of it: (image, leaf, base)."""
    base = host.cli_json("volume", "create", "--size", "4G", "--format", "qcow2",
                         "--alloc", "thin")["uuid"]
    host.cli("volume", "template", base)
    clone = host.cli_json("volume", "clone", base, "--linked")
    return clone["image"], clone["uuid"], base


def test_libvirt_runs_a_linked_clone_grows_it_refuses_a_second_start_and_migrates(
        cluster: Cluster, libvirtds: dict[int, Libvirtd], tmp_path: Path) -> None:
    """A domain on host 2 runs a linked clone's chain with the leaf's lease in its
    qemu (libvirt's sanlock driver, the <lease> disk-xml printed); its thin leaf grows
    under writes (host 2's daemon, through libvirt's threshold event); the same disk
    started on host 3 is refused before anything is activated there; a live migration
    to host 3 moves the lease (one version later) and the watch; destroyed, the lease
    is free and nothing is left active."""
    h2, h3 = cluster.hosts[1], cluster.hosts[2]
    image, leaf, base = linked_clone(h2)
    vm = Domain(h2, libvirtds[2], "web1", image)
    assert vm.disk["leaf"] == leaf and f"<key>{leaf}</key>" in vm.disk["lease"]
    vm.define()
    vm.start()
    assert holders(h2, image) == {base: [], leaf: [2]}  # the template: no lease (libvirt)
    version = lease_version(h2, leaf)
    # the lease is libvirt's: sharedlvm never lets it go for the VM
    assert "libvirt's to stop" in h2.refused("image", "teardown", image)
    assert holders(h2, image)[leaf] == [2]
    record = wait_for(lambda: vmwatch.read_records(h2.paths), 10, "VM recorded")[0]
    assert record.pid == vm.pid() and record.monitor.startswith("libvirt:")
    assert record.held == ((leaf, version),)
    first = lv_size(cluster, leaf)

    # thin growth: writes past the threshold, through the guest's disk
    fill(cluster, vm, leaf, 0, first, 0x40)
    wait_for(lambda: lv_size(cluster, leaf) > first, 30, "the LV grown")
    written = first
    assert "grown to" in (h2.root / "daemon.log").read_text()

    # the same disk on host 3: refused by the hook's prepare, nothing activated
    other = Domain(h3, libvirtds[3], "web1", image)
    other.define()
    refused = other.start(check=False)
    assert refused.returncode != 0 and f"volume {leaf} is held by host 2" in refused.stderr
    assert not (h3.paths.run_dir / cluster.name / image).exists()
    assert h3.prepared_images() == []
    libvirtds[3].virsh("undefine", "web1")

    # live migration: host 3 takes the lease over, one version later. (No grow while
    # libvirt migrates and the destination's refresh at its resume are unit-tested,
    # tests/unit/test_vmwatch.py: qemu migrates this idle guest's zero pages in well
    # under a second, too fast to write through the source meanwhile for sure.)
    libvirtds[2].virsh("migrate", "--live", "--persistent", "--undefinesource", "web1",
                       libvirtds[3].uri, "--migrateuri", f"unix://{tmp_path}/mig.sock")
    moved = Domain(h3, libvirtds[3], "web1", image)
    assert moved.state() == "running"
    device = h3.paths.run_dir / cluster.name / image / leaf
    wait_for(lambda: _device_size(device) == lv_size(cluster, leaf), 30,
             "host 3's mapping as large as the LV")
    assert holders(h3, image) == {base: [], leaf: [3]}
    assert lease_version(h3, leaf) == version + 1
    assert not (h2.paths.run_dir / cluster.name / image).exists()
    assert vmwatch.read_records(h2.paths) == []
    for i, offset in enumerate(range(0, written, PIECE)):
        moved.io(f"read -P {0x40 + i % 32:#x} {offset} {PIECE}")
    # host 3's daemon grows it now
    size = lv_size(cluster, leaf)
    fill(cluster, moved, leaf, written, size, 0x20)
    wait_for(lambda: lv_size(cluster, leaf) > size, 30, "the LV grown by host 3")

    libvirtds[3].virsh("destroy", "web1")
    wait_for(lambda: holders(h3, image) == {base: [], leaf: []}, 30, "lease free")
    wait_for(lambda: not (h3.paths.run_dir / cluster.name / image).exists(), 10,
             "links gone")
    assert h3.prepared_images() == []
    libvirtds[3].virsh("undefine", "web1")


def test_a_paused_libvirt_vm_whose_lease_was_taken_is_killed_when_resumed(
        cluster: Cluster, libvirtds: dict[int, Libvirtd]) -> None:
    """libvirt releases a domain's leases when it pauses it and acquires them again,
    with no version, when it resumes it: another host can use the disk meanwhile.
    sharedlvm's watch sees the version jump (two acquires past the VM's own) when the
    VM resumes and kills it, so its writes and the other holder's cannot interleave."""
    h1, h2 = cluster.hosts[0], cluster.hosts[1]
    image, leaf, _ = linked_clone(h2)
    vm = Domain(h2, libvirtds[2], "paused1", image)
    vm.define()
    vm.start()
    pid = vm.pid()
    wait_for(lambda: any(r.pid == pid for r in vmwatch.read_records(h2.paths)), 10,
             "VM recorded")
    time.sleep(1.5)  # the watch connected (it scans every 0.5 s)
    held = lease_version(h2, leaf)
    libvirtds[2].virsh("suspend", "paused1")
    assert holders(h2, image)[leaf] == []  # libvirt let the lease go
    h1.cli("run", "--volume", leaf, "--", "true")  # another host holds it, and lets go
    assert lease_version(h2, leaf) == held + 1
    libvirtds[2].virsh("resume", "paused1")
    wait_for(lambda: vm.state() in ("shut off", "crashed"), 30, "the VM killed")
    assert "after another holder took its lease" in (h2.root / "daemon.log").read_text()
    wait_for(lambda: holders(h2, image)[leaf] == [], 30, "its lease free")
    libvirtds[2].virsh("undefine", "paused1")


def test_libvirt_guest_burst_pauses_on_enospc_and_resumes(
        cluster: Cluster, libvirtds: dict[int, Libvirtd], tmp_path: Path) -> None:
    """A guest kernel run by libvirt writes 1.25 GiB through virtio-blk into a thin
    volume growing 128 MiB at a time with 1 MiB of warning: qemu pauses it at the LV's
    end (error_policy='enospace'), libvirt lets the lease go, the daemon grows the LV,
    checks the lease's version did not move and resumes it through libvirt (which
    acquires the lease again); the guest sees no error and the disk holds what it
    wrote."""
    h2 = cluster.hosts[1]
    _configure(h2, libvirtds[2], chunk=128, free=1)
    try:
        image_info = build_image(Runner())
        vol = h2.cli_json("volume", "create", "--size", "2G", "--format", "qcow2",
                          "--alloc", "thin")
        blob = tmp_path / "blob"
        blob.write_bytes(random.Random(11).randbytes(16 * MiB))
        copies = 80
        initrd = tmp_path / "initrd"
        writer.writer_initrd(image_info, blob, copies, initrd)
        console = tmp_path / "console.log"
        os_xml = (
            "<os><type arch='x86_64' machine='q35'>hvm</type>"
            f"<kernel>{image_info.kernel}</kernel><initrd>{initrd}</initrd>"
            "<cmdline>console=ttyS0 panic=1 loglevel=4 mitigations=off</cmdline></os>"
            "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>")
        serial = (f"<serial type='file'><source path='{console}'/>"
                  "<target port='0'/></serial>")
        vm = Domain(h2, libvirtds[2], "burst1", vol["image"], os_xml, 384, serial)
        vm.define()
        vm.start()
        wait_for(lambda: vm.state() == "shut off", 600, "the guest done")
        out = console.read_text()
        assert writer.DONE in out and writer.FAILED not in out, out[-2000:]
        log = (h2.root / "daemon.log").read_text()
        assert log.count("resumed after ENOSPC") >= 1
        reference = tmp_path / "reference.raw"
        with reference.open("wb") as f:
            data = blob.read_bytes()
            for _ in range(copies):
                f.write(data)
            f.truncate(2 * GiB)
        compared = h2.cli("run", "--volume", f"{vol['uuid']}:ro", "--", "qemu-img",
                          "compare", "-f", "qcow2", "-F", "raw", "{0}", str(reference),
                          check=False)
        assert compared.returncode == 0, compared.stdout + compared.stderr
        libvirtds[2].virsh("undefine", "burst1")
    finally:
        _configure(h2, libvirtds[2])


def test_a_cloud_managers_domain_xml_gets_its_leases_from_add_leases(
        cluster: Cluster, libvirtds: dict[int, Libvirtd], tmp_path: Path) -> None:
    """A domain XML as OpenNebula writes it: the disk is the VM directory's ``disk.0``,
    a link to a link per chain volume into the image directory, with no lease and no
    error policy. libvirt refuses to start it (the hook's prepare: no lease, nothing
    activated); ``sharedlvm libvirt add-leases`` adds the leaf's lease and the error
    policy, and it runs with the lease in its qemu."""
    h2 = cluster.hosts[1]
    image, leaf, base = linked_clone(h2)
    vmdir = tmp_path / "datastores" / "0" / "42"
    vmdir.mkdir(parents=True)
    for vol in (base, leaf):
        (vmdir / vol).symlink_to(h2.paths.run_dir / cluster.name / image / vol)
    (vmdir / "disk.0").symlink_to(leaf)
    xml = (
        "<domain type='qemu'><name>one-42</name><memory unit='MiB'>128</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
        "<disk type='block' device='disk'><driver name='qemu' type='qcow2' cache='none'/>"
        f"<source dev='{vmdir}/disk.0'/><target dev='vda' bus='virtio'/></disk>"
        "</devices></domain>")
    plain = tmp_path / "deployment.0"
    plain.write_text(xml)
    refused = libvirtds[2].virsh("create", str(plain), check=False)
    assert refused.returncode != 0 and f"no <lease> of volume {leaf}" in refused.stderr
    assert not (h2.paths.run_dir / cluster.name / image).exists()

    h2.cli("libvirt", "add-leases", "--in-place", str(plain))
    fixed = plain.read_text()
    assert f"<key>{leaf}</key>" in fixed and "error_policy=\"enospace\"" in fixed
    h2.cli("libvirt", "add-leases", "--in-place", str(plain))  # again: unchanged
    assert plain.read_text() == fixed
    libvirtds[2].virsh("create", str(plain))
    assert holders(h2, image)[leaf] == [2]
    libvirtds[2].virsh("destroy", "one-42")
    wait_for(lambda: holders(h2, image)[leaf] == [], 30, "lease free")
    assert not (h2.paths.run_dir / cluster.name / image).exists()
