"""Images: chains of volumes, snapshots, templates and linked clones (docs/design.md
"Images").

An image is a chain: a base volume (raw or qcow2) and qcow2 overlays, each one LV
whose ``sl.parent`` tag names the volume below it and whose qcow2 header names that
same volume as its backing file, by bare UUID. vdsm moved to bare UUIDs because
relative paths grew on every merge; a bare name is resolved by qemu next to the
overlay's own path, so every host opens a chain through its image directory
(:func:`image_dir`): ``$SHAREDLVM_ROOT/run/sharedlvm/<domain>/<image>/<volume>``, a
link to the volume's device on that host (device-mapper or loop alike).

Only the leaf of a chain is written. A snapshot makes a new empty leaf over the
current one, which becomes ``internal`` (tag ``sl.role``); a template is a leaf
marked ``template``, the read-only base of linked clones in other images. Read-only
volumes are prepared with shared leases only, never extended or resized, and a
volume with anything on top of it is never deleted (errors.HasChildren names them).

Every operation here is one request of the manager, exactly-once by request id
(volume._once) and built like a qcow2 create: the new LV is made ``creating``, its
header written under its lease, and only then does it become ``ready``. A manager
that dies in between leaves a pending request and a ``creating`` LV: the next
manager removes the LV and puts back what the request changed (:func:`recover`),
so an interrupted snapshot leaves the chain as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import codec, errors, journal, qemu_img, tags
from .activation import set_read_only
from .domain import Domain
from .failpoints import failpoint
from .lvm import LogicalVolume
from .model import (
    Allocation,
    ImageDeleted,
    ImageInfo,
    VolumeFormat,
    VolumeInfo,
    VolumeRole,
    VolumeState,
)
from .requests import CloneVolume, DeleteImage, MergeVolume, SnapshotVolume, TemplateVolume
from .units import round_up
from .volume import (
    THIN_INITIAL_SIZE,
    VOLUME_SELECT,
    ExclusiveLease,
    LeaseAllocator,
    _delete,
    _intent,
    _leaf_again,
    _lv_size,
    _lvcreate,
    _lvextend,
    _once,
    _volume,
    activated,
    children,
    get_volume,
    list_volumes,
)

log = logging.getLogger(__name__)

# The deepest chain sharedlvm makes (DaemonConfig.max_chain): every read of a
# deep chain's unallocated clusters walks it, and qemu opens every file of it.
MAX_CHAIN = 32


# Chains


def chain(domain: Domain, leaf: str) -> list[VolumeInfo]:
    """The volumes under ``leaf`` and ``leaf`` itself, base first."""
    found: list[VolumeInfo] = []
    seen: set[str] = set()
    current: str | None = leaf
    while current is not None:
        if current in seen or len(found) > 4 * MAX_CHAIN:
            raise errors.CorruptRecord(f"the chain of volume {leaf} loops at {current}")
        seen.add(current)
        info = get_volume(domain, current)
        found.append(info)
        current = info.parent
    return found[::-1]


def image_info(domain: Domain, image: str) -> ImageInfo:
    """An image's chain, from its volumes' tags: the leaf is the one volume of the
    image that no other volume of the image is on top of."""
    volumes = list_volumes(domain, image=image)
    if not volumes:
        raise errors.NotFound(f"image {image} not found in domain {domain.name}")
    parents = {v.parent for v in volumes}
    tops = [v for v in volumes if v.uuid not in parents]
    if len(tops) != 1:
        raise errors.CorruptRecord(
            f"image {image} has {len(tops)} volumes on top "
            f"({', '.join(v.uuid for v in tops) or 'none'}): expected one leaf")
    return ImageInfo(image=image, domain=domain.name, leaf=tops[0].uuid,
                     chain=chain(domain, tops[0].uuid))


def require_writable(info: VolumeInfo, doing: str, hint: str = "") -> None:
    if not info.writable:
        raise errors.ReadOnlyVolume(info.uuid, info.role.value, doing, hint)


def require_current(infos: list[VolumeInfo]) -> None:
    """No volume a running VM merged away is opened again: its parent holds newer
    data than it (vmlive.merge)."""
    for info in infos:
        if info.state == VolumeState.MERGED:
            raise errors.Busy(f"volume {info.uuid} was merged into {info.parent} by a "
                              "running VM and is stale: 'sharedlvm volume merge "
                              f"{info.uuid}' removes it")


# The image directory


def image_dir(domain: Domain, image: str) -> Path:
    return domain.paths.run_dir / domain.name / image


def link_chain(domain: Domain, image: str, devices: dict[str, str]) -> Path:
    """Make ``image``'s directory on this host hold a link per volume of its chain
    (``devices``: volume -> device path); returns the directory. Links are replaced
    atomically, so a chain being opened never sees a missing one."""
    directory = image_dir(domain, image)
    directory.mkdir(parents=True, exist_ok=True)
    for volume, device in devices.items():
        link = directory / volume
        tmp = directory / f".{volume}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(device)
        tmp.replace(link)
    return directory


def unlink_chain(domain: Domain, image: str, volumes: list[str]) -> None:
    directory = image_dir(domain, image)
    for volume in volumes:
        with contextlib.suppress(FileNotFoundError):
            (directory / volume).unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()  # only once empty: another consumer's links stay


# Snapshot, template, linked clone (the manager)


@dataclass(frozen=True)
class _OverlayIntent:
    """A new qcow2 overlay, as recorded in the journal: a snapshot's new leaf (same
    image) or a linked clone's first volume (a new image over a template)."""

    volume: str
    image: str
    parent: str
    parent_format: VolumeFormat
    capacity: int
    shard: int
    # A snapshot turns its parent internal (and an abort turns it back to a leaf).
    snapshot: bool
    tags: dict[str, str]
    # A live snapshot's (vmlive.py): the parent is a running VM's leaf, its lease the
    # VM's; the VM switches to the new leaf once it is made.
    live: bool = False


