"""Volumes on real LVM: create, list, info, extend, delete, idempotent requests."""

from __future__ import annotations

import json
import os
import uuid

import pytest
from bed import Cluster, GiB

from sharedlvm import journal, ondisk, tags
from sharedlvm.command import Runner
from sharedlvm.domain import make_lvm

pytestmark = pytest.mark.integration


def test_create_raw_with_tags(cluster: Cluster) -> None:
    w = cluster.first
    image = str(uuid.uuid4())
    vol = w.cli_json("volume", "create", "--size", "2G", "--image", image,
                     "--tag", "vm=web-1", "--tag", "note=héllo wörld & co, 100%")
    assert vol["capacity"] == 2 * GiB and vol["size"] == 2 * GiB
    assert vol["format"] == "raw" and vol["alloc"] == "preallocated"
    assert vol["state"] == "ready" and vol["image"] == image
    assert vol["tags"] == {"vm": "web-1", "note": "héllo wörld & co, 100%"}
    # On disk: one LV named by the UUID, metadata in its tags (DESIGN.md).
    lv = cluster.raw_lvm().lv(cluster.name, vol["uuid"])
    assert f"sl.image={image}" in lv.tags
    assert {"sl.parent=none", "sl.format=raw", "sl.alloc=preallocated",
            "sl.state=ready"} <= set(lv.tags)
    assert f"sl.lease={vol['lease']}" in lv.tags and vol["lease"] >= 1
    assert f"sl.gen={vol['generation']}" in lv.tags and vol["generation"] >= 1
    # Any host reads the same metadata.
    assert cluster.hosts[2].cli_json("volume", "info", vol["uuid"]) == vol


def test_create_qcow2_thin(cluster: Cluster) -> None:
    w = cluster.first
    vol = w.cli_json("volume", "create", "--size", "20G", "--format", "qcow2")
    assert vol["format"] == "qcow2" and vol["alloc"] == "thin"
    assert vol["capacity"] == 20 * GiB
    assert vol["size"] < 2 * GiB  # thin: the LV starts small
    assert vol["state"] == "ready"
    # The image is a real qcow2 of the full capacity, seen from another host.
    info = json.loads(cluster.hosts[1].with_volume(
        vol["uuid"], "import subprocess, sys; subprocess.run(['qemu-img', 'info', '--output', "
        "'json', sys.argv[1]], check=True)", read_only=True))
    assert info["format"] == "qcow2" and info["virtual-size"] == 20 * GiB


def test_list_filters(cluster: Cluster) -> None:
    w = cluster.first
    image = str(uuid.uuid4())
    a = w.cli_json("volume", "create", "--size", "1G", "--image", image, "--tag", "vm=a")
    b = w.cli_json("volume", "create", "--size", "1G", "--image", image, "--tag", "vm=b")
    c = w.cli_json("volume", "create", "--size", "1G", "--tag", "vm=a")
    reader = cluster.hosts[1]
    assert {v["uuid"] for v in reader.cli_json("volume", "list")} == \
        {a["uuid"], b["uuid"], c["uuid"]}
    assert {v["uuid"] for v in reader.cli_json("volume", "list", "--image", image)} == \
        {a["uuid"], b["uuid"]}
    assert {v["uuid"] for v in reader.cli_json("volume", "list", "--tag", "vm=a")} == \
        {a["uuid"], c["uuid"]}
    assert reader.cli_json("volume", "list", "--tag", "vm=zzz") == []
    table = reader.cli("volume", "list").stdout
    assert a["uuid"] in table and "vm=a" in table and "CAPACITY" in table


