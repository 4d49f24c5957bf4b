"""A domain sharded over several VGs (format 2), and a version-1 domain beside it.

A cluster of 2 hosts on 4 LUNs: the domain is made on the first 3 (shards 0, 1, 2);
the 4th is left empty for ``domain extend``. Every check reads the disk itself: which
VG holds which LV (lvs), the VG seqnos, the volume index in the journal."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from bed import Cluster, destroy_cluster, make_cluster, scratch_lun

from sharedlvm import errors, journal, lvm_mda, ondisk, partitions, tags
from sharedlvm.command import Runner
from sharedlvm.domain import make_lvm, shard_vg_name
from sharedlvm.units import GiB

pytestmark = pytest.mark.integration

WRITE = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, sys.argv[2].encode().ljust(4096, b"\\0"), 0)
os.fsync(fd)
print(len(os.pread(fd, 4096, 0).rstrip(b"\\0")))
"""
READ = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print(os.pread(fd, 4096, 0).rstrip(b"\\0").decode())
"""


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = make_cluster(tmp_path_factory.mktemp("sharded") / "bed", hosts=2, size=8 * GiB,
                     luns=4, domain_luns=3)
    try:
        yield c
    finally:
        destroy_cluster(c)


@pytest.fixture
def shards(sharded: Cluster) -> Iterator[Cluster]:
    deadline = time.monotonic() + 90
    while sharded.manager() is not sharded.first:  # host 1 is manager in every test
        assert time.monotonic() < deadline, "host 1 did not get the manager role back"
        sharded.manager().client.release_manager(sharded.name)
        time.sleep(1)
    yield sharded
    sharded.clean()


def where(c: Cluster) -> dict[str, str]:
    """Volume -> the VG that holds its LV, as LVM on the disk says."""
    lvm = c.raw_lvm()
    return {lv.name: lv.vg_name for vg in lvm.vgs() for lv in lvm.lvs(vg.name)
            if tags.is_volume(lv)}


def index_entry(c: Cluster, vol: str) -> int | None:
    """The volume's shard in the volume index, read from the journal on the LUN."""
    with ondisk.BlockFile(c.first.domain().special_path("journal")) as dev:
        return journal.read_index(dev, vol).get(vol)


def cleared_bucket(c: Cluster, vol: str) -> dict[str, int]:
    """The index bucket of a deleted volume once the manager cleared its entry (after
    the delete's answer: volume._delete)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with ondisk.BlockFile(c.first.domain().special_path("journal")) as dev:
                entries = journal.read_index(dev, vol)
            if vol not in entries:
                return entries
        except errors.CorruptRecord:
            pass  # not rewritten yet
        assert time.monotonic() < deadline, f"the index entry of {vol} was never cleared"
        time.sleep(0.1)


def test_domain_of_three_shards(shards: Cluster) -> None:
    info = shards.first.cli_json("domain", "info")
    assert info["format_version"] == 2
    assert [(s["index"], s["vg_name"], s["luns"]) for s in info["shards"]] == [
        (i, shard_vg_name("dom1", i), [shards.luns[i]]) for i in range(3)]
    vgs = {vg.name: vg for vg in shards.raw_lvm().vgs()}
    assert sorted(vgs) == ["dom1", "dom1+1", "dom1+2"]
    for i in range(3):
        vg_tags = vgs[shard_vg_name("dom1", i)].tags
        assert f"sharedlvm.shard={i}" in vg_tags and "sharedlvm.format=2" in vg_tags
        # the fast seqno read agrees with LVM, on every shard
        head = lvm_mda.read_head(shards.luns[i])
        assert head == lvm_mda.MdaHead(shard_vg_name("dom1", i),
                                       vgs[shard_vg_name("dom1", i)].seqno)
    # special LVs only in shard 0
    lvs = {(lv.vg_name, lv.name) for vg in vgs for lv in shards.raw_lvm().lvs(vg)}
    assert {name for vg, name in lvs} == {"ids", "leases", "mailbox", "journal", "backup"}
    assert {vg for vg, _ in lvs} == {"dom1"}


def test_volumes_spread_over_shards_and_indexed(shards: Cluster) -> None:
    """The fewest volumes first: six creates, from both hosts (host 2 through the
    mailbox), land two in each shard; the index names each one's shard."""
    made = []
    for i in range(6):
        host = shards.hosts[i % 2]
        made.append(host.cli_json("volume", "create", "--size", "128M")["uuid"])
    on_disk = where(shards)
    assert sorted(on_disk) == sorted(made)
    counts = {vg: list(on_disk.values()).count(vg) for vg in set(on_disk.values())}
    assert counts == {"dom1": 2, "dom1+1": 2, "dom1+2": 2}
    for vol in made:
        assert shard_vg_name("dom1", index_entry(shards, vol) or 0) == on_disk[vol]
    listed = shards.hosts[1].cli_json("volume", "list")
    assert sorted(v["uuid"] for v in listed) == sorted(made)
    # deleted: gone from its VG, and from the index (cleared after the answer)
    shards.hosts[1].cli("volume", "delete", made[1])
    assert made[1] not in where(shards)
    cleared_bucket(shards, made[1])