def snapshot_volume(domain: Domain, request: SnapshotVolume, allocate_lease: LeaseAllocator,
                    exclusive: ExclusiveLease, max_chain: int = MAX_CHAIN,
                    live_host: int | None = None,
                    holders: Callable[[VolumeInfo], list[int]] | None = None
                    ) -> VolumeInfo:
    """A new empty qcow2 leaf over ``request.volume``, which becomes read-only.
    ``live_host``: the leaf is a running VM's on that host, which holds its lease and
    switches to the new leaf (vmlive.py); checked: nobody else holds it."""

    def check(parent: VolumeInfo) -> None:
        if live_host is not None and holders is not None:
            held = holders(parent)
            if held != [live_host]:
                raise errors.Busy(f"volume {parent.uuid} is held by "
                                  f"{', '.join(f'host {h}' for h in held) or 'no host'}, "
                                  f"not by the VM of host {live_host} alone: no live "
                                  "snapshot")
        if parent.role == VolumeRole.TEMPLATE:
            raise errors.ReadOnlyVolume(parent.uuid, parent.role.value, "snapshot",
                                        "clone it with --linked")
        on_top = children(domain, parent.uuid)
        if on_top:
            raise errors.HasChildren(parent.uuid, on_top, "snapshot")
        require_writable(parent, "snapshot")
        depth = len(chain(domain, parent.uuid))
        if depth >= max_chain:
            raise errors.InvalidArgument(
                f"the chain of volume {parent.uuid} has {depth} volumes, the most "
                f"allowed (max_chain {max_chain}): merge a snapshot first")

    return _overlay(domain, request.volume, request.request_id, request, "snapshot", check,
                    allocate_lease, exclusive, snapshot=True, user_tags=request.tags,
                    live=live_host is not None)


def clone_volume(domain: Domain, request: CloneVolume, allocate_lease: LeaseAllocator,
                 exclusive: ExclusiveLease) -> VolumeInfo:
    """A new image whose first volume is a qcow2 overlay over the template
    ``request.volume`` (a linked clone)."""
    if not request.linked:
        raise errors.Unsupported("full clones are not built yet: use --linked over a "
                                 "template")

    def check(parent: VolumeInfo) -> None:
        if parent.role != VolumeRole.TEMPLATE:
            raise errors.InvalidArgument(
                f"volume {parent.uuid} is not a template: make it one first "
                f"('sharedlvm volume template {parent.uuid}')")
        if request.image is not None and list_volumes(domain, image=request.image):
            raise errors.AlreadyExists(f"image {request.image} already exists: a clone "
                                       "makes a new image")

    return _overlay(domain, request.volume, request.request_id, request, "clone", check,
                    allocate_lease, exclusive, snapshot=False, user_tags=request.tags,
                    image=request.image)


