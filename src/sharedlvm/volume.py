"""Volumes: LVs named by UUID whose metadata lives in their tags (DESIGN.md).

Metadata-changing operations run on the writer only and keep to as few LVM commits
as the operation allows: a raw create is one ``lvcreate`` carrying every tag, a
delete is one ``lvremove``. A qcow2 create takes two commits (``creating`` then
``ready`` around ``qemu-img create``) and a delete with ``--wipe`` marks the volume
``removing`` before it zeroes it, so a crash leaves a state that says what to finish.

With a ``request_id`` an operation is exactly-once: see journal.RequestLog.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import errors, journal, qemu_img, tags
from .domain import SPECIAL_LVS, Domain
from .lvm import LogicalVolume
from .units import GiB, format_size, round_up

log = logging.getLogger(__name__)

FORMATS = ("raw", "qcow2")
ALLOCATIONS = ("preallocated", "thin")

# First size of a thin qcow2 volume's LV; the thin-extend flow grows it in chunks.
# vdsm starts thin block volumes at 1 GiB for the same reason: room for a guest's
# first writes without a round trip to the manager.
THIN_INITIAL_SIZE = 1 * GiB

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def check_uuid(value: str, what: str = "volume") -> str:
    if not _UUID_RE.match(value):
        raise errors.InvalidArgument(f"invalid {what} id {value!r}: expected a lowercase UUID")
    return value


def check_request_id(value: str) -> str:
    if not _REQUEST_ID_RE.match(value):
        raise errors.InvalidArgument(
            f"invalid request id {value!r}: 1-128 letters, digits, '_', '.', ':', '-'")
    return value


@dataclass(frozen=True)
class VolumeInfo:
    uuid: str
    domain: str
    image: str
    parent: str
    format: str
    alloc: str
    capacity: int
    size: int
    state: str
    generation: int
    user_tags: dict[str, str] = field(default_factory=dict)
    segments: int = 1
    lease: int | None = None

    @classmethod
    def from_lv(cls, lv: LogicalVolume) -> VolumeInfo:
        meta, user = tags.parse_tags(lv.tags)
        fmt = meta.get("format", "raw")
        # A raw volume's capacity is its LV size: one source of truth. qcow2 volumes
        # carry their virtual size in sl.capacity (the LV may be smaller: thin).
        capacity = int(meta["capacity"]) if "capacity" in meta else lv.size
        return cls(uuid=lv.name, domain=lv.vg_name, image=meta.get("image", ""),
                   parent=meta.get("parent", "none"), format=fmt,
                   alloc=meta.get("alloc", "preallocated"), capacity=capacity, size=lv.size,
                   state=meta.get("state", "unknown"), generation=int(meta.get("gen", "0")),
                   user_tags=user, segments=lv.segments,
                   lease=int(meta["lease"]) if meta.get("lease", "").isdigit() else None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VolumeInfo:
        return cls(uuid=d["uuid"], domain=d["domain"], image=d["image"], parent=d["parent"],
                   format=d["format"], alloc=d["alloc"], capacity=int(d["capacity"]),
                   size=int(d["size"]), state=d["state"], generation=int(d["generation"]),
                   user_tags=dict(d["tags"]), lease=d.get("lease"))

    def as_dict(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "domain": self.domain, "image": self.image,
                "parent": self.parent, "format": self.format, "alloc": self.alloc,
                "capacity": self.capacity, "size": self.size, "state": self.state,
                "generation": self.generation, "tags": dict(self.user_tags),
                "lease": self.lease}


# LVM selection matching sharedlvm volumes: every volume carries one sl.state tag.
# (LVM allows no regex on tag lists, and "{a,b}" did not match either tag on 2.03.16;
# "{a}" means "has tag a".)
VOLUME_SELECT = "(" + " || ".join(
    f"lv_tags={{sl.state={state}}}" for state in ("ready", "creating", "removing")) + ")"


def _is_volume(lv: LogicalVolume) -> bool:
    return lv.name not in SPECIAL_LVS and any(t.startswith("sl.image=") for t in lv.tags)


def list_volumes(domain: Domain, image: str | None = None,
                 user_tags: Sequence[tuple[str, str]] = ()) -> list[VolumeInfo]:
    if image:
        check_uuid(image, "image")
    found = []
    for lv in domain.lvm.lvs(domain.vg_name):
        if not _is_volume(lv):
            continue
        info = VolumeInfo.from_lv(lv)
        if image and info.image != image:
            continue
        if any(info.user_tags.get(k) != v for k, v in user_tags):
            continue
        found.append(info)
    return sorted(found, key=lambda v: (v.image, v.uuid))


def get_volume(domain: Domain, volume_id: str) -> VolumeInfo:
    check_uuid(volume_id)
    try:
        lv = domain.lvm.lv(domain.vg_name, volume_id)
    except errors.VolumeNotFound:
        raise errors.VolumeNotFound(f"volume {volume_id} not found in domain {domain.name}") \
            from None
    if not _is_volume(lv):
        raise errors.VolumeNotFound(f"volume {volume_id} not found in domain {domain.name}")
    return VolumeInfo.from_lv(lv)


def _once(domain: Domain, request_id: str | None, op: str, args: dict[str, Any],
          run: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Run ``run(args)`` at most once per request id (see journal.RequestLog)."""
    if request_id is None:
        return run(args)
    check_request_id(request_id)
    with domain.journal() as dev:
        log_ = journal.RequestLog(dev)
        rec = log_.find(request_id)
        if rec is not None:
            if rec.op != op:
                raise errors.InvalidArgument(
                    f"request id {request_id} was already used for {rec.op}")
            if rec.state == "done":
                return rec.result
            if rec.state == "failed":
                raise errors.Error(rec.error)
            # pending: roll the same resolved operation forward
            args = dict(rec.args, resumed=True)
        else:
            log_.put(journal.RequestRecord(request_id, op, "pending", args))
        try:
            result = run(args)
        except errors.Error as exc:
            log_.put(journal.RequestRecord(request_id, op, "failed", args, error=str(exc)))
            raise
        log_.put(journal.RequestRecord(request_id, op, "done", args, result))
        return result


