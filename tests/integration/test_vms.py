"""Running VMs: real qemu processes on sharedlvm volumes (vmwatch.py, qmp.py).

qemu runs with no guest (``-M none``): the test writes through its own QMP monitor
with HMP ``qemu-io``, which gives exact control of what is written where; qemu prints
each write's outcome on its stdout. The volume is on host 2, so every extend goes to
the manager (host 1) through the storage mailbox. Checks read the disk: the LV's size
from LVM, the data back through qemu with its pattern."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bed import Cluster, Host, destroy_cluster, make_cluster
from qemu_vm import Qemu, lv_size, wait_for

from sharedlvm import leases, vmwatch
from sharedlvm.command import Runner
from sharedlvm.units import GiB, MiB
from sharedlvm_testbed.vmbed import writer
from sharedlvm_testbed.vmbed.image import build_image

pytestmark = pytest.mark.integration

PIECE = 64 * MiB
TOTAL3 = 640 * MiB  # written by each of the three hosts' qemus: past the threshold


def Vm(host: Host, vol: str, directory: Path) -> Qemu:
    return Qemu(host, vol, directory, f"test-{host.index}")


@pytest.fixture
def vms(cluster: Cluster, tmp_path: Path) -> Iterator[list[Qemu]]:
    started: list[Qemu] = []
    yield started
    for vm in started:
        vm.stop()


def test_thin_volume_grows_under_a_running_qemu(cluster: Cluster, vms: list[Qemu],
                                                tmp_path: Path) -> None:
    """A thin qcow2 volume's LV starts at 1 GiB; qemu writes 6 GiB into it at a steady
    rate and no write ever fails: the daemon of its host grows the LV ahead of the
    writes, through the manager on another host."""
    h2 = cluster.hosts[1]
    vol = h2.cli_json("volume", "create", "--size", "8G", "--format", "qcow2",
                      "--alloc", "thin")["uuid"]
    first = lv_size(cluster, vol)  # 1 GiB + qcow2 metadata room, in whole extents
    assert GiB <= first < 2 * GiB
    vm = Vm(h2, vol, tmp_path)
    vms.append(vm)
    # the daemon found the VM and armed a threshold 512 MiB below the LV's end
    wait_for(lambda: vm.threshold() == first - 512 * MiB, 30, "threshold armed")
    assert [r.volumes[0][0] for r in vmwatch.read_records(h2.paths)] == [vol]
    total = 6 * GiB
    for i, offset in enumerate(range(0, total, PIECE)):
        vm.write(offset, PIECE, 0x10 + i % 200)
        time.sleep(0.1)  # ~400 MB/s at most: a steady writer
    out = vm.output()
    assert "failed" not in out and "error" not in out.lower(), out[-2000:]
    assert out.count("wrote ") == total // PIECE
    size = lv_size(cluster, vol)
    assert size > total, size  # grown ahead of the data, in chunks
    assert vm.threshold() == wait_for(lambda: vm.threshold(), 10, "re-armed")
    running = vm.qmp.execute("query-status")
    assert running["running"] and running["status"] == "running"
    # every piece reads back with its pattern
    for i, offset in enumerate(range(0, total, PIECE)):
        vm.read_ok(offset, PIECE, 0x10 + i % 200)
    out = vm.output()
    assert "Pattern verification failed" not in out and "failed" not in out, out[-2000:]
    metrics = h2.client.metrics()
    assert 'op="vm.extend"' in metrics
    grown = [line for line in (h2.root / "daemon.log").read_text().splitlines()
             if f"volume {vol} grown to" in line]
    print("\n".join(grown))  # each extend's timings (pytest -s)
    assert len(grown) >= 2


@pytest.fixture
def small_chunks(cluster: Cluster) -> Iterator[Host]:
    """Host 2's daemon growing thin volumes by one 128 MiB extent when less than 1 MiB
    is left: a guest's burst outruns every extend, so each one pauses it."""
    h2 = cluster.hosts[1]
    config = h2.paths.config_dir / "daemon.toml"
    config.write_text("[daemon]\nthin_chunk_mib = 128\nthin_free_mib = 1\n")
    try:
        h2.restart_daemon()
        yield h2
    finally:
        config.unlink()
        h2.restart_daemon()