def _overlay(domain: Domain, parent_id: str, request_id: str | None, request: Any, op: str,
             check: Any, allocate_lease: LeaseAllocator, exclusive: ExclusiveLease, *,
             snapshot: bool, user_tags: dict[str, str], image: str | None = None,
             live: bool = False) -> VolumeInfo:
    domain.require_manager()
    with domain.request_lock(request_id), domain.chain_lock(parent_id):
        def plan() -> Any:
            parent = get_volume(domain, parent_id)
            if parent.state != VolumeState.READY:
                raise errors.Busy(f"volume {parent_id} is {parent.state}, not ready")
            check(parent)
            size = _lv_size(parent.capacity, VolumeFormat.QCOW2, Allocation.THIN)
            shard = domain.placement.choose(size)
            return codec.to_wire(_OverlayIntent(
                volume=str(uuid.uuid4()),
                image=parent.image if snapshot else (image or str(uuid.uuid4())),
                parent=parent.uuid, parent_format=parent.format, capacity=parent.capacity,
                shard=shard.index, snapshot=snapshot, tags=dict(user_tags), live=live))

        intent = _intent(domain, request_id, plan)

        def run(data: dict[str, Any], resumed: bool) -> Any:
            a = codec.from_wire(_OverlayIntent, data, f"{op} intent")
            return codec.to_wire(_make_overlay(domain, a, resumed, allocate_lease,
                                               exclusive))

        shard_index = int(intent.get("shard", 0)) if intent else 0
        try:
            with domain.manager_lock(domain.shard(shard_index)):
                result = _once(domain, request, op, intent, run)
        except errors.Error:
            domain.placement.forget(domain.shard(shard_index))
            raise
    return codec.from_wire(VolumeInfo, result)  # type: ignore[no-any-return]


def _make_overlay(domain: Domain, a: _OverlayIntent, resumed: bool,
                  allocate_lease: LeaseAllocator, exclusive: ExclusiveLease) -> VolumeInfo:
    shard = domain.shard(a.shard)
    parent = get_volume(domain, a.parent)
    existing = shard.lvm.volume_lv(shard.vg_name, a.volume) if resumed else None
    if existing is not None and tags.volume_from_lv(existing).state == VolumeState.READY:
        return get_volume(domain, a.volume)  # published: never formatted again
    # A snapshot holds its parent's lease throughout: nobody writes the parent while
    # it becomes read-only. Not a live one: the parent is the running VM's, which
    # writes it until it switches to the new leaf (reads of the new leaf fall through
    # to it meanwhile: its content is the snapshot's, as of the switch).
    hold_parent = (exclusive(parent) if a.snapshot and not a.live
                   else contextlib.nullcontext())
    with hold_parent:
        if existing is None:
            if a.snapshot:  # checked again under the lease: nothing changed meanwhile
                on_top = [c for c in children(domain, a.parent) if c != a.volume]
                if on_top:
                    raise errors.HasChildren(a.parent, on_top, "snapshot")
                require_writable(get_volume(domain, a.parent), "snapshot")
            lease = allocate_lease(a.volume)
            domain.set_volume_shard(a.volume, shard)
            lv_size = _lv_size(a.capacity, VolumeFormat.QCOW2, Allocation.THIN)
            _lvcreate(domain, shard, a.volume, lv_size, tags.volume_tags(
                image=a.image, parent=a.parent, fmt=VolumeFormat.QCOW2,
                alloc=Allocation.THIN, generation=domain.record.manager_generation,
                lease=lease, state=VolumeState.CREATING, capacity=a.capacity,
                user=a.tags))
        info = get_volume(domain, a.volume)
        failpoint("overlay-created")
        with exclusive(info), activated(domain, a.volume) as path:
            domain.require_manager_now()
            # The backing file is the parent's bare UUID, never opened here (-u):
            # each host resolves it in its image directory.
            qemu_img.create(domain.runner, path, "qcow2", a.capacity, backing=a.parent,
                            backing_format=a.parent_format.value)
        failpoint("overlay-formatted")
        if a.snapshot and parent.role != VolumeRole.INTERNAL:
            _set_role(domain, parent, VolumeRole.INTERNAL)
        failpoint("overlay-parent-internal")
        _set_state(domain, a.volume, VolumeState.CREATING, VolumeState.READY)
    return get_volume(domain, a.volume)


