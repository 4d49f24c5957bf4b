"""The Python client of a host's sharedlvm daemon.

    from sharedlvm import Client, errors

    client = Client()                       # this host's daemon ($SHAREDLVM_ROOT or /)
    vol = client.create_volume(10 * 1024**3, format="qcow2", tags={"vm": "web-1"},
                               request_id="web-1-disk-0")
    try:
        client.delete_volume(vol.uuid)
    except errors.VolumeInUse as exc:
        print("held by", exc.hosts)

One method per operation, typed results (model.py), and the daemon's errors raised
as their own classes with their fields (errors.py). Requests are validated here,
before anything is sent (requests.py): bad input raises InvalidArgument and sends
nothing. Any host's daemon can be asked: metadata changes are forwarded to the
manager through the storage mailbox.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import codec, errors, rpc
from . import requests as rq
from .failpoints import failpoint
from .model import (
    Allocation,
    Deleted,
    DomainInfo,
    Downloaded,
    HostInfo,
    ImageDeleted,
    ImageInfo,
    ManagerStatus,
    Migrated,
    MigratedOut,
    ServiceStatus,
    TakenOver,
    VolumeFormat,
    VolumeInfo,
)
from .paths import HostPaths


class Client:
    def __init__(self, root: str | Path | None = None,
                 timeout: float = rpc.CLIENT_TIMEOUT) -> None:
        """``root``: the host's SHAREDLVM_ROOT (default: the environment's, or /)."""
        self.paths = HostPaths(Path(root)) if root is not None else HostPaths.from_env()
        self.timeout = timeout

    def call(self, request: rq.Request) -> Any:
        """Send any request; the result as the request's result type."""
        # A copy answers when it is done, however long that takes.
        timeout = None if request.long_running else self.timeout
        data = rpc.call(self.paths.run_dir, request.op, codec.to_wire(request), timeout)
        return codec.from_wire(request.Result, data, "result")

    # Volumes

    def create_volume(self, size: int, *, format: VolumeFormat | str = VolumeFormat.RAW,
                      alloc: Allocation | str | None = None, image: str | None = None,
                      tags: Mapping[str, str] | None = None, request_id: str | None = None,
                      domain: str | None = None) -> VolumeInfo:
        result: VolumeInfo = self.call(rq.CreateVolume(
            size=size, format=VolumeFormat(format),
            alloc=Allocation(alloc) if alloc is not None else None, image=image,
            tags=dict(tags or {}), request_id=request_id, domain=domain))
        return result

    def extend_volume(self, volume: str, size: str | None = None, *,
                      allocation: str | None = None, request_id: str | None = None,
                      domain: str | None = None) -> VolumeInfo:
        """``size``: the capacity, "+2G" (grow by) or "12G" (grow to); or
        ``allocation``: a thin qcow2 volume's LV only (allowed while in use)."""
        result: VolumeInfo = self.call(rq.ExtendVolume(volume, size, allocation,
                                                       request_id, domain))
        return result

    def delete_volume(self, volume: str, *, wipe: bool = False, discard: bool = False,
                      request_id: str | None = None, domain: str | None = None) -> Deleted:
        result: Deleted = self.call(rq.DeleteVolume(volume, wipe=wipe, discard=discard,
                                                    request_id=request_id, domain=domain))
        return result

    def list_volumes(self, *, image: str | None = None, tags: Mapping[str, str] | None = None,
                     domain: str | None = None) -> list[VolumeInfo]:
        result: list[VolumeInfo] = self.call(rq.ListVolumes(image, dict(tags or {}), domain))
        return result

    def volume_info(self, volume: str, *, domain: str | None = None) -> VolumeInfo:
        result: VolumeInfo = self.call(rq.GetVolume(volume, domain))
        return result

    def prepare_volume(self, volume: str, pid: int, *, shared: bool = False,
                       domain: str | None = None) -> str:
        """Acquire the volume's lease for process ``pid`` (registered with sanlock,
        e.g. started by ``sharedlvm run``) and activate it: the device path."""
        return str(self.call(rq.PrepareVolume(volume, pid, shared, domain)).path)

    def teardown_volume(self, volume: str, *, domain: str | None = None) -> None:
        self.call(rq.TeardownVolume(volume, domain))

    # Images: snapshots, templates, linked clones, chains

    def snapshot_volume(self, volume: str, *, tags: Mapping[str, str] | None = None,
                        request_id: str | None = None, domain: str | None = None
                        ) -> VolumeInfo:
        """A new empty qcow2 leaf over ``volume`` (a leaf), which becomes read-only."""
        result: VolumeInfo = self.call(rq.SnapshotVolume(volume, dict(tags or {}),
                                                         request_id, domain))
        return result

    def merge_volume(self, volume: str, *, request_id: str | None = None,
                     domain: str | None = None) -> VolumeInfo:
        """Remove the snapshot ``volume`` from its chain (not in use): its data goes
        into the volume below it, which is returned."""
        result: VolumeInfo = self.call(rq.MergeVolume(volume, request_id, domain))
        return result

    def template_volume(self, volume: str, *, request_id: str | None = None,
                        domain: str | None = None) -> VolumeInfo:
        """Make a leaf a template: read-only, the base of linked clones."""
        result: VolumeInfo = self.call(rq.TemplateVolume(volume, request_id, domain))
        return result

    def clone_volume(self, volume: str, *, linked: bool = True,
                     format: VolumeFormat | str | None = None,
                     alloc: Allocation | str | None = None, image: str | None = None,
                     tags: Mapping[str, str] | None = None, request_id: str | None = None,
                     domain: str | None = None) -> VolumeInfo:
        """A new image from ``volume``: linked, an overlay over the template ``volume``
        (the manager makes it); else a full copy of its content, flattened, made by
        this host's daemon (``format``, ``alloc``). The call returns when the copy is
        done; ``status()`` shows its progress meanwhile."""
        result: VolumeInfo = self.call(rq.CloneVolume(
            volume, linked=linked, format=VolumeFormat(format) if format else None,
            alloc=Allocation(alloc) if alloc else None, image=image, tags=dict(tags or {}),
            request_id=request_id, domain=domain))
        return result

    def upload_volume(self, file: str | Path, *, file_format: VolumeFormat | str | None = None,
                      format: VolumeFormat | str | None = None,
                      alloc: Allocation | str | None = None, image: str | None = None,
                      tags: Mapping[str, str] | None = None, request_id: str | None = None,
                      domain: str | None = None) -> VolumeInfo:
        """A new volume with the content of a raw or qcow2 file of this host."""
        result: VolumeInfo = self.call(rq.UploadVolume(
            file=str(Path(file).absolute()),
            file_format=VolumeFormat(file_format) if file_format else None,
            format=VolumeFormat(format) if format else None,
            alloc=Allocation(alloc) if alloc else None, image=image, tags=dict(tags or {}),
            request_id=request_id, domain=domain))
        return result

    def download_volume(self, volume: str, file: str | Path, *,
                        format: VolumeFormat | str | None = None,
                        domain: str | None = None) -> Downloaded:
        """A new file of this host with the content of ``volume`` (its chain flattened)."""
        result: Downloaded = self.call(rq.DownloadVolume(
            volume, str(Path(file).absolute()), VolumeFormat(format) if format else None,
            domain))
        return result

    def image_info(self, image: str, *, domain: str | None = None) -> ImageInfo:
        result: ImageInfo = self.call(rq.GetImage(image, domain))
        return result

    def prepare_image(self, image: str, pid: int, *, shared: bool = False,
                      domain: str | None = None) -> str:
        """Acquire the chain's leases for process ``pid`` and activate it: the leaf's
        path in the image directory (open it there: its backing files resolve)."""
        return str(self.call(rq.PrepareImage(image, pid, shared, domain)).path)

    def delete_image(self, image: str, *, wipe: bool = False, discard: bool = False,
                     request_id: str | None = None, domain: str | None = None
                     ) -> ImageDeleted:
        """Delete every volume of ``image``, the leaf first."""
        result: ImageDeleted = self.call(rq.DeleteImage(image, wipe=wipe, discard=discard,
                                                        request_id=request_id,
                                                        domain=domain))
        return result

    def teardown_image(self, image: str, *, domain: str | None = None) -> None:
        self.call(rq.TeardownImage(image, domain))

    # Domains, the manager role, hosts

    def domain_info(self, domain: str | None = None) -> DomainInfo:
        result: DomainInfo = self.call(rq.GetDomain(domain))
        return result

    def remove_domain(self, domain: str | None = None, *, force: bool = False) -> None:
        self.call(rq.RemoveDomain(force, domain))

    def manager_status(self, domain: str | None = None) -> ManagerStatus:
        result: ManagerStatus = self.call(rq.GetManager(domain))
        return result

    def release_manager(self, domain: str | None = None) -> bool:
        """Give the manager role up; True if this host had it."""
        return bool(self.call(rq.ReleaseManager(domain)).released)

    def list_hosts(self, domain: str | None = None) -> list[HostInfo]:
        result: list[HostInfo] = self.call(rq.ListHosts(domain))
        return result

    # The daemon

    def status(self) -> list[ServiceStatus]:
        result: list[ServiceStatus] = self.call(rq.GetStatus())
        return result

    def reload(self) -> list[str]:
        result: list[str] = self.call(rq.Reload())
        return result

    def metrics(self) -> str:
        return str(self.call(rq.GetMetrics()))

    # Running VMs: the steps of a live migration, each on its host (migrate_vm below)

    def vm_incoming(self, pid: int) -> None:
        self.call(rq.VmIncoming(pid))

    def vm_migrate_out(self, pid: int, uri: str, timeout: float = 600.0) -> MigratedOut:
        result: MigratedOut = self.call(rq.VmMigrateOut(pid, uri, timeout))
        return result

    def vm_take_over(self, pid: int, versions: dict[str, int]) -> TakenOver:
        result: TakenOver = self.call(rq.VmTakeOver(pid, versions))
        return result

    def vm_resume(self, pid: int, versions: dict[str, int]) -> None:
        self.call(rq.VmResume(pid, versions))

    def vm_quit(self, pid: int) -> None:
        self.call(rq.VmQuit(pid))

    # Running VMs: their disks, live (vmlive.py)

    def vm_snapshot(self, pid: int, *, volume: str | None = None,
                    tags: Mapping[str, str] | None = None,
                    request_id: str | None = None) -> VolumeInfo:
        """A new leaf over the VM's leaf, which it writes from now on (the new leaf)."""
        result: VolumeInfo = self.call(rq.VmSnapshot(pid, volume, dict(tags or {}),
                                                     request_id))
        return result

    def vm_merge(self, pid: int, volume: str, *, request_id: str | None = None
                 ) -> VolumeInfo:
        """``volume`` (the VM's leaf, or the volume under it) merged into the volume
        under it while the VM runs (that volume)."""
        result: VolumeInfo = self.call(rq.VmMerge(pid, volume, request_id))
        return result


