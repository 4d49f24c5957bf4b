"""``python -m sharedlvm_testbed.demo_vm``: watchdog self-fencing on two real kernels.

Boots two qemu guests on one LUN file (:mod:`sharedlvm_testbed.vmbed`), each running
wdmd and sanlock with the softdog watchdog. Host 1 holds a lease for a consumer that
keeps reading the LUN; then host 1 loses its lease storage. The demo prints when host 1
is reset by its watchdog and when host 2 takes the lease, which sanlock allows only
after its host-dead time (8 x io_timeout + 60 s = 84 s here): about a minute and a half.

Everything is cleaned up on the way out, failure or Ctrl-C included: the guests are
killed by pid and the LUN file and guest directories are removed.
Exit status: 0 if host 1 was fenced before host 2 took the lease, 1 if not,
2 if this machine cannot run qemu guests.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from sharedlvm.command import Runner

from .vmbed import GuestBed, HostUnsupported, build_image, ensure_host_packages
from .vmbed.fencing import STORAGE_RESOURCE, FencingScenario, FencingTimeline
from .vmbed.vmsim import package_share_dir

# Room for the lockspace, the leases and the consumer's reads (lease_guest layout).
LUN_SIZE = 256 * 1024 * 1024


def say(text: str) -> None:
    print(text, flush=True)


def run_demo(work_dir: Path) -> FencingTimeline:
    """Boot, prepare, lose host 1's storage and watch; guests killed on the way out."""
    runner = Runner()
    ensure_host_packages(runner)
    image = build_image(runner)
    lun = work_dir / "lun.img"
    with lun.open("wb") as f:
        f.truncate(LUN_SIZE)
    # The guests import sharedlvm and the test bed from the directory that holds both
    # packages (the 9p /project share), so they run exactly this checkout's code.
    bed = GuestBed(2, lun, work_dir / "bed", image=image, runner=runner,
                   share_dir=package_share_dir())
    try:
        say("booting 2 guests (qemu, real kernels with device-mapper and softdog)...")
        bed.start()
        say(f"booted in {bed.boot_seconds:.1f} s; starting wdmd + sanlock, joining "
            "the lockspace, host 1 takes the lease for its consumer...")
        started = time.monotonic()
        scenario = FencingScenario(bed, power_loss=False, echo=say)
        scenario.prepare()
        rule = scenario.timeline.host_dead_seconds
        say(f"ready in {time.monotonic() - started:.1f} s; host 2 now tries to take the "
            f"lease every 0.5 s. Losing host 1's lease storage (expect ~{rule} s):")
        return scenario.run()
    finally:
        # Power off, not shut down: host 1's storage is suspended and a clean
        # shutdown could hang on it. Guest.power_off kills by pid only.
        bed.power_off()
        lun.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sharedlvm_testbed.demo_vm",
        description="Watchdog self-fencing on two qemu guests sharing a LUN file: "
                    "host 1 loses its lease storage, is reset by its watchdog, and "
                    "host 2 takes its lease after sanlock's host-dead time (~2 min).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        with tempfile.TemporaryDirectory(prefix="sharedlvm-demo-vm-") as tmp:
            timeline = run_demo(Path(tmp))
    except HostUnsupported as exc:
        say(f"cannot run qemu guests on this machine: {exc}")
        return 2
    say("\ntimeline:")
    for line in timeline.lines():
        say(f"  {line}")
    moved = timeline.acquired.get(STORAGE_RESOURCE)
    fenced = timeline.host1_fenced
    if moved is None or fenced is None or fenced >= moved:
        say("FAILED: host 1 was not fenced before host 2 took its lease")
        return 1
    say("OK: host 1 was fenced before host 2 took its lease")
    return 0


if __name__ == "__main__":
    sys.exit(main())