def test_guest_burst_pauses_on_enospc_and_resumes_with_nothing_lost(
        cluster: Cluster, small_chunks: Host, tmp_path: Path) -> None:
    """A guest kernel writes 1.25 GiB through virtio-blk into a thin volume whose LV
    starts at 1 GiB + room, growing 128 MiB at a time with 1 MiB of warning: its
    writes run past the LV's end, qemu pauses it (werror=enospc), the daemon grows
    the LV and resumes it, again and again; the guest never sees an error and every
    byte is on the disk (qemu-img compare with what was written). The manager's
    daemon (host 1) is SIGKILLed as the guest starts: every extend is answered by the
    next manager (asked through the mailbox, exactly once by its request id), the VM
    paused meanwhile resumes by itself."""
    image = build_image(Runner())
    h1, h2 = cluster.hosts[0], small_chunks
    vol = h2.cli_json("volume", "create", "--size", "2G", "--format", "qcow2",
                      "--alloc", "thin")["uuid"]
    first = lv_size(cluster, vol)
    blob = tmp_path / "blob"
    blob.write_bytes(random.Random(7).randbytes(16 * MiB))
    copies = 80  # 1.25 GiB
    initrd = tmp_path / "initrd"
    writer.writer_initrd(image, blob, copies, initrd)
    console = tmp_path / "console.log"
    run = subprocess.Popen(
        [sys.executable, "-m", "sharedlvm", "run", "--volume", vol, "--",
         "qemu-system-x86_64", *writer.writer_qemu_args(image, initrd, console)],
        env=h2.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: vmwatch.read_records(h2.paths), 60, "VM started")
        assert h1.daemon.pid is not None and lv_size(cluster, vol) == first
        os.kill(h1.daemon.pid, signal.SIGKILL)  # before the guest has written much
        _, err = run.communicate(timeout=600)
        assert cluster.manager(timeout=60) is not h1
    finally:
        if run.poll() is None:
            run.kill()
        h1.daemon.start()
    out = console.read_text()
    assert run.returncode == 0, (err, out[-2000:])
    assert writer.DONE in out and writer.FAILED not in out, out[-2000:]
    log = (h2.root / "daemon.log").read_text()
    resumed = log.count("resumed after ENOSPC")
    grown = [line for line in log.splitlines() if f"volume {vol} grown to" in line]
    print("\n".join(grown[-5:]), f"\n{resumed} ENOSPC pauses resumed")
    assert resumed >= 1 and lv_size(cluster, vol) > first
    # the disk holds exactly what the guest wrote, and zeroes after it
    reference = tmp_path / "reference.raw"
    with reference.open("wb") as f:
        data = blob.read_bytes()
        for _ in range(copies):
            f.write(data)
        f.truncate(2 * GiB)
    compared = h2.cli("run", "--volume", f"{vol}:ro", "--", "qemu-img", "compare",
                      "-f", "qcow2", "-F", "raw", "{0}", str(reference), check=False)
    assert compared.returncode == 0, compared.stdout + compared.stderr


def test_watch_resumes_after_a_daemon_restart_and_ends_with_qemu(
        cluster: Cluster, vms: list[Qemu], tmp_path: Path) -> None:
    """The daemon is down while qemu writes past the threshold (its event is lost):
    the restarted daemon finds the VM by its record, sees the highest write past the
    threshold and grows the LV with no further write. Then qemu is SIGKILLed: its
    lease is free at once (another host runs the volume), its record is gone."""
    h1, h2 = cluster.hosts[0], cluster.hosts[1]
    vol = h2.cli_json("volume", "create", "--size", "4G", "--format", "qcow2",
                      "--alloc", "thin")["uuid"]
    first = lv_size(cluster, vol)
    vm = Vm(h2, vol, tmp_path)
    vms.append(vm)
    wait_for(lambda: vm.threshold() == first - 512 * MiB, 30, "threshold armed")
    h2.daemon.stop()
    try:
        for i, offset in enumerate(range(0, first - 128 * MiB, PIECE)):
            vm.write(offset, PIECE, 0x40 + i)
        assert lv_size(cluster, vol) == first  # nobody grew it: the daemon is down
    finally:
        h2.daemon.start()
    wait_for(lambda: lv_size(cluster, vol) > first, 60, "grown by the restarted daemon")
    wait_for(lambda: vm.threshold() > first - 512 * MiB, 30, "re-armed")
    assert "failed" not in vm.output()
    records = vmwatch.read_records(h2.paths)
    assert [r.volumes[0][0] for r in records] == [vol]
    qemu_pid = records[0].pid
    os.kill(qemu_pid, signal.SIGKILL)
    vm.proc.wait(timeout=60)
    assert vmwatch.read_records(h2.paths) == []
    # the lease went with the process: host 1 takes the volume at once
    assert h1.cli("run", "--volume", vol, "--", "true", timeout=60).returncode == 0


