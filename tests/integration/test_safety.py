"""Safety under attack (issue 9): each test attacks one hole a review found and
asserts on what is on the disk. Each failed against the code before its fix."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from bed import Cluster, Host, destroy_cluster, make_cluster, stop_consumer

from sharedlvm import Client, errors, journal, mailbox, ondisk

pytestmark = pytest.mark.integration


def _journal(cluster: Cluster) -> ondisk.BlockFile:
    """The journal opened directly, as a manager that crashed mid-request left it."""
    return ondisk.BlockFile(cluster.first.domain().special_path("journal"), writable=True)


def _holder(cluster: Cluster, host_index: int, vol: str) -> subprocess.Popen[str]:
    """A consumer on host ``host_index`` holding ``vol``'s lease (sleeping)."""
    host = cluster.hosts[host_index - 1]
    proc = host.popen("run", "--volume", vol, "--", "sleep", "600")
    deadline = time.monotonic() + 30
    while True:
        holders = next(h["holds"] for h in cluster.first.cli_json("host", "list")
                       if h["host_id"] == host_index)
        if any(vol in entry for entry in holders):
            return proc
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the consumer did not get the lease"
        time.sleep(0.2)


@pytest.fixture
def consumers() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        stop_consumer(proc)


def _volumes(cluster: Cluster) -> list[str]:
    return sorted(lv.name for lv in cluster.raw_lvm().lvs(cluster.name) if len(lv.name) == 36)


def test_a_rolled_forward_delete_still_refuses_a_volume_in_use(
        cluster: Cluster, consumers: list[subprocess.Popen[str]]) -> None:
    """A delete left pending by a manager that died is repeated while host 2 uses
    the volume: it must be refused, not roll forward past the lease check."""
    vol = cluster.first.cli_json("volume", "create", "--size", "128M")["uuid"]
    consumers.append(_holder(cluster, 2, vol))
    with _journal(cluster) as dev:
        journal.RequestLog(dev).put(journal.RequestRecord(
            "del-crashed", "delete", "pending", args={"volume": vol, "wipe": False}))
    before = cluster.disk_state()
    proc = cluster.first.cli("volume", "delete", vol, "--request-id", "del-crashed",
                             check=False)
    assert proc.returncode == 1 and f"volume {vol} is in use by host 2" in proc.stderr
    assert cluster.disk_state() == before and vol in _volumes(cluster)
    # the refusal is transient: once the consumer is gone, the same request finishes
    stop_consumer(consumers[0])
    deadline = time.monotonic() + 30
    while (proc := cluster.first.cli("volume", "delete", vol, "--request-id",
                                     "del-crashed", check=False)).returncode != 0:
        assert time.monotonic() < deadline, proc.stderr
        time.sleep(0.5)
    assert vol not in _volumes(cluster)


def test_delete_holds_the_lease_across_the_removal(tmp_path: Path) -> None:
    """While the manager removes a volume no consumer can take its lease: a `run` on
    another host started in the middle of the delete is refused, and never writes
    into extents that are being freed."""
    c = make_cluster(tmp_path / "bed", hosts=2,
                     daemon_env={"SHAREDLVM_PAUSEPOINT": "delete-holding-lease:4"})
    try:
        h1, h2 = c.hosts
        vol = h1.cli_json("volume", "create", "--size", "128M")["uuid"]
        deleting = h1.popen("volume", "delete", vol)
        time.sleep(2)  # the manager is inside the delete now
        marker = tmp_path / "wrote"
        proc = h2.cli("run", "--volume", vol, "--", "touch", str(marker), check=False)
        assert proc.returncode == 1, proc.stderr
        assert "is held by host 1" in proc.stderr
        assert not marker.exists()
        _, err = deleting.communicate(timeout=60)
        assert deleting.returncode == 0, err
        assert vol not in _volumes(c)
    finally:
        destroy_cluster(c)