def test_volume_in_every_shard_used_from_another_host(shards: Cluster) -> None:
    made = [shards.first.cli_json("volume", "create", "--size", "128M")["uuid"]
            for _ in range(3)]
    assert sorted(where(shards).values()) == ["dom1", "dom1+1", "dom1+2"]
    for vol in made:  # written on host 2, read back on host 1
        assert shards.hosts[1].with_volume(vol, WRITE, f"data of {vol}").strip() == str(
            len(f"data of {vol}"))
        assert shards.first.with_volume(vol, READ, read_only=True).strip() == \
            f"data of {vol}"
    # extended from host 2 (the mailbox), seen with its new size on host 1
    target = made[2]
    shards.hosts[1].cli("volume", "extend", target, "--size", "512M")
    assert shards.first.cli_json("volume", "info", target)["capacity"] == 512 * 1024 ** 2
    assert shards.first.with_volume(target, READ, read_only=True).strip() == \
        f"data of {target}"


def test_a_stray_write_to_one_shard_fences_the_manager(shards: Cluster) -> None:
    """The seqno check is per shard and read from the metadata area: metadata written
    behind the manager's back in shard 1 stops the manager's next write there."""
    for _ in range(3):  # one volume per shard
        shards.first.cli("volume", "create", "--size", "128M")
    lun = shards.luns[1]  # the next create's shard: fewest volumes, then most free
    stray = make_lvm(shards.first.paths, Runner(), [lun], writable=True)
    before = lvm_mda.read_head(lun)
    stray.lvcreate("dom1+1", "stray", 128 * 1024 ** 2, [])
    try:
        after = lvm_mda.read_head(lun)
        assert before and after and after.seqno == before.seqno + 1
        out = shards.first.cli("volume", "create", "--size", "128M", check=False)
        assert out.returncode == 1 and "lost the manager role" in out.stderr, out.stderr
        assert "dom1+1" in out.stderr and lvm_mda.read_head(lun) == after  # no write
    finally:
        stray.lvremove("dom1+1", ["stray"])
        shards.new_manager_term()  # a manager that reads the shards' seqnos afresh


def test_shard_added_while_volumes_are_in_use(shards: Cluster) -> None:
    made = [shards.first.cli_json("volume", "create", "--size", "128M")["uuid"]
            for _ in range(3)]  # one in each shard
    vol = made[0]
    shards.hosts[1].with_volume(vol, WRITE, "before extend")
    writer = shards.hosts[1].popen("run", "--volume", vol, "--", "sleep", "600")
    try:
        time.sleep(2)
        assert writer.poll() is None
        new_lun = shards.luns[3]
        before = shards.disk_state()
        bad = shards.first.cli("domain", "extend", "--lun", shards.luns[0], check=False)
        assert bad.returncode == 1 and "not empty" in bad.stderr
        assert shards.disk_state() == before  # refused: nothing changed
        info = shards.first.cli_json("domain", "extend", "--lun", new_lun)
        assert [s["vg_name"] for s in info["shards"]][-1] == "dom1+3"
        # the new shard is the emptiest: the next volume goes there, and host 2 (which
        # never had that LUN in its config) uses it through the shard table
        new = shards.hosts[1].cli_json("volume", "create", "--size", "128M")["uuid"]
        assert where(shards)[new] == "dom1+3"
        # host 2's daemon lists it (it learns the new shard from the domain record)
        assert new in {v["uuid"] for v in shards.hosts[1].cli_json("volume", "list")}
        assert shards.hosts[1].with_volume(new, WRITE, "in shard 3").strip() == "10"
        assert shards.first.with_volume(new, READ, read_only=True).strip() == "in shard 3"
        assert writer.poll() is None  # the consumer ran on, untouched
    finally:
        writer.terminate()
        writer.communicate(timeout=60)
    assert shards.first.with_volume(vol, READ, read_only=True).strip() == "before extend"


