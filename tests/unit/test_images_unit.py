"""The image schema in tags (images.py, tags.py): roles, parents, what is writable."""

from __future__ import annotations

import pytest

from sharedlvm import errors, tags
from sharedlvm.lvm import LogicalVolume
from sharedlvm.model import Allocation, VolumeFormat, VolumeRole, VolumeState

IMG = "11111111-1111-4111-8111-111111111111"
PARENT = "22222222-2222-4222-8222-222222222222"


def _lv(extra: list[str]) -> LogicalVolume:
    base = tags.volume_tags(image=IMG, parent=PARENT, fmt=VolumeFormat.QCOW2,
                            alloc=Allocation.THIN, generation=3, lease=7,
                            state=VolumeState.READY, capacity=1 << 30)
    return LogicalVolume("33333333-3333-4333-8333-333333333333", "vg", 1 << 30,
                         tuple(base + extra), "", 0, "", "")


def test_a_new_volume_is_a_leaf_and_carries_no_role_tag() -> None:
    lv = _lv([])
    assert not any(t.startswith("sl.role=") for t in lv.tags)
    info = tags.volume_from_lv(lv)
    assert info.role == VolumeRole.LEAF and info.writable
    assert info.parent == PARENT
    assert tags.role_tag(VolumeRole.LEAF) is None


@pytest.mark.parametrize("role", [VolumeRole.INTERNAL, VolumeRole.TEMPLATE])
def test_read_only_roles(role: VolumeRole) -> None:
    tag = tags.role_tag(role)
    assert tag == f"sl.role={role.value}"
    info = tags.volume_from_lv(_lv([tag]))
    assert info.role == role and not info.writable


def test_an_unknown_role_is_read_only() -> None:
    info = tags.volume_from_lv(_lv(["sl.role=mirror"]))
    assert info.role == VolumeRole.UNKNOWN and not info.writable


def test_parent_tag_is_what_children_match() -> None:
    # volume.children matches this text in the LVs' tags: the schema must agree.
    assert tags.parent_tag(PARENT) in _lv([]).tags


@pytest.mark.parametrize("exc", [
    errors.HasChildren(PARENT, [IMG, "x"], "delete"),
    errors.ReadOnlyVolume(PARENT, "internal", "grow"),
    errors.ReadOnlyVolume(PARENT, "template", "snapshot"),
])
def test_refusals_are_one_line_with_fields(exc: errors.Error) -> None:
    text = str(exc)
    assert "\n" not in text and PARENT in text
    assert exc.to_wire()["fields"]["volume"] == PARENT
    assert errors.from_wire(exc.to_wire()).__class__ is exc.__class__


def test_a_merged_parent_is_fitted_never_below_what_it_was_or_what_it_uses() -> None:
    from sharedlvm.images import fitted_size
    from sharedlvm.qemu_img import metadata_overhead

    mib, gib, extent = 1 << 20, 1 << 30, 128 << 20
    cap = 20 * gib
    # The merge grew the parent from 1 GiB to 3 GiB for both images' data; half of it
    # overlapped: given back down to the extents of what it uses.
    assert fitted_size(int(1.5 * gib), cap, extent, gib, leaf=False) == 1536 * mib
    # ... never below its size before the merge (a thin volume's first room).
    assert fitted_size(100 * mib, cap, extent, gib, leaf=False) == gib
    # The leaf again: what it uses and a new thin volume's room, rounded to the extent.
    assert fitted_size(int(1.5 * gib) + 1, cap, extent, gib, leaf=True) == \
        2560 * mib + extent
    # Never more than fully allocated, never below the end offset.
    small = 512 * mib
    full = small + metadata_overhead(small)
    assert fitted_size(400 * mib, small, extent, 128 * mib, leaf=True) == \
        -(-full // extent) * extent
    assert fitted_size(full + mib, small, extent, 128 * mib, leaf=False) >= full + mib
