"""Volumes: LVs named by UUID whose metadata lives in their tags (docs/design.md).

Metadata-changing operations run on the manager only and keep to as few LVM commits
as the operation allows: a raw create is one ``lvcreate`` carrying every tag, a
delete is one ``lvremove``. A qcow2 create takes two commits (``creating`` then
``ready`` around ``qemu-img create``) and a delete with ``--wipe`` marks the volume
``removing`` before it zeroes it, so a crash leaves a state that says what to finish.

The requests arrive validated (requests.py). With a ``request_id`` an operation is
exactly-once: the manager stores the resolved intent (new UUIDs, the absolute extend
target) before the first change and the answer after (journal.RequestLog).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from . import codec, errors, journal, qemu_img, tags
from .activation import set_read_only
from .domain import Domain
from .failpoints import failpoint
from .lvm import LogicalVolume
from .model import (
    Allocation,
    Deleted,
    VolumeFormat,
    VolumeInfo,
    VolumeRole,
    VolumeState,
    check_uuid,
)
from .requests import CreateVolume, DeleteVolume, ExtendVolume, Request
from .shards import Shard
from .units import GiB, MiB, round_up

log = logging.getLogger(__name__)

# First size of a thin qcow2 volume's LV; the thin-extend flow grows it in chunks.
# vdsm starts thin block volumes at 1 GiB for the same reason: room for a guest's
# first writes without a round trip to the manager.
THIN_INITIAL_SIZE = 1 * GiB
# blkdiscard of a large volume on a slow array: as long as a wipe may take.
DISCARD_TIMEOUT = 3600.0

# LVM selection matching sharedlvm volumes: every volume carries one sl.state tag.
# (LVM allows no regex on tag lists, and "{a,b}" did not match either tag on 2.03.16;
# "{a}" means "has tag a".)
VOLUME_SELECT = "(" + "||".join(
    f"lv_tags={{{tags.state_tag(state)}}}" for state in VolumeState) + ")"

# Allocates and initializes a lease slot for a new volume (lease_layout): required,
# a volume never exists without its lease.
LeaseAllocator = Callable[[str], int]


def _volume(domain: Domain, lv: LogicalVolume) -> VolumeInfo | None:
    """The volume an LV is (None for a special or foreign LV), named with the domain's
    name, not the VG's: a volume of shard K lives in VG ``<name>+K``."""
    if not tags.is_volume(lv):
        return None
    return replace(tags.volume_from_lv(lv), domain=domain.name)


def list_volumes(domain: Domain, image: str | None = None,
                 user_tags: dict[str, str] | None = None) -> list[VolumeInfo]:
    found = []
    for lv in domain.volume_lvs():
        info = _volume(domain, lv)
        if info is None or (image and info.image != image):
            continue
        if any(info.tags.get(k) != v for k, v in (user_tags or {}).items()):
            continue
        found.append(info)
    return sorted(found, key=lambda v: (v.image, v.uuid))


def get_volume(domain: Domain, volume_id: str) -> VolumeInfo:
    check_uuid(volume_id)
    shard = domain.volume_shard(volume_id)
    lv = shard.lvm.volume_lv(shard.vg_name, volume_id)  # the manager: from its view
    info = _volume(domain, lv) if lv is not None else None
    if info is None:
        domain.forget_volume(volume_id)
        raise errors.VolumeNotFound(volume_id, domain.name)
    return info


def _exists(domain: Domain, shard: Shard, volume_id: str) -> LogicalVolume | None:
    return shard.lvm.volume_lv(shard.vg_name, volume_id)


@contextlib.contextmanager
def activated(domain: Domain, volume_id: str) -> Iterator[str]:
    """Activate the volume on this host for the block, then deactivate it again."""
    shard = domain.volume_shard(volume_id)
    path = shard.activator.activate(shard.vg_name, volume_id)
    try:
        yield path
    finally:
        with contextlib.suppress(errors.Error):
            shard.activator.deactivate(shard.vg_name, volume_id)


# Exactly-once by request id

