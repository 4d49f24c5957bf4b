"""Shared fixtures. Integration fixtures need root, loop devices and LVM; they always
clean up what they made (sim down detaches exactly the bed's loop devices)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from bed import Cluster, destroy_cluster, make_cluster


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="integration tests need root (loop devices, LVM)")
    for item in items:
        if "integration" in item.keywords or "vm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """3 hosts on one 20 GiB LUN; host 1 formatted the domain and is its writer.
    Parametrize indirectly with a sector size to get a 4 KiB LUN."""
    sector_size = getattr(request, "param", 512)
    c = make_cluster(tmp_path / "bed", hosts=3, sector_size=sector_size)
    try:
        yield c
    finally:
        destroy_cluster(c)


@pytest.fixture
def empty_bed(tmp_path: Path) -> Iterator[Cluster]:
    """2 hosts on one LUN with no domain yet."""
    c = make_cluster(tmp_path / "bed", hosts=2, attach=False)
    try:
        yield c
    finally:
        destroy_cluster(c)
