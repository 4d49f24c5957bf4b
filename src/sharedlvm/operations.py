"""The operations table: every operation the daemon serves, one row each.

A row names the request type (requests.py), its handler (handlers.py) and how the
daemon runs it:

- ``manager_only``: runs on the manager, with the role held and checked (fencing
  token) for the whole handler;
- ``forward``: a host that is not manager sends it through the storage mailbox
  (otherwise it answers NotManager);
- ``idempotent``: a ``request_id`` makes it exactly-once (journal.RequestLog);
- ``local``: read-only, so the CLI may run it in its own process when no daemon runs;
- ``check_here``: a check run on the asking host before anything is forwarded;
- ``http``: method and path of its HTTP route (http_api.py builds the routes and the
  OpenAPI document from this table);
- ``cli``: its place in the ``sharedlvm`` command (cli.py builds the parser from the
  request's fields).

Adding an operation = one request type + one handler + one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import codec, errors, handlers
from . import requests as rq


@dataclass(frozen=True)
class Operation:
    request: type[rq.Request]
    handler: Callable[[Any, Any], Any]
    manager_only: bool = False
    forward: bool = False
    idempotent: bool = False
    local: bool = False
    check_here: Callable[[Any, Any], None] | None = None
    # A request this returns True for runs on the asking host, not on the manager
    # (a full clone: copied where it was asked).
    runs_here: Callable[[Any], bool] | None = None
    http: tuple[str, str] | None = None  # (method, path)
    cli: tuple[str, ...] = ()
    http_status: int = 200

    @property
    def name(self) -> str:
        return self.request.op

    @property
    def summary(self) -> str:
        return (self.request.__doc__ or self.name).strip().splitlines()[0]


def _not_prepared_here(ctx: handlers.Context, req: rq.DeleteVolume) -> None:
    if req.volume in ctx.service(req.domain).prepared:
        raise errors.Busy(f"volume {req.volume} is prepared on this host; tear it down first")


def _image_not_prepared_here(ctx: handlers.Context, req: rq.DeleteImage) -> None:
    if req.image in ctx.service(req.domain).prepared.images():
        raise errors.Busy(f"image {req.image} is prepared on this host; tear it down first")


_D = "/v1/domains/{domain}"
_V = _D + "/volumes/{volume}"
_I = _D + "/images/{image}"

TABLE: tuple[Operation, ...] = (
    Operation(rq.CreateVolume, handlers.create_volume, manager_only=True, forward=True,
              idempotent=True, http=("POST", f"{_D}/volumes"), cli=("volume", "create"),
              http_status=201),
    Operation(rq.ExtendVolume, handlers.extend_volume, manager_only=True, forward=True,
              idempotent=True, http=("POST", f"{_V}/extend"), cli=("volume", "extend")),
    Operation(rq.DeleteVolume, handlers.delete_volume, manager_only=True, forward=True,
              idempotent=True, check_here=_not_prepared_here, http=("DELETE", _V),
              cli=("volume", "delete")),
    Operation(rq.SnapshotVolume, handlers.snapshot_volume, manager_only=True, forward=True,
              idempotent=True, http=("POST", f"{_V}/snapshot"), cli=("volume", "snapshot"),
              http_status=201),
    Operation(rq.MergeVolume, handlers.merge_volume, manager_only=True, forward=True,
              idempotent=True, http=("POST", f"{_V}/merge"), cli=("volume", "merge")),
    Operation(rq.TemplateVolume, handlers.template_volume, manager_only=True, forward=True,
              idempotent=True, http=("POST", f"{_V}/template"), cli=("volume", "template")),
    Operation(rq.CloneVolume, handlers.clone_volume, manager_only=True, forward=True,
              idempotent=True, runs_here=lambda req: not req.linked,
              http=("POST", f"{_V}/clone"), cli=("volume", "clone"), http_status=201),
    # Files of the daemon's host, read or written as root: on the local socket only,
    # never over the network.
    Operation(rq.UploadVolume, handlers.upload_volume, cli=("volume", "upload")),
    Operation(rq.DownloadVolume, handlers.download_volume, cli=("volume", "download")),
    # The manager's steps of a copy (copies.py), asked by the copying host's daemon.
    Operation(rq.ReserveVolume, handlers.reserve_volume, manager_only=True, forward=True,
              idempotent=True),
    Operation(rq.PublishVolume, handlers.publish_volume, manager_only=True, forward=True,
              idempotent=True),
    Operation(rq.ListVolumes, handlers.list_volumes, local=True,
              http=("GET", f"{_D}/volumes"), cli=("volume", "list")),
    Operation(rq.GetVolume, handlers.get_volume, local=True, http=("GET", _V),
              cli=("volume", "info")),
    Operation(rq.PrepareVolume, handlers.prepare_volume, http=("POST", f"{_V}/prepare"),
              cli=("volume", "prepare")),
    Operation(rq.TeardownVolume, handlers.teardown_volume, http=("POST", f"{_V}/teardown"),
              cli=("volume", "teardown")),
    Operation(rq.GetImage, handlers.get_image, local=True, http=("GET", _I),
              cli=("image", "info")),
    Operation(rq.PrepareImage, handlers.prepare_image, http=("POST", f"{_I}/prepare"),
              cli=("image", "prepare")),
    Operation(rq.DeleteImage, handlers.delete_image, manager_only=True, forward=True,
              idempotent=True, check_here=_image_not_prepared_here, http=("DELETE", _I),
              cli=("image", "delete")),
    Operation(rq.TeardownImage, handlers.teardown_image, http=("POST", f"{_I}/teardown"),
              cli=("image", "teardown")),
    # libvirt's qemu hook (libvirt_hook.py): no command, no route
    Operation(rq.LibvirtPrepare, handlers.libvirt_prepare),
    Operation(rq.LibvirtStarted, handlers.libvirt_started),
    Operation(rq.LibvirtRelease, handlers.libvirt_release),
    Operation(rq.GetDomain, handlers.get_domain, local=True, http=("GET", _D),
              cli=("domain", "info")),
    # LUN paths are the manager host's: not forwarded (another host's path may differ)
    Operation(rq.ExtendDomain, handlers.extend_domain, manager_only=True,
              http=("POST", f"{_D}/extend"), cli=("domain", "extend")),
    # Destroys every disk of the domain: on the manager's command line only, not
    # over the network.
    Operation(rq.RemoveDomain, handlers.remove_domain, manager_only=True,
              cli=("domain", "remove")),
    Operation(rq.GetManager, handlers.get_manager, http=("GET", f"{_D}/manager"),
              cli=("manager", "status")),
    Operation(rq.ReleaseManager, handlers.release_manager,
              http=("POST", f"{_D}/manager/release"), cli=("manager", "release")),
    Operation(rq.ListHosts, handlers.list_hosts, http=("GET", f"{_D}/hosts"),
              cli=("host", "list")),
    Operation(rq.GetStatus, handlers.get_status, http=("GET", "/v1/status")),
    Operation(rq.Reload, handlers.reload, http=("POST", "/v1/reload")),
    Operation(rq.GetMetrics, handlers.get_metrics, cli=("metrics",)),
    Operation(rq.ListVms, handlers.list_vms, http=("GET", "/v1/vms"), cli=("vm", "list")),
    Operation(rq.VmIncoming, handlers.vm_incoming, http=("POST", "/v1/vms/{pid}/incoming"),
              cli=("vm", "incoming")),
    Operation(rq.VmMigrateOut, handlers.vm_migrate_out,
              http=("POST", "/v1/vms/{pid}/migrate-out"), cli=("vm", "migrate-out")),
    Operation(rq.VmTakeOver, handlers.vm_take_over, http=("POST", "/v1/vms/{pid}/take-over"),
              cli=("vm", "take-over")),
    Operation(rq.VmResume, handlers.vm_resume, http=("POST", "/v1/vms/{pid}/resume"),
              cli=("vm", "resume")),
    Operation(rq.VmSnapshot, handlers.vm_snapshot, http=("POST", "/v1/vms/{pid}/snapshot"),
              cli=("vm", "snapshot")),
    # asked by the VM's host's daemon only (vm snapshot): no command, no route
    Operation(rq.LiveSnapshotVolume, handlers.snapshot_volume_live, manager_only=True,
              forward=True, idempotent=True),
    Operation(rq.VmMerge, handlers.vm_merge, http=("POST", "/v1/vms/{pid}/merge"),
              cli=("vm", "merge")),
    # asked by the VM's host's daemon only (vm merge): no command, no route
    Operation(rq.LiveMergeVolume, handlers.merged_live, manager_only=True, forward=True,
              idempotent=True),
    Operation(rq.VmQuit, handlers.vm_quit, http=("POST", "/v1/vms/{pid}/quit"),
              cli=("vm", "quit")),
)

OPERATIONS: dict[str, Operation] = {op.name: op for op in TABLE}


def get(name: str) -> Operation:
    try:
        return OPERATIONS[name]
    except KeyError:
        raise errors.InvalidArgument(f"unknown request {name!r}") from None


def decode(name: Any, fields: Any) -> rq.Request:
    """A request from the wire (socket, mailbox, HTTP): its type from the table, its
    fields checked by the codec and the type's own validation."""
    if not isinstance(name, str):
        raise errors.InvalidArgument("malformed request: no operation name")
    op = get(name)
    request: rq.Request = codec.from_wire(op.request, fields if fields is not None else {},
                                          "request")
    return request
