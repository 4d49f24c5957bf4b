"""Live migration of a VM between two hosts: the lease handoff (docs/design.md, "Live
migration").

Storage is shared, so only the VM's memory and device state move (qemu's own
migration); what sharedlvm adds is that the writable volumes' leases move with the
writer and that at no instant can two qemus write them. The steps, each a request to
one host's daemon (the client library's ``migrate_vm`` runs them in order):

1. **Destination** ``run --incoming URI`` starts qemu stopped (``-S -incoming
   defer``), registered with sanlock and holding the shared leases of the read-only
   part of the chain; its writable volumes are active (qemu must open them) but their
   leases are the source's. This is the one activation without a lease, and it is safe
   because qemu keeps the images *inactive* (``late-block-activate``): no I/O until
   ``cont``, which only step 4 sends. ``vm incoming`` makes it listen.
2. **Source** ``vm migrate-out``: notes the version of each lease its qemu holds, runs
   qemu's migration and waits for ``completed``: the guest is stopped and qemu has
   flushed and inactivated its images. Only then are the leases released (on behalf
   of qemu's pid). A failed or cancelled migration releases nothing: qemu resumes the
   source by itself.
3. Between the two, no one holds the leases and no qemu can write.
4. **Destination** ``vm take-over``: acquires each lease *at the version the source
   held* (sanlock's SANLK_RES_LVER: refused if anyone acquired it in between; libvirt's
   sanlock driver passes the lease state but the version check is sharedlvm's own),
   refreshes each volume (an extend made for the source while the stream ran is seen
   here; the destination's qemu read nothing before this), checks its size against
   LVM and resumes the VM.
5. **Source** ``vm quit``.

If the destination cannot take over, it gives up what it acquired, ends its qemu and
answers HandoffFailed with the versions now on disk, at which the source may take its
leases back and resume (``vm resume``): the destination never ran the guest. If ``cont``
was sent on the destination and failed, the guest may have run there: the answer holds
no version and the source stays stopped for the administrator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from typing import Any

from . import errors, leases
from . import volume as volume_mod
from .domain import device_size
from .failpoints import failpoint
from .lease_layout import LeaseLayout
from .model import MigratedOut, TakenOver, VolumeInfo
from .vmwatch import VmMonitor, VmRecord, VmWatch, alive, write_record

log = logging.getLogger(__name__)

# How often the source's migration status is read (the handoff starts at most this
# long after qemu completed).
POLL = 0.01
def running_watch(ctx: Any, pid: int, doing: str) -> VmWatch:
    """The watch of VM ``pid``, which runs here (not a migration's destination
    waiting for its handoff)."""
    watch: VmWatch = ctx.vms.watch_of(pid)
    if not watch.handed_over.is_set():
        raise errors.InvalidArgument(f"VM {pid} is a migration's destination, not "
                                     f"running here yet: no {doing}")
    return watch


def held_by(pid: int, layout: LeaseLayout) -> dict[str, leases.Held]:
    """The leases of ``layout``'s domain that process ``pid`` holds now, by volume."""
    return {h.resource: h for h in leases.inquire(pid=pid) if h.lockspace == layout.lockspace}


def _volumes(ctx: Any, record: VmRecord) -> list[tuple[VolumeInfo, str]]:
    domain = ctx.domain(record.domain)
    return [(volume_mod.get_volume(domain, uuid), path) for uuid, path in record.volumes]


def incoming(ctx: Any, pid: int) -> None:
    watch = ctx.vms.watch_of(pid)
    if not watch.record.incoming:
        raise errors.InvalidArgument(f"VM {pid} was not started with 'run --incoming'")
    with watch.migration_lock:
        if not watch.listening:
            watch.connected_monitor().listen_incoming(watch.record.incoming)
            watch.listening = True
    log.info("VM %d: waiting for a migration on %s", pid, watch.record.incoming)


