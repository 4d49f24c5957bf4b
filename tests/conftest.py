"""Shared fixtures. Integration fixtures need root, loop devices, LVM and sanlock; they
always clean up what they made (sim down stops daemons by pid and detaches exactly the
bed's loop devices)."""

from __future__ import annotations

import os
import sys
import time
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


def _shared(tmp_path_factory: pytest.TempPathFactory, sector_size: int) -> Iterator[Cluster]:
    c = make_cluster(tmp_path_factory.mktemp(f"bed{sector_size}") / "bed", hosts=3,
                     sector_size=sector_size)
    try:
        yield c
    finally:
        destroy_cluster(c)


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """3 hosts on one 512 B-sector LUN, each with sanlock and a sharedlvm daemon; host 1
    formatted the domain and is its manager. Shared by the whole session (joining a
    lockspace takes seconds); `cluster` empties it after each test."""
    yield from _shared(tmp_path_factory, 512)


@pytest.fixture(scope="session")
def shared_cluster_4k(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The same on a LUN with 4 KiB logical sectors."""
    yield from _shared(tmp_path_factory, 4096)


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A shared cluster, emptied of volumes after the test. Parametrize indirectly
    with 4096 for the 4 KiB-sector one."""
    name = "shared_cluster_4k" if getattr(request, "param", 512) == 4096 else "shared_cluster"
    c: Cluster = request.getfixturevalue(name)
    deadline = time.monotonic() + 90
    while c.manager() is not c.first:  # a test moved the role: give it back to host 1
        assert time.monotonic() < deadline, "host 1 did not get the manager role back"
        c.manager().client.release_manager(c.name)
        time.sleep(1)
    yield c
    c.clean()


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of its own, for tests that destroy or crash things."""
    c = make_cluster(tmp_path / "bed", hosts=3)
    try:
        yield c
    finally:
        destroy_cluster(c)


@pytest.fixture
def empty_bed(tmp_path: Path) -> Iterator[Cluster]:
    """2 host roots on one LUN with no domain and no services."""
    c = make_cluster(tmp_path / "bed", hosts=2, attach=False)
    try:
        yield c
    finally:
        destroy_cluster(c)
