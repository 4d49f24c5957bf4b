"""Any host can ask: requests through the storage mailbox to whichever host is manager,
exactly once, with no network between hosts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from bed import Cluster, destroy_cluster, make_cluster

from sharedlvm import mailbox, ondisk

pytestmark = pytest.mark.integration


def test_any_host_can_ask(cluster: Cluster) -> None:
    h1, h2, h3 = cluster.hosts
    gen = h1.cli_json("manager", "status")["generation"]
    vol = h3.cli_json("volume", "create", "--size", "1G", "--tag", "asked=host3")
    assert vol["generation"] == gen  # committed by the manager, in its term
    assert vol["tags"] == {"asked": "host3"}
    lv = cluster.raw_lvm().lv(cluster.name, vol["uuid"])
    assert f"sl.gen={gen}" in lv.tags and f"sl.lease={vol['lease']}" in lv.tags
    assert h2.cli_json("volume", "extend", vol["uuid"], "--size", "+1G")["capacity"] == 2 * 1024**3
    assert h3.cli_json("volume", "delete", vol["uuid"]) == {"uuid": vol["uuid"], "deleted": True}
    assert cluster.raw_lvm().lvs(cluster.name, select=f"lv_name={vol['uuid']}") == []
    # errors come back as the manager said them, one line
    proc = h2.cli("volume", "delete", vol["uuid"], check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"sharedlvm: volume {vol['uuid']} not found in domain dom1\n"
    before = cluster.disk_state()
    proc = h3.cli("volume", "create", "--size", "100T", check=False)
    assert proc.returncode == 1 and "not enough free space in domain dom1" in proc.stderr
    # destroying the domain is not something another host may ask for
    proc = h2.cli("domain", "remove", check=False)
    assert proc.returncode == 1 and "host 2 is not the manager" in proc.stderr
    assert cluster.disk_state() == before


def test_requests_from_all_hosts_at_once(cluster: Cluster) -> None:
    procs = [(h, h.popen("volume", "create", "--size", "128M", "--json", "--request-id",
                         f"burst-{h.host_id}-{i}"))
             for i in range(4) for h in cluster.hosts]
    acked = []
    for _host, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        acked.append(out)
    import json

    uuids = [json.loads(out)["uuid"] for out in acked]
    on_disk = [lv.name for lv in cluster.raw_lvm().lvs(cluster.name) if len(lv.name) == 36]
    assert sorted(uuids) == sorted(on_disk)  # every acknowledged create exactly once
    assert len(set(uuids)) == 12
    slots = [v["lease"] for v in cluster.hosts[0].cli_json("volume", "list")]
    assert len(set(slots)) == 12  # each its own lease slot
    cluster.raw_lvm().vgck(cluster.name)


def test_corrupt_outbox_record_is_ignored(cluster: Cluster) -> None:
    h2 = cluster.hosts[1]
    before = cluster.disk_state()
    d = h2.domain()
    path = d.special_path("mailbox")
    block = bytearray(ondisk.encode(mailbox.OUT_MAGIC, 10**6, {
        "op": "volume.create", "args": {"size": 1024**3, "request_id": "torn"}}))
    block[70] ^= 0xFF  # torn inside the payload: the checksum no longer matches
    with ondisk.BlockFile(path, writable=True) as dev:
        dev.write(mailbox.outbox_offset(2), bytes(block))
    time.sleep(2)  # several manager polls
    assert cluster.disk_state() == before
    log = (cluster.hosts[0].root / "daemon.log").read_text()
    assert "ignoring the outbox of host 2: record checksum mismatch" in log
    # the host's next request (its own sequence continues past the torn one) works
    with ondisk.BlockFile(path, writable=True) as dev:
        dev.write(mailbox.outbox_offset(2), b"\0" * ondisk.BLOCK_SIZE)


def test_manager_killed_between_execution_and_reply(tmp_path: Path) -> None:
    """The manager executes a request from host 3, then dies before replying. The next
    manager finds the request still unanswered, sees in the journal that it was done,
    and answers with the first result: one volume, not two."""
    once = tmp_path / "failpoint-fired"
    c = make_cluster(tmp_path / "bed", hosts=3,
                     daemon_env={"SHAREDLVM_FAILPOINT": f"mailbox-before-reply:{once}"})
    try:
        h1, h3 = c.hosts[0], c.hosts[2]
        assert c.manager() is h1
        vol = h3.cli_json("volume", "create", "--size", "1G", "--request-id", "order-7")
        assert once.exists()  # the failpoint fired: host 1's daemon died before replying
        assert h1.daemon.pid is None
        assert "failpoint mailbox-before-reply" in (h1.root / "daemon.log").read_text()
        new = c.manager()
        assert new is not h1
        assert [lv.name for lv in c.raw_lvm().lvs(c.name) if len(lv.name) == 36] == \
            [vol["uuid"]]
        again = h3.cli_json("volume", "create", "--size", "1G", "--request-id", "order-7")
        assert again == vol
        c.raw_lvm().vgck(c.name)
    finally:
        destroy_cluster(c)


def test_four_hosts_ask_while_the_manager_is_killed(tmp_path: Path) -> None:
    """4 hosts issue creates, extends and deletes at once, each retried with its
    request id until answered, as an orchestrator would; the manager's daemon is
    SIGKILLed mid-stream and restarted. In the end every acknowledged operation took
    effect exactly once, nothing is half-done, and vgck passes."""
    import json
    import threading

    from sharedlvm_testbed.simhost import DaemonProcess

    c = make_cluster(tmp_path / "bed", hosts=4)
    try:
        results: dict[str, dict[str, object]] = {}
        problems: list[str] = []

        def ask(host_index: int, *args: str) -> dict[str, object]:
            host = c.hosts[host_index]
            for _ in range(60):
                proc = host.cli(*args, "--json", check=False, timeout=300)
                if proc.returncode == 0:
                    return dict(json.loads(proc.stdout))
                time.sleep(0.5)  # daemon restarting or manager moving: ask again
            problems.append(f"host{host_index + 1} {args}: {proc.stderr.strip()}")
            return {}

        def client(i: int) -> None:
            for n in range(4):
                rid = f"h{i}-{n}"
                vol = ask(i, "volume", "create", "--size", "128M", "--request-id", f"{rid}-c")
                if not vol:
                    return
                results[rid] = {"uuid": vol["uuid"], "capacity": 128 * 1024**2}
                if n % 2 == 0:
                    ask(i, "volume", "extend", str(vol["uuid"]), "--size", "+128M",
                        "--request-id", f"{rid}-e")
                    results[rid]["capacity"] = 256 * 1024**2
                if n == 3:
                    ask(i, "volume", "delete", str(vol["uuid"]), "--request-id", f"{rid}-d")
                    results[rid]["deleted"] = True

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(3)
        manager = c.manager()
        manager.daemon.kill()  # SIGKILL mid-stream; sanlock frees its lease at once
        time.sleep(1)
        DaemonProcess(manager.paths).start()
        for t in threads:
            t.join(timeout=600)
        assert not problems, problems
        assert len(results) == 16
        volumes = {v["uuid"]: v for v in c.hosts[0].cli_json("volume", "list")}
        expected = {str(r["uuid"]): r for r in results.values() if not r.get("deleted")}
        assert set(volumes) == set(expected)  # each acknowledged create exactly once
        for uuid_, r in expected.items():
            assert volumes[uuid_]["capacity"] == r["capacity"]  # each extend once
            assert volumes[uuid_]["state"] == "ready"
        on_disk = [lv.name for lv in c.raw_lvm().lvs(c.name) if len(lv.name) == 36]
        assert sorted(on_disk) == sorted(expected)
        c.raw_lvm().vgck(c.name)
    finally:
        destroy_cluster(c)


def test_metrics(cluster: Cluster) -> None:
    h1, h3 = cluster.hosts[0], cluster.hosts[2]
    h3.cli("volume", "create", "--size", "128M")
    text = h1.cli("metrics").stdout
    assert 'sharedlvm_manager{domain="dom1",host_id="1"} 1' in text
    assert 'sharedlvm_requests_total{op="volume.create",outcome="ok"}' in text
    assert 'sharedlvm_request_duration_seconds_bucket{op="volume.create",le="+Inf"}' in text
    assert "sharedlvm_mailbox_requests_served_total" in text
    served = [ln for ln in text.splitlines() if ln.startswith(
        'sharedlvm_mailbox_requests_served_total{domain="dom1",host_id="1"} ')]
    assert int(served[0].split()[1]) >= 1
    assert 'sharedlvm_mailbox_read_bytes_total{domain="dom1",host_id="1"}' in text
    other = h3.cli("metrics").stdout
    assert 'sharedlvm_manager{domain="dom1",host_id="3"} 0' in other
    for line in text.splitlines():  # well-formed exposition lines
        assert line.startswith("#") or line.startswith("sharedlvm_")