def test_qcow2_extend_refused_while_in_use(cluster: Cluster,
                                           consumers: list[subprocess.Popen[str]]) -> None:
    """Growing a qcow2 volume rewrites its header: never while another host runs it."""
    vol = cluster.first.cli_json("volume", "create", "--size", "1G", "--format", "qcow2")
    consumers.append(_holder(cluster, 2, vol["uuid"]))
    before = cluster.disk_state()
    proc = cluster.hosts[2].cli("volume", "extend", vol["uuid"], "--size", "+1G", check=False)
    assert proc.returncode == 1 and "is in use by host 2" in proc.stderr
    assert cluster.disk_state() == before
    stop_consumer(consumers[0])
    deadline = time.monotonic() + 30
    while (proc := cluster.first.cli("volume", "extend", vol["uuid"], "--size", "+1G",
                                     "--json", check=False)).returncode != 0:
        assert time.monotonic() < deadline, proc.stderr
        time.sleep(0.5)
    assert '"capacity": 2147483648' in proc.stdout


def test_a_request_id_is_never_reused_for_other_arguments(cluster: Cluster) -> None:
    """Reusing an id for another request must not hand out the first request's
    volume (two VMs, one disk): it is refused and nothing changes."""
    first = cluster.hosts[1].cli_json("volume", "create", "--size", "128M",
                                      "--request-id", "vm-7-disk-0")
    assert cluster.hosts[2].cli_json("volume", "create", "--size", "128M",
                                     "--request-id", "vm-7-disk-0") == first
    before = cluster.disk_state()
    for host in cluster.hosts:
        proc = host.cli("volume", "create", "--size", "256M", "--request-id", "vm-7-disk-0",
                        check=False)
        assert proc.returncode == 1
        assert "request id vm-7-disk-0 was already used for another request" in proc.stderr
    with pytest.raises(errors.InvalidArgument):
        Client(cluster.first.root).create_volume(128 * 1024**2, tags={"vm": "8"},
                                                 request_id="vm-7-disk-0")
    assert cluster.disk_state() == before


def test_oversized_tags_are_refused_before_any_change(cluster: Cluster) -> None:
    """Tags that fit LVM but not the request's journal record used to fail after the
    lvcreate: a volume the client was told failed."""
    tags: list[str] = []
    for i in range(20):
        tags += ["--tag", f"key{i}={'v' * 110}"]
    before = cluster.disk_state()
    for host in cluster.hosts:
        proc = host.cli("volume", "create", "--size", "128M", "--request-id", "big-tags",
                        *tags, check=False)
        assert proc.returncode == 1 and "tags are too large" in proc.stderr
    assert cluster.disk_state() == before
    # just under the limit: accepted, and its record fits (the repeat answers it)
    ok = [a for pair in [["--tag", f"k{i}={'v' * 100}"] for i in range(18)] for a in pair]
    vol = cluster.hosts[1].cli_json("volume", "create", "--size", "128M", "--request-id",
                                    "many-tags", *ok)
    assert cluster.hosts[2].cli_json("volume", "create", "--size", "128M", "--request-id",
                                     "many-tags", *ok) == vol


def test_a_new_manager_recovers_pending_requests(cluster: Cluster) -> None:
    """Requests a dead manager left pending are finished by the next manager at
    takeover, not only when (if ever) a client repeats them."""
    h1 = cluster.first
    done_vol = h1.cli_json("volume", "create", "--size", "128M")
    never = str(uuid.uuid4())
    with _journal(cluster) as dev:
        log = journal.RequestLog(dev)
        log.put(journal.RequestRecord("was-created", "create", "pending", args={
            "volume": done_vol["uuid"], "image": done_vol["image"], "size": 128 * 1024**2,
            "format": "raw", "alloc": "preallocated", "tags": {}}))
        log.put(journal.RequestRecord("never-created", "create", "pending", args={
            "volume": never, "image": str(uuid.uuid4()), "size": 128 * 1024**2,
            "format": "raw", "alloc": "preallocated", "tags": {}}))
        log.put(journal.RequestRecord("to-delete", "delete", "pending",
                                      args={"volume": done_vol["uuid"], "wipe": False}))
    before = _volumes(cluster)
    h1.cli("manager", "release")
    deadline = time.monotonic() + 30
    while True:
        with _journal(cluster) as dev:
            log = journal.RequestLog(dev)
            states = [log.find(r).state for r in  # type: ignore[union-attr]
                      ("was-created", "never-created", "to-delete")]
        if "pending" not in states:
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.5)
    assert states == ["done", "aborted", "done"]
    assert done_vol["uuid"] in before and _volumes(cluster) == []
    assert never not in _volumes(cluster)