def _set_role(domain: Domain, info: VolumeInfo, role: VolumeRole) -> None:
    shard = domain.volume_shard(info.uuid)
    old, new = tags.role_tag(info.role), tags.role_tag(role)
    shard.lvm.change_tags(shard.vg_name, info.uuid, add=[new] if new else [],
                          delete=[old] if old else [])


def _set_state(domain: Domain, volume_id: str, old: VolumeState, new: VolumeState) -> None:
    shard = domain.volume_shard(volume_id)
    shard.lvm.change_tags(shard.vg_name, volume_id, add=[tags.state_tag(new)],
                          delete=[tags.state_tag(old)])


def template_volume(domain: Domain, request: TemplateVolume,
                    exclusive: ExclusiveLease) -> VolumeInfo:
    """Mark a leaf as a template: read-only from now on, shared by linked clones."""
    domain.require_manager()
    vol = request.volume
    with domain.request_lock(request.request_id), domain.chain_lock(vol), \
            domain.manager_lock(domain.volume_shard(vol)):

        def run(a: dict[str, Any], resumed: bool) -> Any:
            return finish_template(domain, a["volume"], exclusive)

        result = _once(domain, request, "template", {"volume": vol}, run)
    return codec.from_wire(VolumeInfo, result)  # type: ignore[no-any-return]


def finish_template(domain: Domain, vol: str, exclusive: ExclusiveLease) -> Any:
    """Mark ``vol`` a template (its wire answer); also a recovery's roll forward."""
    info = get_volume(domain, vol)
    if info.role == VolumeRole.TEMPLATE:
        return codec.to_wire(info)
    if info.state != VolumeState.READY:
        raise errors.Busy(f"volume {vol} is {info.state}, not ready")
    require_writable(info, "make a template of")
    on_top = children(domain, vol)
    if on_top:
        raise errors.HasChildren(vol, on_top, "make a template of")
    # No writer may hold it while it becomes read-only.
    with exclusive(info):
        _set_role(domain, info, VolumeRole.TEMPLATE)
    return codec.to_wire(get_volume(domain, vol))


# Merge (a chain not in use)


@dataclass(frozen=True)
class _MergeIntent:
    """A merge, as recorded in the journal before its first step."""

    volume: str  # the snapshot merged and then removed
    parent: str  # the volume below it, which receives its data
    child: str | None  # the volume on top of it, rebased onto the parent (None: a leaf)
    image: str
    above: list[str]  # the image's volumes above the parent: held exclusively throughout
    # The parent's LV size before the merge: it is fitted afterwards, never below this
    # (0 in a journal written before it was recorded: not fitted).
    parent_size: int = 0
    # A volume a running VM's qemu committed already (state merged, vmlive.merge):
    # nothing is copied or rebased (qemu did both), the volume is only dropped.
    stale: bool = False


def merge_volume(domain: Domain, request: MergeVolume, exclusive: ExclusiveLease
                 ) -> VolumeInfo:
    """Remove the snapshot ``request.volume`` from its chain: its data committed into
    the volume below it, the volume on top of it (if any) rebased onto that one, then
    its LV removed. Always recorded (a request id is made when none is given): each
    step can be run again, and the LV goes last, so a manager that dies anywhere is
    followed by one that finishes it, and the chain reads the same data at every
    point."""
    domain.require_manager()
    if request.request_id is None:
        request = replace(request, request_id=f"merge-{uuid.uuid4()}")
    with domain.request_lock(request.request_id), domain.chain_lock(request.volume):
        def plan() -> Any:
            return codec.to_wire(_plan_merge(domain, request.volume))

        intent = _intent(domain, request.request_id, plan)

        def run(data: dict[str, Any], resumed: bool) -> Any:
            a = codec.from_wire(_MergeIntent, data, "merge intent")
            return codec.to_wire(_merge(domain, a, resumed, exclusive))

        result = _once(domain, request, "merge", intent, run)
    return codec.from_wire(VolumeInfo, result)  # type: ignore[no-any-return]


