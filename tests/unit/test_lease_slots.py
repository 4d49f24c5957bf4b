"""The volume lease allocator's lock (lease_layout.LeaseLayout), without sanlock.

A fencing check inside an allocation drops the manager role, and the role's end
forgets the slot map (reset_slots) from the same thread: the allocator's lock must
let it (a plain lock deadlocked; hostile review of 05dffcf)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from sharedlvm import errors
from sharedlvm.lease_layout import LeaseLayout


def _layout() -> LeaseLayout:
    layout: LeaseLayout

    def fenced() -> None:
        layout.reset_slots()  # what Manager._drop -> on_term does, in this thread
        raise errors.Fenced("host 1 lost the manager role of domain d: test")

    domain: Any = SimpleNamespace(
        volume_lvs=lambda: [], vg_name="d", require_manager_now=fenced,
        lvm=SimpleNamespace(lv=lambda vg, name: SimpleNamespace(size=16 * 1024**2)))
    layout = LeaseLayout(domain)
    layout._sector_size = 512  # 1 MiB slots: 16 of them
    return layout


def test_a_fence_inside_an_allocation_does_not_deadlock() -> None:
    layout = _layout()
    outcome: list[BaseException] = []

    def allocate() -> None:
        try:
            layout.allocate_volume_lease("0b6a5f3e-3c1f-4c1e-9a53-5d0d9f0e2a11")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=allocate, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the allocation deadlocked on its own lock"
    assert len(outcome) == 1 and isinstance(outcome[0], errors.Fenced)
    assert layout._used is None  # the map was forgotten with the role


def test_a_held_slot_is_never_in_a_rebuilt_free_list() -> None:
    layout = _layout()
    layout._held.add(1)
    assert 1 in layout._scan_used() and 0 in layout._scan_used()
    with pytest.raises(errors.Fenced):
        layout.allocate_volume_lease("0b6a5f3e-3c1f-4c1e-9a53-5d0d9f0e2a11")
