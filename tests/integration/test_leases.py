"""Leases on real sanlock daemons: the manager role, its handover and failover, the
fencing of a stale manager, and volume leases bound to their consumer.

Assertions are on what is on the disk: the manager lease and volume leases read from
the leases LV with sanlock's direct read (``sanlock.read_resource``), the domain record
in ``journal``, the VG seqno from LVM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bed import (
    IO_TIMEOUT,
    Cluster,
    Host,
    consumer_pid,
    destroy_cluster,
    make_cluster,
    stop_consumer,
)

from sharedlvm import journal, leases, ondisk
from sharedlvm.lease_layout import LeaseLayout

pytestmark = pytest.mark.integration

HOST_DEAD = leases.host_dead_seconds(IO_TIMEOUT)


def _leader(cluster: Cluster, slot: int, resource: str = "manager") -> dict[str, str]:
    """The lease leader in a leases slot, read from the disk by `sanlock direct`
    (no daemon involved): owner_id, owner_generation, lver (the fencing token)..."""
    d = cluster.first.domain()
    disk = LeaseLayout(d).slot_disk(slot)
    out = subprocess.run(["sanlock", "direct", "read_leader", "-r",
                          f"{d.lockspace}:{resource}:{disk.path}:{disk.offset}"],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def _slot_version(cluster: Cluster, slot: int, resource: str = "manager") -> int:
    return int(_leader(cluster, slot, resource)["lver"])


def _record(cluster: Cluster) -> journal.DomainRecord:
    with ondisk.BlockFile(cluster.first.domain().special_path("journal")) as dev:
        return journal.read_domain_record(dev)


def _wait(predicate, timeout: float, step: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met in {timeout} s")


def _vol(cluster: Cluster) -> str:
    return str(cluster.first.cli_json("volume", "create", "--size", "1G")["uuid"])


def test_one_manager_seen_everywhere(cluster: Cluster) -> None:
    statuses = [h.cli_json("manager", "status") for h in cluster.hosts]
    assert {s["manager"] for s in statuses} == {1}
    assert len({s["generation"] for s in statuses}) == 1
    assert [s["this_host"] for s in statuses] == [True, False, False]
    assert [h.status()["manager"] for h in cluster.hosts] == [True, False, False]
    assert _record(cluster).manager_host_id == 1
    assert _leader(cluster, 0)["owner_id"] == "1"  # on disk: host 1 owns slot 0
    def all_live() -> list[dict[str, object]] | None:
        hosts: list[dict[str, object]] = cluster.hosts[2].cli_json("host", "list")
        return hosts if [h["state"] for h in hosts] == ["live"] * 3 else None

    hosts = _wait(all_live, timeout=30)
    assert [h["host_id"] for h in hosts] == [1, 2, 3]
    assert hosts[0]["holds"] == ["manager"]


def test_clean_handover(cluster: Cluster) -> None:
    gen_before = _record(cluster).manager_generation
    lver_before = _slot_version(cluster, 0)
    start = time.monotonic()
    assert "released" in cluster.hosts[0].cli("manager", "release").stdout
    new = _wait(lambda: next((h for h in cluster.hosts[1:] if h.status()["manager"]), None),
                timeout=10, step=0.05)
    took = time.monotonic() - start
    print(f"clean handover to host {new.host_id} in {took:.2f} s")
    assert took < 5
    record = _record(cluster)
    assert record.manager_generation == gen_before + 1 and record.manager_host_id == new.host_id
    assert _slot_version(cluster, 0) > lver_before  # the fencing token moved on
    vol = new.cli_json("volume", "create", "--size", "1G")
    assert vol["generation"] == gen_before + 1
    # asked on host 1, now done by the new manager through the mailbox
    assert cluster.hosts[0].cli_json("volume", "create", "--size", "1G")["generation"] == \
        gen_before + 1
    proc = cluster.hosts[0].cli("domain", "remove", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"sharedlvm: host 1 is not the manager of domain dom1 "
                                   f"(manager: host {new.host_id})")


def test_exclusive_and_shared_volume_leases(cluster: Cluster) -> None:
    h1, h2, h3 = cluster.hosts
    vol = _vol(cluster)
    with h1.registered() as p1, h2.registered() as p2, h3.registered() as p3:
        path = h2.cli("volume", "prepare", vol, "--pid", str(p2), "--exclusive").stdout.strip()
        assert path.startswith("/dev/")
        slot = h1.cli_json("volume", "info", vol)["lease"]
        lver = _slot_version(cluster, slot, vol)
        # the lease is the consumer's, not the daemon's (sanlock says whose)
        assert vol in [h.resource for h in leases_held_by(h2, p2)]
        for args in (["--exclusive"], ["--shared"]):
            proc = h3.cli("volume", "prepare", vol, "--pid", str(p3), *args, check=False)
            assert proc.returncode == 1
            assert proc.stderr.strip() == \
                f"sharedlvm: volume {vol} is held by host 2 (exclusive)"
        proc = h3.cli("run", "--volume", vol, "--", "true", check=False)
        assert proc.returncode == 1 and "held by host 2 (exclusive)" in proc.stderr
        # The manager refuses to delete a volume in use.
        before = cluster.disk_state()
        proc = h1.cli("volume", "delete", vol, check=False)
        assert proc.returncode == 1 and f"volume {vol} is in use by host 2" in proc.stderr
        assert cluster.disk_state() == before
        h2.cli("volume", "teardown", vol)
        # Shared leases coexist, on read-only devices; an exclusive one is refused.
        shared = h2.cli("volume", "prepare", vol, "--pid", str(p2), "--shared").stdout.strip()
        assert Path(f"/sys/block/{os.path.basename(shared)}/ro").read_text().strip() == "1"
        h3.cli("volume", "prepare", vol, "--pid", str(p3), "--shared")
        proc = h1.cli("volume", "prepare", vol, "--pid", str(p1), "--exclusive", check=False)
        assert proc.returncode == 1
        assert "is held by host 2, host 3 (shared)" in proc.stderr
        listed = {h["host_id"]: h["holds"] for h in h1.cli_json("host", "list")}
        assert listed[2] == [f"{vol} (shared)"] and listed[3] == [f"{vol} (shared)"]
        h2.cli("volume", "teardown", vol)
        h3.cli("volume", "teardown", vol)
        h1.cli("volume", "prepare", vol, "--pid", str(p1), "--exclusive")
        assert _slot_version(cluster, slot, vol) > lver
        h1.cli("volume", "teardown", vol)


def test_delete_gives_the_lease_back_after_the_answer(cluster: Cluster) -> None:
    """A delete answers before it gives the volume's lease back (volume._delete): the
    release still happens, on the manager's daemon and on the disk."""
    h1 = cluster.hosts[0]
    assert cluster.manager() is h1
    vol = _vol(cluster)
    slot = h1.cli_json("volume", "info", vol)["lease"]
    h1.cli("volume", "delete", vol)
    assert h1.daemon.pid is not None
    _wait(lambda: vol not in [h.resource for h in leases_held_by(h1, h1.daemon.pid or 0)],
          timeout=30)
    leader = _leader(cluster, slot, vol)  # acquired by the manager, then released
    assert int(leader["owner_id"]) == 1 and int(leader["timestamp"]) == 0, leader


