"""Copies (issue 10): full clones, uploads and downloads, run by the asking host's
daemon through a copier process that holds the leases while real qemu-img copies.

What is asserted is on the disk: the content read back through sharedlvm against the
source (``qemu-img compare``), the LV's state tag, the target left ``creating`` by a
killed copier and removed by the next manager, nothing changed by a refused copy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from bed import Cluster

from sharedlvm import errors
from sharedlvm import requests as rq

pytestmark = pytest.mark.integration

MiB = 1024**2


def lv_of(c: Cluster, volume: str) -> Any:
    for vg in c.raw_lvm().vgs():
        for lv in c.raw_lvm().lvs(vg.name):
            if lv.name == volume:
                return lv
    return None


def state_of(c: Cluster, volume: str) -> str | None:
    lv = lv_of(c, volume)
    if lv is None:
        return None
    return next(t.split("=", 1)[1] for t in lv.tags if t.startswith("sl.state="))


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                          text=True).stdout


def compare(host: Any, volume: str, fmt: str, other: Path, other_fmt: str) -> None:
    """The volume's content (read on ``host`` under a shared lease) equals ``other``."""
    host.cli("run", "--volume", f"{volume}:ro", "--", "qemu-img", "compare", "-f", fmt,
             "-F", other_fmt, "{0}", str(other))


def test_upload_clone_download_round_trip(cluster: Cluster, tmp_path: Path) -> None:
    h1, h2, h3 = cluster.hosts
    src = tmp_path / "cloud.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "1536M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8M", "-c",
                    "write -P 0xc3 1400M 4M", str(src)], check=True, capture_output=True)

    # Import on a host that is not manager: reserved and published by the manager,
    # copied here.
    vol = h2.cli_json("volume", "upload", str(src))
    assert (vol["format"], vol["alloc"], vol["state"], vol["capacity"]) == (
        "qcow2", "thin", "ready", 1536 * MiB)
    assert state_of(cluster, vol["uuid"]) == "ready"
    # Thin: the LV holds what qemu-img measured (12 MiB of data) and room for first
    # writes (1 GiB, as a new thin volume), never the whole capacity's worth.
    assert vol["size"] < 1536 * MiB - 128 * MiB
    compare(h3, vol["uuid"], "qcow2", src, "qcow2")

    # A snapshot on top, more data in it; then a full clone of the chain as raw,
    # asked on host 1: one independent volume, flattened.
    top = h2.cli_json("volume", "snapshot", vol["uuid"])
    h2.cli("run", "--image", vol["image"], "--", "qemu-io", "-f", "qcow2", "-c",
           "write -P 0x77 100M 2M", "{0}")
    clone = h1.cli_json("volume", "clone", top["uuid"], "--format", "raw", "--request-id",
                        "clone-1")
    assert clone["image"] not in (vol["image"], top["image"])
    assert (clone["parent"], clone["format"], clone["role"], clone["state"]) == (
        None, "raw", "leaf", "ready")
    assert clone["capacity"] == 1536 * MiB
    copies_dir = h1.paths.run_dir / cluster.name / "copies"
    assert not copies_dir.exists() or not list(copies_dir.iterdir())  # links removed

    # Download of the chain (flattened) on host 3, compared with the clone and the
    # source's data.
    out = tmp_path / "top.raw"
    got = h3.cli_json("volume", "download", top["uuid"], str(out), "--format", "raw")
    assert (got["file"], got["format"]) == (str(out), "raw")
    compare(h1, clone["uuid"], "raw", out, "raw")
    read = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 0 8M", "-c",
                           "read -P 0x77 100M 2M", "-c", "read -P 0xc3 1400M 4M", "-c",
                           "read -P 0 8M 92M", str(out)], check=True, capture_output=True,
                          text=True).stdout
    assert "Pattern verification failed" not in read and read.count("read ") == 4
    # The clone is independent: writable, no children on the source.
    h2.cli("run", "--volume", clone["uuid"], "--", "true")
    h1.cli("volume", "delete", top["uuid"])
    # Asked again after its source is gone: the first answer, from the journal.
    again = h3.cli_json("volume", "clone", top["uuid"], "--format", "raw", "--request-id",
                        "clone-1")
    assert again["uuid"] == clone["uuid"]

    # Refused, one line each, nothing changed on the disk.
    before = cluster.disk_state()
    assert "not found" in h2.refused("volume", "upload", str(tmp_path / "missing.img"))
    child = tmp_path / "child.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(src), "-F", "qcow2", str(child))
    assert "backing file" in h2.refused("volume", "upload", str(child))
    vmdk = tmp_path / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(vmdk), "16M")
    assert "vmdk" in h2.refused("volume", "upload", str(vmdk))
    broken = tmp_path / "broken.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(broken), "64M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 8M", str(broken)], check=True,
                   capture_output=True)
    os.truncate(broken, 1024**2)  # its data clusters cut off: qemu-img check errors
    assert "damaged qcow2" in h2.refused("volume", "upload", str(broken))
    assert "exists" in h3.refused("volume", "download", vol["uuid"], str(src))
    assert "preallocated" in h1.refused("volume", "clone", vol["uuid"], "--format", "raw",
                                     "--alloc", "thin")
    assert "preallocated" in h2.refused("volume", "upload", str(src), "--format", "raw",
                                     "--alloc", "thin")
    # A source a consumer writes (its leaf held exclusively on host 1) is not copied.
    consumer = h1.popen("run", "--volume", clone["uuid"], "--", "sleep", "60")
    try:
        deadline = time.monotonic() + 30
        while clone["uuid"] not in h1.status().get("prepared", {}) and \
                1 not in _holders(h1, clone["uuid"]):
            assert time.monotonic() < deadline, "the consumer did not start"
            time.sleep(0.2)
        assert "held" in h2.refused("volume", "clone", clone["uuid"])
        assert "held" in h3.refused("volume", "download", clone["uuid"],
                                 str(tmp_path / "x.raw"))
        assert not (tmp_path / "x.raw").exists()
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(timeout=30)
    assert cluster.disk_state() == before


