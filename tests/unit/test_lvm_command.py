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


def test_config_manager() -> None:
    text = _config(True, activation=False).text()
    assert "locking_type" not in text
    assert "activation = 0" in text and "backup = 0" in text and "archive = 0" in text


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
    ('  Logical volume x not found in volume group vg.', errors.VolumeNotFound),  # lvextend
    ('  Volume group "vg" not found\n  Cannot process volume group vg', errors.DomainNotFound),
    ("  Something else entirely", errors.LvmError),
])
def test_map_error(stderr: str, cls: type[errors.Error]) -> None:
    err = _map_error(errors.CommandError(["lvm", "lvcreate"], 5, "", stderr))
    assert type(err) is cls
    assert "\n" not in str(err)


# Real stderr of LVM 2.03.16 (Debian 12), produced with LVM_SYSTEM_DIR pointing to an
# empty lvm.conf; the last one on a kernel without device-mapper, activation on.
NO_DM_LVCREATE = (
    "  /dev/mapper/control: open failed: No such device\n"
    "  Failure to communicate with kernel device-mapper driver.\n"
    "  Check that device-mapper is available in the kernel.\n"
    "  Incompatible libdevmapper 1.02.185 (2022-05-18) and kernel driver (unknown version).\n"
    "  striped: Required device-mapper target(s) not detected in your kernel.\n"
    "  Run `lvcreate --help' for more information.\n")


# (command, its stderr, the line that says what went wrong)
SAMPLES = [
    ("lvcreate -n x -L 1G vg", NO_DM_LVCREATE,
     "striped: Required device-mapper target(s) not detected in your kernel."),
    ("lvcreate --bogus-option",
     "lvcreate: unrecognized option '--bogusoption'\n"
     "  Error during parsing of command line.\n",
     "lvcreate: unrecognized option '--bogusoption'"),
    ("lvcreate -L 1x vg",
     "  Can't parse size argument.\n"
     "  Invalid argument for --size: 1x\n"
     "  Error during parsing of command line.\n",
     "Invalid argument for --size: 1x"),
    ("lvcreate -L 1G --type bogus vg",
     "  WARNING: Unrecognised segment type bogus\n"
     "  Invalid argument for --type: bogus\n"
     "  Error during parsing of command line.\n",
     "Invalid argument for --type: bogus"),
    ("lvcreate -L 1G",
     "  No command with matching syntax recognised.  Run 'lvcreate --help' for more "
     "information.\n"
     "  Nearest similar command has syntax:\n",
     "No command with matching syntax recognised."),
    ("lvremove",
     "  No command with matching syntax recognised.  Run 'lvremove --help' for more "
     "information.\n"
     "  Correct command syntax is:\n",
     "No command with matching syntax recognised."),
    ("nosuchcmd", "  No such command.  Try 'lvm help'.\n", "No such command.  Try 'lvm help'."),
    ("lvchange -ay vg/x",
     '  Volume group "vg" not found\n  Cannot process volume group vg\n',
     "Cannot process volume group vg"),
]


@pytest.mark.parametrize("argv, stderr, line", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_last_line_says_what_went_wrong(argv: str, stderr: str, line: str) -> None:
    exc = errors.CommandError(["lvm", *argv.split()], 3, "", stderr)
    assert exc.last_line() == line
    assert "--help" not in str(exc) and "\n" not in str(exc)


def test_last_line_falls_back_to_what_there_is() -> None:
    def last(stderr: str) -> str:
        return errors.CommandError(["lvm", "lvs"], 5, "", stderr).last_line()

    assert last("") == ""
    assert last("  WARNING: only a warning\n") == "WARNING: only a warning"
    assert last("  Run `lvs --help' for more information.\n") == \
        "Run `lvs --help' for more information."
    assert last("oops\n\n  WARNING: later\n") == "oops"


def test_lvm_error_without_device_mapper_names_the_reason() -> None:
    """What `domain create` printed on a kernel without device-mapper (issue 9 item
    13): "lvcreate: Run `lvcreate --help' for more information." """
    err = _map_error(errors.CommandError(["lvm", "lvcreate"], 3, "", NO_DM_LVCREATE))
    assert type(err) is errors.LvmError
    assert str(err) == ("lvcreate: striped: Required device-mapper target(s) not detected "
                        "in your kernel.")
