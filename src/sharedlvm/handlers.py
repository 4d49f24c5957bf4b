"""The handler of each operation: a typed request in, a typed result out.

Handlers run in the daemon (and, for the read-only ones, in the CLI's own process
when no daemon runs). They get a :class:`Context` — the daemon, or the CLI's local
stand-in — and a request already validated at the edge (requests.py). Whether a
handler runs here, on the manager, or is forwarded through the mailbox is decided
once, by the daemon, from the operations table (operations.py); a handler of a
manager-only operation runs with the manager role held and checked.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Protocol

from . import copies, errors, images, vmlive, vmmigrate, vmwatch
from . import domain as domain_mod
from . import volume as volume_mod
from .copies import CopySettings
from .domain import Domain
from .model import (
    Deleted,
    DomainInfo,
    DomainRemoved,
    Done,
    Downloaded,
    HostInfo,
    ImageDeleted,
    ImageInfo,
    LeaseVersions,
    ManagerStatus,
    MigratedOut,
    Prepared,
    Released,
    ServiceStatus,
    TakenOver,
    VmInfo,
    VolumeInfo,
)
from .requests import (
    CloneVolume,
    CreateVolume,
    DeleteImage,
    DeleteVolume,
    DownloadVolume,
    ExtendDomain,
    ExtendVolume,
    GetDomain,
    GetImage,
    GetManager,
    GetMetrics,
    GetStatus,
    GetVolume,
    LibvirtPrepare,
    LibvirtRelease,
    LibvirtStarted,
    ListHosts,
    ListVms,
    ListVolumes,
    LiveMergeVolume,
    LiveSnapshotVolume,
    MergeVolume,
    PrepareImage,
    PrepareVolume,
    PublishVolume,
    ReleaseManager,
    Reload,
    RemoveDomain,
    Request,
    ReserveVolume,
    SnapshotVolume,
    TeardownImage,
    TeardownVolume,
    TemplateVolume,
    UploadVolume,
    VmIncoming,
    VmMerge,
    VmMigrateOut,
    VmQuit,
    VmResume,
    VmSnapshot,
    VmTakeOver,
)
from .service import DomainService


class Context(Protocol):
    """What handlers may use of the daemon."""

    release_holdoff: float
    max_chain: int
    copy_settings: CopySettings

    def ask(self, request: Request) -> Any:
        """Run a request as the daemon would run it from a client (on the manager here,
        or forwarded to it)."""
        ...

    def service(self, name: str | None) -> DomainService:
        """The attached domain's service (DaemonNotRunning outside the daemon)."""
        ...

    def domain(self, name: str | None) -> Domain:
        """The attached domain, opened on this host."""
        ...

    def services(self) -> list[DomainService]: ...

    def reload(self) -> list[str]: ...

    def forget(self, name: str) -> None:
        """Stop serving a domain (it is being removed)."""
        ...

    def render_metrics(self) -> str: ...


# Volumes


def create_volume(ctx: Context, req: CreateVolume) -> VolumeInfo:
    service = ctx.service(req.domain)
    return volume_mod.create_volume(service.domain, req, service.layout.allocate_volume_lease,
                                    service.exclusive)


def extend_volume(ctx: Context, req: ExtendVolume) -> VolumeInfo:
    service = ctx.service(req.domain)
    return volume_mod.extend_volume(service.domain, req, service.exclusive)


def delete_volume(ctx: Context, req: DeleteVolume) -> Deleted:
    service = ctx.service(req.domain)
    return volume_mod.delete_volume(service.domain, req, service.exclusive)


def snapshot_volume(ctx: Context, req: SnapshotVolume) -> VolumeInfo:
    service = ctx.service(req.domain)
    return images.snapshot_volume(service.domain, req, service.layout.allocate_volume_lease,
                                  service.exclusive, ctx.max_chain)


def snapshot_volume_live(ctx: Context, req: LiveSnapshotVolume) -> VolumeInfo:
    service = ctx.service(req.domain)
    return images.snapshot_volume(service.domain, SnapshotVolume(
        req.volume, req.tags, req.request_id, req.domain), service.layout.allocate_volume_lease,
        service.exclusive, ctx.max_chain, live_host=req.host_id,
        holders=service.layout.holders)


def merge_volume(ctx: Context, req: MergeVolume) -> VolumeInfo:
    service = ctx.service(req.domain)
    return images.merge_volume(service.domain, req, service.exclusive)


