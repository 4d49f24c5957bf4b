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
# qemu's run states of a source that may be migrated.
_MIGRATABLE = ("running", "paused", "io-error")


def _monitor(watch: VmWatch) -> VmMonitor:
    monitor = watch.monitor
    if monitor is None:
        raise errors.MonitorError(f"VM {watch.record.pid}: its monitor is not connected")
    return monitor


def _volumes(ctx: Any, record: VmRecord) -> list[tuple[VolumeInfo, str]]:
    domain = ctx.domain(record.domain)
    return [(volume_mod.get_volume(domain, uuid), path) for uuid, path in record.volumes]


def incoming(ctx: Any, pid: int) -> None:
    watch = ctx.vms.watch_of(pid)
    if not watch.record.incoming:
        raise errors.InvalidArgument(f"VM {pid} was not started with 'run --incoming'")
    with watch.migration_lock:
        if not watch.listening:
            _monitor(watch).listen_incoming(watch.record.incoming)
            watch.listening = True
    log.info("VM %d: waiting for a migration on %s", pid, watch.record.incoming)


def migrate_out(ctx: Any, pid: int, uri: str, timeout: float) -> MigratedOut:
    watch = ctx.vms.watch_of(pid)
    if not watch.handed_over.is_set():
        raise errors.InvalidArgument(f"VM {pid} is a migration's destination, not running "
                                     "here yet")
    with watch.migration_lock:
        monitor = _monitor(watch)
        vols = _volumes(ctx, watch.record)
        layout = LeaseLayout(ctx.domain(watch.record.domain))
        held = {h.resource: h for h in leases.inquire(pid=pid)
                if h.lockspace == layout.lockspace}
        versions = {}
        for info, _ in vols:
            lease = held.get(info.uuid)
            if lease is None or lease.shared:
                raise errors.Unsupported(f"VM {pid} does not hold volume {info.uuid}'s "
                                         "lease exclusively: nothing to hand over")
            versions[info.uuid] = lease.version
        _, state = monitor.status()
        if state not in _MIGRATABLE:
            raise errors.Busy(f"VM {pid} is {state}: not migrated")
        start = time.monotonic()
        monitor.migrate(uri)
        log.info("VM %d: migrating to %s", pid, uri)
        while True:
            status, downtime, error = monitor.migration()
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise errors.MigrationFailed(pid, error or status)
            if time.monotonic() - start > timeout:
                monitor.cancel_migration()
                raise errors.MigrationFailed(pid, f"not completed in {timeout:g} s: "
                                                  "cancelled")
            time.sleep(POLL)
        # qemu completed: the guest is stopped and every image flushed and inactive;
        # this qemu writes no more (a `cont` here would re-activate them: vm resume).
        failpoint("migrate-out-release")
        for info, _ in vols:
            layout.release_volume(info, pid=pid)
        log.info("VM %d: migrated in %.1f s (downtime %s ms); leases released at %s",
                 pid, time.monotonic() - start, downtime, versions)
        return MigratedOut(pid, versions, int(downtime or 0))


def take_over(ctx: Any, pid: int, versions: dict[str, int]) -> TakenOver:
    start = time.monotonic()
    watch = ctx.vms.watch_of(pid)
    record = watch.record
    if not record.incoming or watch.handed_over.is_set():
        raise errors.InvalidArgument(f"VM {pid} is not a migration's destination waiting "
                                     "for its handoff")
    vols_asked = {uuid for uuid, _ in record.volumes}
    if set(versions) != vols_asked:
        raise errors.InvalidArgument(f"versions name {sorted(versions)}, the VM writes "
                                     f"{sorted(vols_asked)}")
    with watch.migration_lock:
        monitor = _monitor(watch)
        layout = LeaseLayout(ctx.domain(record.domain))
        vols = _volumes(ctx, record)
        acquired: list[VolumeInfo] = []
        resumed = False
        try:
            status, _, error = monitor.migration()
            if status != "completed":
                raise errors.MigrationFailed(pid, f"the stream is {status}, not completed"
                                             + (f": {error}" if error else ""))
            for info, _ in sorted(vols, key=lambda v: v[0].uuid):
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
                shard = domain.volume_shard(info.uuid)
                shard.activator.refresh(shard.vg_name, info.uuid)
                if device_size(path) < info.size:
                    raise errors.LvmError(f"volume {info.uuid} is {device_size(path)} "
                                          f"bytes here after its refresh, LVM says "
                                          f"{info.size}")
            refreshed_at = time.monotonic()
            resumed = True
            monitor.resume()
        except Exception as exc:
            _give_up(watch, monitor, layout, acquired, resumed)
            now = {} if resumed else {info.uuid: layout.lease_version(info)
                                      for info, _ in vols}
            reason = str(exc) if isinstance(exc, errors.Error) else repr(exc)
            raise errors.HandoffFailed(pid, reason, now) from exc
        held = {h.resource: h.version for h in leases.inquire(pid=pid)
                if h.lockspace == layout.lockspace}
        watch.record = VmRecord(record.pid, record.started, record.monitor, record.domain,
                                record.volumes)
        with contextlib.suppress(OSError):  # a restarted daemon must know it runs here
            write_record(ctx.paths, watch.record)
        watch.handed_over.set()
        took = (time.monotonic() - start) * 1000
        log.info("VM %d: taken over in %.0f ms (leases acquired %.0f ms, refreshed %.0f "
                 "ms, resumed %.0f ms), leases at %s", pid, took,
                 (acquired_at - start) * 1000, (refreshed_at - acquired_at) * 1000,
                 took - (refreshed_at - start) * 1000, held)
        return TakenOver(pid, {u: held.get(u, 0) for u in vols_asked}, took)


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
    """A migration's source after a failed handoff: its leases back at ``versions``
    (refused if anyone else acquired them since), then ``cont``."""
    watch = ctx.vms.watch_of(pid)
    with watch.migration_lock:
        monitor = _monitor(watch)
        layout = LeaseLayout(ctx.domain(watch.record.domain))
        held = {h.resource for h in leases.inquire(pid=pid)
                if h.lockspace == layout.lockspace}
        for info, _ in _volumes(ctx, watch.record):
            if info.uuid in held:
                continue  # qemu's migration failed: nothing was released
            if info.uuid not in versions:
                raise errors.InvalidArgument(f"no version given for volume {info.uuid}")
            layout.acquire_volume(info, shared=False, pid=pid, version=versions[info.uuid])
        _, state = monitor.status()
        if state == "postmigrate":
            monitor.resume()  # qemu activates its images again
        log.info("VM %d: resumed at its source (it was %s)", pid, state)


def quit_vm(ctx: Any, pid: int) -> None:
    watch = ctx.vms.watch_of(pid)
    with watch.migration_lock:
        _monitor(watch).quit()
