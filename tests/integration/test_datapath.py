"""The data path without device-mapper: an LV mapped by a loop device over its PV."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bed import Cluster

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("cluster", [512, 4096], indirect=True)
def test_write_on_one_host_read_on_another(cluster: Cluster) -> None:
    a, b = cluster.hosts[0], cluster.hosts[2]
    vol = a.cli_json("volume", "create", "--size", "1G")["uuid"]
    path_a = a.cli("volume", "path", vol).stdout.strip()
    path_b = b.cli("volume", "path", vol).stdout.strip()
    assert path_a != path_b  # each host has its own mapping, as with dm
    pattern = os.urandom(1024 * 1024)
    fd = os.open(path_a, os.O_WRONLY)
    try:
        os.pwrite(fd, pattern, 512 * 1024 * 1024)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(path_b, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, len(pattern))
        os.preadv(fd, [buf], 512 * 1024 * 1024)
        assert bytes(buf) == pattern
    finally:
        os.close(fd)
    sys_b = Path("/sys/block") / os.path.basename(path_b)
    sector = int((sys_b / "queue/logical_block_size").read_text())
    assert sector == cluster.bed.luns[0].sector_size
    size = int((sys_b / "size").read_text()) * 512
    assert size == 1024**3
    a.cli("volume", "deactivate", vol)
    assert not os.path.exists(f"/sys/block/{os.path.basename(path_a)}/loop")


def test_multi_segment_lv_is_refused_clearly(cluster: Cluster) -> None:
    w = cluster.writer
    first = w.cli_json("volume", "create", "--size", "1G")["uuid"]
    w.cli("volume", "create", "--size", "1G")  # takes the extents after `first`
    w.cli("volume", "extend", first, "--size", "+1G")  # now in two segments
    proc = cluster.hosts[1].cli("volume", "path", first, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"sharedlvm: dom1/{first} has 2 segments; without device-mapper only "
        "single-segment LVs can be mapped")


def test_extend_grows_active_device_on_refresh(cluster: Cluster) -> None:
    w, r = cluster.writer, cluster.hosts[1]
    vol = w.cli_json("volume", "create", "--size", "1G")["uuid"]
    path = r.cli("volume", "path", vol).stdout.strip()
    w.cli("volume", "extend", vol, "--size", "+1G")  # the last LV: stays one segment
    dev = os.path.basename(path)
    assert int(Path(f"/sys/block/{dev}/size").read_text()) * 512 == 1024**3  # not yet refreshed
    assert r.cli("volume", "path", vol).stdout.strip() == path  # same device, refreshed
    assert int(Path(f"/sys/block/{dev}/size").read_text()) * 512 == 2 * 1024**3
