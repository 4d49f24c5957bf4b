"""Simulated hosts as qemu guests: real device-mapper activation on a shared LUN.

Two guests share one sparse LUN file. Host 1 (the writer) creates a VG and an LV,
activates it and writes a pattern; host 2, read-only through ``locking_type=4`` as
DESIGN.md rule 1 prescribes for non-managers, activates the same LV into a real
/dev/mapper device and reads the pattern back, and its lvcreate is refused. Then
host 2 starts wdmd on the softdog watchdog and a sanlock daemon on top of it.

Skipped, with the reason printed, when this machine cannot install or start qemu.
Timings (image, boot of 1 and of 2 guests, scenario) are printed; run with -s.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sharedlvm.command import Runner
from sharedlvm_testbed.vmbed import (
    Guest,
    GuestBed,
    GuestImage,
    HostUnsupported,
    build_image,
    ensure_host_packages,
)

pytestmark = pytest.mark.vm

GiB = 1024**3
VG = "vmbedvg"
LV = "lv0"
PATTERN_SIZE = 64 * 1024
SRC_DIR = Path(__file__).resolve().parents[2] / "src"

# What every guest's LVM needs without lvmetad, udev or a devices file: scan only the
# shared LUN, no udev device list or sync (nodes are made by libdevmapper), no hints
# file that could go stale when another host changes the VG.
_DEVICES = ('devices{filter=["a|^/dev/vda$|","r|.*|"] obtain_device_list_from_udev=0 '
            'hints="none" use_devicesfile=0 scan_lvs=0}')
_ACTIVATION = "activation{udev_sync=0 udev_rules=0 monitoring=0}"
WRITER_CONFIG = f"{_DEVICES} {_ACTIVATION} global{{use_lvmlockd=0}}"
# DESIGN.md rule 1: every non-manager runs LVM read-only.
READER_CONFIG = f"{_DEVICES} {_ACTIVATION} global{{use_lvmlockd=0 locking_type=4}}"

TIMINGS: dict[str, float] = {}


def _skip(reason: str) -> None:
    print(f"\nSKIP vm bed: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image() -> Iterator[GuestImage]:
    runner = Runner()
    started = time.monotonic()
    try:
        ensure_host_packages(runner)
        built = build_image(runner)
    except HostUnsupported as exc:
        _skip(f"cannot run qemu guests here: {exc}")
    TIMINGS["image (build or cache hit)"] = time.monotonic() - started
    yield built
    print("\nvm bed timings:", file=sys.stderr)
    for name, seconds in TIMINGS.items():
        print(f"  {name}: {seconds:.1f} s", file=sys.stderr)


@pytest.fixture
def lun(tmp_path: Path) -> Path:
    path = tmp_path / "lun.img"
    with path.open("wb") as f:
        f.truncate(2 * GiB)
    return path


def lvm(guest: Guest, config: str, *args: str, check: bool = True) -> tuple[int, str, str]:
    return guest.run(["lvm", args[0], "--config", config, *args[1:]], check=check)


def test_one_guest_boots_with_a_real_kernel(image: GuestImage, lun: Path,
                                            tmp_path: Path) -> None:
    # This one boots with udev (when the archive has the machine's systemd version),
    # which lvmlockd will need; the 2-guest scenario shows plain LVM needs no udev.
    guest = Guest("solo", image, lun, tmp_path / "solo", share_dir=SRC_DIR,
                  udev=image.has_udev)
    try:
        guest.start()
    except HostUnsupported as exc:
        _skip(str(exc))
    try:
        assert guest.boot_seconds is not None
        TIMINGS["boot 1 guest"] = guest.boot_seconds
        guest.run(["test", "-b", "/dev/vda"])
        guest.run(["test", "-c", "/dev/mapper/control"])
        guest.run(["test", "-c", "/dev/watchdog0"])
        _, out, _ = guest.run(["cat", "/sys/block/vda/serial"])
        assert out.strip() == "SAN0"
        if image.has_udev:
            guest.run(["test", "-b", "/dev/disk/by-id/virtio-SAN0"])
        # Project code reaches the guest through the writable 9p share.
        _, out, _ = guest.run(["python3", "-c", "import sharedlvm; print(sharedlvm.__name__)"])
        assert out.strip() == "sharedlvm"
    finally:
        guest.stop()
    assert not guest.is_running()


def test_writer_and_read_only_host_share_one_lun(image: GuestImage, lun: Path,
                                                 tmp_path: Path) -> None:
    started = time.monotonic()
    bed = GuestBed(2, lun, tmp_path / "bed", image=image, share_dir=SRC_DIR)
    try:
        bed.start()
    except HostUnsupported as exc:
        _skip(str(exc))
    try:
        assert bed.boot_seconds is not None
        TIMINGS["boot 2 guests in parallel"] = bed.boot_seconds
        writer, reader = bed[0], bed[1]
        scenario = time.monotonic()

        lvm(writer, WRITER_CONFIG, "pvcreate", "/dev/vda")
        lvm(writer, WRITER_CONFIG, "vgcreate", VG, "/dev/vda")
        lvm(writer, WRITER_CONFIG, "lvcreate", "-n", LV, "-L", "16m", VG)
        lvm(writer, WRITER_CONFIG, "lvchange", "-ay", f"{VG}/{LV}")
        pattern = (secrets.token_hex(8).encode() * (PATTERN_SIZE // 16))[:PATTERN_SIZE]
        writer.run(["dd", f"of=/dev/{VG}/{LV}", f"bs={PATTERN_SIZE}", "count=1",
                    "iflag=fullblock", "oflag=direct", "conv=fsync", "status=none"],
                   input=pattern)

        # The read-only host activates with real device-mapper and sees the data.
        lvm(reader, READER_CONFIG, "lvchange", "-ay", f"{VG}/{LV}")
        reader.run(["test", "-b", f"/dev/mapper/{VG}-{LV}"])
        _, table, _ = reader.run(["dmsetup", "table", f"{VG}-{LV}"])
        assert " linear " in table
        _, data, _ = reader.run(["dd", f"if=/dev/mapper/{VG}-{LV}", f"bs={PATTERN_SIZE}",
                                 "count=1", "iflag=direct", "status=none"])
        assert data == pattern.decode()

        # ... and cannot change metadata, whatever it runs.
        rc, _, err = lvm(reader, READER_CONFIG, "lvcreate", "-n", "intruder", "-L", "8m", VG,
                         check=False)
        assert rc != 0, "lvcreate with locking_type=4 must be refused"
        assert "read" in err.lower(), err
        _, out, _ = lvm(writer, WRITER_CONFIG, "lvs", "--noheadings", "-o", "lv_name", VG)
        assert out.split() == [LV]
        TIMINGS["LVM scenario on 2 guests"] = time.monotonic() - scenario

        # Self-fencing stack on the read-only host: softdog -> wdmd -> sanlock.
        fencing = time.monotonic()
        reader.run(["test", "-c", "/dev/watchdog0"])
        reader.run(["wdmd"])
        reader.run(["sanlock", "daemon", "-U", "root", "-G", "root"])
        reader.wait_ok(["sanlock", "client", "status"], timeout=30)
        TIMINGS["wdmd + sanlock start"] = time.monotonic() - fencing

        # Power loss of one host: its qemu is gone at once, the other host goes on.
        reader.power_off()
        assert not reader.is_running()
        _, out, _ = writer.run(["dd", f"if=/dev/{VG}/{LV}", f"bs={PATTERN_SIZE}", "count=1",
                                "iflag=direct", "status=none"])
        assert out == pattern.decode()
    finally:
        guests = list(bed.guests)
        stopping = time.monotonic()
        bed.stop()
        TIMINGS["stop 2 guests"] = time.monotonic() - stopping
    assert not any(guest.is_running() for guest in guests)
    TIMINGS["2-guest test wall time"] = time.monotonic() - started