def test_crash_recovery_across_shards(shards: Cluster) -> None:
    """A manager died mid-create in shard 2 (after lvcreate, before the answer): the
    next manager finishes it where it was started, and the index names shard 2."""
    vol, image = str(uuid.uuid4()), str(uuid.uuid4())
    args = {"volume": vol, "image": image, "size": GiB, "format": "raw",
            "alloc": "preallocated", "tags": {}, "shard": 2}
    with ondisk.BlockFile(shards.first.domain().special_path("journal"),
                          writable=True) as dev:
        journal.RequestLog(dev).put(journal.RequestRecord("shard-crash", "create",
                                                          "pending", args=args))
    lvm = make_lvm(shards.first.paths, Runner(), [shards.luns[2]], writable=True)
    lvm.lvcreate("dom1+2", vol, GiB, [tags.make_tag("image", image),
                                      tags.make_tag("state", "ready")])
    shards.new_manager_term()
    out = shards.hosts[1].cli_json("volume", "create", "--size", "5G",
                                   "--request-id", "shard-crash")
    assert out["uuid"] == vol and out["capacity"] == GiB
    assert where(shards) == {vol: "dom1+2"}
    with ondisk.BlockFile(shards.first.domain().special_path("journal")) as dev:
        rec = journal.RequestLog(dev).find("shard-crash")
    assert rec is not None and rec.state == "done"


def test_torn_index_bucket_is_searched_and_rebuilt(shards: Cluster) -> None:
    made = [shards.first.cli_json("volume", "create", "--size", "128M")["uuid"]
            for _ in range(3)]
    vol = next(v for v in made if where(shards)[v] != "dom1")
    offset = journal.INDEX_OFFSET + journal.index_bucket(vol) * ondisk.BLOCK_SIZE
    with ondisk.BlockFile(shards.first.domain().special_path("journal"),
                          writable=True) as dev:
        block = bytearray(dev.read(offset, ondisk.BLOCK_SIZE))
        block[100] ^= 0xFF  # right magic, wrong checksum: a torn write
        dev.write(offset, bytes(block))
    # host 2 finds it anyway (asks every shard), and uses it
    assert shards.hosts[1].cli_json("volume", "info", vol)["uuid"] == vol
    shards.hosts[1].with_volume(vol, WRITE, "found")
    # the manager's next index write there rebuilds the bucket from the LVs
    shards.first.cli("volume", "delete", vol)
    entries = cleared_bucket(shards, vol)
    for other in made:
        if other != vol and journal.index_bucket(other) == journal.index_bucket(vol):
            assert other in entries


def test_extend_refuses_bad_luns_and_changes_nothing(shards: Cluster) -> None:
    before = shards.disk_state()
    for lun, why in [("/dev/nonexistent", "does not exist"),
                     ("/dev/null", "not a block device"),
                     ("relative", "invalid LUN")]:
        out = shards.first.cli("domain", "extend", "--lun", lun, check=False)
        assert out.returncode != 0 and why in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1
    out = shards.hosts[1].cli("domain", "extend", "--lun", shards.luns[3], check=False)
    assert out.returncode == 1 and "manager" in out.stderr  # not forwarded
    assert shards.disk_state() == before