def test_extend_relative_and_absolute(cluster: Cluster) -> None:
    w = cluster.first
    vol = w.cli_json("volume", "create", "--size", "1G")["uuid"]
    assert w.cli_json("volume", "extend", vol, "--size", "+1G")["capacity"] == 2 * GiB
    assert w.cli_json("volume", "extend", vol, "--size", "3G")["capacity"] == 3 * GiB
    assert w.cli_json("volume", "extend", vol, "--size", "3G")["capacity"] == 3 * GiB  # no-op
    assert cluster.raw_lvm().lv(cluster.name, vol).size == 3 * GiB
    before = cluster.disk_state()
    proc = w.cli("volume", "extend", vol, "--size", "2G", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"sharedlvm: volume {vol} is {3 * GiB} bytes; it cannot "
                                   f"shrink to {2 * GiB}")
    assert cluster.disk_state() == before


def test_extend_qcow2_grows_virtual_size(cluster: Cluster) -> None:
    w = cluster.first
    vol = w.cli_json("volume", "create", "--size", "2G", "--format", "qcow2")["uuid"]
    out = w.cli_json("volume", "extend", vol, "--size", "+3G")
    assert out["capacity"] == 5 * GiB
    info = json.loads(cluster.hosts[1].with_volume(
        vol, "import subprocess, sys; subprocess.run(['qemu-img', 'info', '--output', "
        "'json', sys.argv[1]], check=True)", read_only=True))
    assert info["virtual-size"] == 5 * GiB