def test_a_malformed_mailbox_request_gets_an_error_reply_and_stalls_no_one(
        cluster: Cluster) -> None:
    """A request that decodes (checksum right) but is not a valid request is
    answered with an error, once; other hosts are served meanwhile."""
    h3 = cluster.hosts[2]
    path = h3.domain().special_path("mailbox")
    with ondisk.BlockFile(path) as dev:
        seq = ondisk.decode(dev.read(mailbox.outbox_offset(3), ondisk.BLOCK_SIZE),
                            mailbox.OUT_MAGIC)
    next_seq = (seq.seq if seq else 0) + 1000
    before = cluster.disk_state()
    for fields in ({"size": "ten"}, {"size": 1, "tags": ["vm=web"]}, {"nonsense": [1, 2]}):
        with ondisk.BlockFile(path, writable=True) as dev:
            dev.write(mailbox.outbox_offset(3), ondisk.encode(mailbox.OUT_MAGIC, next_seq, {
                "v": mailbox.MAILBOX_VERSION, "op": "volume.create", "fields": fields,
                "request_id": f"bad-{next_seq}", "host_id": 3, "time": time.time()}))
        deadline = time.monotonic() + 10
        while True:
            with ondisk.BlockFile(path) as dev:
                reply = ondisk.decode(dev.read(mailbox.inbox_offset(3), ondisk.BLOCK_SIZE),
                                      mailbox.IN_MAGIC)
            if reply and reply.seq == next_seq:
                break
            assert time.monotonic() < deadline, "no reply to a malformed request"
            time.sleep(0.1)
        assert reply.payload["ok"] is False
        assert reply.payload["error"]["kind"] == "InvalidArgument"
        next_seq += 1
    assert cluster.disk_state() == before
    # host 2 is served as usual; host 3's own next request too
    assert cluster.hosts[1].cli_json("volume", "create", "--size", "128M")["uuid"]
    assert h3.cli_json("volume", "create", "--size", "128M")["uuid"]


def _wait_manager(hosts: list[Host], timeout: float) -> Host:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for host in hosts:
            try:
                if host.status().get("manager"):
                    return host
            except errors.Error:
                pass
        time.sleep(0.1)
    raise AssertionError(f"no manager among {[h.host_id for h in hosts]} in {timeout} s")


def test_a_hung_manager_loses_the_role_within_the_bound(tmp_path: Path) -> None:
    """SIGSTOP of the manager daemon alone (its sanlock keeps renewing, so the lease
    would stay forever): its watcher kills it after hang_timeout, sanlock frees the
    lease, another host is manager, and the stopped daemon never writes again."""
    c = make_cluster(tmp_path / "bed", hosts=3)
    try:
        for host in c.hosts:
            (host.paths.config_dir / "daemon.toml").write_text("[daemon]\nhang_timeout = 4\n")
            host.daemon.stop()
            host.daemon.start()
        h1 = _wait_manager(c.hosts, 60)
        others = [h for h in c.hosts if h is not h1]
        for host in others:
            deadline = time.monotonic() + 60
            while not host.status().get("joined"):
                assert time.monotonic() < deadline
                time.sleep(0.2)
        pid = h1.daemon.pid
        assert pid is not None
        start = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            new = _wait_manager(others, 30)
            took = time.monotonic() - start
            print(f"hung manager replaced by host {new.host_id} after {took:.1f} s")
            assert took < 4 + 10
            before = c.disk_state()
            vol = new.cli_json("volume", "create", "--size", "128M")
            assert vol["generation"] > 1
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        time.sleep(2)
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
        assert "made no progress for 4 s" in (h1.root / "daemon.log").read_text()
        after = c.disk_state()
        assert [lv for lv in after["lvs"] if lv not in before["lvs"]] == \
            [lv for lv in after["lvs"] if lv[1] == vol["uuid"]]  # only the new manager's
        h1.daemon.start()  # back as a plain host
        assert _wait_manager(c.hosts, 30) is new
    finally:
        destroy_cluster(c)


