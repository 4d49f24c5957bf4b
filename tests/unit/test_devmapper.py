from __future__ import annotations

import os

from sharedlvm import devmapper
from sharedlvm.lvm import Segment


def test_dm_name_doubles_hyphens() -> None:
    assert devmapper.dm_name("my-vg", "6d3c181d-b07b") == "my--vg-6d3c181d--b07b"


def test_linear_table_from_segments() -> None:
    rdev = os.stat("/dev/null").st_rdev
    major, minor = os.major(rdev), os.minor(rdev)
    extent = 128 * 1024 * 1024
    segments = [Segment(0, 8, "/dev/null", 10), Segment(8, 8, "/dev/null", 30)]
    table = devmapper.linear_table(segments, extent, {"/dev/null": 1024 * 1024})
    per_extent = extent // 512
    assert table.splitlines() == [
        f"0 {8 * per_extent} linear {major}:{minor} {2048 + 10 * per_extent}",
        f"{8 * per_extent} {8 * per_extent} linear {major}:{minor} {2048 + 30 * per_extent}",
    ]