def _plan_merge(domain: Domain, vol: str) -> _MergeIntent:
    info = get_volume(domain, vol)
    if info.state == VolumeState.MERGED:
        return _plan_drop(domain, info)
    if info.state != VolumeState.READY:
        raise errors.Busy(f"volume {vol} is {info.state}, not ready")
    if info.role == VolumeRole.TEMPLATE:
        raise errors.ReadOnlyVolume(vol, info.role.value, "merge",
                                    "a template is the base of linked clones")
    if info.parent is None:
        raise errors.InvalidArgument(f"volume {vol} is the base of its chain: nothing below "
                                     "it to merge into")
    parent = get_volume(domain, info.parent)
    if parent.role == VolumeRole.TEMPLATE:
        raise errors.ReadOnlyVolume(
            parent.uuid, parent.role.value, f"merge volume {vol} into",
            "linked clones of it would change; make a full clone instead")
    if parent.state != VolumeState.READY:
        raise errors.Busy(f"volume {parent.uuid} is {parent.state}, not ready")
    if info.capacity > parent.capacity:
        raise errors.Unsupported(
            f"volume {vol} is larger than the volume below it ({info.capacity} > "
            f"{parent.capacity} bytes: grown after the snapshot): not merged")
    others = [c for c in children(domain, parent.uuid) if c != vol]
    if others:
        raise errors.HasChildren(parent.uuid, others, f"merge volume {vol} into")
    on_top = children(domain, vol)
    if len(on_top) > 1:
        raise errors.HasChildren(vol, on_top, "merge")
    leaf = image_info(domain, info.image).chain
    uuids = [v.uuid for v in leaf]
    if parent.uuid not in uuids:
        raise errors.CorruptRecord(f"volume {parent.uuid} is not in the chain of image "
                                   f"{info.image}")
    return _MergeIntent(volume=vol, parent=parent.uuid, child=on_top[0] if on_top else None,
                        image=info.image, above=uuids[uuids.index(parent.uuid) + 1:],
                        parent_size=parent.size)


def _plan_drop(domain: Domain, info: VolumeInfo) -> _MergeIntent:
    """A merged volume's removal: its data is in its parent already (the running VM's
    qemu committed it and writes the parent, or the volume above it, now)."""
    if info.parent is None:
        raise errors.CorruptRecord(f"volume {info.uuid} is merged but has no parent")
    on_top = children(domain, info.uuid)
    if len(on_top) > 1:
        raise errors.HasChildren(info.uuid, on_top, "drop")
    return _MergeIntent(volume=info.uuid, parent=info.parent,
                        child=on_top[0] if on_top else None, image=info.image, above=[],
                        stale=True)


def mark_merged(domain: Domain, volume: str, host_id: int,
                holders: Callable[[VolumeInfo], list[int]]) -> VolumeInfo:
    """A running VM's live merge of ``volume`` into its parent went through in qemu
    (vmlive.merge): the volume is marked stale (state merged) before the VM's qemu
    writes anything more to the parent. From here on the volume is never opened
    again (prepare refuses it) and a merge of it only drops it. Checked: the VM's host
    alone holds its lease. One LVM commit; asked again, the same answer."""
    domain.require_manager()
    with domain.chain_lock(volume):
        info = get_volume(domain, volume)
        if info.state == VolumeState.MERGED:
            return info
        if info.state != VolumeState.READY:
            raise errors.Busy(f"volume {volume} is {info.state}, not ready")
        if info.parent is None:
            raise errors.InvalidArgument(f"volume {volume} is the base of its chain: "
                                         "nothing below it was merged into")
        held = holders(info)
        if held != [host_id]:
            raise errors.Busy(f"volume {volume} is held by "
                              f"{', '.join(f'host {h}' for h in held) or 'no host'}, not "
                              f"by the VM of host {host_id} alone: not marked merged")
        domain.require_manager_now()
        with domain.manager_lock(domain.volume_shard(volume)):
            _set_state(domain, volume, VolumeState.READY, VolumeState.MERGED)
    log.info("volume %s merged into %s by a running VM on host %d", volume, info.parent,
             host_id)
    return get_volume(domain, volume)


