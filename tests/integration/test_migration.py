"""Live migration between two simulated hosts: qemu's own migration over a unix
socket, the volume's lease handed over by sharedlvm (vmmigrate.py).

qemu runs with no guest (``-M none``) and the test writes through HMP ``qemu-io``.
qemu-io must never write on a source whose migration has completed (qemu asserts on a
write through an inactive image), so the source is given ``pause-before-switchover``:
its migration stops at ``pre-switchover`` with the VM stopped and its images still
active, the test writes its last data there (and past the thin threshold: an extend
happens during the migration), then lets it complete with ``migrate-continue``.
Checks read the disk: the lease's holders and version from sanlock's lease on the
LUN, the LV's size from LVM, the data through the destination's qemu."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bed import Cluster, Host
from qemu_vm import Qemu, lv_size, wait_for

from sharedlvm import leases, vmwatch
from sharedlvm.command import Runner
from sharedlvm.domain import Domain, device_size
from sharedlvm.lease_layout import LeaseLayout
from sharedlvm.units import GiB, MiB
from sharedlvm.volume import get_volume

pytestmark = pytest.mark.integration

PIECE = 64 * MiB
CAPACITY = 16 * GiB  # thin: the LV starts at 1 GiB whatever the capacity


@pytest.fixture
def qemus(cluster: Cluster) -> Iterator[list[Qemu]]:
    started: list[Qemu] = []
    yield started
    for q in started:
        q.stop()


def lease_on_disk(host: Host, vol: str) -> tuple[list[int], int]:
    """(holders, version) of ``vol``'s lease as sanlock wrote them on the LUN."""
    leases.use_run_dir(host.paths.sanlock_run_dir)
    domain = Domain.open(host.paths, Runner(), None)
    info = get_volume(domain, vol)
    layout = LeaseLayout(domain)
    return sorted(layout.holders(info)), layout.lease_version(info)


def migrate(source: Qemu, dest: Qemu, uri: str, env: dict[str, str] | None = None
            ) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sharedlvm", "vm", "migrate", str(source.pid),
         "--to-root", str(dest.host.root), "--to-pid", str(dest.pid), "--uri", uri,
         "--json"], env=env or source.host.env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def pause_before_switchover(q: Qemu) -> None:
    q.qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "pause-before-switchover", "state": True}]})


