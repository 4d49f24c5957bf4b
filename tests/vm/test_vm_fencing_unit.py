"""Fast tests of the fencing scenario's pure parts: the timeline and its wording, the
guest script's lease layout. No qemu, no root."""

from __future__ import annotations

import pytest

from sharedlvm_testbed.vmbed import lease_guest
from sharedlvm_testbed.vmbed.fencing import (
    POWER_RESOURCE,
    RESOURCES,
    STORAGE_RESOURCE,
    FencingTimeline,
)


def _timeline() -> FencingTimeline:
    t = FencingTimeline(io_timeout=3, power_loss=True)
    t.storage_lost = 1000.0
    t.power_lost = 1000.1
    t.consumer_stuck = 1000.3
    t.host1_reset = 1070.6
    t.reset_by_watchdog = True
    t.acquired = {STORAGE_RESOURCE: 1086.5, POWER_RESOURCE: 1086.5}
    return t


def test_host_dead_time_is_sanlocks() -> None:
    assert FencingTimeline(io_timeout=3, power_loss=False).host_dead_seconds == 84
    assert FencingTimeline(io_timeout=10, power_loss=False).host_dead_seconds == 140


def test_times_are_relative_to_each_failure() -> None:
    t = _timeline()
    assert t.after_storage_loss(t.acquired[STORAGE_RESOURCE]) == pytest.approx(86.5)
    assert t.after_power_loss(t.acquired[POWER_RESOURCE]) == pytest.approx(86.4)
    assert t.after_storage_loss(None) is None
    assert FencingTimeline(3, False).after_power_loss(5.0) is None


def test_fenced_is_the_first_of_reset_and_consumer_killed() -> None:
    t = _timeline()
    assert t.host1_fenced == 1070.6
    t.consumer_gone = 1030.0
    assert t.host1_fenced == 1030.0
    assert FencingTimeline(3, False).host1_fenced is None


def test_lines_are_ordered_and_name_the_host_dead_rule() -> None:
    lines = _timeline().lines()
    assert lines[0] == "t+0.0 s lease storage of host 1 lost (dmsetup suspend)"
    assert "t+70.6 s host 1 reset by its watchdog (softdog)" in lines
    assert ("t+86.5 s host 2 acquired host 1's lease "
            "(sanlock host-dead time: 8x3+60 = 84 s)") in lines
    assert "t+86.5 s host 2 acquired host 3's lease (86.4 s after its power loss)" in lines
    assert len(lines) == 6


def test_lines_skip_what_was_not_seen() -> None:
    t = FencingTimeline(io_timeout=3, power_loss=False)
    t.storage_lost = 50.0
    t.host1_reset = 122.0
    assert t.lines() == ["t+0.0 s lease storage of host 1 lost (dmsetup suspend)",
                         "t+72.0 s host 1 reset (qemu exited)"]


def test_resources_follow_the_lockspace_at_lease_alignment(monkeypatch: pytest.MonkeyPatch,
                                                           ) -> None:
    monkeypatch.setattr(lease_guest, "sector_size", lambda device: 512)
    assert lease_guest.lockspace_disk("/dev/vda").offset == 0
    offsets = [lease_guest.resource_disk("/dev/vda", RESOURCES.index(r)).offset
               for r in RESOURCES]
    assert offsets == [1024 * 1024, 2 * 1024 * 1024]
    # The consumer reads past every lease.
    assert max(offsets) + 1024 * 1024 < lease_guest.CONSUMER_IO_OFFSET
    monkeypatch.setattr(lease_guest, "sector_size", lambda device: 4096)
    assert lease_guest.resource_disk("/dev/vda", 0).offset == 8 * 1024 * 1024