def create_volume(domain: Domain, size: int, fmt: str = "raw", alloc: str | None = None,
                  image: str | None = None, user_tags: Sequence[tuple[str, str]] = (),
                  request_id: str | None = None) -> VolumeInfo:
    if fmt not in FORMATS:
        raise errors.InvalidArgument(f"invalid format {fmt!r}: use raw or qcow2")
    alloc = alloc or ("thin" if fmt == "qcow2" else "preallocated")
    if alloc not in ALLOCATIONS:
        raise errors.InvalidArgument(f"invalid allocation {alloc!r}: use preallocated or thin")
    if fmt == "raw" and alloc == "thin":
        raise errors.InvalidArgument("raw volumes are always preallocated; thin needs qcow2")
    if size <= 0:
        raise errors.InvalidArgument("size must be larger than 0")
    if image:
        check_uuid(image, "image")
    user = [tags.make_user_tag(k, v) for k, v in user_tags]  # validates before any change
    domain.require_writer()
    args = {"volume": str(uuid.uuid4()), "image": image or str(uuid.uuid4()), "size": size,
            "format": fmt, "alloc": alloc, "tags": user}
    with domain.writer_lock():
        result = _once(domain, request_id, "create", args,
                       lambda a: _create(domain, a).as_dict())
    return VolumeInfo.from_dict(result)