def migrate_out(ctx: Any, pid: int, uri: str, timeout: float) -> MigratedOut:
    watch = running_watch(ctx, pid, "migration out")
    with watch.migration_lock:
        monitor = watch.connected_monitor()
        vols = _volumes(ctx, watch.record)
        layout = LeaseLayout(ctx.domain(watch.record.domain))
        held = held_by(pid, layout)
        versions = {}
        for info, _ in vols:
            lease = held.get(info.uuid)
            if lease is None or lease.shared:
                raise errors.Unsupported(f"VM {pid} does not hold volume {info.uuid}'s "
                                         "lease exclusively: nothing to hand over")
            versions[info.uuid] = lease.version
        # Only a running VM: qemu restarts a running source after a failed migration,
        # not a paused one (it would be left in postmigrate), and a VM paused for
        # ENOSPC is the watch's to grow and resume first.
        _, state = monitor.status()
        if state != "running":
            raise errors.Busy(f"VM {pid} is {state}, not running: resume it before "
                              "migrating it")
        start = time.monotonic()
        monitor.migrate(uri)
        log.info("VM %d: migrating to %s", pid, uri)
        status, downtime = _wait_migration(monitor, pid, start, timeout)
        if status != "completed":
            raise errors.MigrationFailed(pid, status)
        # qemu completed: the guest is stopped and every image flushed and inactive;
        # this qemu writes no more (only `vm resume` at these versions would `cont`).
        watch.record = dataclasses.replace(watch.record, released=tuple(versions.items()))
        write_record(ctx.paths, watch.record)
        failpoint("migrate-out-release")
        done: list[str] = []
        for info, _ in vols:
            try:
                layout.release_volume(info, pid=pid)
            except errors.Error as exc:
                raise errors.LeaseError(
                    f"VM {pid} migrated but the lease of {info.uuid} was not released "
                    f"({exc}); released: {', '.join(done) or 'none'}: the destination "
                    "cannot take over; 'vm resume' runs the VM here again") from exc
            done.append(info.uuid)
        log.info("VM %d: migrated in %.1f s (downtime %s ms); leases released at %s",
                 pid, time.monotonic() - start, downtime, versions)
        return MigratedOut(pid, versions, int(downtime or 0))


def _wait_migration(monitor: VmMonitor, pid: int, start: float,
                    timeout: float) -> tuple[str, int | None]:
    """qemu's migration to its end: ("completed", downtime), or a failure's reason.
    Past ``timeout`` it is cancelled, and what qemu then says decides: a migration
    that completed before the cancel reached it is completed."""
    cancelled = False
    while True:
        try:
            status, downtime, error = monitor.migration()
        except (OSError, ValueError) as exc:  # the watch closed the monitor
            raise errors.MonitorError(f"VM {pid}: its monitor failed during the "
                                      f"migration: {exc}") from exc
        if status == "completed":
            return status, downtime
        if status in ("failed", "cancelled"):
            return (f"not completed in {timeout:g} s: cancelled" if cancelled
                    else error or status), None
        if not cancelled and time.monotonic() - start > timeout:
            with contextlib.suppress(errors.MonitorError):
                monitor.cancel_migration()
            cancelled = True
        if cancelled and time.monotonic() - start > timeout + 60:
            raise errors.MonitorError(f"VM {pid}: qemu did not end its migration 60 s "
                                      "after the cancel")
        time.sleep(POLL)


def take_over(ctx: Any, pid: int, versions: dict[str, int]) -> TakenOver:
    start = time.monotonic()
    watch = ctx.vms.watch_of(pid)
    record = watch.record
    if not record.incoming:
        raise errors.InvalidArgument(f"VM {pid} is not a migration's destination")
    vols_asked = {uuid for uuid, _ in record.volumes}
    if set(versions) != vols_asked:
        raise errors.InvalidArgument(f"versions name {sorted(versions)}, the VM writes "
                                     f"{sorted(vols_asked)}")
    with watch.migration_lock:
        monitor = watch.connected_monitor()
        layout = LeaseLayout(ctx.domain(record.domain))
        vols = _volumes(ctx, record)
        held = set(held_by(pid, layout))
        acquired: list[VolumeInfo] = []
        resumed = False
        try:
            running, state = monitor.status()
            if running and not vols_asked <= held:
                # resumed by someone else (a `cont` on the user's own monitor): it
                # may have written without its leases
                resumed = True
                raise errors.Busy(f"VM {pid} was resumed outside the handoff ({state})")
            _wait_incoming(monitor, pid)
            for info, _ in sorted(vols, key=lambda v: v[0].uuid):
                if info.uuid in held:
                    continue  # a repeated take-over: acquired by the first
                layout.acquire_volume(info, shared=False, pid=pid,
                                      version=versions[info.uuid])
                acquired.append(info)
            failpoint("take-over-acquired")
            acquired_at = time.monotonic()
            domain = ctx.domain(record.domain)
            for info, path in vols:
                # ``info`` was read after the source completed: every extend its qemu
                # wrote into was committed before the source's own refresh, so before
                # that read. Mapped here at that size (or more: an extend since).
                if device_size(path) >= info.size:
                    continue  # no extend since it was mapped: the mapping is whole
                shard = domain.volume_shard(info.uuid)
                shard.activator.refresh(shard.vg_name, info.uuid)
                if device_size(path) < info.size:
                    raise errors.LvmError(f"volume {info.uuid} is {device_size(path)} "
                                          f"bytes here after its refresh, LVM says "
                                          f"{info.size}")
            refreshed_at = time.monotonic()
            resumed = True
            if not running:
                monitor.resume()
        except Exception as exc:
            _give_up(watch, monitor, layout, acquired, resumed)
            # The source may take its leases back only where nobody acquired since it
            # released them: at its own versions, and only if this destination took
            # none (a lease acquired here, even released, could have been used).
            now = {} if acquired or resumed or held else dict(versions)
            reason = str(exc) if isinstance(exc, errors.Error) else repr(exc)
            raise errors.HandoffFailed(pid, reason, now) from exc
        mine = {u: h.version for u, h in held_by(pid, layout).items()}
        watch.record = dataclasses.replace(record, incoming="")
        try:  # a restarted daemon must know it runs here
            write_record(ctx.paths, watch.record)
        except OSError as exc:
            log.error("VM %d: its record could not be written: %s", pid, exc)
        watch.handed_over.set()
        took = (time.monotonic() - start) * 1000
        log.info("VM %d: taken over in %.0f ms (leases acquired %.0f ms, refreshed %.0f "
                 "ms, resumed %.0f ms), leases at %s", pid, took,
                 (acquired_at - start) * 1000, (refreshed_at - acquired_at) * 1000,
                 took - (refreshed_at - start) * 1000, mine)
        return TakenOver(pid, {u: mine.get(u, 0) for u in vols_asked}, took)


