"""The data path without device-mapper: an LV mapped by a loop device over its PV."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bed import Cluster

pytestmark = pytest.mark.integration


WRITE = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
os.pwrite(fd, bytes.fromhex(sys.argv[2]) * 256, 512 * 1024 * 1024)
os.fsync(fd)
print(sys.argv[1])
"""

READ = """
import mmap, os, sys
from pathlib import Path
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 1024 * 1024)
os.preadv(fd, [buf], 512 * 1024 * 1024)
expected = bytes.fromhex(sys.argv[2]) * 256
block = Path("/sys/block") / os.path.basename(sys.argv[1])
try:
    wfd = os.open(sys.argv[1], os.O_WRONLY)
    os.pwrite(wfd, b"x" * 4096, 0)
    os.fsync(wfd)
    writable = True
except OSError:  # EPERM at write (or EACCES at open, on older kernels)
    writable = False
print(sys.argv[1], bytes(buf) == expected,
      (block / "queue/logical_block_size").read_text().strip(),
      int((block / "size").read_text()) * 512, writable)
"""


@pytest.mark.parametrize("cluster", [512, 4096], indirect=True)
def test_write_on_one_host_read_on_another(cluster: Cluster) -> None:
    """Each under the volume's lease: a writer on one host, then a reader under a
    shared lease on another, whose device is read-only; both devices go away when
    their consumers exit."""
    a, b = cluster.hosts[0], cluster.hosts[2]
    vol = a.cli_json("volume", "create", "--size", "1G")["uuid"]
    pattern = os.urandom(4096).hex()  # x 256: 1 MiB written and read back
    path_a = a.with_volume(vol, WRITE, pattern).strip()
    path_b, same, sector, size, writable = b.with_volume(vol, READ, pattern,
                                                         read_only=True).split()
    assert same == "True"
    assert int(sector) == cluster.bed.luns[0].sector_size
    assert int(size) == 1024**3
    assert writable == "False"  # a shared lease gets a read-only device
    # the writer's mapping is gone with its consumer (the reader's may stay: sanlock's
    # owners of a shared lease on disk can still name this host for a while)
    assert path_b != path_a or not os.path.exists(f"/sys/block/{os.path.basename(path_a)}/loop")


def test_multi_segment_lv_is_refused_clearly(cluster: Cluster) -> None:
    w = cluster.first
    first = w.cli_json("volume", "create", "--size", "1G")["uuid"]
    w.cli("volume", "create", "--size", "1G")  # takes the extents after `first`
    w.cli("volume", "extend", first, "--size", "+1G")  # now in two segments
    proc = cluster.hosts[1].cli("run", "--volume", first, "--", "true", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"sharedlvm: dom1/{first} has 2 segments; without device-mapper only "
        "single-segment LVs can be mapped")


def test_extend_grows_active_device_on_refresh(cluster: Cluster) -> None:
    w, r = cluster.first, cluster.hosts[1]
    vol = w.cli_json("volume", "create", "--size", "1G")["uuid"]
    with r.registered() as pid:
        path = r.cli("volume", "prepare", vol, "--pid", str(pid)).stdout.strip()
        w.cli("volume", "extend", vol, "--size", "+1G")  # the last LV: stays one segment
        dev = os.path.basename(path)
        assert int(Path(f"/sys/block/{dev}/size").read_text()) * 512 == 1024**3  # not yet
        again = r.cli("volume", "prepare", vol, "--pid", str(pid)).stdout.strip()
        assert again == path  # same device, refreshed
        assert int(Path(f"/sys/block/{dev}/size").read_text()) * 512 == 2 * 1024**3
        r.cli("volume", "teardown", vol)


def test_loop_device_left_read_only_is_writable_again(tmp_path: Path) -> None:
    """A block device's read-only flag (BLKROSET) outlives a loop detach: a loop
    device left read-only by whatever used it before (a shared lease's device
    detached by a crashed host's cleanup) must not make the next mapping refuse
    writes. Found as an EPERM on the journal at `domain create` in a CI run."""
    import subprocess

    from bed import scratch_lun

    from sharedlvm import ondisk
    from sharedlvm.command import Runner
    from sharedlvm.loopdev import LoopActivator
    from sharedlvm.lvm import EXTENT_SIZE

    def run(*argv: str) -> str:
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()

    with scratch_lun(tmp_path, 2 * 1024**3) as (lun, _reader, lvm):
        lvm.pvcreate([lun])
        lvm.vgcreate("rovg", [lun], [])
        lvm.lvcreate("rovg", "lv", EXTENT_SIZE, [])
        # The next free loop device, left read-only by its last user.
        scratch = tmp_path / "scratch.img"
        with open(scratch, "xb") as f:
            f.truncate(1024**2)
        stale = run("losetup", "--find", "--show", str(scratch))
        run("blockdev", "--setro", stale)
        run("losetup", "--detach", stale)
        assert run("blockdev", "--getro", stale) == "1"

        activator = LoopActivator(lvm, Runner(), tmp_path / "activations")
        device = activator.activate("rovg", "lv")
        try:
            assert device == stale  # the first free one
            with ondisk.BlockFile(device, writable=True) as dev:
                dev.write(0, b"\x01" * ondisk.BLOCK_SIZE)
            assert run("blockdev", "--getro", device) == "0"
        finally:
            activator.deactivate("rovg", "lv")
        lvm.vgremove("rovg")
