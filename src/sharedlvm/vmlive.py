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
import time
import uuid as uuid_mod
from typing import Any

from . import errors
from . import volume as volume_mod
from .activation import set_read_only
from .lease_layout import LeaseLayout
from .model import VolumeInfo
from .requests import DeleteVolume, LiveSnapshotVolume
from .vmmigrate import held_by, running_watch
from .vmwatch import alive, write_record

log = logging.getLogger(__name__)


def snapshot(ctx: Any, pid: int, volume: str | None, tags: dict[str, str],
             request_id: str | None) -> VolumeInfo:
    watch = running_watch(ctx, pid, "live snapshot")
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
        domain = ctx.domain(record.domain)
        layout = LeaseLayout(domain)
        lease = held_by(pid, layout).get(volume)
        if lease is None or lease.shared:
            raise errors.Busy(f"VM {pid} does not hold volume {volume}'s lease "
                              "exclusively: no live snapshot")
        monitor = watch.connected_monitor()
        old_path = writes[volume]
        active = monitor.active_node(old_path)
        rid = request_id or f"live-snapshot-{uuid_mod.uuid4()}"
        try:
            new: VolumeInfo = ctx.ask(LiveSnapshotVolume(
                volume, domain.host_id, dict(tags), rid, record.domain))
        except errors.Error as exc:
            log.error("VM %d: live snapshot of %s: no new leaf (%s); if the manager made "
                      "one, 'vm snapshot %d --request-id %s' finishes it", pid, volume,
                      exc, pid, rid)
            raise
        node = f"sl-{new.uuid[:8]}"
        acquired = added = sent = False
        try:
            # Recorded before it is activated (`run` deactivates what the record names
            # when qemu ends), then, once qemu has a node on it, as written by the VM
            # too until the switch is known: a daemon restarted meanwhile watches (and
            # grows) whichever qemu writes.
            _save(ctx, watch, dataclasses.replace(
                record, others=(*record.others, new.uuid)))
            layout.acquire_volume(new, shared=False, pid=pid)
            acquired = True
            path = volume_mod.volume_path(domain, new.uuid, info=new)
            sent = True  # from here a lost answer may hide a done command
            monitor.add_overlay(node, path)
            added = True
            _save(ctx, watch, dataclasses.replace(
                record, volumes=(*record.volumes, (new.uuid, path)),
                others=(*record.others, new.uuid)))
            monitor.snapshot(active, node)
        except Exception as exc:
            if sent and not isinstance(exc, errors.MonitorRefused):
                # No answer: qemu may have the node, or have switched. Everything stays
                # the VM's (the new leaf's lease dies with qemu; what its record names
                # is watched and deactivated at its end): never undone blind.
                _remember(watch, dataclasses.replace(
                    record, volumes=(*record.volumes, (new.uuid, path)),
                    others=(*record.others, new.uuid)))
                raise errors.MonitorError(
                    f"VM {pid}: the switch to the new leaf {new.uuid} got no answer "
                    f"({exc}): qemu may write either volume; both stay the VM's until "
                    "it ends") from exc
            log.error("VM %d: live snapshot of %s failed before the switch: %s; undoing",
                      pid, volume, exc)
            _undo(ctx, watch, record, layout, domain, new, node, added, acquired, rid)
            raise
        # Switched: qemu writes the new leaf only; the old one is read. The watch
        # follows even if the record cannot be written (a restarted daemon would not).
        others = tuple(dict.fromkeys((*record.others, volume)))
        switched = dataclasses.replace(record, volumes=tuple(
            (new.uuid, path) if u == volume else (u, p) for u, p in record.volumes),
            others=others)
        try:
            write_record(ctx.paths, switched)
        except OSError as exc:
            log.error("VM %d: its record could not be written after the switch: %s",
                      pid, exc)
        _remember(watch, switched)
        with watch.grow_lock:  # no grow of the old leaf in flight: its refresh would
            _old_leaf_shared(ctx, monitor, layout, domain, pid, volume, active, old_path)
        log.info("VM %d: live snapshot: writes %s now, over %s", pid, new.uuid, volume)
        return volume_mod.get_volume(domain, new.uuid)


def _remember(watch: Any, record: Any) -> None:
    """The watch follows ``record`` (its disks reloaded before its next event)."""
    watch.record = record
    watch.reload.set()


def _save(ctx: Any, watch: Any, record: Any) -> None:
    """The VM's record as it is now (a restarted daemon watches from it; `run`
    deactivates what it names): a step that cannot be recorded is not taken."""
    write_record(ctx.paths, record)
    watch.record = record


def _undo(ctx: Any, watch: Any, record: Any, layout: LeaseLayout, domain: Any,
          new: VolumeInfo, node: str, added: bool, acquired: bool, rid: str) -> None:
    """Before the switch: the node removed, the new leaf deactivated, then its lease
    released (never a mapping without a lease), then the leaf deleted, which makes the
    old one the leaf again."""
    monitor = watch.monitor
    if added and monitor is not None:
        with contextlib.suppress(errors.Error):
            monitor.remove_node(node)
    try:
        domain.deactivate_volume(new.uuid)
    except errors.Error as exc:
        log.error("VM %d: the new leaf %s stays active and leased (%s): it is deactivated "
                  "when the VM ends; delete it then", watch.record.pid, new.uuid, exc)
        return
    if acquired:
        with contextlib.suppress(errors.Error):
            layout.release_volume(new, pid=watch.record.pid)
    if alive(watch.record):  # else `run` has removed the record: not written again
        with contextlib.suppress(OSError):
            _save(ctx, watch, record)
    deadline = time.monotonic() + 15  # a dead qemu's lease: freed by sanlock at once
    while True:
        try:
            ctx.ask(DeleteVolume(new.uuid, request_id=f"{rid}:undo", domain=record.domain))
            return
        except errors.VolumeInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _old_leaf_shared(ctx: Any, monitor: Any, layout: LeaseLayout, domain: Any, pid: int,
                     volume: str, active: str, path: str) -> None:
    """The old leaf is read only now: once qemu says it opened it read-only, its
    device is made read-only too (a write would fail, not land) and its lease shared
    (released, then acquired shared: sanlock has no conversion here; in between
    nobody can take it to write it: it is internal, with a child), so that a
    migration's destination can take its own shared lease on it."""
    try:
        if not monitor.read_only(active):
            log.error("VM %d: qemu still has %s open read-write after the switch: its "
                      "lease stays exclusive", pid, volume)
            return
        set_read_only(domain.runner, path, True)
        old = volume_mod.get_volume(domain, volume)
        layout.release_volume(old, pid=pid)
    except errors.Error as exc:
        log.error("VM %d: the lease of %s, now read only, stays exclusive (%s): a "
                  "migration's destination cannot open the chain until the VM ends",
                  pid, volume, exc)
        return
    # Released: the VM reads it with no lease until one of these succeeds.
    for shared in (True, True, True, False, False):
        try:
            layout.acquire_volume(old, shared=shared, pid=pid)
            return
        except errors.Error as exc:
            log.warning("VM %d: re-acquiring the lease of %s (%s): %s", pid, volume,
                        "shared" if shared else "exclusive", exc)
            time.sleep(0.2)
    # Nobody may change a volume a running VM reads: the VM is stopped (not resumed
    # by sharedlvm: a pause that is not its own) for the administrator.
    log.critical("VM %d: no lease could be taken back on %s, which it reads: VM paused",
                 pid, volume)
    with contextlib.suppress(errors.Error):
        monitor.pause()