def _wait_incoming(monitor: VmMonitor, pid: int, timeout: float = 30.0) -> None:
    """The destination's side of the stream at its end: the source says "completed"
    once it has sent everything, the destination once it has loaded it."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, error = monitor.migration()
        if status == "completed":
            return
        if status in ("failed", "cancelled", "none") or time.monotonic() > deadline:
            raise errors.MigrationFailed(pid, f"the destination's stream is {status}, not "
                                              "completed" + (f": {error}" if error else ""))
        time.sleep(POLL)


def _give_up(watch: VmWatch, monitor: VmMonitor, layout: LeaseLayout,
             acquired: list[VolumeInfo], resumed: bool) -> None:
    """The destination must not run: end its qemu (for good, if ``cont`` may have
    reached it) and give up the leases taken for it."""
    pid = watch.record.pid
    if resumed:
        # cont may have run the guest: the process goes before its leases do (they go
        # with it: sanlock frees a dead pid's leases)
        with contextlib.suppress(ProcessLookupError):
            if alive(watch.record):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while alive(watch.record) and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    for info in acquired:
        try:
            layout.release_volume(info, pid=pid)
        except errors.Error as exc:
            log.error("VM %d: releasing %s after a failed handoff: %s", pid, info.uuid, exc)
    with contextlib.suppress(errors.Error):
        monitor.quit()


def resume_source(ctx: Any, pid: int, versions: dict[str, int]) -> None:
    """A migration's source after a failed handoff: its leases back at the versions it
    released them at (refused by sanlock if anyone acquired them since), then
    ``cont``."""
    watch = running_watch(ctx, pid, "resume of a migration's source")
    with watch.migration_lock:
        monitor = watch.connected_monitor()
        released = dict(watch.record.released)
        layout = LeaseLayout(ctx.domain(watch.record.domain))
        held = set(held_by(pid, layout))
        vols = _volumes(ctx, watch.record)
        missing = [info.uuid for info, _ in vols if info.uuid not in held]
        if missing and versions != released:
            raise errors.InvalidArgument(
                f"VM {pid} released its leases at {released or 'no version'}: it resumes "
                f"at those only, not {versions}")
        for info, _ in vols:
            if info.uuid not in held:
                layout.acquire_volume(info, shared=False, pid=pid,
                                      version=released[info.uuid])
        _, state = monitor.status()
        if state == "postmigrate":
            monitor.resume()  # qemu activates its images again
        watch.record = dataclasses.replace(watch.record, released=())
        write_record(ctx.paths, watch.record)
        log.info("VM %d: resumed at its source (it was %s)", pid, state)


def quit_vm(ctx: Any, pid: int) -> None:
    watch = ctx.vms.watch_of(pid)
    with watch.migration_lock:
        watch.connected_monitor().quit()