def test_delete(cluster: Cluster) -> None:
    w = cluster.first
    vol = w.cli_json("volume", "create", "--size", "1G")["uuid"]
    w.cli("volume", "delete", vol)
    assert vol not in {lv.name for lv in cluster.raw_lvm().lvs(cluster.name)}
    proc = w.cli("volume", "delete", vol, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"sharedlvm: volume {vol} not found in domain dom1"


def test_delete_wipe_zeroes_the_extents(cluster: Cluster) -> None:
    w = cluster.first
    vol = w.cli_json("volume", "create", "--size", "1G")["uuid"]
    lvm = cluster.raw_lvm()
    lv = lvm.lv(cluster.name, vol)
    extent = int(lv.devices.split("(")[1].rstrip(")"))
    offset = lvm.pvs([cluster.luns[0]])[0].pe_start + extent * lvm.vg(cluster.name).extent_size
    w.with_volume(vol, "import os, sys\n"
                  "with open(sys.argv[1], 'r+b') as f:\n"
                  "    f.write(b'secret' * 1000); f.seek(int(sys.argv[2]) - 4096)\n"
                  "    f.write(b'tail-secret'); f.flush(); os.fsync(f.fileno())\n", str(GiB))
    with open(cluster.luns[0], "rb") as f:
        f.seek(offset)
        assert f.read(6) == b"secret"
    w.cli("volume", "delete", vol, "--wipe")
    assert vol not in {lv.name for lv in lvm.lvs(cluster.name)}
    with open(cluster.luns[0], "rb") as f:
        f.seek(offset)
        assert f.read(8192) == b"\0" * 8192
        f.seek(offset + GiB - 4096)
        assert f.read(4096) == b"\0" * 4096


def test_delete_discard_frees_the_extents(cluster: Cluster) -> None:
    """--discard: blkdiscard of the volume before its extents are freed. On the loop
    bed the LUN is a sparse file: discarded extents are holes again (fewer blocks
    allocated, reading zeroes)."""
    w = cluster.first
    vol = w.cli_json("volume", "create", "--size", "1G")["uuid"]
    lvm = cluster.raw_lvm()
    extent = int(lvm.lv(cluster.name, vol).devices.split("(")[1].rstrip(")"))
    offset = lvm.pvs([cluster.luns[0]])[0].pe_start + extent * lvm.vg(cluster.name).extent_size
    w.with_volume(vol, "import os, sys\n"
                  "with open(sys.argv[1], 'r+b') as f:\n"
                  "    f.write(b'secret' + os.urandom(32 << 20)); f.flush()\n"
                  "    os.fsync(f.fileno())\n")
    lun_file = cluster.bed.luns[0].file
    before = os.stat(lun_file).st_blocks * 512
    w.cli("volume", "delete", vol, "--discard")
    assert vol not in {lv.name for lv in lvm.lvs(cluster.name)}
    assert before - os.stat(lun_file).st_blocks * 512 >= 32 * 1024**2
    with open(cluster.luns[0], "rb") as f:
        f.seek(offset)
        assert f.read(8192) == b"\0" * 8192


@pytest.mark.parametrize("size, message", [
    ("0", "must be larger than 0"),
    ("-1G", "invalid size"),
    ("ten", "invalid size"),
    ("1.3", "not a whole number of bytes"),
    ("100T", "not enough free space in domain dom1"),
])
def test_create_bad_size_changes_nothing(cluster: Cluster, size: str, message: str) -> None:
    before = cluster.disk_state()
    proc = cluster.first.cli("volume", "create", f"--size={size}", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert cluster.disk_state() == before


@pytest.mark.parametrize("args, message", [
    (["volume", "info", "not-a-uuid"], "invalid volume id"),
    (["volume", "info", "00000000-0000-0000-0000-000000000000"], "not found in domain"),
    (["volume", "extend", "00000000-0000-0000-0000-000000000000", "--size", "+1G"],
     "not found in domain"),
    (["volume", "delete", "00000000-0000-0000-0000-000000000000"], "not found in domain"),
    (["volume", "delete", "journal"], "invalid volume id"),
    (["volume", "create", "--size", "1G", "--image", "x"], "invalid image id"),
    (["volume", "create", "--size", "1G", "--tag", "novalue"], "use key=value"),
    (["volume", "create", "--size", "1G", "--tag", "bad key=v"], "invalid tag key"),
    (["volume", "create", "--size", "1G", "--tag", "k=" + "x" * 200], "too long"),
    (["volume", "create", "--size", "1G", "--format", "vmdk"], "invalid choice"),
    (["volume", "create", "--size", "1G", "--alloc", "thin"], "thin needs qcow2"),
    (["volume", "create", "--size", "1G", "--request-id", "a b"], "invalid request id"),
    (["volume", "delete", "00000000-0000-0000-0000-000000000000", "--wipe", "--discard"],
     "give one of --wipe and --discard"),
])
def test_bad_input_changes_nothing(cluster: Cluster, args: list[str], message: str) -> None:
    before = cluster.disk_state()
    proc = cluster.first.cli(*args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert cluster.disk_state() == before


def test_request_id_create_is_idempotent(cluster: Cluster) -> None:
    w = cluster.first
    first = w.cli_json("volume", "create", "--size", "1G", "--request-id", "req-1")
    again = w.cli_json("volume", "create", "--size", "1G", "--request-id", "req-1")
    assert first == again
    assert len(w.cli_json("volume", "list")) == 1
    # a different operation may not reuse the id
    proc = w.cli("volume", "delete", first["uuid"], "--request-id", "req-1", check=False)
    assert proc.returncode == 1 and "already used for another request (create)" in proc.stderr


def test_request_id_extend_and_delete_are_idempotent(cluster: Cluster) -> None:
    w = cluster.first
    vol = w.cli_json("volume", "create", "--size", "1G")["uuid"]
    for _ in range(3):
        out = w.cli_json("volume", "extend", vol, "--size", "+1G", "--request-id", "ext-1")
        assert out["capacity"] == 2 * GiB
    assert cluster.raw_lvm().lv(cluster.name, vol).size == 2 * GiB
    one = w.cli_json("volume", "delete", vol, "--request-id", "del-1")
    two = w.cli_json("volume", "delete", vol, "--request-id", "del-1")
    assert one == two == {"uuid": vol, "deleted": True}


def _journal(cluster: Cluster) -> ondisk.BlockFile:
    """The journal opened directly, as a manager that crashed mid-request left it."""
    return ondisk.BlockFile(cluster.first.domain().special_path("journal"), writable=True)


def test_request_interrupted_after_commit_rolls_forward(cluster: Cluster) -> None:
    """The manager died after lvcreate but before recording the result: repeating the
    request finds the pending intent and finishes it, without a second volume."""
    vol, image = str(uuid.uuid4()), str(uuid.uuid4())
    args = {"volume": vol, "image": image, "size": GiB, "format": "raw",
            "alloc": "preallocated", "tags": {}}
    with _journal(cluster) as dev:
        journal.RequestLog(dev).put(journal.RequestRecord("crashed-1", "create", "pending",
                                                          args=args))
    lvm = make_lvm(cluster.first.paths, Runner(), cluster.luns, writable=True)
    lvm.lvcreate(cluster.name, vol, GiB, [tags.make_tag("image", image),
                                          tags.make_tag("state", "ready")])
    # The manager that did that "died": a new term begins (the new manager reads the
    # VG as it finds it, and finishes the pending request at takeover).
    cluster.new_manager_term()
    out = cluster.first.cli_json("volume", "create", "--size", "5G",
                                  "--request-id", "crashed-1")
    assert out["uuid"] == vol and out["capacity"] == GiB
    assert [v["uuid"] for v in cluster.first.cli_json("volume", "list")] == [vol]
    with _journal(cluster) as dev:
        rec = journal.RequestLog(dev).find("crashed-1")
    assert rec is not None and rec.state == "done"


def test_request_interrupted_before_commit_rolls_forward(cluster: Cluster) -> None:
    vol = str(uuid.uuid4())
    args = {"volume": vol, "image": str(uuid.uuid4()), "size": 2 * GiB, "format": "raw",
            "alloc": "preallocated", "tags": {}}
    # The term is read before the record is written: a takeover at any point after this
    # (which recovers the pending record, finds nothing done and aborts it) shows as a
    # new generation below.
    gen = cluster.first.cli_json("manager", "status")["generation"]
    with _journal(cluster) as dev:
        journal.RequestLog(dev).put(journal.RequestRecord("crashed-2", "create", "pending",
                                                          args=args))
    out = cluster.first.cli_json("volume", "create", "--size", "1G",
                                  "--request-id", "crashed-2")
    if cluster.first.cli_json("manager", "status")["generation"] == gen:
        assert out["uuid"] == vol and out["capacity"] == 2 * GiB  # the recorded intent wins
    else:  # a takeover in between found nothing of it done, aborted it: asked anew
        assert out["uuid"] != vol and out["capacity"] == GiB


def test_failed_request_answers_the_same_error(cluster: Cluster) -> None:
    w = cluster.first
    one = w.cli("volume", "create", "--size", "100T", "--request-id", "big", check=False)
    two = w.cli("volume", "create", "--size", "100T", "--request-id", "big", check=False)
    assert one.returncode == two.returncode == 1
    assert one.stderr == two.stderr and "not enough free space" in one.stderr
    # the same id for another request is refused, never answered with the first's
    other = w.cli("volume", "create", "--size", "1G", "--request-id", "big", check=False)
    assert other.returncode == 1 and "already used for another request" in other.stderr
    assert w.cli_json("volume", "list") == []
    # a final error (the volume does not exist) is recorded and answered again, even
    # once a volume of that name would exist
    gone = "0" * 8 + "-0000-4000-8000-" + "0" * 12
    first = w.cli("volume", "delete", gone, "--request-id", "del-gone", check=False)
    again = w.cli("volume", "delete", gone, "--request-id", "del-gone", check=False)
    assert first.returncode == again.returncode == 1
    assert first.stderr == again.stderr == \
        f"sharedlvm: volume {gone} not found in domain {cluster.name}\n"


def test_multi_segment_volume_listed_once(cluster: Cluster) -> None:
    w = cluster.first
    first = w.cli_json("volume", "create", "--size", "1G")["uuid"]
    w.cli("volume", "create", "--size", "1G")
    w.cli("volume", "extend", first, "--size", "+1G")  # now two segments
    assert [v["uuid"] for v in w.cli_json("volume", "list")].count(first) == 1
    w.cli("volume", "delete", first)
    assert first not in {lv.name for lv in cluster.raw_lvm().lvs(cluster.name)}
