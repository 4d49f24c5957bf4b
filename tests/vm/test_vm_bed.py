"""Simulated hosts as qemu guests: one guest boots a real kernel with udev, the
shared LUN, device-mapper and a watchdog. What two guests do on one LUN (real
device-mapper on a read-only host, its LVM refused, sanlock on wdmd and softdog) is
in test_vm_refresh.py and test_vm_sim.py, on beds booted once per module.

Skipped, with the reason printed, when this machine cannot install or start qemu.
Timings (image, boot) are printed; run with -s.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sharedlvm.command import Runner
from sharedlvm_testbed.vmbed import (
    Guest,
    GuestImage,
    HostUnsupported,
    build_image,
    ensure_host_packages,
)

pytestmark = pytest.mark.vm

GiB = 1024**3
SRC_DIR = Path(__file__).resolve().parents[2] / "src"

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