def test_a_second_metadata_writer_stops_the_manager(cluster: Cluster) -> None:
    """Something else commits to the VG between two commits of the manager (a stray
    lvm, a second manager): the manager sees the VG seqno jump, stops writing and says
    so; the role is taken again at a new generation."""
    from sharedlvm.command import Runner
    from sharedlvm.domain import make_lvm

    h1 = cluster.first
    gen = h1.cli_json("manager", "status")["generation"]
    rogue = make_lvm(cluster.hosts[2].paths, Runner(), cluster.luns, writable=True)
    seqno = cluster.raw_lvm().vg(cluster.name).seqno
    rogue.lvcreate(cluster.name, "rogue", 128 * 1024**2, ["not.sharedlvm"])
    try:
        proc = h1.cli("volume", "create", "--size", "128M", check=False)
        assert proc.returncode == 1 and "another host or process wrote it" in proc.stderr
        assert "another host or process wrote it" in (h1.root / "daemon.log").read_text()
        # stopped before writing: the rogue's commit is the only change
        assert cluster.raw_lvm().vg(cluster.name).seqno == seqno + 1
        assert _volumes(cluster) == []
        deadline = time.monotonic() + 30
        while h1.cli_json("manager", "status")["generation"] == gen:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        rogue.lvremove(cluster.name, ["rogue"])
    # the rogue's removal is a foreign commit too: at most one more refusal, then the
    # role is taken again with a fresh view and work goes on
    deadline = time.monotonic() + 30
    while (proc := h1.cli("volume", "create", "--size", "128M", check=False)).returncode:
        assert "another host or process wrote it" in proc.stderr
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_a_thin_qcow2_lv_grows_while_in_use(cluster: Cluster,
                                            consumers: list[subprocess.Popen[str]]) -> None:
    """Growing only the LV of a thin qcow2 volume needs no lease (its qcow2 is not
    touched): allowed while a host uses it, unlike a capacity change."""
    vol = cluster.first.cli_json("volume", "create", "--size", "4G", "--format", "qcow2")
    consumers.append(_holder(cluster, 2, vol["uuid"]))
    grown = cluster.hosts[2].cli_json("volume", "extend", vol["uuid"], "--allocation", "+1G")
    assert grown["size"] == vol["size"] + 1024**3 and grown["capacity"] == 4 * 1024**3
    assert cluster.raw_lvm().lv(cluster.name, vol["uuid"]).size == grown["size"]
    before = cluster.disk_state()
    for args, message in ((["--allocation", "+10G"], "can grow to"),
                          (["--size", "+1G", "--allocation", "+1G"], "give one of")):
        proc = cluster.first.cli("volume", "extend", vol["uuid"], *args, check=False)
        assert proc.returncode == 1 and message in proc.stderr
    raw = cluster.first.cli_json("volume", "create", "--size", "128M")["uuid"]
    proc = cluster.first.cli("volume", "extend", raw, "--allocation", "+1G", check=False)
    assert proc.returncode == 1 and "only a thin qcow2 volume" in proc.stderr
    assert [s for s in cluster.disk_state()["lvs"] if s[1] != raw] == before["lvs"]


def test_a_volume_held_by_another_process_of_the_same_host_is_refused_clearly(
        cluster: Cluster, consumers: list[subprocess.Popen[str]]) -> None:
    """A second consumer on the host that already runs one gets VolumeHeld naming the
    host (sanlock answers EEXIST there, not a conflict), and nothing changes."""
    vol = cluster.first.cli_json("volume", "create", "--size", "128M")["uuid"]
    consumers.append(_holder(cluster, 2, vol))
    before = cluster.disk_state()
    proc = cluster.hosts[1].cli("run", "--volume", vol, "--", "true", check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"sharedlvm: volume {vol} is held by host 2 (exclusive)\n"
    assert cluster.disk_state() == before


def test_a_second_daemon_on_a_host_refuses_to_start(cluster: Cluster) -> None:
    """Found by the fault harness: a daemon restart retried under load left two
    daemons on one host, the first holding the manager lease and the second the
    socket. A second daemon now exits at once, and the first serves on."""
    host = cluster.hosts[1]
    pid = host.daemon.pid
    proc = host.cli("daemon", check=False, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("sharedlvm: a sharedlvm daemon already runs on this host")
    assert proc.stderr.count("\n") == 1
    assert host.daemon.pid == pid and host.status()  # the first one still answers
    assert host.cli_json("volume", "list") == []