def _drop_merged(domain: Domain, a: _MergeIntent, top: VolumeInfo,
                 exclusive: ExclusiveLease) -> VolumeInfo:
    """A merged volume removed from its chain: the volume above it (if any) named the
    parent's child (qemu wrote its header already), the volume's LV removed, the
    parent a leaf again if nothing is on top. Only the merged volume's lease is taken:
    free once the VM's host let it go, which proves no qemu has it open; the parent
    and the child stay the running VM's."""
    with exclusive(top):
        domain.require_manager_now()
        if a.child is not None:
            _relink(domain, a)
        _remove_merged(domain, a, top)
    log.info("dropped volume %s, merged into %s by a running VM", a.volume, a.parent)
    return get_volume(domain, a.parent)


def _merge(domain: Domain, a: _MergeIntent, resumed: bool,
           exclusive: ExclusiveLease) -> VolumeInfo:
    try:
        top = get_volume(domain, a.volume)
    except errors.VolumeNotFound:
        if resumed:  # removed: only the parent's role may be left to do
            with domain.manager_lock(domain.volume_shard(a.parent)):
                _leaf_again(domain, a.parent)
            return get_volume(domain, a.parent)
        raise
    if a.stale or top.state == VolumeState.MERGED:
        # (also a merge journaled before a running VM's qemu merged the volume: its
        # data is older than the parent's now, and must never be copied into it)
        return _drop_merged(domain, a, top, exclusive)
    parent = get_volume(domain, a.parent)
    # What is above may have changed while a cut merge waited for the next manager
    # (its leaf deleted): what is gone is neither held nor rebased.
    above = [v for v in a.above if v != a.volume and _exists_now(domain, v)]
    held = [parent] + [get_volume(domain, v) for v in above] + [top]
    if a.child is not None and a.child not in above:
        a = replace(a, child=None)
    with contextlib.ExitStack() as stack:
        # Nobody may use the chain: every volume from the parent up is held here.
        for info in sorted(held, key=lambda v: v.uuid):
            stack.enter_context(exclusive(info))
        domain.require_manager_now()
        p_path = stack.enter_context(activated(domain, a.parent))
        t_path = stack.enter_context(activated(domain, a.volume))
        set_read_only(domain.runner, p_path, False)
        _grow_for_merge(domain, parent, top, p_path, t_path)
        base = qemu_img.alone(p_path, parent.format.value)
        qemu_img.commit(domain.runner, qemu_img.alone(t_path, "qcow2", base))
        failpoint("merge-committed")
        if a.child is not None:
            c_path = stack.enter_context(activated(domain, a.child))
            set_read_only(domain.runner, c_path, False)
            domain.require_manager_now()
            qemu_img.rebase_unsafe(domain.runner, c_path, a.parent, parent.format.value)
            failpoint("merge-rebased")
            _relink(domain, a)
        _remove_merged(domain, a, top)
        # The merge is done. Still holding the parent's lease, what the merge grew is
        # given back, best effort: a manager that dies before, or a fit that fails,
        # leaves the parent as the merge grew it, which is safe, only larger.
        if a.parent_size:
            try:
                _fit_after_merge(domain, parent, p_path, a.parent_size,
                                 leaf=a.child is None)
            except errors.Fenced:
                raise
            except errors.Error as exc:
                log.warning("merge: volume %s not fitted: %s", a.parent, exc)
    log.info("merged volume %s into %s", a.volume, a.parent)
    return get_volume(domain, a.parent)


def _relink(domain: Domain, a: _MergeIntent) -> None:
    """The merged volume's child named its parent's child (its tag; the header says so
    already)."""
    assert a.child is not None
    try:
        if get_volume(domain, a.child).parent == a.parent:
            return
    except errors.VolumeNotFound:
        return  # deleted since the merge was planned: nothing to relink
    shard = domain.volume_shard(a.child)
    with domain.manager_lock(shard):
        domain.require_manager_now()
        shard.lvm.change_tags(shard.vg_name, a.child, add=[tags.parent_tag(a.parent)],
                              delete=[tags.parent_tag(a.volume)])