def migrate_vm(source: Client, pid: int, dest: Client, dest_pid: int, uri: str,
               timeout: float = 600.0) -> Migrated:
    """Move VM ``pid`` (``source``'s host) to the qemu ``dest_pid`` started on
    ``dest``'s host with ``sharedlvm run --incoming URI`` (vmmigrate.py has the
    protocol). On a failure the VM runs on at the source, or, when the destination may
    have run it, stays stopped at the source (HandoffFailed with no versions)."""
    dest.vm_incoming(dest_pid)
    try:
        out = source.vm_migrate_out(pid, uri, timeout)
    except errors.Error:
        # qemu's migration failed (the source runs on, its leases kept): the
        # destination, which holds none, is ended
        _quietly(dest.vm_quit, dest_pid)
        raise
    released = time.monotonic()
    failpoint("vm-handoff")
    try:
        taken = dest.vm_take_over(dest_pid, out.versions)
    except errors.HandoffFailed as exc:
        if exc.versions:
            source.vm_resume(pid, exc.versions)
        raise
    except errors.Error as exc:
        # No answer that says what the destination did (its daemon gone, a timeout):
        # the source takes its leases back at the versions it released them at, which
        # sanlock refuses if the destination (or anyone) acquired one since. Only then
        # is the destination ended: if it took the leases, it may be running the VM.
        try:
            source.vm_resume(pid, out.versions)
        except errors.Error as again:
            raise errors.HandoffFailed(
                dest_pid, f"{exc}; the source could not take its leases back ({again}): "
                "the destination may hold them and run the VM", {}) from exc
        _quietly(dest.vm_quit, dest_pid)
        raise
    handoff_ms = (time.monotonic() - released) * 1000
    _quietly(source.vm_quit, pid)
    return Migrated(pid, dest_pid, taken.versions, out.downtime_ms, handoff_ms)


def _quietly(step: Any, *args: Any) -> None:
    with contextlib.suppress(errors.Error):
        step(*args)