def leases_held_by(host: Host, pid: int) -> list[leases.Held]:
    """What sanlock on ``host`` says process ``pid`` holds."""
    code = ("import json, sys\n"
            "from sharedlvm import leases\n"
            f"leases.use_run_dir({str(host.paths.sanlock_run_dir)!r})\n"
            f"print(json.dumps([h.resource for h in leases.inquire(pid={pid})]))\n")
    out = subprocess.run([sys.executable, "-c", code], env=host.env, capture_output=True,
                         text=True, check=True).stdout
    return [leases.Held("", name, 0, False) for name in json.loads(out)]


def test_prepared_leases_survive_a_daemon_restart(cluster: Cluster) -> None:
    """A volume prepared for a consumer keeps its lease when the daemon crashes or
    restarts: the lease is the consumer's, and the restarted daemon knows it again."""
    h1, h2 = cluster.hosts[0], cluster.hosts[1]
    vol = _vol(cluster)
    with h2.registered() as pid:
        h2.cli("volume", "prepare", vol, "--pid", str(pid))
        for stop in ("kill", "restart"):
            try:
                if stop == "kill":
                    h2.daemon.kill()
                else:
                    h2.daemon.stop()
                proc = h1.cli("volume", "delete", vol, check=False)
                assert proc.returncode == 1 and "in use by host 2" in proc.stderr
                assert vol in [h.resource for h in leases_held_by(h2, pid)]
            finally:
                if h2.daemon.pid is None:
                    h2.daemon.start()
            _wait(lambda: h2.status().get("joined"), timeout=30)
            assert h2.status()["prepared"] == {vol: False}
        h2.cli("volume", "teardown", vol)
        assert leases_held_by(h2, pid) == []
    h1.cli("volume", "delete", vol)


