from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from sharedlvm import devmapper, domain
from sharedlvm.command import Runner
from sharedlvm.lvm import Segment
from sharedlvm.paths import HostPaths


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


# Device-mapper detection (issue 9 item 13): asked of the kernel, never taken from the
# existence of /dev/mapper/control, which any `lvm version` or `dmsetup` creates.

def test_dm_version_request_is_the_kernels_layout() -> None:
    assert devmapper.DM_VERSION == 0xC138FD00    # _IOWR(0xfd, 0, struct dm_ioctl)
    assert devmapper._DM_IOCTL.size == 312


def test_ioctl_version_on_another_device_fails() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            devmapper.ioctl_version(fd)
    finally:
        os.close(fd)
    assert info.value.errno == errno.ENOTTY


def _misc(tmp_path: Path, with_dm: bool) -> str:
    path = tmp_path / "misc"
    path.write_text(" 237 loop-control\n" + (" 236 device-mapper\n" if with_dm else "")
                    + "  57 snapshot-of-device-mapper\n")
    return str(path)


@pytest.mark.parametrize("answer, expected", [
    ((4, 48, 0), True),
    (OSError(errno.ENOTTY, "Inappropriate ioctl for device"), False),
    (OSError(errno.EACCES, "Permission denied"), False),
    ((5, 0, 0), False),
])
def test_an_existing_node_is_asked(tmp_path: Path, answer: object, expected: bool) -> None:
    control = tmp_path / "control"
    control.touch()
    asked: list[int] = []

    def version(fd: int) -> devmapper.Version:
        asked.append(fd)
        if isinstance(answer, OSError):
            raise answer
        assert isinstance(answer, tuple)
        return answer

    # The node decides, whatever /proc/misc says.
    for with_dm in (True, False):
        assert devmapper.ask_kernel(str(control), _misc(tmp_path, with_dm), version) \
            is expected
    assert len(asked) == 2


@pytest.mark.parametrize("with_dm", [True, False])
def test_without_a_node_the_misc_list_decides(tmp_path: Path, with_dm: bool) -> None:
    def version(fd: int) -> devmapper.Version:
        raise AssertionError("nothing to ask")

    for control in (tmp_path / "control", tmp_path / "no-such-dir" / "control"):
        assert devmapper.ask_kernel(str(control), _misc(tmp_path, with_dm), version) \
            is with_dm
    assert devmapper.misc_registered(str(tmp_path / "missing")) is False


def test_available_is_asked_once_and_chooses_activation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answers: list[bool] = []

    def ask() -> bool:
        answers.append(answer)
        return answer

    monkeypatch.setattr(devmapper, "ask_kernel", ask)
    try:
        for answer in (True, False):
            devmapper.available.cache_clear()
            for _ in range(3):
                lvm = domain.make_lvm(HostPaths(tmp_path), Runner(), ["/dev/loop0"], False)
                assert lvm.config.activation is answer
                assert f"activation = {int(answer)}" in lvm.config.text()
        assert answers == [True, False]
    finally:
        devmapper.available.cache_clear()


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
@pytest.mark.skipif(devmapper.misc_registered(), reason="this kernel has device-mapper")
def test_a_control_node_is_not_device_mapper() -> None:
    """On a kernel without device-mapper (this project's test machines) a
    /dev/mapper/control node, as `lvm version` leaves it, changes nothing."""
    control = Path(devmapper.CONTROL)
    made_dir = made_node = False
    try:
        try:
            control.parent.mkdir(mode=0o755)
            made_dir = True
        except FileExistsError:
            pass
        try:
            os.mknod(control, 0o600 | stat.S_IFCHR, os.makedev(10, 236))
            made_node = True
        except FileExistsError:
            pass    # someone's lvm made it: the better test
        assert control.is_char_device()
        assert devmapper.ask_kernel() is False
    finally:
        if made_node:
            control.unlink()
        if made_dir:
            control.parent.rmdir()


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
@pytest.mark.skipif(devmapper.misc_registered(), reason="this kernel has device-mapper")
def test_a_private_control_node_is_not_device_mapper(tmp_path: Path) -> None:
    control = tmp_path / "control"
    os.mknod(control, 0o600 | stat.S_IFCHR, os.makedev(10, 236))
    assert devmapper.ask_kernel(str(control)) is False