def _remove_merged(domain: Domain, a: _MergeIntent, top: VolumeInfo) -> None:
    """The merged volume's LV removed (last: until here the chain reads the same with
    or without it), then the parent the leaf again if nothing is on top of it: never
    a writable volume under another."""
    failpoint("merge-relinked")
    shard = domain.volume_shard(a.volume)
    shard.activator.deactivate(shard.vg_name, a.volume)
    with domain.manager_lock(shard):
        domain.require_manager_now()
        shard.lvm.lvremove_selected(shard.vg_name, f"lv_name={a.volume}&&{VOLUME_SELECT}")
    domain.placement.used(shard, -1, -top.size)
    domain.clear_volume_shard(a.volume)
    with domain.manager_lock(domain.volume_shard(a.parent)):
        _leaf_again(domain, a.parent)


def _exists_now(domain: Domain, volume: str) -> bool:
    try:
        get_volume(domain, volume)
    except errors.VolumeNotFound:
        return False
    return True


def _grow_for_merge(domain: Domain, parent: VolumeInfo, top: VolumeInfo, p_path: str,
                    t_path: str) -> None:
    """A qcow2 parent's LV grown to hold the snapshot's data: at most what both use
    on their devices now, never more than the parent fully allocated."""
    if parent.format != VolumeFormat.QCOW2:
        return  # a raw volume holds every byte of its capacity already
    need = (qemu_img.end_offset(domain.runner, qemu_img.alone(p_path, "qcow2"))
            + qemu_img.end_offset(domain.runner, qemu_img.alone(t_path, "qcow2")))
    full = parent.capacity + qemu_img.metadata_overhead(parent.capacity)
    target = round_up(min(need, full), domain.record.extent_size)
    if target > parent.size:
        shard = domain.volume_shard(parent.uuid)
        with domain.manager_lock(shard):
            _lvextend(domain, shard, parent.uuid, target, parent.size)
        shard.activator.refresh(shard.vg_name, parent.uuid)


def fitted_size(used: int, capacity: int, extent: int, before: int, leaf: bool) -> int:
    """The LV size of a thin qcow2 volume after a merge into it: what its image uses
    (``used``, qemu-img check's end offset), with a new thin volume's room when it is
    the leaf again, never more than fully allocated, never below its size before the
    merge (``before``): the merge gives back what it grew, and no host's older
    mapping of the LV can be larger than the LV."""
    full = capacity + qemu_img.metadata_overhead(capacity)
    room = min(capacity, THIN_INITIAL_SIZE) if leaf else 0
    return max(before, round_up(max(used, min(used + room, full)), extent))


def _fit_after_merge(domain: Domain, parent: VolumeInfo, p_path: str, before: int,
                     leaf: bool) -> None:
    """A thin qcow2 parent's LV reduced to what it holds after the merge (vdsm reduces a
    merged volume to its optimal size the same way): the growth for the merge given
    back, down to fitted_size; never grown here (a thin volume's growth is the running
    VM's business). Only from a clean ``qemu-img check`` (read past the page cache);
    an image check finds anything wrong with is left as it is."""
    if parent.format != VolumeFormat.QCOW2 or parent.alloc != Allocation.THIN:
        return  # raw and preallocated volumes hold their whole capacity by design
    used = qemu_img.clean_end_offset(domain.runner, qemu_img.alone(p_path, "qcow2"))
    if used is None:
        log.warning("merge: volume %s not fitted (qemu-img check is not clean)",
                    parent.uuid)
        return
    target = fitted_size(used, parent.capacity, domain.record.extent_size, before, leaf)
    shard = domain.volume_shard(parent.uuid)
    with domain.manager_lock(shard):
        domain.require_manager_now()
        now = get_volume(domain, parent.uuid).size
        if target >= now:
            return
        shard.lvm.lvreduce(shard.vg_name, parent.uuid, target)
        domain.placement.used(shard, 0, target - now)
    shard.activator.refresh(shard.vg_name, parent.uuid)
    log.info("merge: volume %s reduced from %d to %d bytes", parent.uuid, now, target)