def test_killed_consumer_frees_its_lease(cluster: Cluster) -> None:
    h2, h3 = cluster.hosts[1], cluster.hosts[2]
    vol = _vol(cluster)
    consumer = h2.popen("run", "--volume", vol, "--", "sleep", "600")
    try:
        pid = consumer_pid(consumer, "sleep")
        with h3.registered() as p3:
            assert h3.cli("volume", "prepare", vol, "--pid", str(p3),
                          check=False).returncode == 1
            os.kill(pid, signal.SIGKILL)  # the consumer itself dies
            assert consumer.wait(timeout=10) == 128 + signal.SIGKILL
            # sanlock releases a dead process's leases at once: another host gets it
            _wait(lambda: h3.cli("volume", "prepare", vol, "--pid", str(p3),
                                 check=False).returncode == 0, timeout=20, step=0.5)
            h3.cli("volume", "teardown", vol)
    finally:
        stop_consumer(consumer)


def test_run_wait_takes_the_lease_when_the_holder_lets_go(cluster: Cluster,
                                                         tmp_path: Path) -> None:
    h2, h3 = cluster.hosts[1], cluster.hosts[2]
    vol = _vol(cluster)
    holder = h2.popen("run", "--volume", vol, "--", "sleep", "600")
    marker = tmp_path / "ran"
    waiter = None
    try:
        _wait(lambda: any(f"{vol} (exclusive)" in h["holds"] for h in
                          h3.cli_json("host", "list") if h["host_id"] == 2), timeout=20)
        # Without --wait: refused at once, naming the holder.
        proc = h3.cli("run", "--volume", vol, "--", "true", check=False)
        assert proc.returncode == 1 and "held by host 2" in proc.stderr
        # With a short --wait: still refused, after about that long.
        started = time.monotonic()
        proc = h3.cli("run", "--wait", "1.5", "--volume", vol, "--", "true", check=False)
        assert proc.returncode == 1 and "held by host 2" in proc.stderr
        assert time.monotonic() - started >= 1.0
        waiter = h3.popen("run", "--wait", "60", "--volume", vol, "--", "touch", str(marker))
        time.sleep(2)
        assert waiter.poll() is None and not marker.exists()  # waiting, not running
        holder.send_signal(signal.SIGTERM)  # passed on to the consumer
        holder.wait(timeout=10)
        assert waiter.wait(timeout=30) == 0 and marker.exists()
    finally:
        for proc in (holder, waiter):
            if proc is not None:
                stop_consumer(proc)


def test_consumer_sees_its_device(cluster: Cluster, tmp_path: Path) -> None:
    vol = _vol(cluster)
    out = tmp_path / "out"
    cluster.hosts[1].cli("run", "--volume", f"{vol}:ro", "--", "sh", "-c",
                         f'echo "$SHAREDLVM_DEVICE {{0}}" > {out}')
    device, formatted = out.read_text().split()
    assert device == formatted and device.startswith("/dev/loop")