class ExclusiveLease(Protocol):
    """Holds a volume's lease exclusively for a block (lease_layout.LeaseLayout.exclusive
    with the manager's sanlock connection): required for every change of a volume's
    content or its removal, so no consumer can use it meanwhile. ``release_later``
    (a delete only: nobody can ask for a volume that is gone) gives it back after the
    answer, on the daemon's release thread, drained before a manager term begins or
    ends (service.py)."""

    def __call__(self, info: VolumeInfo, *,
                 release_later: bool = False) -> contextlib.AbstractContextManager[None]: ...


def request_digest(request: Request) -> str:
    """What a request id stands for: the request's arguments (not the domain's name,
    which each host spells from its own config)."""
    wire = codec.to_wire(request)
    for name in ("request_id", "domain", *request.digest_omits):
        wire.pop(name, None)
    text = json.dumps({"op": request.op, "fields": wire}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _once(domain: Domain, request: Request, op: str, intent: dict[str, Any],
          run: Callable[[dict[str, Any], bool], Any]) -> Any:
    """``run(intent, resumed)`` at most once per request id; returns its wire result.

    The first time, ``intent`` is recorded ``pending`` before ``run`` and the answer
    after: the result, or a final error (errors.Error.final) with its class and
    fields. An error raised before anything changed (errors.Error.changes_nothing: a
    held lease, no space) marks the request ``aborted``: it was not done and will not
    be done unless asked again. Any other error leaves it pending (it may have done
    part): a repeat, or the next manager's recovery, rolls it forward. Repeated:
    ``done`` returns the first result, ``failed`` raises the first error again,
    ``pending`` rolls the recorded intent forward with ``resumed=True`` (each step
    checks what is done), ``aborted`` runs as new. The same id with other arguments is
    refused before anything is done."""
    request_id = getattr(request, "request_id", None)
    if request_id is None:
        return run(intent, False)
    digest = request_digest(request)
    with domain.journal() as dev:
        requests = domain.request_log(dev)
        rec = requests.find(request_id)
        resumed = False
        if rec is not None and (rec.op != op or (rec.digest and rec.digest != digest)):
            raise errors.InvalidArgument(
                f"request id {request_id} was already used for another request ({rec.op})")
        if rec is not None and rec.state != journal.ABORTED:
            if rec.state == journal.DONE:
                return rec.result
            if rec.state == journal.FAILED:
                raise errors.from_wire(rec.error)
            intent, resumed = rec.args, True
        else:
            # The record must fit before anything is changed (it is the proof of the
            # change): put raises InvalidArgument for an oversized one.
            requests.put(journal.RequestRecord(request_id, op, journal.PENDING, digest,
                                               intent))
        try:
            result = run(intent, resumed)
        except errors.Error as exc:
            if exc.final or exc.changes_nothing:
                domain.require_manager_now()
                requests.put(journal.RequestRecord(
                    request_id, op, journal.FAILED if exc.final else journal.ABORTED,
                    digest, error=exc.to_wire()))
            raise
        domain.require_manager_now()
        requests.put(journal.RequestRecord(request_id, op, journal.DONE, digest,
                                           result=result))
        return result


# Create

@dataclass(frozen=True)
class _CreateIntent:
    """A create with everything resolved, as recorded in the journal."""

    volume: str
    image: str
    size: int
    format: VolumeFormat
    alloc: Allocation
    tags: dict[str, str]
    shard: int = 0  # records written before format 2 have none: shard 0


def _recorded(domain: Domain, request_id: str | None) -> journal.RequestRecord | None:
    """The current record of a request id, read before the operation picks its shard
    or resolves its target. A read: no fencing check (``_once`` checks before it
    writes anything)."""
    if request_id is None:
        return None
    with domain.special_reader("journal") as dev:
        return domain.request_log(dev).find(request_id)


def _intent(domain: Domain, request_id: str | None,
            plan: Callable[[], Any]) -> Any:
    """The intent to run a request with: a pending record's (rolled forward where it
    started), none for one answered already (``_once`` answers it as the first time),
    else ``plan()``: the checks and choices made only for a request not yet run."""
    rec = _recorded(domain, request_id)
    if rec is not None and rec.state == journal.PENDING:
        return rec.args
    if rec is not None and rec.state != journal.ABORTED:
        return {}
    return plan()


def create_volume(domain: Domain, request: CreateVolume, allocate_lease: LeaseAllocator,
                  exclusive: ExclusiveLease) -> VolumeInfo:
    domain.require_manager()
    assert request.alloc is not None  # resolved by the request
    with domain.request_lock(request.request_id):
        rec = _recorded(domain, request.request_id)
        recorded = rec.args if rec is not None and rec.state == journal.PENDING else None
        if recorded is not None:  # roll forward where it started
            shard = domain.shard(int(recorded.get("shard", 0)))
            intent = recorded
        else:
            shard = domain.placement.choose(_lv_size(request.size, request.format,
                                                     request.alloc))
            intent = codec.to_wire(_CreateIntent(
                volume=str(uuid.uuid4()), image=request.image or str(uuid.uuid4()),
                size=request.size, format=request.format, alloc=request.alloc,
                tags=dict(request.tags), shard=shard.index))

        def run(data: dict[str, Any], resumed: bool) -> Any:
            a = codec.from_wire(_CreateIntent, data, "create intent")
            return codec.to_wire(_create(domain, a, resumed, allocate_lease, exclusive))

        try:
            with domain.manager_lock(shard):
                result = _once(domain, request, "create", intent, run)
        except errors.Error:
            domain.placement.forget(shard)  # its counts may be off: read them again
            raise
    return codec.from_wire(VolumeInfo, result)  # type: ignore[no-any-return]


def _lv_size(size: int, fmt: VolumeFormat, alloc: Allocation) -> int:
    if fmt == VolumeFormat.RAW:
        return size
    lv_size = min(size, THIN_INITIAL_SIZE) if alloc == Allocation.THIN else size
    return lv_size + qemu_img.metadata_overhead(size)


def _create(domain: Domain, a: _CreateIntent, resumed: bool,
            allocate_lease: LeaseAllocator, exclusive: ExclusiveLease) -> VolumeInfo:
    gen = domain.record.manager_generation
    shard = domain.shard(a.shard)
    if resumed and _exists(domain, shard, a.volume):
        info = get_volume(domain, a.volume)
        if info.state == VolumeState.READY:  # published: never formatted again
            return info
        return _finish_qcow2(domain, info, a.size, exclusive)
    # The lease exists before the volume is published (docs/design.md "Create"), and
    # the index names its shard before the LV exists (journal: "The volume index").
    lease = allocate_lease(a.volume)
    domain.set_volume_shard(a.volume, shard)
    lv_size = _lv_size(a.size, a.format, a.alloc)
    if a.format == VolumeFormat.RAW:
        _lvcreate(domain, shard, a.volume, lv_size, tags.volume_tags(
            image=a.image, parent=None, fmt=a.format, alloc=a.alloc, generation=gen,
            lease=lease, state=VolumeState.READY, user=a.tags))
        # What one lvcreate just committed: no second LVM command to read it back.
        size = round_up(a.size, domain.record.extent_size)
        return VolumeInfo(uuid=a.volume, domain=domain.name, image=a.image, parent=None,
                          format=a.format, alloc=a.alloc, capacity=size, size=size,
                          state=VolumeState.READY, generation=gen, tags=dict(a.tags),
                          lease=lease)
    _lvcreate(domain, shard, a.volume, lv_size, tags.volume_tags(
        image=a.image, parent=None, fmt=a.format, alloc=a.alloc, generation=gen,
        lease=lease, state=VolumeState.CREATING, capacity=a.size, user=a.tags))
    return _finish_qcow2(domain, get_volume(domain, a.volume), a.size, exclusive)


def _finish_qcow2(domain: Domain, info: VolumeInfo, size: int,
                  exclusive: ExclusiveLease) -> VolumeInfo:
    """Format a volume left ``creating`` under its lease, then publish it."""
    with exclusive(info), activated(domain, info.uuid) as path:
        domain.require_manager_now()
        qemu_img.create(domain.runner, path, "qcow2", size)
    shard = domain.volume_shard(info.uuid)
    shard.lvm.change_tags(shard.vg_name, info.uuid,
                          add=[tags.state_tag(VolumeState.READY)],
                          delete=[tags.state_tag(VolumeState.CREATING)])
    return get_volume(domain, info.uuid)


def _lvextend(domain: Domain, shard: Shard, vol: str, size: int, current: int) -> None:
    try:
        shard.lvm.lvextend(shard.vg_name, vol, size)
    except errors.NoSpace:
        free = shard.lvm.vg(shard.vg_name).free
        domain.placement.forget(shard)
        raise errors.NoSpace(domain.name, size - current, free) from None
    domain.placement.used(shard, 0, size - current)


def _lvcreate(domain: Domain, shard: Shard, vol: str, size: int,
              lv_tags: list[str]) -> None:
    try:
        shard.lvm.lvcreate(shard.vg_name, vol, size, lv_tags)
    except errors.NoSpace:
        free = shard.lvm.vg(shard.vg_name).free
        raise errors.NoSpace(domain.name, size, free) from None
    domain.placement.used(shard, 1, size)


# Extend

def extend_volume(domain: Domain, request: ExtendVolume,
                  exclusive: ExclusiveLease) -> VolumeInfo:
    """Grow a volume to ``request.target(current capacity)`` bytes (never shrinks).

    A raw volume's LV grows under its users (they see the new size after a refresh).
    A qcow2 volume's virtual size is in its header: rewriting it needs the volume's
    lease, so it is refused while any host uses the volume (a running VM grows its
    disk through its own qemu)."""
    domain.require_manager()
    vol = request.volume
    with domain.request_lock(request.request_id), \
            domain.manager_lock(domain.volume_shard(vol)):
        current: list[VolumeInfo] = []

        def resolve() -> dict[str, Any]:
            info = get_volume(domain, vol)  # fresh view (rule 4)
            current.append(info)
            if request.allocation is not None:
                return {"volume": vol, "lv_size": _allocation_target(info, request)}
            new = request.target(info.capacity)
            if new < info.capacity:
                raise errors.InvalidArgument(
                    f"volume {vol} is {info.capacity} bytes; it cannot shrink to {new}")
            return {"volume": vol, "capacity": new}

        # A known id keeps what it resolved to the first time ("+1G" of the size
        # then), and a finished one is answered as it was: resolve only a new one.
        rec = _recorded(domain, request.request_id)
        intent = rec.args if rec is not None and rec.state != journal.ABORTED else None

        def run(a: dict[str, Any], resumed: bool) -> Any:
            info = current[0] if current and not resumed else None
            if "lv_size" in a:
                return codec.to_wire(_allocate(domain, a["volume"], int(a["lv_size"])))
            return codec.to_wire(_extend(domain, a["volume"], int(a["capacity"]), info,
                                         exclusive))

        result = _once(domain, request, "extend", resolve() if intent is None else intent,
                       run)
    return codec.from_wire(VolumeInfo, result)  # type: ignore[no-any-return]


def _allocation_target(info: VolumeInfo, request: ExtendVolume) -> int:
    if info.format != VolumeFormat.QCOW2 or info.alloc != Allocation.THIN:
        raise errors.InvalidArgument(
            f"volume {info.uuid} is {info.format} {info.alloc}: only a thin qcow2 volume's "
            "LV grows apart from its capacity (use --size)")
    new = request.target(info.size)
    most = round_up(info.capacity + qemu_img.metadata_overhead(info.capacity), MiB)
    if new < info.size or new > most:
        raise errors.InvalidArgument(
            f"volume {info.uuid} has a {info.size}-byte LV for a {info.capacity}-byte "
            f"capacity: its LV can grow to {most} bytes at most, not {new}")
    return new


def _allocate(domain: Domain, vol: str, lv_size: int) -> VolumeInfo:
    """Grow a thin volume's LV only: the qcow2 inside is not touched, so no lease is
    needed and the volume may be in use (the thin-extend path of a running VM)."""
    info = get_volume(domain, vol)
    _lvextend(domain, domain.volume_shard(vol), vol, lv_size, info.size)
    return get_volume(domain, vol)


def _extend(domain: Domain, vol: str, capacity: int, info: VolumeInfo | None,
            exclusive: ExclusiveLease) -> VolumeInfo:
    if info is None:
        info = get_volume(domain, vol)
    if not info.writable and capacity != info.capacity:
        raise errors.ReadOnlyVolume(vol, info.role.value, "grow")
    shard = domain.volume_shard(vol)
    if info.format == VolumeFormat.RAW:
        _lvextend(domain, shard, vol, capacity, info.size)
        size = max(info.size, round_up(capacity, domain.record.extent_size))
        return replace(info, capacity=size, size=size)
    if info.format != VolumeFormat.QCOW2:
        raise errors.Unsupported(f"volume {vol} has format {info.format}")
    if capacity == info.capacity:
        return info
    # qcow2: grow the virtual size; a preallocated volume's LV grows with it. The data
    # is reached first, so a volume that cannot be reached is refused unchanged.
    with exclusive(info), activated(domain, vol) as path:
        if info.alloc == Allocation.PREALLOCATED:
            # (qemu-img resize writes the header and L1 table near the image's start:
            # the device as mapped before the extend holds them)
            _lvextend(domain, shard, vol, capacity + qemu_img.metadata_overhead(capacity),
                      info.size)
        domain.require_manager_now()
        qemu_img.resize(domain.runner, path, "qcow2", capacity)
        shard.lvm.change_tags(shard.vg_name, vol, add=[tags.capacity_tag(capacity)],
                              delete=[tags.capacity_tag(info.capacity)])
    return get_volume(domain, vol)


# Delete

def delete_volume(domain: Domain, request: DeleteVolume,
                  exclusive: ExclusiveLease) -> Deleted:
    """Delete a volume, holding its lease exclusively from before the first change to
    after the removal: refused (VolumeInUse) while any host, live or dead but not yet
    expired, holds it, also when a repeated or recovered request rolls it forward."""
    domain.require_manager()

    def run(a: dict[str, Any], resumed: bool) -> Any:
        return codec.to_wire(_delete(domain, a["volume"], bool(a["wipe"]), resumed,
                                     exclusive, a.get("parent"),
                                     discard=bool(a.get("discard"))))

    with domain.request_lock(request.request_id), domain.chain_lock(request.volume), \
            domain.manager_lock(domain.volume_shard(request.volume)):
        try:  # recorded: a recovery after the removal still knows the parent
            parent = get_volume(domain, request.volume).parent
        except errors.VolumeNotFound:
            parent = None
        result = _once(domain, request, "delete",
                       {"volume": request.volume, "wipe": request.wipe, "parent": parent,
                        "discard": request.discard},
                       run)
    return codec.from_wire(Deleted, result)  # type: ignore[no-any-return]


def children(domain: Domain, volume_id: str) -> list[str]:
    """The volumes whose parent is ``volume_id``, in every shard. Asked by the manager
    before every delete: from its view of each shard in turn (no report, no thread
    pool, no volume decoded: the tag is matched as text; ~1 ms at 10,000 volumes)."""
    wanted = tags.parent_tag(volume_id)
    found: list[str] = []
    for shard in domain.shards():
        if shard.luns:
            found += [lv.name for lv in shard.lvm.volume_lvs(shard.vg_name)
                      if wanted in lv.tags]
    return sorted(found)


def _delete(domain: Domain, vol: str, wipe: bool, resumed: bool,
            exclusive: ExclusiveLease, parent: str | None = None, *,
            discard: bool = False) -> Deleted:
    try:
        info = get_volume(domain, vol)
    except errors.VolumeNotFound:
        if resumed:  # removed before the manager that started it died
            domain.clear_volume_shard(vol)
            _leaf_again(domain, parent)
            return Deleted(vol)
        raise
    shard = domain.volume_shard(vol)
    on_top = children(domain, vol)
    if on_top:  # their backing file: never removed under them
        raise errors.HasChildren(vol, on_top, "delete")
    # The lease is given back and the index entry cleared after the answer: neither
    # can matter to anyone once the LV is gone (bench/scale.py: 4 ms of a 47 ms delete).
    with exclusive(info, release_later=True):
        failpoint("delete-holding-lease")
        shard.activator.deactivate(shard.vg_name, vol)
        if discard:
            # Reach the data first: a LUN without discard refuses before any change.
            _discard(domain, shard, vol)
        if not wipe:
            # One command: the selection matches only a sharedlvm volume of that name,
            # never a special LV or a foreign LV (rule: never touch what is not ours).
            shard.lvm.lvremove_selected(shard.vg_name,
                                        f"lv_name={vol}&&{VOLUME_SELECT}")
        else:
            # Reach the data first: a volume that cannot be wiped is left untouched.
            shard.activator.activate(shard.vg_name, vol)
            if info.state != VolumeState.REMOVING:
                shard.lvm.change_tags(shard.vg_name, vol,
                                      add=[tags.state_tag(VolumeState.REMOVING)],
                                      delete=[tags.state_tag(info.state)])
            finish_removal(domain, vol)
    domain.placement.used(shard, -1, -info.size)
    domain.clear_volume_shard(vol, later=True)
    _leaf_again(domain, info.parent)
    return Deleted(vol)


def _discard(domain: Domain, shard: Shard, vol: str) -> None:
    """blkdiscard of the volume's extents (the LUN frees them, on thin storage, and reads
    them as zeroes where it says so), refused when its device does not take discards."""
    path = shard.activator.activate(shard.vg_name, vol)
    try:
        rdev = os.stat(path).st_rdev
        sysfs = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/queue")
        try:
            supported = int((sysfs / "discard_max_bytes").read_text()) > 0
        except (OSError, ValueError):
            supported = False
        if not supported:
            raise errors.InvalidArgument(f"the LUN of volume {vol} does not take discards: "
                                         "delete it without --discard (or with --wipe)")
        domain.require_manager_now()
        domain.runner.run(["blkdiscard", path], timeout=DISCARD_TIMEOUT)
    finally:
        shard.activator.deactivate(shard.vg_name, vol)


def _leaf_again(domain: Domain, parent: str | None) -> None:
    """After the leaf over ``parent`` was deleted: a parent of the same chain with
    nothing left on top of it is the leaf again, writable (a template stays one)."""
    if parent is None:
        return
    try:
        info = get_volume(domain, parent)
    except errors.VolumeNotFound:
        return
    if info.role != VolumeRole.INTERNAL or children(domain, parent):
        return
    shard = domain.volume_shard(parent)
    shard.lvm.change_tags(shard.vg_name, parent, delete=[tags.make_tag("role", "internal")])


def finish_removal(domain: Domain, vol: str) -> None:
    """Zero and remove a volume marked ``removing``, under its lease (the caller
    holds it); also the recovery path."""
    shard = domain.volume_shard(vol)
    lv = shard.lvm.volume_lv(shard.vg_name, vol)
    if lv is None:
        raise errors.VolumeNotFound(vol, domain.name)
    size = lv.size
    path = shard.activator.activate(shard.vg_name, vol)
    domain.require_manager_now()
    zero_device(path, size, progress=domain.progress)
    shard.activator.deactivate(shard.vg_name, vol)
    shard.lvm.lvremove(shard.vg_name, [vol])


def zero_device(path: str, size: int, chunk: int = 8 * 1024 * 1024,
                progress: Callable[[], None] | None = None) -> None:
    """Overwrite ``size`` bytes with zeros, O_DIRECT, synced before returning;
    ``progress`` is called after each chunk."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)
    try:
        offset = 0
        while offset < size:
            n = min(chunk, size - offset)
            os.pwritev(fd, [memoryview(buf)[:n]], offset)
            offset += n
            if progress is not None:
                progress()
        os.fsync(fd)
    finally:
        buf.close()
        os.close(fd)


def volume_path(domain: Domain, volume_id: str, read_only: bool = False,
                creating: bool = False, info: VolumeInfo | None = None) -> str:
    """Activate the volume on this host and return its device path, read-only for a
    shared lease's holder. Only for a caller that holds the volume's lease (or acquires
    it for the consumer it prepares the volume for): no activation without a lease.
    ``creating``: the volume is a copy's target, still ``creating``. ``info``: the
    volume as the caller read it after acquiring its lease (else read here)."""
    if info is None or info.uuid != volume_id:
        info = get_volume(domain, volume_id)
    if info.state != VolumeState.READY and not (
            creating and info.state == VolumeState.CREATING):
        raise errors.Busy(f"volume {volume_id} is {info.state}, not ready")
    shard = domain.volume_shard(volume_id)
    path = shard.activator.activate(shard.vg_name, volume_id)
    set_read_only(domain.runner, path, read_only)
    return path


# Recovery by a new manager

# Rolls a pending request of another module forward (its wire answer) or back (None).
Recovery = Callable[[journal.RequestRecord], Any]


def recover(domain: Domain, exclusive: ExclusiveLease,
            more: dict[str, Recovery] | None = None) -> list[str]:
    """Finish what a previous manager left, under each volume's lease: volumes left
    ``creating`` are removed (their content was never completed), ``removing`` ones
    wiped and removed; then every pending request in the journal is rolled forward,
    or marked aborted when nothing of it was done. What cannot be finished now (a
    volume held by a host) is returned, not raised: it is tried again at the next
    takeover or when its request is repeated. Fenced stops everything."""
    problems: list[str] = []
    for lv in domain.volume_lvs():
        info = _volume(domain, lv)
        if info is None or info.state == VolumeState.READY:
            continue
        try:
            with exclusive(info):
                if info.state == VolumeState.CREATING:
                    log.warning("recovery: removing %s left creating", info.uuid)
                    shard = domain.volume_shard(info.uuid)
                    shard.activator.deactivate(shard.vg_name, info.uuid)
                    shard.lvm.lvremove(shard.vg_name, [info.uuid])
                else:
                    log.warning("recovery: finishing the wipe and removal of %s", info.uuid)
                    finish_removal(domain, info.uuid)
            domain.clear_volume_shard(info.uuid)  # both ways: the LV is gone
        except errors.Fenced:
            raise
        except errors.Error as exc:
            problems.append(f"volume {info.uuid} ({info.state}): {exc}")
    return problems + _recover_requests(domain, exclusive, more)


def _recover_requests(domain: Domain, exclusive: ExclusiveLease,
                      more: dict[str, Recovery] | None) -> list[str]:
    problems: list[str] = []
    with domain.journal() as dev:
        requests = domain.request_log(dev)
        for rec in requests.pending():
            answer = journal.RequestRecord(rec.request_id, rec.op, journal.DONE, rec.digest)
            try:
                if rec.op == "create":
                    vol = str(rec.args["volume"])
                    found = _exists(domain, domain.shard(int(rec.args.get("shard", 0))), vol)
                    info = _volume(domain, found) if found else None
                    if info is None or info.state != VolumeState.READY:
                        answer.state = journal.ABORTED  # never published: nothing to keep
                    else:
                        answer.result = codec.to_wire(info)
                elif rec.op == "extend" and "lv_size" in rec.args:
                    answer.result = codec.to_wire(_allocate(
                        domain, str(rec.args["volume"]), int(rec.args["lv_size"])))
                elif rec.op == "extend":
                    answer.result = codec.to_wire(_extend(
                        domain, str(rec.args["volume"]), int(rec.args["capacity"]), None,
                        exclusive))
                elif rec.op == "delete":
                    answer.result = codec.to_wire(_delete(
                        domain, str(rec.args["volume"]), bool(rec.args["wipe"]), True,
                        exclusive, rec.args.get("parent"),
                        discard=bool(rec.args.get("discard"))))
                elif rec.op in (more or {}):
                    answer.result = (more or {})[rec.op](rec)
                    if answer.result is None:  # rolled back
                        answer.state = journal.ABORTED
                else:
                    raise errors.Unsupported(f"unknown request kind {rec.op!r}")
            except errors.Fenced:
                raise
            except errors.Error as exc:
                if not exc.final:
                    problems.append(f"request {rec.request_id} ({rec.op}): {exc}")
                    continue
                answer.state, answer.error = journal.FAILED, exc.to_wire()
            except (KeyError, TypeError, ValueError) as exc:
                answer.state = journal.FAILED
                answer.error = errors.CorruptRecord(f"bad pending record: {exc!r}").to_wire()
            log.warning("recovery: request %s (%s) is now %s", rec.request_id, rec.op,
                        answer.state)
            domain.require_manager_now()
            try:
                requests.put(answer)
            except errors.Fenced:
                raise
            except errors.Error as exc:  # reported and left: never cost the role
                problems.append(f"request {rec.request_id} ({rec.op}): cannot record "
                                f"its answer: {exc}")
    return problems