def _create(domain: Domain, a: dict[str, Any]) -> VolumeInfo:
    vol, fmt, size = a["volume"], a["format"], int(a["size"])
    base = [tags.make_tag("image", a["image"]), tags.make_tag("parent", "none"),
            tags.make_tag("format", fmt), tags.make_tag("alloc", a["alloc"]),
            tags.make_tag("gen", str(domain.record.manager_generation)), *a["tags"]]
    existing = domain.lvm.lvs(domain.vg_name, select=f"lv_name={vol}") \
        if "resumed" in a else []
    lease = None
    if domain.lease_allocator is not None and not existing:
        # The lease exists before the volume is published (DESIGN.md "Create").
        lease = domain.lease_allocator(vol)
        base.append(tags.make_tag("lease", str(lease)))
    extent = domain.record.extent_size
    if fmt == "raw":
        if existing:
            return get_volume(domain, vol)
        _lvcreate(domain, vol, size, [*base, tags.make_tag("state", "ready")])
        # What one lvcreate just committed: no second LVM command to read it back.
        size = round_up(size, extent)
        return VolumeInfo(uuid=vol, domain=domain.name, image=a["image"], parent="none",
                          format="raw", alloc="preallocated", capacity=size, size=size,
                          state="ready", generation=domain.record.manager_generation,
                          user_tags=tags.parse_tags(a["tags"])[1], lease=lease)
    lv_size = (min(size, THIN_INITIAL_SIZE) if a["alloc"] == "thin" else size)
    lv_size += qemu_img.metadata_overhead(size)
    creating = tags.make_tag("state", "creating")
    if not existing:
        _lvcreate(domain, vol, lv_size, [*base, creating, tags.make_tag("capacity", str(size))])
    path = domain.activator.activate(domain.vg_name, vol)
    try:
        qemu_img.create(domain.runner, path, "qcow2", size)
    finally:
        with contextlib.suppress(errors.Error):
            domain.activator.deactivate(domain.vg_name, vol)
    domain.lvm.change_tags(domain.vg_name, vol, add=[tags.make_tag("state", "ready")],
                           delete=[creating])
    return get_volume(domain, vol)


def _lvcreate(domain: Domain, vol: str, size: int, lv_tags: list[str]) -> None:
    try:
        domain.lvm.lvcreate(domain.vg_name, vol, size, lv_tags)
    except errors.NoSpace:
        free = domain.lvm.vg(domain.vg_name).free
        raise errors.NoSpace(f"not enough free space in domain {domain.name}: need "
                             f"{format_size(size)}, free {format_size(free)}") from None


def extend_volume(domain: Domain, volume_id: str, target: Callable[[int], int],
                  request_id: str | None = None) -> VolumeInfo:
    """Grow a volume to ``target(current capacity)`` bytes (never shrinks)."""
    check_uuid(volume_id)
    domain.require_writer()
    with domain.writer_lock():
        current: list[VolumeInfo] = []

        def resolve() -> dict[str, Any]:
            info = get_volume(domain, volume_id)  # fresh view (rule 4)
            current.append(info)
            new = target(info.capacity)
            if new < info.capacity:
                raise errors.InvalidArgument(
                    f"volume {volume_id} is {info.capacity} bytes; it cannot shrink to {new}")
            return {"volume": volume_id, "capacity": new}

        if request_id is not None:
            check_request_id(request_id)
            with domain.journal() as dev:
                rec = journal.RequestLog(dev).find(request_id)
            args = rec.args if rec else resolve()
        else:
            args = resolve()
        result = _once(domain, request_id, "extend", args,
                       lambda a: _extend(domain, a, None if "resumed" in a else
                                         current[0] if current else None).as_dict())
    return VolumeInfo.from_dict(result)


