"""Live snapshot of a running VM's disk (docs/design.md, "Live snapshot").

``vm snapshot PID`` on the VM's host:

1. The manager makes the new leaf over the VM's leaf (LiveSnapshotVolume, through the
   mailbox from any host): an empty qcow2 overlay whose backing file is the leaf, the
   leaf turned internal. Unlike an offline snapshot it does not take the leaf's lease
   (the VM holds it); it checks that the asking host alone holds it. Until step 3 the
   VM still writes the old leaf, and the new one reads through to it: what the
   snapshot holds is the old leaf as of the switch.
2. This host acquires the new leaf's lease for the VM's qemu (on behalf of its pid:
   the lease dies with the VM) and activates it.
3. qemu switches: ``blockdev-add`` of a qcow2 node on the new leaf's device, then
   ``blockdev-snapshot`` makes it the drive's active layer, backed by the old one.
   From here on qemu writes only the new leaf; the old one is read.
4. The VM's record names the new leaf; the watch grows it from now on; ``run``
   deactivates it with the rest when qemu exits.

After the switch the old leaf's lease, the VM's, is made shared (released and
acquired shared on the VM's behalf: sanlock has no conversion here), as for any volume
below a leaf, so that a migration's destination can open the chain. A failure before
the switch undoes it all: the node removed, the lease released, the new leaf deleted
(its parent is a leaf again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid as uuid_mod
from typing import Any

from . import errors
from . import volume as volume_mod
from .lease_layout import LeaseLayout
from .model import VolumeInfo
from .requests import DeleteVolume, LiveSnapshotVolume
from .vmwatch import write_record

log = logging.getLogger(__name__)


def snapshot(ctx: Any, pid: int, volume: str | None, tags: dict[str, str],
             request_id: str | None) -> VolumeInfo:
    watch = ctx.vms.watch_of(pid)
    if not watch.handed_over.is_set():
        raise errors.InvalidArgument(f"VM {pid} is a migration's destination, not running "
                                     "here yet")
    with watch.migration_lock:
        record = watch.record
        writes = dict(record.volumes)
        if volume is None:
            if len(writes) != 1:
                raise errors.InvalidArgument(
                    f"VM {pid} writes {len(writes)} volumes ({', '.join(writes) or 'none'})"
                    ": give --volume")
            volume = next(iter(writes))
        if volume not in writes:
            raise errors.InvalidArgument(f"VM {pid} does not write volume {volume}")
        monitor = watch.connected_monitor()
        active = monitor.active_node(writes[volume])
        domain = ctx.domain(record.domain)
        rid = request_id or f"live-snapshot-{uuid_mod.uuid4()}"
        new: VolumeInfo = ctx.ask(LiveSnapshotVolume(
            volume, domain.host_id, dict(tags), rid, record.domain))
        layout = LeaseLayout(domain)
        node = f"sl-{new.uuid[:8]}"
        acquired = added = False
        try:
            layout.acquire_volume(new, shared=False, pid=pid)
            acquired = True
            path = volume_mod.volume_path(domain, new.uuid, info=new)
            monitor.add_overlay(node, path)
            added = True
            monitor.snapshot(active, node)
        except Exception as exc:
            log.error("VM %d: live snapshot of %s failed before the switch: %s; undoing",
                      pid, volume, exc)
            if added:
                with contextlib.suppress(errors.Error):
                    monitor.remove_node(node)
            if acquired:
                with contextlib.suppress(errors.Error):
                    layout.release_volume(new, pid=pid)
            with contextlib.suppress(errors.Error):
                domain.deactivate_volume(new.uuid)
            ctx.ask(DeleteVolume(new.uuid, request_id=f"{rid}:undo",
                                 domain=record.domain))
            raise
        # The old leaf is only read now: its lease becomes shared, so that a
        # migration's destination can take its own shared lease on it. sanlock has no
        # conversion here: released, then acquired shared at once. In between nobody
        # can take it exclusively for a write: it is internal, with a child.
        old = volume_mod.get_volume(domain, volume)
        try:
            layout.release_volume(old, pid=pid)
            layout.acquire_volume(old, shared=True, pid=pid)
        except errors.Error as exc:
            log.error("VM %d: the lease of %s, now read only, could not be made shared "
                      "(%s): a migration of this VM will be refused until it restarts",
                      pid, volume, exc)
        watch.record = dataclasses.replace(record, volumes=tuple(
            (new.uuid, path) if u == volume else (u, p) for u, p in record.volumes))
        try:
            write_record(ctx.paths, watch.record)
        except OSError as exc:  # the watch knows; a restarted daemon would not
            log.error("VM %d: its record could not be written: %s", pid, exc)
        watch.reload.set()
        log.info("VM %d: live snapshot: writes %s now, over %s", pid, new.uuid, volume)
        return volume_mod.get_volume(domain, new.uuid)
