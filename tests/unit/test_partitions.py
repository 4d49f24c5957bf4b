"""partitions.members on a sysfs tree laid out as the kernel lays it out (a fake
/sys/class/block in tmp_path): kernel partitions of a disk, and kpartx's partitions
of a device-mapper multipath LUN (holders whose DM UUID is part<N>-<the LUN's>)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sharedlvm import partitions
from sharedlvm.command import Result, Runner


class _Recorder(Runner):
    """Records argv lists and runs nothing (a unit test touches no device)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    def run(self, argv, **kwargs):  # type: ignore[no-untyped-def, override]
        self.calls.append(list(argv))
        return Result(list(argv), 0, "", "", 0.0)


def test_recorder_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "made"
    _Recorder().run(["touch", str(marker)])
    assert not marker.exists()


def _dm(root: Path, kernel: str, name: str, uuid: str, holders: tuple[str, ...] = ()) -> None:
    (root / kernel / "dm").mkdir(parents=True)
    (root / kernel / "dm" / "name").write_text(name + "\n")
    (root / kernel / "dm" / "uuid").write_text(uuid + "\n")
    (root / kernel / "holders").mkdir()
    for holder in holders:
        (root / kernel / "holders" / holder).mkdir()


@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "sys-class-block"
    root.mkdir()
    monkeypatch.setattr(partitions, "SYS_BLOCK", root)
    return root


def test_kernel_partitions_in_order(sysfs: Path) -> None:
    for name, number in (("sdb10", 10), ("sdb2", 2), ("sdb1", 1)):
        (sysfs / "sdb" / name).mkdir(parents=True)
        (sysfs / "sdb" / name / "partition").write_text(f"{number}\n")
    (sysfs / "sdb" / "queue").mkdir()  # not a partition
    assert partitions.members("/dev/sdb") == ["/dev/sdb1", "/dev/sdb2", "/dev/sdb10"]
    assert partitions.members("/dev/sdc") == ["/dev/sdc"]  # unknown: itself


def test_kpartx_partitions_of_a_multipath_lun(sysfs: Path) -> None:
    lun = "mpath-3600a0b80001"
    # dm-3 and dm-5 are its partitions (delimiters differ: kpartx versions, -p);
    # dm-4 is an LV on top of it (an LVM UUID), dm-6 a partition of another LUN.
    _dm(sysfs, "dm-0", "3600a0b80001", lun, ("dm-3", "dm-4", "dm-5", "dm-6"))
    _dm(sysfs, "dm-3", "3600a0b80001-part2", f"part2-{lun}")
    _dm(sysfs, "dm-5", "3600a0b80001p1", f"part1-{lun}")
    _dm(sysfs, "dm-4", "vg-lv", "LVM-abcdef")
    _dm(sysfs, "dm-6", "other-part1", "part1-mpath-other")
    assert partitions.members("/dev/dm-0") == ["/dev/mapper/3600a0b80001p1",
                                               "/dev/mapper/3600a0b80001-part2"]
    _dm(sysfs, "dm-9", "plain", "")  # a map without a UUID has no kpartx partitions
    assert partitions.members("/dev/dm-9") == ["/dev/dm-9"]


@pytest.mark.parametrize("udev", [True, False])
def test_reread_uses_kpartx_for_device_mapper(sysfs: Path, udev: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partitions, "udev_running", lambda: udev)
    _dm(sysfs, "dm-0", "mpatha", "mpath-x", ("dm-1",))
    _dm(sysfs, "dm-1", "mpatha1", "part1-mpath-x")
    (sysfs / "sdb").mkdir()
    runner = _Recorder()
    partitions.reread(runner, "/dev/dm-0")
    partitions.reread(runner, "/dev/dm-1")  # a partition itself: nothing to do
    partitions.reread(runner, "/dev/sdb")
    assert runner.calls == [["kpartx", "-a", "-s", "/dev/dm-0"],
                            *([] if udev else [["dmsetup", "mknodes"]]),
                            ["partx", "--update", "/dev/sdb"]]