# Image delete


def delete_image(domain: Domain, request: DeleteImage, exclusive: ExclusiveLease
                 ) -> ImageDeleted:
    """Delete every volume of an image's chain that belongs to it, the leaf first
    (a template of another image at its base stays). Recorded like a merge: a
    manager that dies midway is followed by one that deletes the rest."""
    domain.require_manager()
    if request.request_id is None:
        request = replace(request, request_id=f"image-delete-{uuid.uuid4()}")
    with domain.request_lock(request.request_id):
        def plan() -> Any:
            info = image_info(domain, request.image)
            own = [v for v in info.chain if v.image == request.image][::-1]
            names = {v.uuid for v in own}
            for v in own:
                outside = [c for c in children(domain, v.uuid) if c not in names]
                if outside:
                    raise errors.HasChildren(v.uuid, outside, f"delete image {request.image}")
            return {"image": request.image, "volumes": [v.uuid for v in own],
                      "wipe": request.wipe, "discard": request.discard}

        intent = _intent(domain, request.request_id, plan)

        def run(a: dict[str, Any], resumed: bool) -> Any:
            return codec.to_wire(_delete_image(domain, a, resumed, exclusive))

        result = _once(domain, request, "image-delete", intent, run)
    return codec.from_wire(ImageDeleted, result)  # type: ignore[no-any-return]


def _delete_image(domain: Domain, a: dict[str, Any], resumed: bool,
                  exclusive: ExclusiveLease) -> ImageDeleted:
    volumes = [str(v) for v in a["volumes"]]
    for n, vol in enumerate(volumes):
        try:
            parent = get_volume(domain, vol).parent
        except errors.VolumeNotFound:
            if resumed or n:
                continue  # deleted before
            raise
        try:
            with domain.chain_lock(vol), domain.manager_lock(domain.volume_shard(vol)):
                _delete(domain, vol, bool(a["wipe"]), True, exclusive, parent,
                        discard=bool(a.get("discard")))
        except errors.Error as exc:
            if n and exc.changes_nothing:  # true of this volume, not of the request
                raise errors.Busy(f"image {a['image']}: {n} of {len(volumes)} volumes "
                                  f"deleted, then: {exc}") from exc
            raise
    return ImageDeleted(image=str(a["image"]), volumes=volumes)


# Recovery by a new manager


def recover_request(domain: Domain, rec: journal.RequestRecord) -> Any:
    """The answer of a pending snapshot or clone left by a dead manager: its volume
    if it was published, else the request is rolled back (volume.recover has removed
    the ``creating`` LV; a snapshot's parent is made a leaf again if nothing else is
    on top of it). Returns the wire result, or None when rolled back."""
    a = codec.from_wire(_OverlayIntent, rec.args, f"{rec.op} intent")
    shard = domain.shard(a.shard)
    lv: LogicalVolume | None = shard.lvm.volume_lv(shard.vg_name, a.volume)
    info = _volume(domain, lv) if lv is not None else None
    if info is not None and info.state == VolumeState.READY:
        return codec.to_wire(info)
    if a.snapshot:
        try:
            parent = get_volume(domain, a.parent)
        except errors.VolumeNotFound:
            return None
        if parent.role == VolumeRole.INTERNAL and not children(domain, a.parent):
            log.warning("recovery: volume %s is a leaf again (snapshot %s rolled back)",
                        a.parent, a.volume)
            _set_role(domain, parent, VolumeRole.LEAF)
    return None


def recovery(domain: Domain, exclusive: ExclusiveLease) -> dict[str, Any]:
    """What volume.recover does with a pending request of this module."""
    return {"image-delete": lambda rec: codec.to_wire(_delete_image(
                domain, rec.args, True, exclusive)),
            "merge": lambda rec: codec.to_wire(_merge(
                domain, codec.from_wire(_MergeIntent, rec.args, "merge intent"), True,
                exclusive)),
            "snapshot": lambda rec: recover_request(domain, rec),
            "clone": lambda rec: recover_request(domain, rec),
            "template": lambda rec: finish_template(domain, str(rec.args["volume"]),
                                                    exclusive)}