def test_live_migration_hands_the_lease_over_with_an_extend_during_it(
        cluster: Cluster, qemus: list[Qemu], tmp_path: Path) -> None:
    """A VM on host 2 writing a thin volume moves to host 3. During the migration the
    source's lease stays on the disk and its last writes grow the LV (host 3's device
    is still the old size); after it host 3 alone holds the lease, one version later,
    its device was refreshed before the VM resumed, and every byte reads back there,
    past the old end too; host 3's daemon grows the volume from then on."""
    _, h2, h3 = cluster.hosts
    vol = h2.cli_json("volume", "create", "--size", str(CAPACITY), "--format", "qcow2",
                      "--alloc", "thin")["uuid"]
    first = lv_size(cluster, vol)
    a = Qemu(h2, vol, tmp_path, "a")
    qemus.append(a)
    holders, version = wait_for(lambda: lease_on_disk(h2, vol), 10, "lease")
    assert holders == [2]
    for i in range(4):
        a.write(i * PIECE, PIECE, 0x30 + i)
    uri = f"unix:{tmp_path}/mig.sock"
    b = Qemu(h3, vol, tmp_path, "b", incoming=uri)
    qemus.append(b)
    assert b.status() == "inmigrate"
    assert lease_on_disk(h2, vol) == ([2], version)  # the destination holds nothing
    listed = wait_for(lambda: [(v["pid"], v["state"], v["writes"], v["watched"])
                               for v in h3.cli_json("vm", "list")
                               if v["watched"]], 30, "destination watched")
    assert listed == [(b.pid, "incoming", [vol], True)]
    pause_before_switchover(a)
    proc = migrate(a, b, uri)
    wait_for(lambda: a.migration() == "pre-switchover" or proc.poll() is not None, 60,
             "pre-switchover")
    assert proc.poll() is None, proc.communicate()
    # The source is stopped, its images still active: its last writes, past the
    # threshold; its daemon grows the LV while the migration waits.
    assert lease_on_disk(h2, vol) == ([2], version)
    last = (first - 64 * MiB) // PIECE
    for i in range(4, last):
        a.write(i * PIECE, PIECE, 0x30 + i)
    wait_for(lambda: lv_size(cluster, vol) > first, 60, "grown during the migration")
    grown = lv_size(cluster, vol)
    assert device_size(b.device) == first  # host 3's mapping: still the old size
    a.qmp.execute("migrate-continue", {"state": "pre-switchover"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    done = json.loads(out)
    print(f"\ndowntime {done['downtime_ms']} ms, handoff {done['handoff_ms']:.0f} ms;",
          *[ln for ln in (h3.root / "daemon.log").read_text().splitlines()
            if "taken over in" in ln])
    # On the disk: host 3 holds the lease, acquired at the version host 2 released.
    assert lease_on_disk(h3, vol) == ([3], version + 1)
    assert done["versions"] == {vol: version + 1}
    assert device_size(b.device) == grown  # refreshed before it resumed
    wait_for(lambda: b.status() == "running", 10, "destination running")
    # qemu keeps saying "completed" on the destination for good: the watch must not
    # take it for a migration under way (ENOSPC resume would never happen again)
    assert b.migration() == "completed"
    assert a.proc.wait(timeout=60) == 0  # the source's qemu quit, its run ended
    assert [(v["pid"], v["state"]) for v in h3.cli_json("vm", "list")] == [(b.pid,
                                                                            "running")]
    assert h2.cli_json("vm", "list") == []
    assert [r.pid for r in vmwatch.read_records(h2.paths)] == []
    for i in range(last):  # everything the source wrote, read on the destination
        b.read_ok(i * PIECE, PIECE, 0x30 + i)
    # host 3's watch took over: writing on past its threshold grows the LV again (up
    # to the threshold in guest data: the image's end is past it then). Not "up to the
    # LV's end": the chunk follows the measured write rate x extend latency, so on a
    # loaded machine the source's extend may have taken the LV near its largest size.
    threshold = wait_for(b.threshold, 30, "threshold armed on host 3")
    assert threshold < CAPACITY
    for i in range(last, threshold // PIECE + 1):
        b.write(i * PIECE, PIECE, 0x70 + i % 16)
    wait_for(lambda: lv_size(cluster, vol) > grown, 60, "grown by host 3")
    assert "failed" not in b.out.read_text()


def test_a_failed_migration_leaves_the_vm_running_at_its_source(
        cluster: Cluster, qemus: list[Qemu], tmp_path: Path) -> None:
    """The destination is killed (1) during qemu's migration: qemu fails it and runs
    the VM on at the source, which never gave its lease up; (2) after the source
    completed and released its lease, before the handoff: the destination never took
    it, so the source takes it back at the version it released it at and resumes.
    Either way the migration command fails with one line and the source writes on."""
    _, h2, h3 = cluster.hosts
    vol = h2.cli_json("volume", "create", "--size", "2G", "--format", "qcow2",
                      "--alloc", "thin")["uuid"]
    a = Qemu(h2, vol, tmp_path, "a")
    qemus.append(a)
    a.write(0, PIECE, 0x41)
    _, version = wait_for(lambda: lease_on_disk(h2, vol), 10, "lease")
    uri = f"unix:{tmp_path}/mig1.sock"
    b = Qemu(h3, vol, tmp_path, "b1", incoming=uri)
    qemus.append(b)
    pause_before_switchover(a)
    proc = migrate(a, b, uri)
    wait_for(lambda: a.migration() == "pre-switchover", 60, "pre-switchover")
    os.kill(b.pid, signal.SIGKILL)
    b.proc.wait(timeout=60)
    a.qmp.execute("migrate-continue", {"state": "pre-switchover"})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert "runs on at its source" in err, err
    wait_for(lambda: a.status() == "running", 10, "source running")
    assert lease_on_disk(h2, vol) == ([2], version)  # never released
    a.write(PIECE, PIECE, 0x42)

    # (2) killed in the handoff's window: the source has released its lease
    uri = f"unix:{tmp_path}/mig2.sock"
    b = Qemu(h3, vol, tmp_path, "b2", incoming=uri)
    qemus.append(b)
    pause_before_switchover(a)
    proc = migrate(a, b, uri, env=dict(h2.env, SHAREDLVM_PAUSEPOINT="vm-handoff:4"))
    wait_for(lambda: a.migration() == "pre-switchover", 60, "pre-switchover")
    a.qmp.execute("migrate-continue", {"state": "pre-switchover"})
    wait_for(lambda: lease_on_disk(h2, vol)[0] == [], 30, "source released")
    assert a.status() == "postmigrate"
    os.kill(b.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith("sharedlvm: no VM with pid"), err
    wait_for(lambda: a.status() == "running", 10, "source resumed")
    assert lease_on_disk(h2, vol) == ([2], version + 1)  # taken back, one acquire later
    a.write(2 * PIECE, PIECE, 0x43)
    for i in range(3):
        a.read_ok(i * PIECE, PIECE, 0x41 + i)
    assert a.proc.poll() is None