def template_volume(ctx: Context, req: TemplateVolume) -> VolumeInfo:
    service = ctx.service(req.domain)
    return images.template_volume(service.domain, req, service.exclusive)


def clone_volume(ctx: Context, req: CloneVolume) -> VolumeInfo:
    service = ctx.service(req.domain)
    if not req.linked:  # copied here (operations: runs_here)
        service.require_joined()
        return copies.full_clone(service.domain, ctx.ask, service.copies, ctx.copy_settings,
                                 req)
    return images.clone_volume(service.domain, req, service.layout.allocate_volume_lease,
                               service.exclusive)


def upload_volume(ctx: Context, req: UploadVolume) -> VolumeInfo:
    service = ctx.service(req.domain)
    service.require_joined()
    return copies.upload(service.domain, ctx.ask, service.copies, ctx.copy_settings, req)


def download_volume(ctx: Context, req: DownloadVolume) -> Downloaded:
    service = ctx.service(req.domain)
    service.require_joined()
    return copies.download(service.domain, service.copies, ctx.copy_settings, req)


def reserve_volume(ctx: Context, req: ReserveVolume) -> VolumeInfo:
    service = ctx.service(req.domain)
    return copies.reserve_volume(service.domain, req, service.layout.allocate_volume_lease)


def publish_volume(ctx: Context, req: PublishVolume) -> VolumeInfo:
    service = ctx.service(req.domain)
    return copies.publish_volume(service.domain, req, service.layout.holders)


def prepare_volume(ctx: Context, req: PrepareVolume) -> Prepared:
    return Prepared(ctx.service(req.domain).prepared.prepare(req.volume, req.pid, req.shared))


def teardown_volume(ctx: Context, req: TeardownVolume) -> Done:
    ctx.service(req.domain).prepared.teardown(req.volume)
    return Done()


def list_volumes(ctx: Context, req: ListVolumes) -> list[VolumeInfo]:
    return volume_mod.list_volumes(ctx.domain(req.domain), req.image, req.tags)


def get_volume(ctx: Context, req: GetVolume) -> VolumeInfo:
    return volume_mod.get_volume(ctx.domain(req.domain), req.volume)


# Images


def get_image(ctx: Context, req: GetImage) -> ImageInfo:
    info = images.image_info(ctx.domain(req.domain), req.image)
    try:
        layout = ctx.service(req.domain).layout
        holders = {v.uuid: layout.holders(v) for v in info.chain if v.lease is not None}
    except errors.Error:  # no daemon here (the CLI's own process), or sanlock unreachable
        return info
    return replace(info, holders=holders)


def prepare_image(ctx: Context, req: PrepareImage) -> Prepared:
    return Prepared(ctx.service(req.domain).prepared.prepare_image(req.image, req.pid,
                                                                   req.shared))


def libvirt_prepare(ctx: Context, req: LibvirtPrepare) -> Prepared:
    return Prepared(ctx.service(req.domain).prepared.prepare_libvirt(req))


def libvirt_started(ctx: Context, req: LibvirtStarted) -> LeaseVersions:
    return LeaseVersions(ctx.service(req.domain).prepared.started_libvirt(
        req.image, req.vm, req.pid))


def libvirt_release(ctx: Context, req: LibvirtRelease) -> Done:
    ctx.service(req.domain).prepared.release_libvirt(req.image, req.vm)
    return Done()


def delete_image(ctx: Context, req: DeleteImage) -> ImageDeleted:
    service = ctx.service(req.domain)
    return images.delete_image(service.domain, req, service.exclusive)


def teardown_image(ctx: Context, req: TeardownImage) -> Done:
    ctx.service(req.domain).prepared.teardown_image(req.image)
    return Done()


# Domains


def get_domain(ctx: Context, req: GetDomain) -> DomainInfo:
    d = ctx.domain(req.domain)
    info = d.info()
    try:
        status = get_manager(ctx, GetManager(d.name))
    except errors.DaemonNotRunning:
        return info  # the last manager the domain record names
    return replace(info, manager_host_id=status.manager or 0, is_manager=status.this_host)


def extend_domain(ctx: Context, req: ExtendDomain) -> DomainInfo:
    service = ctx.service(req.domain)
    domain_mod.extend_domain(service.domain, req.luns, req.partitions)
    return get_domain(ctx, GetDomain(req.domain))