def test_leases_lv_grows_past_its_slots(tmp_path: Path) -> None:
    """128 MiB of leases on a 4 KiB LUN holds 16 slots of 8 MiB (slot 0: manager):
    the 16th volume needs a slot the LV does not have, and the LV grows."""
    c = make_cluster(tmp_path / "bed", hosts=2, sector_size=4096,
                     extra=("--leases-size", "128M"))
    try:
        lvm = c.raw_lvm()
        assert lvm.lv(c.name, "leases").size == 128 * 1024**2
        vols = [c.first.cli_json("volume", "create", "--size", "128M") for _ in range(17)]
        slots = [v["lease"] for v in vols]
        assert sorted(slots) == list(range(1, 18))  # every volume its own slot
        assert lvm.lv(c.name, "leases").size == 128 * 1024**2 + 1024**3
        # the lease in the grown part works like any other
        last = vols[-1]["uuid"]
        holder = c.hosts[1].popen("run", "--volume", last, "--", "sleep", "600")
        consumer_pid(holder, "sleep")
        proc = c.first.cli("run", "--volume", last, "--", "true", check=False)
        assert proc.returncode == 1 and "held by host 2 (exclusive)" in proc.stderr
        stop_consumer(holder)
        # a new manager rebuilds the slot map from the LVs: freed slots are reused
        c.first.cli("volume", "delete", vols[3]["uuid"])
        c.first.cli("manager", "release")
        new = c.manager()
        assert new is c.hosts[1]
        assert new.cli_json("volume", "create", "--size", "128M")["lease"] == slots[3]
        assert lvm.lv(c.name, "leases").size == 128 * 1024**2 + 1024**3
    finally:
        destroy_cluster(c)


def test_slot_of_a_lease_still_held_is_never_reused(tmp_path: Path) -> None:
    """A delete gives the volume's lease back after its answer (on the daemon's release
    thread, here 5 s late). Meanwhile the leases LV is full and a create rebuilds the
    slot map from the LVs, where the deleted volume is gone: its slot must not be
    handed out, or the late release writes the old lease's dblock over the new lease
    and sanlock retries the new volume's acquire forever (hostile review of 05dffcf)."""
    c = make_cluster(tmp_path / "bed", hosts=1, sector_size=4096,
                     extra=("--leases-size", "128M"),
                     daemon_env={"SHAREDLVM_PAUSEPOINT": "exclusive-release:5"})
    try:
        h1 = c.first
        vols = [h1.cli_json("volume", "create", "--size", "128M") for _ in range(15)]
        assert sorted(v["lease"] for v in vols) == list(range(1, 16))  # 16 slots: full
        gone = vols[4]
        h1.cli("volume", "delete", gone["uuid"])  # answered; its release sleeps 5 s
        new = h1.cli_json("volume", "create", "--size", "128M")
        assert new["lease"] != gone["lease"], "a slot whose lease is still held was reused"
        _wait(lambda: int(_leader(c, gone["lease"], gone["uuid"])["timestamp"]) == 0,
              timeout=30, step=0.2)  # the late release has run
        # the new volume's lease works: a consumer acquires it (in seconds, not never)
        done = h1.cli("run", "--volume", new["uuid"], "--", "true", timeout=60)
        assert done.returncode == 0
    finally:
        destroy_cluster(c)


@pytest.mark.slow
def test_stale_manager_makes_no_writes(fresh_cluster: Cluster) -> None:
    """Host 1 hangs (its sanlock and daemon SIGSTOPped: the manager lease is not
    released, as after a crash) until its lease expires and another host becomes
    manager, never before sanlock's host-dead time, and writes. When host 1 wakes up
    it must not write. (A crash, SIGKILL, leaves the lease the same way; the VM bed's
    power-loss test cuts a whole guest.)"""
    c = fresh_cluster
    h1 = c.first
    gen = _record(c).manager_generation
    frozen = [p for p in (h1.sanlock.pid, h1.daemon.pid) if p]
    start = time.monotonic()
    h1.freeze()
    try:
        new = _wait(lambda: next((h for h in c.hosts[1:] if h.status()["manager"]), None),
                    timeout=HOST_DEAD + 60, step=0.2)
        took = time.monotonic() - start
        print(f"failover after a hang: {took:.1f} s (sanlock host-dead time {HOST_DEAD} s)")
        # Never before sanlock says the old holder is dead: that is the safety.
        assert took >= HOST_DEAD - 2 * 2 * IO_TIMEOUT
        assert took <= HOST_DEAD * 1.05 + 10
        new.cli("volume", "create", "--size", "1G")
        seqno = c.raw_lvm().vg(c.name).seqno
        record = _record(c)
        assert record.manager_host_id == new.host_id
        assert record.manager_generation == gen + 1
    finally:
        h1.thaw(frozen)
    # Host 1 wakes up believing it is manager; a request reaches its daemon at once.
    # Whatever happens to that request, host 1 itself must not write.
    h1.cli("volume", "create", "--size", "1G", check=False, timeout=200)
    time.sleep(4 * IO_TIMEOUT)
    assert c.raw_lvm().vg(c.name).seqno == seqno  # zero metadata writes
    after = _record(c)
    assert (after.manager_generation, after.manager_host_id) == \
        (record.manager_generation, new.host_id)
    log = (h1.root / "daemon.log").read_text()
    assert "lost the manager role" in log or h1.daemon.pid is None