def test_thin_writers_on_three_hosts_at_once(tmp_path: Path) -> None:
    """Three hosts, a qemu on each writing 640 MiB into its own thin volume at once (one
    volume per shard: the loop bed maps an LV of one segment only, and a shard's LVs
    grown in turns would interleave): every LV grows, no write fails, each disk reads
    back its own data."""
    c = make_cluster(tmp_path / "bed", hosts=3, luns=3, size=8 * GiB)
    started: list[Qemu] = []
    try:
        vols = [h.cli_json("volume", "create", "--size", "4G", "--format", "qcow2",
                           "--alloc", "thin")["uuid"] for h in c.hosts]
        assert len({lv_vg(c, v) for v in vols}) == 3  # a shard each
        first = {v: lv_size(c, v) for v in vols}
        for host, vol in zip(c.hosts, vols, strict=True):
            vm = Vm(host, vol, tmp_path)
            started.append(vm)
        for vm, vol in zip(started, vols, strict=True):
            wait_for(lambda vm=vm, vol=vol: vm.threshold() == first[vol] - 512 * MiB,
                     30, "threshold armed")

        def write(index: int) -> None:
            vm = started[index]
            for i, offset in enumerate(range(0, TOTAL3, PIECE)):
                vm.write(offset, PIECE, 0x20 * (index + 1) + i % 16)
                time.sleep(0.05)

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(write, range(3)))
        for index, (vm, vol) in enumerate(zip(started, vols, strict=True)):
            assert lv_size(c, vol) > first[vol] >= TOTAL3, vol
            for i, offset in enumerate(range(0, TOTAL3, PIECE)):
                vm.read_ok(offset, PIECE, 0x20 * (index + 1) + i % 16)
            out = vm.output()
            assert "failed" not in out and out.count("wrote ") == TOTAL3 // PIECE, out[-800:]
    finally:
        for vm in started:
            vm.stop()
        destroy_cluster(c)


def lv_vg(cluster: Cluster, vol: str) -> str:
    lvm = cluster.raw_lvm()
    return next(lv.vg_name for vg in lvm.vgs() for lv in lvm.lvs(vg.name) if lv.name == vol)