def test_full_clone_of_a_10_percent_full_disk_writes_its_data_only(cluster: Cluster) -> None:
    """Sparse-aware: a 1 GiB disk with 104 MiB of data is cloned by writing about that
    much (sectors written to the LUN, from the kernel's own counters), not 1 GiB."""
    h1, h2, _ = cluster.hosts
    src = h1.cli_json("volume", "create", "--size", "1G", "--format", "qcow2")
    writes = [f"write -P 0x{i % 250 + 1:02x} {i * 40}M 4M" for i in range(26)]
    h1.cli("run", "--volume", src["uuid"], "--", "qemu-io", "-f", "qcow2",
           *[x for w in writes for x in ("-c", w)], "{0}")
    stat = Path(f"/sys/block/{Path(cluster.luns[0]).name}/stat")

    def written() -> int:
        return int(stat.read_text().split()[6]) * 512

    before = written()
    clone = h2.cli_json("volume", "clone", src["uuid"], "--format", "qcow2")
    data = 26 * 4 * MiB
    assert data <= written() - before <= data * 1.1 + 16 * MiB, written() - before
    assert clone["format"] == "qcow2" and clone["state"] == "ready"


def _inquire(host: Any, pid: int) -> Any:
    """The leases process ``pid`` of ``host`` holds, asked of that host's sanlock (in a
    process of its own: libsanlock keeps the first run dir a process used)."""
    code = ("import json, sys; from pathlib import Path; from sharedlvm import leases; "
            "leases.use_run_dir(Path(sys.argv[1])); "
            "print(json.dumps([[h.resource, h.shared] for h in "
            "leases.inquire(pid=int(sys.argv[2]))]))")
    out = subprocess.run([sys.executable, "-c", code, str(host.paths.sanlock_run_dir),
                          str(pid)], check=True, capture_output=True, text=True,
                         env=host.env).stdout
    return json.loads(out)


def _holders(host: Any, volume: str) -> list[int]:
    """Who holds ``volume``'s lease, as ``image info`` says (from the leases on disk)."""
    image = host.cli_json("volume", "info", volume)["image"]
    return list(host.cli_json("image", "info", image)["holders"].get(volume, []))


@pytest.fixture
def slow_copies(cluster: Cluster) -> Any:
    """Host 2's daemon restarted with copies limited to 2 MiB/s (a copy of 16 MiB
    takes 8 s: long enough to look at it under any load)."""
    h2 = cluster.hosts[1]
    config = h2.paths.config_dir / "daemon.toml"
    config.write_text(f"[daemon]\ncopy_rate = {2 * MiB}\n")
    h2.restart_daemon()
    try:
        yield cluster
    finally:
        config.unlink()
        h2.restart_daemon()