@pytest.mark.slow
def test_lockspace_loss_kills_consumer_before_lease_moves(fresh_cluster: Cluster) -> None:
    """Host 2's sanlock stops renewing (SIGSTOP) while a consumer holds a volume lease.
    When it runs again its renewal has failed: sanlock kills the consumer, then frees
    its lease. Another host gets the lease only after that (or, had the kill failed,
    after the host-dead time): never while the consumer may still write."""
    c = fresh_cluster
    h2, h3 = c.hosts[1], c.hosts[2]
    vol = _vol(c)
    # A consumer with a child of its own (a shell running a writer): both must die.
    child_file = Path(c.bed.dir) / "child.pid"
    consumer = h2.popen("run", "--volume", vol, "--", "sh", "-c",
                        f"sleep 600 & echo $! > {child_file}; wait")
    registered = h3.popen("run", "--", "sleep", "600")
    p3 = consumer_pid(registered, "sleep")

    def prepare() -> int:
        return h3.cli("volume", "prepare", vol, "--pid", str(p3), check=False).returncode

    try:
        _wait(lambda: prepare() == 1 and child_file.exists() and
              any(f"{vol} (exclusive)" in h["holds"] for h in h3.cli_json("host", "list")),
              timeout=20)
        child = int(child_file.read_text())
        sanlock_pid = h2.sanlock.pid
        assert sanlock_pid
        start = time.monotonic()
        os.kill(sanlock_pid, signal.SIGSTOP)
        time.sleep(8 * IO_TIMEOUT + 4)  # past renewal failure, well before host-dead
        os.kill(sanlock_pid, signal.SIGCONT)
        consumer.wait(timeout=60)
        killed = time.monotonic() - start
        # the consumer's own child went with it (killpath: the process group)
        assert not Path(f"/proc/{child}").exists(), "the consumer's child outlived it"
        acquired = None
        while time.monotonic() - start < HOST_DEAD + 60:
            if prepare() == 0:
                acquired = time.monotonic() - start
                break
            time.sleep(0.5)
        print(f"consumer killed at {killed:.1f} s, lease taken by host 3 at {acquired} s")
        assert acquired is not None, "host 3 never got the lease"
        assert killed < acquired
        assert consumer.returncode in (128 + signal.SIGTERM, 128 + signal.SIGKILL)
        h3.cli("volume", "teardown", vol)
    finally:
        stop_consumer(consumer)
        stop_consumer(registered)
        if child_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(child_file.read_text()), signal.SIGKILL)


def test_run_bad_input(cluster: Cluster) -> None:
    before = cluster.disk_state()
    for args, message in ((["--volume", "nope", "--", "true"], "invalid volume id"),
                          (["--volume", "00000000-0000-0000-0000-000000000000:rx", "--",
                            "true"], "use UUID or UUID:ro"),
                          (["--volume", "00000000-0000-0000-0000-000000000000", "--",
                            "true"], "not found"),
                          (["--wait", "-1", "--volume", "00000000-0000-0000-0000-000000000000",
                            "--", "true"], "invalid wait -1"),
                          (["--", "echo", "{0}"], "this run has 0 device(s)")):
        proc = cluster.hosts[1].cli("run", *args, check=False)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert cluster.disk_state() == before
    # Only {N} is a device: other braces reach the command as given (they crashed the
    # consumer with a Python traceback before).
    out = cluster.hosts[1].cli("run", "--", "echo", "${x}", "{a}", "{}").stdout
    assert out.strip() == "${x} {a} {}"


def test_cli_without_daemon(empty_bed: Cluster) -> None:
    out = empty_bed.hosts[0].cli("manager", "status", check=False)
    assert out.returncode == 1
    assert out.stderr.strip().startswith("sharedlvm: the sharedlvm daemon is not running")