def test_version_1_domain_still_works(tmp_path: Path) -> None:
    """A domain of format 1 (one VG over two LUNs), as earlier versions made it: one
    shard; create, use from another host, extend, delete, all as before."""
    c = make_cluster(tmp_path / "bed", hosts=2, size=4 * GiB, luns=2,
                     extra=("--format-version", "1"))
    try:
        info = c.first.cli_json("domain", "info")
        assert info["format_version"] == 1 and len(info["shards"]) == 1
        assert [vg.name for vg in c.raw_lvm().vgs()] == ["dom1"]
        assert "sharedlvm.shard=0" not in c.raw_lvm().vg("dom1").tags
        vol = c.hosts[1].cli_json("volume", "create", "--size", "128M")["uuid"]
        assert c.hosts[1].with_volume(vol, WRITE, "v1").strip() == "2"
        assert c.first.with_volume(vol, READ, read_only=True).strip() == "v1"
        c.first.cli("volume", "extend", vol, "--size", "256M")
        out = c.first.cli("domain", "extend", "--lun", "/dev/null", check=False)
        assert out.returncode == 1
        c.hosts[1].cli("volume", "delete", vol)
        assert c.first.cli_json("volume", "list") == []
        with ondisk.BlockFile(c.first.domain().special_path("journal")) as dev:
            rec = journal.read_domain_record(dev)
        assert rec.format_version == 1 and "format_version" not in rec.payload()
    finally:
        destroy_cluster(c)


def test_fast_seqno_read_follows_lvm_around_the_ring(tmp_path: Path) -> None:
    """lvm_mda reads what LVM committed, also once the metadata text wraps around the
    circular area (a small one here, so it wraps after a few commits)."""
    with scratch_lun(tmp_path, 2 * GiB) as (dev, lvm, writer):
        writer.run("pvcreate", "--metadatasize", "1m", dev)
        writer.vgcreate("ring", [dev], [])
        writer.lvcreate("ring", "lv", 128 * 1024 ** 2, [])
        for i in range(60):  # ~2 KiB of text each commit: wraps a 1 MiB area
            writer.change_tags("ring", "lv", add=[f"t{i}-" + "x" * 100])
            head = lvm_mda.read_head(dev)
            assert head == lvm_mda.MdaHead("ring", lvm.vg("ring").seqno)
        writer.vgremove("ring")


def test_metadata_backups_kept_in_the_domain(shards: Cluster, tmp_path: Path) -> None:
    """LVM's own backups are off; the manager copies each shard's metadata into the
    domain after a takeover (and when it changed), readable on any host and taken by
    vgcfgrestore."""
    made = [shards.first.cli_json("volume", "create", "--size", "128M")["uuid"]
            for _ in range(3)]
    in_one = next(v for v, vg in where(shards).items() if vg == "dom1+1")
    shards.new_manager_term()  # the new manager backs up what changed, at once
    out_file = tmp_path / "dom1+1.vg"
    seqno = shards.raw_lvm().vg("dom1+1").seqno
    deadline = time.monotonic() + 60
    while True:
        out = shards.hosts[1].cli("domain", "backup", "--shard", "1", "--output",
                                  str(out_file), check=False)
        if out.returncode == 0 and f"seqno {seqno}," in out.stderr:
            break
        assert time.monotonic() < deadline, out.stderr
        time.sleep(1)
    text = out_file.read_text()
    assert f"seqno = {seqno}" in text and in_one in text
    assert not any(v in text for v in made if v != in_one)  # that shard's only
    # LVM takes it (test mode: nothing written)
    lvm = make_lvm(shards.first.paths, Runner(), [shards.luns[1]], writable=True)
    lvm.run("vgcfgrestore", "--test", "--file", str(out_file), "dom1+1")
    assert shards.raw_lvm().vg("dom1+1").seqno == seqno
    # no LVM backup or archive files anywhere on the hosts
    for host in shards.hosts:
        assert not list((host.paths.lvm_system_dir).glob("archive/*"))
        assert not list((host.paths.lvm_system_dir).glob("backup/*"))
    bad = shards.first.cli("domain", "backup", "--shard", "9", "--output", "-", check=False)
    assert bad.returncode == 1 and "no shard 9" in bad.stderr