def test_live_snapshot_switches_a_writing_vm_to_a_new_leaf(
        cluster: Cluster, vms: list[Qemu], tmp_path: Path) -> None:
    """`vm snapshot` of a running qemu: the manager makes the new leaf (the VM holds
    the old one's lease), qemu switches to it without stopping, and from then on every
    write lands in the new leaf: the old leaf, read alone once the VM is gone, holds
    exactly what was written before the snapshot; the chain reads both; the new leaf
    grows under the VM as the old one did, and both are deactivated when qemu ends."""
    h2, h3 = cluster.hosts[1], cluster.hosts[2]
    vol = h2.cli_json("volume", "create", "--size", "4G", "--format", "qcow2",
                      "--alloc", "thin")["uuid"]
    vm = Vm(h2, vol, tmp_path)
    vms.append(vm)
    vm.write(0, PIECE, 0x51)
    wait_for(lambda: vm.threshold(), 30, "threshold armed")
    new = h2.cli_json("vm", "snapshot", str(vm.pid), "--tag", "why=test")
    assert new["parent"] == vol and new["role"] == "leaf" and new["tags"] == {"why": "test"}
    chain = h2.cli_json("image", "info", new["image"])
    assert [v["uuid"] for v in chain["chain"]] == [vol, new["uuid"]]
    assert chain["chain"][0]["role"] == "internal"
    assert vm.status() == "running"
    leases.use_run_dir(h2.paths.sanlock_run_dir)
    held = {h.resource: h.shared for h in leases.inquire(pid=vm.pid)}
    assert held == {vol: True, new["uuid"]: False}  # the old leaf is only read now
    vm.write(0, MiB, 0x53)  # over the snapshot's data: lands in the new leaf
    vm.write(PIECE, PIECE, 0x52)
    first = lv_size(cluster, new["uuid"])
    # the watch follows the new leaf: written toward its end, it grows
    for i in range(2, (first - 64 * MiB) // PIECE):
        vm.write(i * PIECE, PIECE, 0x60 + i % 16)
    wait_for(lambda: lv_size(cluster, new["uuid"]) > first, 60, "new leaf grown")
    assert lv_size(cluster, vol) < first + GiB  # the old leaf was not grown
    vm.read_ok(0, MiB, 0x53)
    vm.read_ok(MiB, PIECE - MiB, 0x51)
    vm.read_ok(PIECE, PIECE, 0x52)
    # the VM, now on a chain, migrates to host 3, started on the image (its old leaf
    # shared, as the source now holds it)
    uri = f"unix:{tmp_path}/mig.sock"
    dest = Qemu(h3, new["image"], tmp_path, "dest", incoming=uri, image=True)
    vms.append(dest)
    h2.cli("vm", "migrate", str(vm.pid), "--to-root", str(h3.root), "--to-pid",
           str(dest.pid), "--uri", uri)
    vm.proc.wait(timeout=60)
    vms.remove(vm)
    dest.read_ok(0, MiB, 0x53)
    dest.read_ok(MiB, PIECE - MiB, 0x51)
    dest.read_ok(PIECE, PIECE, 0x52)
    # a second snapshot on host 3: the VM's third volume
    third = h3.cli_json("vm", "snapshot", str(dest.pid))
    assert third["parent"] == new["uuid"]
    dest.write(2 * MiB, MiB, 0x54)
    dest.stop()
    vms.remove(dest)
    # nothing left mapped on host 2 or 3; host 3 reads the old leaf alone, the chain
    for h in (h2, h3):
        assert not vmwatch.read_records(h.paths)
        for uuid in (vol, new["uuid"], third["uuid"]):
            shard = h.domain().volume_shard(uuid)
            assert shard.activator.path(shard.vg_name, uuid) is None, (h.index, uuid)
    old = h3.cli("run", "--volume", f"{vol}:ro", "--", "qemu-io", "-r", "-f", "qcow2",
                 "-c", f"read -P 0x51 0 {PIECE}", "-c", f"read -P 0 {PIECE} {PIECE}", "{0}")
    assert "Pattern verification failed" not in old.stdout, old.stdout
    both = h3.cli("run", "--image", f"{new['image']}:ro", "--", "qemu-io", "-r", "-f",
                  "qcow2", "-c", f"read -P 0x53 0 {MiB}", "-c", f"read -P 0x54 {2 * MiB} {MiB}",
                  "-c",
                  f"read -P 0x51 {3 * MiB} {PIECE - 3 * MiB}", "-c",
                  f"read -P 0x52 {PIECE} {PIECE}", "{0}")
    assert "Pattern verification failed" not in both.stdout, both.stdout


def test_live_merge_under_writes_leaves_the_chain_one_volume_with_every_byte(
        cluster: Cluster, vms: list[Qemu], tmp_path: Path) -> None:
    """`vm merge` of a running qemu's chain (base <- s1 <- s2, two live snapshots with
    writes between): s1, under the leaf, is committed into the base and qemu names the
    base in s2's header; then s2, the leaf, is committed while another thread writes
    through the VM, and qemu pivots onto the base. After each the chain on the LUN is
    one volume shorter, the merged LV is gone, the VM holds the leases of what it still
    reads (the base exclusive once it is the leaf again) and every byte reads back:
    through qemu, then from the base alone on another host once the VM is gone.
    (1 GiB: a thin LV of that capacity is made fully allocated, so the base needs no
    growth, which the loop bed could not map once other LVs follow it in the VG: the
    growth's steps are unit-tested, test_vmmerge_unit.py.)"""
    h2, h3 = cluster.hosts[1], cluster.hosts[2]
    base = h2.cli_json("volume", "create", "--size", "1G", "--format", "qcow2",
                       "--alloc", "thin")["uuid"]
    vm = Vm(h2, base, tmp_path)
    vms.append(vm)
    vm.write(0, PIECE, 0x71)
    s1 = h2.cli_json("vm", "snapshot", str(vm.pid))["uuid"]
    vm.write(PIECE, PIECE, 0x72)
    vm.write(0, MiB, 0x73)
    s2 = h2.cli_json("vm", "snapshot", str(vm.pid))["uuid"]
    vm.write(2 * PIECE, PIECE, 0x74)
    image = h2.cli_json("volume", "info", base)["image"]
    leases.use_run_dir(h2.paths.sanlock_run_dir)

    def chain() -> list[str]:
        return [v["uuid"] for v in h2.cli_json("image", "info", image)["chain"]]

    def held() -> dict[str, bool]:
        return {h.resource: h.shared for h in leases.inquire(pid=vm.pid)}

    def on_lun() -> set[str]:
        lvm = cluster.raw_lvm()
        return {lv.name for vg in lvm.vgs() for lv in lvm.lvs(vg.name)} & {base, s1, s2}

    assert chain() == [base, s1, s2] and held() == {base: True, s1: True, s2: False}
    # s1, under the leaf: into the base; s2 over the base from now on
    merged = h2.cli_json("vm", "merge", str(vm.pid), "--volume", s1)
    assert merged["uuid"] == base and merged["role"] == "internal"
    assert chain() == [base, s2] and on_lun() == {base, s2}
    assert held() == {base: True, s2: False}  # the base only read again
    assert vm.status() == "running"
    vm.write(3 * PIECE, MiB, 0x75)
    # s2, the leaf, while the VM writes on: qemu pivots onto the base
    with ThreadPoolExecutor(1) as pool:
        writes = pool.submit(lambda: [vm.write(4 * PIECE + i * 8 * MiB, 8 * MiB, 0x76)
                                      for i in range(8)])
        merged = h2.cli_json("vm", "merge", str(vm.pid), "--volume", s2)
        writes.result()
    assert merged["uuid"] == base and merged["role"] == "leaf" and merged["state"] == "ready"
    print("\n", *[ln for ln in (h2.root / "daemon.log").read_text().splitlines()
                  if "for the pivot and the mark" in ln][-1:])
    assert chain() == [base] and on_lun() == {base}
    assert held() == {base: False}
    assert vm.status() == "running"
    record = vmwatch.read_records(h2.paths)[0]
    assert [u for u, _ in record.volumes] == [base] and not record.merge_pause
    vm.write(5 * PIECE, PIECE, 0x77)  # into the base, the leaf again
    expected = [(0, MiB, 0x73), (MiB, PIECE - MiB, 0x71), (PIECE, PIECE, 0x72),
                (2 * PIECE, PIECE, 0x74), (3 * PIECE, MiB, 0x75),
                (4 * PIECE, PIECE, 0x76), (5 * PIECE, PIECE, 0x77)]
    for offset, length, pattern in expected:
        vm.read_ok(offset, length, pattern)
    vm.stop()
    vms.remove(vm)
    reads = [arg for offset, length, pattern in expected
             for arg in ("-c", f"read -P {pattern:#x} {offset} {length}")]
    alone = h3.cli("run", "--volume", f"{base}:ro", "--", "qemu-io", "-r", "-f", "qcow2",
                   *reads, "{0}")
    assert "Pattern verification failed" not in alone.stdout, alone.stdout
    assert alone.stdout.count("read ") == len(expected), alone.stdout