def _extend(domain: Domain, a: dict[str, Any], info: VolumeInfo | None) -> VolumeInfo:
    vol, capacity = a["volume"], int(a["capacity"])
    if info is None:
        info = get_volume(domain, vol)
    if info.format == "raw":
        domain.lvm.lvextend(domain.vg_name, vol, capacity)
        size = max(info.size, round_up(capacity, domain.record.extent_size))
        return replace(info, capacity=size, size=size)
    if capacity == info.capacity:
        return info
    # qcow2: grow the virtual size; a preallocated volume's LV grows with it.
    if info.alloc == "preallocated":
        domain.lvm.lvextend(domain.vg_name, vol,
                            capacity + qemu_img.metadata_overhead(capacity))
    path = domain.activator.activate(domain.vg_name, vol)
    try:
        qemu_img.resize(domain.runner, path, "qcow2", capacity)
    finally:
        with contextlib.suppress(errors.Error):
            domain.activator.deactivate(domain.vg_name, vol)
    domain.lvm.change_tags(domain.vg_name, vol, add=[tags.make_tag("capacity", str(capacity))],
                           delete=[tags.make_tag("capacity", str(info.capacity))])
    return get_volume(domain, vol)


def delete_volume(domain: Domain, volume_id: str, wipe: bool = False,
                  request_id: str | None = None,
                  check_free: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Delete a volume; ``check_free`` (the daemon's lease check) runs only when the
    deletion is actually executed, not when a repeated request is answered."""
    check_uuid(volume_id)
    domain.require_writer()

    def run(a: dict[str, Any]) -> dict[str, Any]:
        if check_free is not None and "resumed" not in a:
            check_free(a["volume"])
        return _delete(domain, a)

    with domain.writer_lock():
        return _once(domain, request_id, "delete", {"volume": volume_id, "wipe": wipe}, run)


def _delete(domain: Domain, a: dict[str, Any]) -> dict[str, Any]:
    vol = a["volume"]
    if not a["wipe"]:
        # One command: the selection matches only a sharedlvm volume of that name,
        # never a special LV or a foreign LV (rule: never touch what is not ours).
        domain.activator.deactivate(domain.vg_name, vol)
        if domain.lvm.lvremove_selected(domain.vg_name, f"lv_name={vol} && {VOLUME_SELECT}"):
            return {"uuid": vol, "deleted": True}
        if "resumed" in a:
            return {"uuid": vol, "deleted": True}
        raise errors.VolumeNotFound(f"volume {vol} not found in domain {domain.name}")
    try:
        info = get_volume(domain, vol)
    except errors.VolumeNotFound:
        if "resumed" in a:
            return {"uuid": vol, "deleted": True}
        raise
    # Reach the data first: a volume that cannot be wiped is left untouched.
    domain.activator.activate(domain.vg_name, vol)
    if info.state != "removing":
        domain.lvm.change_tags(domain.vg_name, vol, add=[tags.make_tag("state", "removing")],
                               delete=[tags.make_tag("state", info.state)])
    finish_removal(domain, vol)
    return {"uuid": vol, "deleted": True}


def finish_removal(domain: Domain, vol: str) -> None:
    """Zero and remove a volume marked ``removing`` (also the recovery path)."""
    size = domain.lvm.lv(domain.vg_name, vol).size
    zero_device(domain.activator.activate(domain.vg_name, vol), size)
    domain.activator.deactivate(domain.vg_name, vol)
    domain.lvm.lvremove(domain.vg_name, [vol])


def zero_device(path: str, size: int, chunk: int = 8 * 1024 * 1024) -> None:
    """Overwrite ``size`` bytes with zeros, O_DIRECT, synced before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)
    try:
        offset = 0
        while offset < size:
            n = min(chunk, size - offset)
            os.pwritev(fd, [memoryview(buf)[:n]], offset)
            offset += n
        os.fsync(fd)
    finally:
        buf.close()
        os.close(fd)


def volume_path(domain: Domain, volume_id: str) -> str:
    """Activate the volume on this host and return its device path."""
    info = get_volume(domain, volume_id)
    if info.state != "ready":
        raise errors.Busy(f"volume {volume_id} is {info.state}, not ready")
    return domain.activator.activate(domain.vg_name, volume_id)
