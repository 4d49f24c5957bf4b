"""Domains on real LVM over loop-device LUNs, several simulated hosts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from bed import Cluster, destroy_cluster, make_cluster

from sharedlvm import domain as domain_mod
from sharedlvm import journal, ondisk
from sharedlvm.command import Runner
from sharedlvm.lvm import Lvm, LvmConfig

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("cluster", [512, 4096], indirect=True)
def test_create_and_attach(cluster: Cluster) -> None:
    lvm = cluster.raw_lvm()
    vg = lvm.vg(cluster.name)
    assert any(t.startswith("sharedlvm.domain=") for t in vg.tags)
    assert "sharedlvm.format=2" in vg.tags and "sharedlvm.shard=0" in vg.tags
    special = {lv.name: lv.size for lv in lvm.lvs(cluster.name)}
    assert set(special) == {"ids", "leases", "mailbox", "journal", "backup"}
    assert special["leases"] >= 1024**3 and special["journal"] >= 64 * 1024**2
    # Every host sees the same domain and knows who the manager is.
    infos = [h.cli_json("domain", "info") for h in cluster.hosts]
    tag = next(t for t in vg.tags if t.startswith("sharedlvm.domain="))
    assert {i["domain_uuid"] for i in infos} == {tag.split("=", 1)[1]}
    assert {i["manager_host_id"] for i in infos} == {1}
    assert infos[0]["manager_generation"] >= 1
    assert infos[0]["format_version"] == 2
    # The PV metadata area is sized for 10,000 volumes (see lvm.METADATA_SIZE).
    assert infos[0]["metadata_size"] >= 128 * 1024**2
    lvm.vgck(cluster.name)


def test_domain_info_table(cluster: Cluster) -> None:
    out = cluster.hosts[1].cli("domain", "info").stdout
    assert "manager" in out and "host 1" in out and "dead host's leases free after 68 s" in out


def test_create_refuses_lun_with_foreign_vg(tmp_path: Path) -> None:
    c = make_cluster(tmp_path / "bed", hosts=1, attach=False)
    try:
        lun = c.luns[0]
        foreign = Lvm(Runner(), LvmConfig((lun,), True, tmp_path / "lvm", tmp_path / "lock",
                                          activation=False))
        (tmp_path / "lvm").mkdir()
        (tmp_path / "lvm" / "lvm.conf").write_text("config {\n checks = 1\n}\n")
        foreign.pvcreate([lun])
        foreign.vgcreate("foreignvg", [lun], [])
        before = c.disk_state()
        proc = c.hosts[0].cli("domain", "create", "--name", "d", "--lun", lun, "--host-id", "1",
                              check=False)
        assert proc.returncode == 1
        assert proc.stderr.strip() == f"sharedlvm: LUN {lun} is not empty: it holds an LVM " \
            "physical volume"
        assert c.disk_state() == before
        assert not c.hosts[0].paths.domain_config("d").exists()
    finally:
        destroy_cluster(c)


def test_create_refuses_lun_with_filesystem(empty_bed: Cluster) -> None:
    lun = empty_bed.luns[0]
    subprocess.run(["mkfs.ext4", "-q", "-F", lun], check=True, capture_output=True)
    proc = empty_bed.hosts[0].cli("domain", "create", "--name", "d", "--lun", lun,
                                  "--host-id", "1", check=False)
    assert proc.returncode == 1
    assert "is not empty: it holds ext4" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    found = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", lun],
                           capture_output=True, text=True).stdout.strip()
    assert found == "ext4"  # untouched


@pytest.mark.parametrize("args, message", [
    (["--name", "bad/name", "--host-id", "1"], "invalid domain name"),
    (["--name=-x", "--host-id", "1"], "invalid domain name"),
    (["--name", "ids", "--host-id", "1"], "invalid domain name"),
    (["--name", "ok", "--host-id", "0"], "invalid host id 0"),
    (["--name", "ok", "--host-id", "2001"], "invalid host id 2001"),
])
def test_create_bad_input_changes_nothing(empty_bed: Cluster, args: list[str],
                                          message: str) -> None:
    before = empty_bed.disk_state()
    proc = empty_bed.hosts[0].cli("domain", "create", "--lun", empty_bed.luns[0], *args,
                                  check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert empty_bed.disk_state() == before == {"vgs": [], "lvs": []}


def test_create_unknown_lun(empty_bed: Cluster) -> None:
    proc = empty_bed.hosts[0].cli("domain", "create", "--name", "d", "--lun",
                                  "/dev/does-not-exist", "--host-id", "1", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "sharedlvm: LUN /dev/does-not-exist does not exist"


def test_unknown_domain(cluster: Cluster) -> None:
    proc = cluster.hosts[1].cli("domain", "info", "--domain", "nosuch", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "sharedlvm: domain nosuch is not attached on this host"


def test_attach_wrong_name(empty_bed: Cluster) -> None:
    domain_mod.create_domain(empty_bed.hosts[0].paths, Runner(), "real", empty_bed.luns, 1)
    before = empty_bed.disk_state()
    proc = empty_bed.hosts[1].cli("domain", "attach", "other", "--lun", empty_bed.luns[0],
                                  "--host-id", "2", check=False)
    assert proc.returncode == 1
    assert "other" in proc.stderr and "not found" in proc.stderr
    assert empty_bed.disk_state() == before
    assert not empty_bed.hosts[1].paths.domain_config("other").exists()


def _journal_offset(cluster: Cluster) -> int:
    lvm = cluster.raw_lvm()
    lv = lvm.lv(cluster.name, "journal")
    extent = int(lv.devices.split("(")[1].rstrip(")"))
    pe_start = lvm.pvs([cluster.luns[0]])[0].pe_start
    return pe_start + extent * lvm.vg(cluster.name).extent_size


def test_attach_refuses_corrupt_domain_record(empty_bed: Cluster) -> None:
    c = empty_bed
    domain_mod.create_domain(c.hosts[0].paths, Runner(), c.name, c.luns, 1)
    offset = _journal_offset(c)
    # Flip one payload byte in both copies of the domain record, as bit rot would.
    with open(c.luns[0], "r+b") as f:
        for copy in journal.DOMAIN_COPIES:
            f.seek(offset + copy + 60)
            byte = f.read(1)
            f.seek(offset + copy + 60)
            f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
    subprocess.run(["blockdev", "--flushbufs", c.luns[0]], check=True)
    before = c.disk_state()
    proc = c.hosts[1].cli("domain", "attach", c.name, "--lun", c.luns[0], "--host-id", "2",
                          check=False)
    assert proc.returncode == 1
    assert "domain record" in proc.stderr and "checksum mismatch" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert c.disk_state() == before
    assert not c.hosts[1].paths.domain_config(c.name).exists()
    # and the creating host itself refuses to work on it
    proc = c.hosts[0].cli("volume", "list", check=False)
    assert proc.returncode == 1 and "checksum mismatch" in proc.stderr


def test_torn_record_copy_falls_back_to_other(empty_bed: Cluster) -> None:
    c = empty_bed
    domain_mod.create_domain(c.hosts[0].paths, Runner(), c.name, c.luns, 1)
    offset = _journal_offset(c)
    with open(c.luns[0], "r+b") as f:  # copy A torn: garbage in its payload
        f.seek(offset + 100)
        f.write(b"\xff" * 50)
    subprocess.run(["blockdev", "--flushbufs", c.luns[0]], check=True)
    info = c.hosts[1].cli("domain", "attach", c.name, "--lun", c.luns[0], "--host-id", "2",
                          "--json")
    assert json.loads(info.stdout)["domain_uuid"] == c.hosts[0].domain().record.domain_uuid


def test_remove_refuses_with_volumes(fresh_cluster: Cluster) -> None:
    cluster = fresh_cluster
    w = cluster.first
    w.cli("volume", "create", "--size", "1G")
    before = cluster.disk_state()
    proc = w.cli("domain", "remove", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("sharedlvm: domain dom1 has 1 volume(s); "
                                   "delete them or use --force")
    assert cluster.disk_state() == before
    # a reader cannot remove it at all
    proc = cluster.hosts[1].cli("domain", "remove", "--force", check=False)
    assert proc.returncode == 1 and "not the manager" in proc.stderr
    assert cluster.disk_state() == before
    # nor the manager while other hosts still use it
    proc = w.cli("domain", "remove", "--force", check=False)
    assert proc.returncode == 1
    assert "host(s) 2, 3 still use domain dom1: detach them first" in proc.stderr
    assert cluster.disk_state() == before
    for host in cluster.hosts[1:]:
        host.cli("domain", "detach")
    w.cli("domain", "remove", "--force")
    assert cluster.disk_state() == {"vgs": [], "lvs": []}
    probe = subprocess.run(["blkid", "-p", cluster.luns[0]], capture_output=True)
    assert probe.returncode == 2  # the LUN is blank again
    assert not w.paths.domain_config(cluster.name).exists()


def test_never_touches_foreign_vg(cluster: Cluster, tmp_path: Path) -> None:
    """A VG on another device of the host stays invisible and unchanged."""
    other = tmp_path / "other.img"
    other.write_bytes(b"")
    with open(other, "r+b") as f:
        f.truncate(1024**3)
    dev = subprocess.run(["losetup", "--find", "--show", str(other)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        conf = tmp_path / "lvm"
        conf.mkdir()
        (conf / "lvm.conf").write_text("config {\n checks = 1\n}\n")
        lvm = Lvm(Runner(), LvmConfig((dev,), True, conf, tmp_path / "lock", activation=False))
        lvm.pvcreate([dev])
        lvm.vgcreate("hostvg", [dev], [])
        lvm.lvcreate("hostvg", "root", 128 * 1024**2, [])
        seqno = lvm.vg("hostvg").seqno
        w = cluster.first
        vol = w.cli_json("volume", "create", "--size", "1G")["uuid"]
        w.cli("volume", "extend", vol, "--size", "+1G")
        w.cli("volume", "delete", vol)
        d = w.domain()
        assert [vg.name for vg in d.lvm.vgs()] == [cluster.name]  # filter hides hostvg
        assert lvm.vg("hostvg").seqno == seqno
        assert [lv.name for lv in lvm.lvs("hostvg")] == ["root"]
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


def test_record_roundtrip_on_device(cluster: Cluster) -> None:
    d = cluster.first.domain()
    with ondisk.BlockFile(d.special_path("journal")) as dev:
        rec = journal.read_domain_record(dev)
    assert rec.manager_host_id == 1 and rec.vg_name == cluster.name
    assert rec.manager_generation >= 1 and rec.io_timeout == 1