def test_shards_on_partitions_of_one_lun(tmp_path: Path) -> None:
    """A LUN larger than one shard needs is cut into GPT partitions, a shard each; a
    host attached by the whole LUN finds them; extend cuts a new LUN the same way;
    remove leaves the LUNs blank."""
    c = make_cluster(tmp_path / "bed", hosts=2, size=40 * GiB, luns=2, domain_luns=1,
                     extra=("--partitions", "3"))
    try:
        lun, spare = c.luns
        base = Path(lun).name
        info = c.hosts[1].cli_json("domain", "info")
        assert [(s["vg_name"], s["luns"]) for s in info["shards"]] == [
            (shard_vg_name("dom1", i), [f"/dev/{base}p{i + 1}"]) for i in range(3)]
        made = [c.hosts[i % 2].cli_json("volume", "create", "--size", "128M")["uuid"]
                for i in range(3)]
        assert sorted(where(c).values()) == ["dom1", "dom1+1", "dom1+2"]
        # A volume of any shard says the domain's name, not its shard's VG name.
        assert {c.hosts[1].cli_json("volume", "info", v)["domain"] for v in made} == {"dom1"}
        assert {v["domain"] for v in c.first.cli_json("volume", "list")} == {"dom1"}
        for vol in made:
            c.hosts[1].with_volume(vol, WRITE, f"p {vol}")
            assert c.first.with_volume(vol, READ, read_only=True).strip() == f"p {vol}"
        bad = c.first.cli("domain", "extend", "--lun", spare, "--partitions", "200",
                          check=False)
        assert bad.returncode != 0 and "partition count" in bad.stderr
        info = c.first.cli_json("domain", "extend", "--lun", spare, "--partitions", "2")
        assert [s["luns"] for s in info["shards"]][3:] == [
            [f"/dev/{Path(spare).name}p1"], [f"/dev/{Path(spare).name}p2"]]
        new = [c.hosts[1].cli_json("volume", "create", "--size", "128M")["uuid"]
               for _ in range(2)]
        assert sorted(where(c)[v] for v in new) == ["dom1+3", "dom1+4"]
        c.hosts[1].with_volume(new[1], WRITE, "on a new partition")
        for vol in made + new:
            c.first.cli("volume", "delete", vol)
        c.hosts[1].cli("domain", "detach")
        c.first.cli("domain", "remove", "--force")
        for device in (lun, spare):
            probe = subprocess.run(["blkid", "-p", device], capture_output=True)
            assert probe.returncode == 2, probe  # blank again
    finally:
        destroy_cluster(c)


def test_manager_view_of_lvs_follows_lvm(tmp_path: Path) -> None:
    """The manager's view of a shard's LVs (Lvm keep_view: read once, then changed by
    its own commits) says what a fresh LVM report says after every kind of commit,
    sizes rounded as LVM rounds them; a failed command drops it (read again)."""
    from sharedlvm.lvm import EXTENT_SIZE

    with scratch_lun(tmp_path, 8 * GiB, keep_view=True) as (dev, fresh, manager):
        manager.pvcreate([dev])
        manager.vgcreate("view", [dev], [])
        manager.lvcreate("view", "before", EXTENT_SIZE, ["sl.a=1"])

        def same() -> None:
            on_disk = {lv.name: (lv.size, set(lv.tags)) for lv in fresh.lvs("view")}
            for name in {*on_disk, "before", "raw", "qcow", "gone", "missing"}:
                lv = manager.volume_lv("view", name)
                seen = (lv.size, set(lv.tags)) if lv is not None else None
                assert seen == on_disk.get(name), name
            for lvm in (manager, fresh):  # the list: from the view, from a light report
                assert {lv.name: (lv.size, set(lv.tags))
                        for lv in lvm.volume_lvs("view")} == on_disk

        same()  # loads the view: "before" is in it
        manager.lvcreate("view", "raw", 512, ["sl.b=2", "sl.c=3"])  # one extent
        same()
        manager.lvextend("view", "raw", EXTENT_SIZE + 512)  # two extents
        same()
        manager.lvextend("view", "raw", 2 * EXTENT_SIZE)  # no-op (LVM: matches existing)
        same()
        manager.lvcreate("view", "qcow", 3 * EXTENT_SIZE, [tags.make_tag("state", "creating")])
        manager.change_tags("view", "qcow", add=[tags.make_tag("state", "ready"), "sl.x=1"],
                            delete=[tags.make_tag("state", "creating")])
        same()
        manager.lvcreate("view", "gone", EXTENT_SIZE, [])
        assert manager.lvremove_selected("view", "lv_name=gone") == ["gone"]
        manager.lvremove("view", ["before"])
        same()
        # A command that fails (it might have committed): the view is read again.
        with pytest.raises(errors.AlreadyExists):
            manager.lvcreate("view", "raw", EXTENT_SIZE, [])
        assert "view" not in (manager._views or {})
        same()
        # What the view cannot see by itself: a commit by another writer. The
        # manager's seqno check around each commit is what stops that (tests of
        # the stray writer); the view only ever holds its own commits.
        manager.vgremove("view")


