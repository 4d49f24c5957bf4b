from __future__ import annotations

from pathlib import Path

import pytest

from sharedlvm import errors
from sharedlvm.command import RecordingRunner, Runner
from sharedlvm.lvm import LvmConfig, _map_error


def _config(writable: bool, activation: bool = True) -> LvmConfig:
    return LvmConfig(("/dev/disk/by-id/scsi-36001.a", "/dev/loop0"), writable,
                     Path("/h/etc/lvm"), Path("/h/run/lock"), activation)


def test_config_reader_is_read_only() -> None:
    text = _config(False).text()
    assert "locking_type = 4" in text
    assert "backup = 0" in text and "archive = 0" in text


def test_config_writer() -> None:
    text = _config(True, activation=False).text()
    assert "locking_type" not in text
    assert "activation = 0" in text and "backup = 1" in text


def test_config_filter_accepts_only_domain_pvs() -> None:
    text = _config(True).text()
    assert r'"a|^/dev/disk/by-id/scsi-36001\.a$|", "a|^/dev/loop0$|", "r|.*|"' in text
    assert 'hints = "none"' in text and "obtain_device_list_from_udev = 0" in text
    assert 'locking_dir = "/h/run/lock"' in text


def test_runner_failure_by_default() -> None:
    with pytest.raises(errors.CommandError) as info:
        Runner().run(["sh", "-c", "echo oops >&2; exit 3"])
    assert info.value.rc == 3 and info.value.err == "oops\n"
    assert Runner().run(["false"], check=False).rc == 1


def test_runner_timeout() -> None:
    with pytest.raises(errors.CommandTimeout):
        Runner().run(["sleep", "5"], timeout=0.2)


def test_runner_missing_command() -> None:
    with pytest.raises(errors.CommandError, match="not found"):
        Runner().run(["no-such-command-here"])


def test_recording_runner_records_and_runs() -> None:
    rec = RecordingRunner()
    assert rec.run(["echo", "hi"]).out == "hi\n"
    assert rec.calls == [["echo", "hi"]]


@pytest.mark.parametrize("stderr, cls", [
    ("  Operation prohibited while --readonly is set.\n  Can't get lock for vg.",
     errors.ReadOnlyDenied),
    ('  Volume group "vg" has insufficient free space (10 extents): 80 required.',
     errors.NoSpace),
    ('  Logical Volume "x" already exists in volume group "vg"', errors.AlreadyExists),
    ('  Failed to find logical volume "vg/x"', errors.VolumeNotFound),
    ('  Volume group "vg" not found\n  Cannot process volume group vg', errors.DomainNotFound),
    ("  Something else entirely", errors.LvmError),
])
def test_map_error(stderr: str, cls: type[errors.Error]) -> None:
    err = _map_error(errors.CommandError(["lvm", "lvcreate"], 5, "", stderr))
    assert type(err) is cls
    assert "\n" not in str(err)
