"""Live snapshot and live merge of a running VM's disk (docs/design.md, "Live snapshot",
"Live merge").

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
import os
import time
import uuid as uuid_mod
from typing import Any

from . import errors, qemu_img
from . import volume as volume_mod
from .activation import set_read_only
from .lease_layout import LeaseLayout
from .model import Allocation, VolumeFormat, VolumeInfo, VolumeRole, VolumeState
from .requests import DeleteVolume, ExtendVolume, LiveMergeVolume, LiveSnapshotVolume, MergeVolume
from .units import round_up
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
                volume, domain.host_id, rid, record.domain, tags=dict(tags)))
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
    _reacquire(layout, monitor, pid, old, (True, True, True, False, False))


def _reacquire(layout: LeaseLayout, monitor: Any, pid: int, info: VolumeInfo,
               modes: tuple[bool, ...]) -> None:
    """A lease the VM gave up on a volume it reads taken back for it: shared or
    exclusive, in the order of ``modes``."""
    for shared in modes:
        try:
            layout.acquire_volume(info, shared=shared, pid=pid)
            return
        except errors.Error as exc:
            log.warning("VM %d: re-acquiring the lease of %s (%s): %s", pid, info.uuid,
                        "shared" if shared else "exclusive", exc)
            time.sleep(0.2)
    # Nobody may change a volume a running VM reads: the VM is stopped (not resumed
    # by sharedlvm: a pause that is not its own) for the administrator.
    log.critical("VM %d: no lease could be taken back on %s, which it reads: VM paused",
                 pid, info.uuid)
    with contextlib.suppress(errors.Error):
        monitor.pause()


# Live merge

# How often a commit job is looked at, and for how long at most: it copies at the
# disk's speed, and an active commit's mirror follows the guest's writes until ready.
JOB_POLL = 0.05
JOB_TIMEOUT = 6 * 3600.0
# How long an active merge waits, before its pivot, for a VM paused by an I/O error
# (ENOSPC, which the watch resolves) to run again. A VM paused by anyone else is not
# pivoted: a resume that is not the merge's own could come before the mark.
RUNNING_WAIT = 10.0


def merge(ctx: Any, pid: int, volume: str, request_id: str | None) -> VolumeInfo:
    """``vm merge PID --volume V``: V's data committed into the volume under it by the
    VM's own qemu (block-commit), the VM running on, then V dropped from the chain.

    V is the VM's leaf (an active commit: qemu writes both until ``job-complete``
    pivots the drive onto the base) or the volume under the leaf (qemu then names the
    base in the leaf's header). In this order, so that a cut anywhere leaves a chain
    that reads right: the base grown and its lease made exclusive; the job run; for an
    active commit the VM paused for the pivot, so that no guest write lands in the
    base before the manager knows V is stale; the record and the watch moved to the
    base; the manager marks V ``merged`` (never opened again); the VM resumed; V's
    node, mapping and lease let go here; the manager drops V. A failure before the
    pivot cancels the job and leaves V in the chain (it still holds all it held);
    after it, ``vm merge`` again (qemu's chain says which it was), or ``volume merge
    V`` once the VM is gone, finishes."""
    watch = running_watch(ctx, pid, "live merge")
    rid = request_id or f"merge-live-{volume}"
    with watch.migration_lock:
        record = watch.record
        domain = ctx.domain(record.domain)
        layout = LeaseLayout(domain)
        try:
            top = volume_mod.get_volume(domain, volume)
        except errors.VolumeNotFound:
            # dropped already: the drop's answer, from the journal (or the same error)
            done: VolumeInfo = ctx.ask(MergeVolume(volume, request_id=rid,
                                                   domain=record.domain))
            return done
        if top.parent is None:
            raise errors.InvalidArgument(f"volume {volume} is the base of its chain: "
                                         "nothing below it to merge into")
        base = volume_mod.get_volume(domain, top.parent)
        held = held_by(pid, layout)
        if top.state == VolumeState.MERGED and volume not in held:
            # all but the drop was done; the record follows if it did not yet
            with contextlib.suppress(errors.Error):
                _follow(ctx, watch, volume, base.uuid, _device(domain, base.uuid))
            _drop(ctx, record.domain, volume, rid)
            return volume_mod.get_volume(domain, base.uuid)
        if volume not in held or base.uuid not in held:
            raise errors.InvalidArgument(f"VM {pid} does not read volume {volume} and the "
                                         "volume under it")
        writes = dict(record.volumes)
        if volume in writes:
            leaf_path, active = writes[volume], True
        elif base.uuid in writes and volume in record.others:
            leaf_path, active = writes[base.uuid], True  # pivoted: the record followed
        else:
            above = volume_mod.children(domain, volume)
            if len(above) != 1 or above[0] not in writes:
                raise errors.Unsupported(
                    f"volume {volume} is neither VM {pid}'s leaf nor the volume under "
                    "it: merge the volumes above it first")
            leaf_path, active = writes[above[0]], False
        top_dev, base_dev = _device(domain, volume), _device(domain, base.uuid)
        monitor = watch.connected_monitor()
        job = f"sl-merge-{volume}"
        # A cut merge's job first: cancelled if it can be, else waited for; only once
        # no job is left can qemu's chain say for good whether it pivoted.
        _end_job(monitor, job)
        if _reads(monitor, leaf_path, top_dev, base_dev):
            if top.state == VolumeState.MERGED:
                raise errors.CorruptRecord(f"volume {volume} is marked merged, but VM "
                                           f"{pid} still reads it")
            _lift_pause(ctx, watch, monitor, volume)  # a cut merge's, from before a pivot
            _check(domain, top, base)
            _commit(ctx, watch, monitor, domain, layout, top, base, active, leaf_path,
                    top_dev, base_dev, job, rid)
        else:  # qemu committed it (a merge cut after that): what is left of it
            if active:
                _follow(ctx, watch, volume, base.uuid, base_dev)
            if top.state != VolumeState.MERGED:
                _mark(ctx, watch, monitor, domain, top)
            else:
                _lift_pause(ctx, watch, monitor, volume)
        _let_go(ctx, watch, monitor, domain, layout, top, base, active, top_dev, base_dev)
        _drop(ctx, record.domain, volume, rid)
        log.info("VM %d: live merge: volume %s merged into %s", pid, volume, base.uuid)
        return volume_mod.get_volume(domain, base.uuid)


def _check(domain: Any, top: VolumeInfo, base: VolumeInfo) -> None:
    if top.role == VolumeRole.TEMPLATE:
        raise errors.ReadOnlyVolume(top.uuid, top.role.value, "merge",
                                    "a template is the base of linked clones")
    if base.role == VolumeRole.TEMPLATE:
        raise errors.ReadOnlyVolume(base.uuid, base.role.value, f"merge volume {top.uuid} "
                                    "into", "linked clones of it would change")
    if top.state != VolumeState.READY or base.state != VolumeState.READY:
        raise errors.Busy(f"volumes {top.uuid} and {base.uuid} are {top.state} and "
                          f"{base.state}, not both ready")
    others = [c for c in volume_mod.children(domain, base.uuid) if c != top.uuid]
    if others:
        raise errors.HasChildren(base.uuid, others, f"merge volume {top.uuid} into")
    if top.capacity > base.capacity:
        raise errors.Unsupported(
            f"volume {top.uuid} is larger than the volume below it ({top.capacity} > "
            f"{base.capacity} bytes: grown after the snapshot): not merged")


def _device(domain: Any, volume: str) -> str:
    shard = domain.volume_shard(volume)
    path: str | None = shard.activator.path(shard.vg_name, volume)
    if path is None:
        raise errors.Busy(f"volume {volume} is not active on this host")
    return path


def _reads(monitor: Any, leaf_path: str, top_dev: str, base_dev: str) -> bool:
    """qemu reads the volume on ``top_dev`` in the chain of the drive on
    ``leaf_path`` (False: it committed it; an active commit's drive is on the base
    now)."""
    try:
        files = monitor.chain(leaf_path)
    except errors.MonitorRefused:
        raise
    except errors.MonitorError:
        files = monitor.chain(base_dev)  # pivoted: the base is the active layer
    return os.path.realpath(top_dev) in {os.path.realpath(f) for f in files}


def _end_job(monitor: Any, job: str) -> None:
    """No job ``job`` left in qemu: cancelled (before a pivot, qemu changes nothing;
    a job already completing is not cancelled but waited for), dismissed."""
    state = monitor.job(job)
    if state is None:
        return
    if state[0] not in ("concluded", "null"):
        with contextlib.suppress(errors.MonitorRefused):
            monitor.cancel_job(job)
        _wait_job(monitor, job, "concluded", quiet=True)
    with contextlib.suppress(errors.MonitorRefused):
        monitor.dismiss_job(job)


def _wait_job(monitor: Any, job: str, want: str, quiet: bool = False) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        state = monitor.job(job)
        if state is None:
            raise errors.MonitorError(f"qemu's job {job} is gone")
        status, error = state
        if status == "concluded" and error and not quiet:
            raise errors.MonitorRefused(f"qemu's commit failed: {error}")
        if status == want:
            return
        if status == "concluded":
            raise errors.MonitorRefused(f"qemu's commit ended before it was {want}")
        if time.monotonic() > deadline:
            raise errors.MonitorError(f"qemu's job {job} is still {status}")
        time.sleep(JOB_POLL)


def _grow_base(ctx: Any, watch: Any, domain: Any, top: VolumeInfo, base: VolumeInfo,
               base_dev: str, rid: str) -> None:
    """Room in a thin base for all the commit may write: what the base uses now (its
    end offset, read past qemu's locks; leaks included) + the volume's whole LV + a
    chunk for what the guest writes meanwhile, never beyond fully allocated. Grown by
    the manager, refreshed here; the device read-only again (a refresh may reload it
    writable, and the base is only read until its lease is exclusive)."""
    if base.format != VolumeFormat.QCOW2 or base.alloc != Allocation.THIN:
        return  # holds its whole capacity already
    used = qemu_img.end_offset(domain.runner, qemu_img.in_use(qemu_img.alone(base_dev,
                                                                              "qcow2")))
    full = base.capacity + qemu_img.metadata_overhead(base.capacity)
    target = round_up(min(used + top.size + watch.settings.chunk, full),
                      domain.record.extent_size)
    if target <= base.size:
        return
    ctx.ask(ExtendVolume(base.uuid, allocation=str(target), request_id=f"{rid}:grow-{target}",
                         domain=watch.record.domain))
    shard = domain.volume_shard(base.uuid)
    shard.activator.refresh(shard.vg_name, base.uuid)
    set_read_only(domain.runner, base_dev, True)
    log.info("VM %d: live merge: volume %s grown to %d bytes", watch.record.pid, base.uuid,
             target)


def _exclusive(layout: LeaseLayout, monitor: Any, pid: int, base: VolumeInfo) -> None:
    """The base's lease, shared until now, held exclusively for qemu (released, then
    acquired: sanlock has no conversion here); else shared again and Busy."""
    lease = held_by(pid, layout).get(base.uuid)
    if lease is None:
        raise errors.Busy(f"VM {pid} holds no lease on volume {base.uuid}")
    if not lease.shared:
        return
    try:
        layout.release_volume(base, pid=pid)
        layout.acquire_volume(base, shared=False, pid=pid)
    except errors.Error as exc:
        if base.uuid not in held_by(pid, layout):
            _reacquire(layout, monitor, pid, base, (True, True, True))
        raise errors.Busy(f"volume {base.uuid}'s lease could not be taken exclusively "
                          f"({exc}): not merged") from exc


def _commit(ctx: Any, watch: Any, monitor: Any, domain: Any, layout: LeaseLayout,
            top: VolumeInfo, base: VolumeInfo, active: bool, leaf_path: str, top_dev: str,
            base_dev: str, job: str, rid: str) -> None:
    pid = watch.record.pid
    _grow_base(ctx, watch, domain, top, base, base_dev, rid)
    _exclusive(layout, monitor, pid, base)
    paused_at: float | None = None
    try:
        base_node = monitor.format_node(base_dev)
        set_read_only(domain.runner, base_dev, False)
        monitor.commit(job, monitor.active_node(leaf_path), monitor.format_node(top_dev),
                       base_node, None if active else base.uuid)
        with watch.state_lock:
            watch.merge_job = True  # the watch may resume an ENOSPC meanwhile
        try:
            _wait_job(monitor, job, "ready" if active else "concluded")
            if active:
                _pause_for_pivot(ctx, watch, monitor, top.uuid)
                paused_at = time.monotonic()
                monitor.complete_job(job)
                _wait_job(monitor, job, "concluded")
        finally:
            with watch.state_lock:
                watch.merge_job = False
        with contextlib.suppress(errors.MonitorRefused):
            monitor.dismiss_job(job)
        if _reads(monitor, leaf_path, top_dev, base_dev):
            raise errors.MonitorError(f"qemu's job on {top.uuid} ended, but qemu still "
                                      "reads it (cancelled by someone else?)")
    except Exception as exc:
        _after_failure(ctx, watch, monitor, domain, layout, top, base, leaf_path, top_dev,
                       base_dev, job, exc)
    if active:
        _follow(ctx, watch, top.uuid, base.uuid, base_dev)
    _mark(ctx, watch, monitor, domain, top)
    if paused_at is not None:
        log.info("VM %d: live merge of %s: paused %.0f ms for the pivot and the mark",
                 pid, top.uuid, (time.monotonic() - paused_at) * 1000)


def _pause_for_pivot(ctx: Any, watch: Any, monitor: Any, volume: str) -> None:
    """The VM paused for its pivot, recorded as the merge's own pause first. Only a
    running VM (waiting a little for one paused by ENOSPC, which the watch resumes):
    a pause that is not the merge's may be lifted by whoever made it, before the
    manager knows the volume is stale."""
    deadline = time.monotonic() + RUNNING_WAIT
    while True:
        with watch.state_lock:
            running, state = monitor.status()
            if running:
                watch.merge_job = False
                _save(ctx, watch, dataclasses.replace(watch.record, merge_pause=volume))
                monitor.pause()
                return
        if state != "io-error" or time.monotonic() > deadline:
            raise errors.Busy(f"VM {watch.record.pid} is {state}, not running: its drive is "
                              "not pivoted under a pause that is not sharedlvm's")
        time.sleep(0.2)


def _after_failure(ctx: Any, watch: Any, monitor: Any, domain: Any, layout: LeaseLayout,
                   top: VolumeInfo, base: VolumeInfo, leaf_path: str, top_dev: str,
                   base_dev: str, job: str, exc: Exception) -> None:
    """A failure anywhere in the job: no job left, then qemu's chain decides. qemu
    committed after all: returns (the merge goes on to the mark). It did not: the
    base read-only and shared again, the merge's pause lifted, the failure raised.
    Nobody can tell (qemu gone or not answering): nothing undone, the VM left as it
    is, raised."""
    pid = watch.record.pid
    try:
        _end_job(monitor, job)
        still = _reads(monitor, leaf_path, top_dev, base_dev)
    except errors.Error as again:
        log.critical("VM %d: live merge of %s: %s; whether qemu pivoted cannot be told "
                     "(%s): %sdo not resume it by any other means; 'vm merge %d --volume "
                     "%s' finds out and finishes", pid, top.uuid, exc, again,
                     "the VM stays paused; " if watch.record.merge_pause else "", pid,
                     top.uuid)
        raise exc from again
    if not still:
        log.warning("VM %d: live merge of %s: %s, but qemu committed it: finishing", pid,
                    top.uuid, exc)
        return
    log.error("VM %d: live merge of %s failed before its pivot (%s): cancelled", pid,
              top.uuid, exc)
    with contextlib.suppress(errors.Error):
        lease = held_by(pid, layout).get(base.uuid)
        if lease is not None and not lease.shared:
            with watch.grow_lock:
                _old_leaf_shared(ctx, monitor, layout, domain, pid, base.uuid,
                                 monitor.format_node(base_dev), base_dev)
    with contextlib.suppress(errors.Error, OSError):
        _lift_pause(ctx, watch, monitor, top.uuid)
    raise exc


def _follow(ctx: Any, watch: Any, volume: str, base: str, base_dev: str) -> None:
    """qemu writes the base now (an active commit pivoted): the record and the watch
    follow it at once (the watch grows it from the resume on); the merged volume
    stays recorded among the others until it is let go (deactivated at the VM's end
    otherwise)."""
    record = watch.record
    if not any(u == volume for u, _ in record.volumes):
        return
    followed = dataclasses.replace(record, volumes=tuple(
        (base, base_dev) if u == volume else (u, p) for u, p in record.volumes),
        others=tuple(dict.fromkeys((*record.others, volume))))
    try:
        write_record(ctx.paths, followed)
    except OSError as exc:
        log.error("VM %d: its record could not be written after the pivot: %s",
                  record.pid, exc)
    _remember(watch, followed)


def _mark(ctx: Any, watch: Any, monitor: Any, domain: Any, top: VolumeInfo) -> None:
    """The manager marks the volume merged; only then is the VM resumed from the
    merge's pause."""
    try:
        ctx.ask(LiveMergeVolume(top.uuid, domain.host_id, f"merge-live-{top.uuid}:mark",
                                watch.record.domain))
    except errors.Error as exc:
        log.critical("VM %d: qemu merged volume %s into %s, but the manager did not mark "
                     "it merged (%s): %sdo not resume it by any other means (an image "
                     "opened elsewhere meanwhile would read the stale volume over newer "
                     "data); 'vm merge %d --volume %s' again finishes",
                     watch.record.pid, top.uuid, top.parent, exc,
                     "the VM stays paused; " if watch.record.merge_pause else "",
                     watch.record.pid, top.uuid)
        raise
    _lift_pause(ctx, watch, monitor, top.uuid)


def _lift_pause(ctx: Any, watch: Any, monitor: Any, volume: str) -> None:
    """The VM resumed from the pause its merge of ``volume`` made (only that one);
    resumed first, then recorded: a VM must never stay paused unrecorded."""
    if watch.record.merge_pause != volume:
        return
    monitor.resume()
    with contextlib.suppress(OSError):
        _save(ctx, watch, dataclasses.replace(watch.record, merge_pause=""))


def _let_go(ctx: Any, watch: Any, monitor: Any, domain: Any, layout: LeaseLayout,
            top: VolumeInfo, base: VolumeInfo, active: bool, top_dev: str,
            base_dev: str) -> None:
    """qemu done with the merged volume: its node (a live snapshot's, which qemu keeps
    until deleted) removed, its mapping, then its lease given up; the base read-only
    and shared again when it is not the leaf now; the record forgets the volume."""
    pid = watch.record.pid
    with contextlib.suppress(errors.Error):
        monitor.remove_node(monitor.format_node(top_dev))
    if monitor.disk_nodes(top_dev):
        raise errors.MonitorError(f"qemu still has volume {top.uuid} open: it stays "
                                  "active and leased until the VM ends; 'volume merge "
                                  f"{top.uuid}' then drops it")
    with watch.grow_lock:  # no grow of it in flight: its refresh would map it again
        domain.deactivate_volume(top.uuid)
    held = held_by(pid, layout)  # one inquiry: releasing the top leaves the base's lease
    if top.uuid in held:
        layout.release_volume(top, pid=pid)
    lease = held.get(base.uuid)
    if not active and lease is not None and not lease.shared:
        with watch.grow_lock:
            _old_leaf_shared(ctx, monitor, layout, domain, pid, base.uuid,
                             monitor.format_node(base_dev), base_dev)
    record = watch.record
    merged = dataclasses.replace(record, volumes=tuple(
        (u, p) for u, p in record.volumes if u != top.uuid),
        others=tuple(u for u in record.others if u != top.uuid))
    try:
        write_record(ctx.paths, merged)
    except OSError as exc:
        log.error("VM %d: its record could not be written after the merge: %s", pid, exc)
    _remember(watch, merged)


def _drop(ctx: Any, domain_name: str, volume: str, rid: str) -> None:
    """The manager drops the merged volume (its lease is free once qemu's is gone)."""
    deadline = time.monotonic() + 15
    while True:
        try:
            ctx.ask(MergeVolume(volume, request_id=rid, domain=domain_name))
            return
        except (errors.VolumeInUse, errors.LeaseHeld):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
