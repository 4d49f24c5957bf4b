"""Self-fencing on real kernels, watchdog included (issue 5).

Three guests run wdmd + sanlock with softdog, joined to one lockspace at io_timeout 3
(see :mod:`sharedlvm_testbed.vmbed.fencing` for the roles). At one moment host 1 loses
its lease storage (its dm device is suspended) and host 3 loses its power, while host
2 tries to take both their leases every 0.5 s. Both scenarios share one boot and one
wait of sanlock's host-dead time, so the module takes ~2 minutes, not ~4.

Asserted:
(a) host 1 is fenced (watchdog reset, or its consumer killed) strictly before host 2
    takes its lease, and host 2 does take it;
(b) host 3's lease moves no earlier than the host-dead time minus one renewal period
    plus poll slack, and no later than host-dead time x 1.05 + 10 s.

Skipped, with the reason printed, when this machine cannot run qemu guests.
Run with ``-s`` to see the timeline.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import sharedlvm
from sharedlvm.command import Runner
from sharedlvm_testbed.vmbed import GuestBed, HostUnsupported, build_image, ensure_host_packages
from sharedlvm_testbed.vmbed.fencing import (
    IO_TIMEOUT,
    POWER_RESOURCE,
    STORAGE_RESOURCE,
    FencingScenario,
    FencingTimeline,
)

pytestmark = [pytest.mark.vm, pytest.mark.slow]

SRC_DIR = Path(sharedlvm.__file__).resolve().parents[1]
MiB = 1024**2
# sanlock renews a delta lease every 2 x io_timeout, so the last renewal of a host
# that dies is up to that much before its death, and the host-dead clock of the
# others starts from it; the last 1 s covers polling and the agent round trip.
EARLY_SLACK = 2 * IO_TIMEOUT + 1.0


def _skip(reason: str) -> None:
    print(f"\nSKIP vm fencing: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def timeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FencingTimeline]:
    runner = Runner()
    try:
        ensure_host_packages(runner)
        image = build_image(runner)
    except HostUnsupported as exc:
        _skip(f"cannot run qemu guests here: {exc}")
    work = tmp_path_factory.mktemp("fencing")
    lun = work / "lun.img"
    with lun.open("wb") as f:
        f.truncate(256 * MiB)
    bed = GuestBed(3, lun, work / "bed", image=image, runner=runner, share_dir=SRC_DIR)
    try:
        bed.start()
    except HostUnsupported as exc:
        _skip(str(exc))
    try:
        print(f"\n3 guests booted in {bed.boot_seconds:.1f} s", file=sys.stderr)
        scenario = FencingScenario(bed, power_loss=True,
                                   echo=lambda line: print(line, file=sys.stderr))
        scenario.prepare()
        result = scenario.run()
    finally:
        # Power off, not shut down: host 1's storage is suspended, a clean
        # shutdown could hang on it. Every kill is by pid (Guest.power_off).
        bed.power_off()
        lun.unlink(missing_ok=True)
    print("fencing timeline:", file=sys.stderr)
    for line in result.lines():
        print(f"  {line}", file=sys.stderr)
    yield result


def test_storage_loss_fences_the_host_before_its_lease_moves(
        timeline: FencingTimeline) -> None:
    moved = timeline.acquired.get(STORAGE_RESOURCE)
    assert moved is not None, (
        f"host 2 never acquired host 1's lease; last refusal: "
        f"{timeline.last_refusal.get(STORAGE_RESOURCE)}")
    fenced = timeline.host1_fenced
    assert fenced is not None, "host 1 was neither reset nor had its consumer killed"
    assert fenced < moved, (
        f"host 1 fenced at t+{timeline.after_storage_loss(fenced):.1f} s, but its lease "
        f"was taken at t+{timeline.after_storage_loss(moved):.1f} s")
    # The consumer was stuck in I/O, so only the watchdog could fence host 1.
    assert timeline.host1_reset is not None
    assert timeline.reset_by_watchdog, "host 1's qemu exited without softdog firing"


def test_power_loss_lease_moves_after_the_host_dead_time(
        timeline: FencingTimeline) -> None:
    after = timeline.after_power_loss(timeline.acquired.get(POWER_RESOURCE))
    assert after is not None, (
        f"host 2 never acquired host 3's lease; last refusal: "
        f"{timeline.last_refusal.get(POWER_RESOURCE)}")
    dead = timeline.host_dead_seconds
    print(f"\npower loss -> lease taken: {after:.1f} s (host-dead time {dead} s)",
          file=sys.stderr)
    assert after >= dead - EARLY_SLACK
    assert after <= dead * 1.05 + 10