def test_a_grown_lun_gets_a_new_shard_when_the_shards_are_full(tmp_path: Path) -> None:
    """A partitioned LUN that grew (the SAN admin's resize, seen by every host: the bed's
    hosts share one loop device) gets a new partition and shard from the manager as
    soon as a volume fits in no shard; the volume goes there and another host uses it.
    Where no LUN has room, the create fails with NoSpace and nothing changes. An
    interrupted growth is finished, not repeated."""
    c = make_cluster(tmp_path / "bed", hosts=2, size=20 * GiB,
                     extra=("--partitions", "2"))
    try:
        lun = c.luns[0]
        lun_file = Path(c.bed.luns[0].file)
        # Fill both shards (10 GiB partitions; shard 0 also holds the special LVs).
        for _ in range(2):
            c.first.cli("volume", "create", "--size", "8G")
        assert sorted(where(c).values()) == ["dom1", "dom1+1"]
        before = c.disk_state()
        table = subprocess.run(["sfdisk", "--dump", lun], capture_output=True,
                               text=True, check=True).stdout
        bad = c.hosts[1].cli("volume", "create", "--size", "9G", check=False)
        assert bad.returncode == 1 and "not enough free space" in bad.stderr, bad.stderr
        assert c.disk_state() == before  # refused: nothing changed, no partition made
        assert subprocess.run(["sfdisk", "--dump", lun], capture_output=True, text=True,
                              check=True).stdout == table

        # The LUN grows by 12 GiB; the next create that fits nowhere makes a shard.
        with lun_file.open("r+b") as f:
            f.truncate(32 * GiB)
        subprocess.run(["losetup", "--set-capacity", lun], check=True)
        vol = c.hosts[1].cli_json("volume", "create", "--size", "9G")["uuid"]
        assert where(c)[vol] == "dom1+2"
        parts = partitions.members(lun)
        assert len(parts) == 3
        first, third = (int(subprocess.run(["blockdev", "--getsize64", p],
                                           capture_output=True, text=True,
                                           check=True).stdout) for p in (parts[0], parts[2]))
        assert third == first  # as large as the LUN's other partitions
        info = c.hosts[1].cli_json("domain", "info")
        assert [s["luns"] for s in info["shards"]] == [[p] for p in parts]
        c.hosts[1].with_volume(vol, WRITE, "in grown space")
        assert c.first.with_volume(vol, READ, read_only=True).strip() == "in grown space"
        # The primary GPT and the backup at the LUN's new end agree (sfdisk --verify).
        subprocess.run(["sfdisk", "--verify", lun], check=True, capture_output=True)

        # A growth that stopped after its vgcreate (the manager crashed or was fenced
        # before the shard was counted) left a partition holding the next index's VG:
        # the next growth counts it instead of making a second VG of the same name on
        # another partition (which would make the shard ambiguous on every host).
        with lun_file.open("r+b") as f:
            f.truncate(54 * GiB)  # room for two more partitions
        subprocess.run(["losetup", "--set-capacity", lun], check=True)
        part = partitions.append(Runner(), lun, 10 * GiB)
        stray = make_lvm(c.first.paths, Runner(), [part], writable=True)
        stray.pvcreate([part])
        stray.vgcreate("dom1+3", [part], [f"sharedlvm.domain={info['domain_uuid']}",
                                          "sharedlvm.format=2", "sharedlvm.shard=3"])
        vol = c.first.cli_json("volume", "create", "--size", "9G")["uuid"]
        assert where(c)[vol] == "dom1+3"
        assert partitions.members(lun)[3:] == [part]  # no fifth partition
        info = c.hosts[1].cli_json("domain", "info")
        assert [s["luns"] for s in info["shards"]][3] == [part]
        c.hosts[1].with_volume(vol, WRITE, "finished growth")
    finally:
        destroy_cluster(c)