def _upload_in_thread(host: Any, src: Path, request_id: str) -> tuple[threading.Thread,
                                                                        dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["volume"] = host.client.upload_volume(src, request_id=request_id)
        except errors.Error as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _running_copy(host: Any, job: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for copy in host.status().get("copies", []):
            if copy["job"] == job and copy["target"] and copy["percent"] > 0:
                return dict(copy)
        time.sleep(0.1)
    raise AssertionError(f"copy {job} never showed progress")


def test_killed_copier_leaves_the_target_for_the_retry(slow_copies: Cluster,
                                                       tmp_path: Path) -> None:
    cluster = slow_copies
    h1, h2, _ = cluster.hosts
    src = tmp_path / "data.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(16 * MiB))

    # Old data where the new volume's LV will be (LVM gives the lowest free extents):
    # the raw target is whole extents, larger than the 16 MiB copied, and its tail
    # must read zeroes, never a deleted volume's data (compare below checks it).
    junk = h1.cli_json("volume", "create", "--size", "512M")["uuid"]
    h1.with_volume(junk, "import os, sys\nwith open(sys.argv[1], 'r+b') as f:\n"
                   "    f.write(b'\\xee' * (512 << 20)); f.flush(); os.fsync(f.fileno())\n")
    h1.cli("volume", "delete", junk)

    thread, outcome = _upload_in_thread(h2, src, "up-1")
    copy = _running_copy(h2, "up-1")
    # Progress over the API: a percent, a rate, the copier's pid. (qemu-img's percent
    # runs ahead of writes it holds back for its rate limit: up to 100 here.)
    assert 0 < copy["percent"] <= 100 and copy["kind"] == "upload" and copy["pid"]
    assert copy["capacity"] == 16 * MiB and copy["bytes_per_second"] > 0
    target = copy["target"]
    assert state_of(cluster, target) == "creating"
    # The leases belong to the process that writes: qemu-img, the copier's child,
    # holds the target exclusive (an upload's source is a file: no lease).
    pid = copy["pid"]
    writers = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(writers) == 1
    assert Path(f"/proc/{writers[0]}/comm").read_text().strip() == "qemu-img"
    held = _inquire(h2, int(writers[0]))
    assert held == [[target, False]]
    os.killpg(copy["pid"], signal.SIGKILL)  # the copier and its qemu-img
    thread.join(timeout=60)
    assert "error" in outcome and not outcome["error"].final, outcome
    # Left creating for the retry, its lease free.
    assert state_of(cluster, target) == "creating"
    assert _holders(h1, target) == []
    # The manager publishes a target only while the copying host holds it.
    with pytest.raises(errors.LeaseError, match="not held by host 2"):
        h2.client.call(rq.PublishVolume(target, host_id=2, request_id="publish-x"))
    assert state_of(cluster, target) == "creating"

    # The retry with the same request id copies into the same target again.
    again = h2.client.upload_volume(src, request_id="up-1")
    assert again.uuid == target and state_of(cluster, target) == "ready"
    compare(h1, target, "raw", src, "raw")
    # Asked once more after it was done (and written to since): the same volume,
    # never copied over again.
    h1.cli("run", "--volume", target, "--", "qemu-io", "-f", "raw", "-c",
           "write -P 0xee 0 1M", "{0}")
    assert h2.client.upload_volume(src, request_id="up-1").uuid == target
    out = h1.cli("run", "--volume", f"{target}:ro", "--", "qemu-io", "-f", "raw", "-r",
                 "-c", "read -P 0xee 0 1M", "{0}").stdout
    assert "Pattern verification failed" not in out and "read 1048576/1048576" in out

    # A target nobody retries is removed by the next manager; the retry then says so.
    thread, outcome = _upload_in_thread(h2, src, "up-2")
    copy = _running_copy(h2, "up-2")
    os.killpg(copy["pid"], signal.SIGKILL)
    thread.join(timeout=60)
    assert state_of(cluster, copy["target"]) == "creating"
    h1.client.release_manager(cluster.name)
    deadline = time.monotonic() + 60
    while state_of(cluster, copy["target"]) is not None:
        assert time.monotonic() < deadline, "the new manager left the target"
        time.sleep(0.5)
    with pytest.raises(errors.NotFound, match="new request id"):
        h2.client.upload_volume(src, request_id="up-2")