def remove_domain(ctx: Context, req: RemoveDomain) -> DomainRemoved:
    service = ctx.service(req.domain)
    d = service.domain
    d.check_removable(req.force)
    # A host that just left is seen free at this host's next renewal (every
    # 2 x io_timeout): allow for that before refusing.
    deadline = time.monotonic() + 3 * d.record.io_timeout + 1
    while True:
        others = sorted(h for h in service.layout.live_hosts() if h != d.host_id)
        if not others or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if others:
        raise errors.Busy(f"host(s) {', '.join(map(str, others))} still use domain "
                          f"{d.name}: detach them first")
    ctx.forget(d.name)
    service.stop(leave=True)  # releases the role, leaves the lockspace
    d.destroy(req.force)
    return DomainRemoved(d.name)


# The manager role, hosts, the daemon


def get_manager(ctx: Context, req: GetManager) -> ManagerStatus:
    service = ctx.service(req.domain)
    record = service.domain.read_record()
    owner = service.manager.lease.owner() if service.joined else None
    live = service.layout.live_hosts() if service.joined else set()
    return ManagerStatus(domain=service.domain.name, manager=owner if owner in live else None,
                         generation=record.manager_generation,
                         last_manager=record.manager_host_id,
                         this_host=service.manager.active)


def release_manager(ctx: Context, req: ReleaseManager) -> Released:
    service = ctx.service(req.domain)
    service.holdoff_until = time.monotonic() + ctx.release_holdoff
    was = service.manager.active
    service.manager.release()
    return Released(was)


def list_hosts(ctx: Context, req: ListHosts) -> list[HostInfo]:
    service = ctx.service(req.domain)
    service.require_joined()
    holds: dict[int, list[str]] = {}
    owner = service.manager.lease.owner()
    if owner:
        holds.setdefault(owner, []).append("manager")
    for info in volume_mod.list_volumes(service.domain):
        if info.lease is None:
            continue
        holders = service.layout.holders(info)
        mode = "shared" if len(holders) > 1 else "exclusive"
        for host in holders:
            holds.setdefault(host, []).append(f"{info.uuid} ({mode})")
    states = service.layout.host_states()
    return [HostInfo(h, st.state, st.generation, holds.get(h, []))
            for h, st in sorted(states.items())]


def get_status(ctx: Context, req: GetStatus) -> list[ServiceStatus]:
    return [ServiceStatus(domain=s.domain.name, host_id=s.domain.host_id, joined=s.joined,
                          manager=s.manager.serving, generation=s.manager.generation,
                          prepared=s.prepared.snapshot(), images=s.prepared.images(),
                          copies=s.copies.snapshot())
            for s in ctx.services()]


def reload(ctx: Context, req: Reload) -> list[str]:
    return ctx.reload()


def get_metrics(ctx: Context, req: GetMetrics) -> str:
    return ctx.render_metrics()


# Running VMs: live migration's steps (vmmigrate.py)


def list_vms(ctx: Context, req: ListVms) -> list[VmInfo]:
    return vmwatch.list_vms(ctx)


def vm_incoming(ctx: Context, req: VmIncoming) -> Done:
    vmmigrate.incoming(ctx, req.pid)
    return Done()


def vm_migrate_out(ctx: Context, req: VmMigrateOut) -> MigratedOut:
    return vmmigrate.migrate_out(ctx, req.pid, req.uri, req.timeout)


def vm_take_over(ctx: Context, req: VmTakeOver) -> TakenOver:
    return vmmigrate.take_over(ctx, req.pid, req.versions)


def vm_resume(ctx: Context, req: VmResume) -> Done:
    vmmigrate.resume_source(ctx, req.pid, req.versions)
    return Done()


def vm_snapshot(ctx: Context, req: VmSnapshot) -> VolumeInfo:
    return vmlive.snapshot(ctx, req.pid, req.volume, req.tags, req.request_id)


def vm_merge(ctx: Context, req: VmMerge) -> VolumeInfo:
    return vmlive.merge(ctx, req.pid, req.volume, req.request_id)


def merged_live(ctx: Context, req: LiveMergeVolume) -> VolumeInfo:
    service = ctx.service(req.domain)
    return images.mark_merged(service.domain, req.volume, req.host_id,
                              service.layout.holders)


def vm_quit(ctx: Context, req: VmQuit) -> Done:
    vmmigrate.quit_vm(ctx, req.pid)
    return Done()
