"""One dataclass per operation: what a caller may ask, validated once, at the edge.

A request is built where it enters the system (the CLI's parser, the HTTP API, the
client library, the manager's mailbox decoder) and checked in ``__post_init__``;
from then on it travels typed to its handler. It becomes JSON only at the transport
boundaries (codec.py): the daemon's socket, the storage mailbox and the journal carry
``{"op": request.op, "fields": codec.to_wire(request)}``.

Each request names its result type (``Result``), so the client library decodes
answers into the same types the handler returned. Field metadata (:func:`arg`) gives
the help text and the command-line form, from which the CLI parser, the HTTP routes
and the OpenAPI document are all built (operations.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import tags as tags_mod
from . import units
from .errors import InvalidArgument
from .model import (
    Allocation,
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
    VolumeFormat,
    VolumeInfo,
    check_request_id,
    check_uuid,
)


def arg(help: str, default: Any = dataclasses.MISSING, *, positional: bool = False,
        flag: str | None = None, negative: str | None = None, metavar: str | None = None,
        cli_parse: Any = None, decode: Any = None, repeat: bool = False,
        schema: dict[str, Any] | None = None, default_factory: Any = dataclasses.MISSING,
        ) -> Any:
    """A request field with what the CLI and the HTTP API need to know about it.

    ``cli_parse``: text from the command line to the wire value (e.g. "10G" -> bytes);
    ``decode``: a wire value in another accepted form to the canonical one (HTTP may
    send a size as "10G"); ``repeat``: the option may be given several times;
    ``negative``: a second flag that sets a bool field to False."""
    metadata = {"help": help, "positional": positional, "flag": flag, "negative": negative,
                "metavar": metavar, "cli_parse": cli_parse, "decode": decode,
                "repeat": repeat, "schema": schema}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(f"invalid count {text!r}: a whole number") from None


def _size(value: Any) -> Any:
    return units.parse_size(value) if isinstance(value, str) else value


def _tag_pairs(values: list[str]) -> dict[str, str]:
    return dict(tags_mod.parse_user_tag(t) for t in values)


def _tag_map(value: Any) -> Any:
    """Tags as an object {"key": "value"}; a list of [key, value] pairs is accepted too."""
    if isinstance(value, list):
        pairs = {}
        for item in value:
            if not (isinstance(item, list | tuple) and len(item) == 2
                    and all(isinstance(x, str) for x in item)):
                raise InvalidArgument("tags must be an object of key: value")
            pairs[item[0]] = item[1]
        return pairs
    return value


# User tags of one volume, as JSON. A request's journal record (one 4 KiB block,
# ondisk.MAX_PAYLOAD) carries them once, in the intent and then in the answer, with
# about 600 bytes of everything else: the limit keeps every record in its block, so an
# operation never fails after its commit for want of room to record it.
MAX_TAGS_SIZE = 2048

def _check_tags(user_tags: dict[str, str]) -> None:
    for key, value in user_tags.items():
        tags_mod.make_user_tag(key, value)  # raises on a bad key or a too long tag
    size = len(json.dumps(user_tags))
    if size > MAX_TAGS_SIZE:
        raise InvalidArgument(f"tags are too large: {size} bytes of JSON "
                              f"(at most {MAX_TAGS_SIZE})")


def _user_tags(help: str) -> Any:
    """A field of user tags: ``--tag KEY=VALUE`` (repeatable), a JSON object on the wire."""
    return arg(help, flag="--tag", default_factory=dict, cli_parse=_tag_pairs, repeat=True,
               decode=_tag_map, metavar="KEY=VALUE", schema=_TAGS_SCHEMA)


_DOMAIN_HELP = "domain name (default: the only domain attached on this host)"
_SIZE_SCHEMA = {"oneOf": [{"type": "integer", "minimum": 1},
                          {"type": "string", "example": "10G"}]}
_TAGS_SCHEMA = {"type": "object", "additionalProperties": {"type": "string"}}


@dataclass(frozen=True)
class Request:
    """Base of all requests. ``op`` is the operation's name on every transport."""

    op: ClassVar[str]
    Result: ClassVar[Any]
    # A copy's request is answered when the copy ends: a client waits without a limit.
    long_running: ClassVar[bool] = False
    # Fields that are not part of what a request id stands for (volume.request_digest).
    digest_omits: ClassVar[tuple[str, ...]] = ()

    def domain_name(self) -> str | None:
        return getattr(self, "domain", None)

    def with_request_id(self, request_id: str) -> Request:
        return dataclasses.replace(self, request_id=request_id)  # type: ignore[call-arg]


# Volumes


@dataclass(frozen=True)
class CreateVolume(Request):
    """create a volume (asked on any host, run by the manager)"""

    op: ClassVar[str] = "volume.create"
    Result: ClassVar[Any] = VolumeInfo

    size: int = arg("capacity: bytes or a binary unit, e.g. 10G", cli_parse=units.parse_size,
                    decode=_size, schema=_SIZE_SCHEMA)
    format: VolumeFormat = arg("volume format", VolumeFormat.RAW)
    alloc: Allocation | None = arg("allocation (default: thin for qcow2, else preallocated)",
                                   None)
    image: str | None = arg("image UUID (default: a new image)", None)
    tags: dict[str, str] = _user_tags("user tag key=value (repeatable)")
    request_id: str | None = arg("makes the request idempotent", None)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        if not 0 < self.size <= units.MAX_SIZE:
            raise InvalidArgument(f"invalid size {self.size}: must be 1..{units.MAX_SIZE}")
        _resolve_alloc(self)
        _check_new_volume(self)


@dataclass(frozen=True)
class ExtendVolume(Request):
    """grow a volume's capacity, or a thin volume's LV (asked on any host, run by the
    manager)"""

    op: ClassVar[str] = "volume.extend"
    Result: ClassVar[Any] = VolumeInfo

    volume: str = arg("volume UUID", positional=True)
    size: str | None = arg("capacity: +2G (grow by) or 12G (grow to)", None,
                           schema={"type": "string", "example": "+2G"})
    allocation: str | None = arg(
        "a thin qcow2 volume's LV: +1G or 3G; allowed while the volume is in use (the "
        "user's host refreshes it)", None, schema={"type": "string", "example": "+1G"})
    request_id: str | None = arg("makes the request idempotent", None)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.volume)
        if (self.size is None) == (self.allocation is None):
            raise InvalidArgument("give one of --size (capacity) and --allocation (LV)")
        units.parse_resize(self.size or self.allocation or "", 0)
        _check_common(self)

    def target(self, current: int) -> int:
        return units.parse_resize(self.size or self.allocation or "", current)


@dataclass(frozen=True)
class DeleteVolume(Request):
    """delete a volume; refused while any live host holds its lease"""

    op: ClassVar[str] = "volume.delete"
    Result: ClassVar[Any] = Deleted

    volume: str = arg("volume UUID", positional=True)
    wipe: bool = arg("zero the data before removing", False)
    discard: bool = arg("discard the extents (blkdiscard) before they are freed, where "
                        "the LUN supports it", False)
    request_id: str | None = arg("makes the request idempotent", None)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.volume)
        _check_erase(self)
        _check_common(self)


def _check_erase(request: Any) -> None:
    if request.wipe and request.discard:
        raise InvalidArgument("give one of --wipe and --discard")


@dataclass(frozen=True)
class SnapshotVolume(Request):
    """a new empty qcow2 leaf over a leaf volume, which becomes read-only

    Asked on any host, run by the manager."""

    op: ClassVar[str] = "volume.snapshot"
    Result: ClassVar[Any] = VolumeInfo

    volume: str = arg("the leaf to snapshot", positional=True)
    tags: dict[str, str] = _user_tags("user tag of the new leaf, key=value (repeatable)")
    request_id: str | None = arg("makes the request idempotent", None)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.volume)
        _check_tags(self.tags)
        _check_common(self)


@dataclass(frozen=True)
class _HeldVolumeRequest(Request):
    """An internal request about a volume whose lease the asking host holds."""

    volume: str = arg("volume UUID", positional=True)
    host_id: int = arg("the host that holds the volume's lease", 0)
    request_id: str | None = arg("makes the request idempotent", None)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.volume)
        if not 1 <= self.host_id <= 2000:
            raise InvalidArgument(f"invalid host id {self.host_id}")
        _check_common(self)


@dataclass(frozen=True)
class LiveSnapshotVolume(_HeldVolumeRequest):
    """a snapshot of a running VM's leaf, asked by the VM's host (vm snapshot), the
    leaf's lease's only holder"""

    op: ClassVar[str] = "volume.snapshot-live"
    Result: ClassVar[Any] = VolumeInfo

    tags: dict[str, str] = _user_tags("user tag of the new leaf, key=value (repeatable)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_tags(self.tags)


@dataclass(frozen=True)
class LiveMergeVolume(_HeldVolumeRequest):
    """a running VM's live merge went through: its volume is stale, its data in the
    parent (asked by the VM's host, the volume's only holder, vm merge). Idempotent by
    itself; the request id lets it travel through the mailbox."""

    op: ClassVar[str] = "volume.merged-live"
    Result: ClassVar[Any] = VolumeInfo


@dataclass(frozen=True)
class TemplateVolume(Request):
    """make a leaf a template: read-only, the shared base of linked clones

    Asked on any host, run by the manager."""

    op: ClassVar[str] = "volume.template"
    Result: ClassVar[Any] = VolumeInfo

    volume: str = arg("volume UUID (a leaf)", positional=True)
    request_id: str | None = arg("makes the request idempotent", None)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.volume)
        _check_common(self)


@dataclass(frozen=True)
class MergeVolume(Request):
    """remove a snapshot from its chain: its data committed into the volume below

    The chain must not be in use (a stopped VM). Asked on any host, run by the
    manager; every step is recorded, and a manager that dies is followed by one that
    finishes it."""

    op: ClassVar[str] = "volume.merge"
    Result: ClassVar[Any] = VolumeInfo
    long_running: ClassVar[bool] = True

    volume: str = arg("the snapshot to merge into the volume below it (a leaf or an "
                      "internal volume)", positional=True)
    request_id: str | None = arg("makes the request idempotent", None)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.volume)
        _check_common(self)


@dataclass(frozen=True)
class CloneVolume(Request):
    """a new image from a volume: a full copy, or --linked over a template

    With --linked, a qcow2 overlay over the template, made by the manager. A full
    clone is copied on the asking host, under the source's shared leases and the new
    volume's exclusive lease."""

    op: ClassVar[str] = "volume.clone"
    Result: ClassVar[Any] = VolumeInfo
    long_running: ClassVar[bool] = True

    volume: str = arg("the volume to clone (a template, for --linked); a volume of a "
                      "chain is copied with what is under it, flattened", positional=True)
    linked: bool = arg("a linked clone: an overlay over the template, no copy", False)
    format: VolumeFormat | None = arg("a full clone's format (default: the source's)", None)
    alloc: Allocation | None = arg("a full clone's allocation (default: thin for qcow2, "
                                   "else preallocated)", None)
    image: str | None = arg("the new image's UUID (default: a new one)", None)
    tags: dict[str, str] = _user_tags("user tag of the new volume, key=value (repeatable)")
    request_id: str | None = arg("makes the request idempotent", None)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.volume)
        if self.image is not None:
            check_uuid(self.image, "image")
        if self.linked and (self.format is not None or self.alloc is not None):
            raise InvalidArgument("a linked clone is a thin qcow2 overlay: --format and "
                                  "--alloc are for full clones")
        _check_format(self.format, self.alloc)
        _check_tags(self.tags)
        _check_common(self)


def _resolve_alloc(request: Any) -> None:
    """A new volume's allocation: checked against its format, or its default."""
    _check_format(request.format, request.alloc)
    alloc = request.alloc or (Allocation.THIN if request.format == VolumeFormat.QCOW2
                              else Allocation.PREALLOCATED)
    _check_format(request.format, alloc)
    object.__setattr__(request, "alloc", alloc)


def _check_new_volume(request: Any) -> None:
    """What every request making a new volume carries: image, tags, request id."""
    if request.image is not None:
        check_uuid(request.image, "image")
    _check_tags(request.tags)
    _check_common(request)


def _check_format(fmt: VolumeFormat | None, alloc: Allocation | None) -> None:
    if fmt == VolumeFormat.UNKNOWN or alloc == Allocation.UNKNOWN:
        raise InvalidArgument("invalid format or allocation 'unknown'")
    if fmt == VolumeFormat.RAW and alloc == Allocation.THIN:
        raise InvalidArgument("raw volumes are always preallocated; thin needs qcow2")


def _absolute(text: str) -> str:
    """A file named on the command line, as the daemon (another cwd) must see it."""
    return os.path.abspath(text)


def _check_file(path: str) -> None:
    if not path or not os.path.isabs(path) or "\0" in path or len(path) > 4096:
        raise InvalidArgument(f"invalid file {path!r}: an absolute path on the daemon's host")


@dataclass(frozen=True)
class UploadVolume(Request):
    """a new volume from a raw or qcow2 file on this host (import a cloud image)"""

    op: ClassVar[str] = "volume.upload"
    Result: ClassVar[Any] = VolumeInfo
    long_running: ClassVar[bool] = True

    file: str = arg("the file to copy in (on this host)", positional=True, cli_parse=_absolute)
    file_format: VolumeFormat | None = arg(
        "the file's format (default: probed; give raw for a raw file whose content could "
        "look like an image header)", None)
    format: VolumeFormat | None = arg("the volume's format (default: the file's)", None)
    alloc: Allocation | None = arg("allocation (default: thin for qcow2, else preallocated)",
                                   None)
    image: str | None = arg("image UUID (default: a new image)", None)
    tags: dict[str, str] = _user_tags("user tag key=value (repeatable)")
    request_id: str | None = arg("makes the request idempotent", None)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        _check_file(self.file)
        _check_format(self.format, self.alloc)
        if self.file_format == VolumeFormat.UNKNOWN:
            raise InvalidArgument("invalid file format 'unknown'")
        _check_new_volume(self)


@dataclass(frozen=True)
class DownloadVolume(Request):
    """copy a volume (its chain flattened) into a new file on this host"""

    op: ClassVar[str] = "volume.download"
    Result: ClassVar[Any] = Downloaded
    long_running: ClassVar[bool] = True

    volume: str = arg("volume UUID", positional=True)
    file: str = arg("the file to write (on this host; must not exist)", positional=True,
                    cli_parse=_absolute)
    format: VolumeFormat | None = arg("the file's format (default: the volume's)", None)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.volume)
        _check_file(self.file)
        _check_format(self.format, None)


@dataclass(frozen=True)
class ReserveVolume(Request):
    """a volume left creating for the asking host to fill (internal: copies)"""

    op: ClassVar[str] = "volume.reserve"
    Result: ClassVar[Any] = VolumeInfo

    size: int = arg("capacity, bytes")
    format: VolumeFormat = arg("volume format", VolumeFormat.RAW)
    alloc: Allocation | None = arg("allocation", None)
    lv_size: int = arg("the LV's size, bytes (measured for the content)", 0)
    image: str | None = arg("image UUID (default: a new image)", None)
    tags: dict[str, str] = _user_tags("user tag key=value (repeatable)")
    request_id: str | None = arg("makes the request idempotent", None)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        if not 0 < self.size <= units.MAX_SIZE:
            raise InvalidArgument(f"invalid size {self.size}: must be 1..{units.MAX_SIZE}")
        if not 0 <= self.lv_size <= 2 * units.MAX_SIZE:
            raise InvalidArgument(f"invalid LV size {self.lv_size}")
        _resolve_alloc(self)
        _check_new_volume(self)


@dataclass(frozen=True)
class PublishVolume(_HeldVolumeRequest):
    """make a filled volume ready, while the asking host holds its lease (internal)"""

    op: ClassVar[str] = "volume.publish"
    Result: ClassVar[Any] = VolumeInfo
    # Whichever host asks again (a copy retried on another host) publishes the same
    # target once; the manager sets it from the mailbox message.
    digest_omits: ClassVar[tuple[str, ...]] = ("host_id",)


@dataclass(frozen=True)
class PrepareVolume(Request):
    """acquire the volume's lease for a consumer process, activate, print the device"""

    op: ClassVar[str] = "volume.prepare"
    Result: ClassVar[Any] = Prepared

    volume: str = arg("volume UUID", positional=True)
    pid: int = arg("the consumer process that will hold the lease: registered with "
                   "sanlock, e.g. started with 'sharedlvm run -- COMMAND'", metavar="PID",
                   cli_parse=int)
    shared: bool = arg("shared lease, read-only device (readers, migration handoff)",
                       False, negative="--exclusive")
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.volume)
        if not 1 < self.pid < 2**22:
            raise InvalidArgument(f"invalid pid {self.pid}")


@dataclass(frozen=True)
class TeardownVolume(Request):
    """deactivate a prepared volume and release its lease"""

    op: ClassVar[str] = "volume.teardown"
    Result: ClassVar[Any] = Done

    volume: str = arg("volume UUID", positional=True)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.volume)


@dataclass(frozen=True)
class ListVolumes(Request):
    """list volumes"""

    op: ClassVar[str] = "volume.list"
    Result: ClassVar[Any] = list[VolumeInfo]

    image: str | None = arg("only volumes of this image", None)
    tags: dict[str, str] = _user_tags("only volumes with tag key=value (repeatable)")
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        if self.image is not None:
            check_uuid(self.image, "image")
        for key in self.tags:
            tags_mod.check_user_key(key)


@dataclass(frozen=True)
class GetVolume(Request):
    """show one volume"""

    op: ClassVar[str] = "volume.info"
    Result: ClassVar[Any] = VolumeInfo

    volume: str = arg("volume UUID", positional=True)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.volume)


# Images


@dataclass(frozen=True)
class GetImage(Request):
    """show an image's chain, base first: each volume's role, format, size, state"""

    op: ClassVar[str] = "image.info"
    Result: ClassVar[Any] = ImageInfo

    image: str = arg("image UUID", positional=True)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.image, "image")


@dataclass(frozen=True)
class PrepareImage(Request):
    """acquire an image's leases for a process; print the leaf's path

    The read-only volumes' leases shared, the leaf's exclusive unless --shared; the
    chain is activated and linked into the image directory, where the backing files
    resolve."""

    op: ClassVar[str] = "image.prepare"
    Result: ClassVar[Any] = Prepared

    image: str = arg("image UUID", positional=True)
    pid: int = arg("the consumer process that will hold the leases: registered with "
                   "sanlock, e.g. started with 'sharedlvm run -- COMMAND'", metavar="PID",
                   cli_parse=int)
    shared: bool = arg("the leaf's lease shared too, read-only (readers, migration "
                       "handoff)", False, negative="--exclusive")
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.image, "image")
        if not 1 < self.pid < 2**22:
            raise InvalidArgument(f"invalid pid {self.pid}")


@dataclass(frozen=True)
class TeardownImage(Request):
    """release a prepared image's leases, deactivate what nothing else here uses"""

    op: ClassVar[str] = "image.teardown"
    Result: ClassVar[Any] = Done

    image: str = arg("image UUID", positional=True)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.image, "image")


@dataclass(frozen=True)
class _LibvirtRequest(Request):
    """A step of libvirt's qemu hook (libvirt.py) for one image of a libvirt domain."""

    image: str = arg("image UUID", positional=True)
    vm: str = arg("the libvirt domain's UUID", "")
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.image, "image")
        check_uuid(self.vm, "libvirt domain")


@dataclass(frozen=True)
class LibvirtPrepare(_LibvirtRequest):
    """activate an image's chain for a libvirt domain about to start (hook: prepare)

    ``volume`` is the volume the domain's disk names (it must be the image's leaf);
    ``lease`` the domain XML's <lease> for it as LOCKSPACE:KEY:PATH:OFFSET (required
    for a writable disk: libvirt holds the leaf's lease in qemu)."""

    op: ClassVar[str] = "libvirt.prepare"
    Result: ClassVar[Any] = Prepared

    volume: str = arg("the volume the disk names", "")
    lease: str = arg("the XML's lease of the leaf", "")
    read_only: bool = arg("a read-only disk: shared leases only", False)
    incoming: bool = arg("a migration's destination: the source holds the leaf", False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_uuid(self.volume)


@dataclass(frozen=True)
class LibvirtStarted(_LibvirtRequest):
    """a libvirt domain's qemu runs (hook: started): registered with sanlock (libvirt's
    lock manager is sanlock), the preparations its; answers the leaf's lease version"""

    op: ClassVar[str] = "libvirt.started"
    Result: ClassVar[Any] = LeaseVersions

    pid: int = arg("the domain's qemu", 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 < self.pid < 2**22:
            raise InvalidArgument(f"invalid pid {self.pid}")


@dataclass(frozen=True)
class LibvirtRelease(_LibvirtRequest):
    """a libvirt domain's qemu ended (hook: release): links gone, volumes deactivated"""

    op: ClassVar[str] = "libvirt.release"
    Result: ClassVar[Any] = Done


@dataclass(frozen=True)
class DeleteImage(Request):
    """delete an image: every volume of its chain, the leaf first

    A template of another image under it stays; refused while any of its volumes is
    in use or is the template of a linked clone. Asked on any host, run by the
    manager."""

    op: ClassVar[str] = "image.delete"
    Result: ClassVar[Any] = ImageDeleted

    image: str = arg("image UUID", positional=True)
    wipe: bool = arg("zero each volume's data before removing it", False)
    discard: bool = arg("discard each volume's extents (blkdiscard) before they are "
                        "freed, where the LUN supports it", False)
    request_id: str | None = arg("makes the request idempotent", None)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        check_uuid(self.image, "image")
        _check_erase(self)
        _check_common(self)


# Domains, the manager role, hosts, the daemon


@dataclass(frozen=True)
class GetDomain(Request):
    """show a domain"""

    op: ClassVar[str] = "domain.info"
    Result: ClassVar[Any] = DomainInfo

    domain: str | None = arg(_DOMAIN_HELP, None)


@dataclass(frozen=True)
class RemoveDomain(Request):
    """destroy a domain (on its manager, once every other host detached)"""

    op: ClassVar[str] = "domain.remove"
    Result: ClassVar[Any] = DomainRemoved

    force: bool = arg("even if volumes exist", False)
    domain: str | None = arg(_DOMAIN_HELP, None)


@dataclass(frozen=True)
class ExtendDomain(Request):
    """add a shard on each new LUN (on the manager; give LUNs by names that are the
    same on every host)"""

    op: ClassVar[str] = "domain.extend"
    Result: ClassVar[Any] = DomainInfo

    luns: list[str] = arg("empty block device for a new shard (repeatable)", flag="--lun",
                          cli_parse=list, repeat=True, metavar="DEVICE")
    partitions: int = arg("cut each LUN into this many GPT partitions, a shard each", 1,
                          metavar="N", cli_parse=_count)
    domain: str | None = arg(_DOMAIN_HELP, None)

    def __post_init__(self) -> None:
        if not self.luns:
            raise InvalidArgument("at least one --lun is needed")
        if not 1 <= self.partitions <= 128:
            raise InvalidArgument(f"invalid partition count {self.partitions}: 1..128")
        for lun in self.luns:
            if not lun.startswith("/dev/") or "\0" in lun or len(lun) > 4096:
                raise InvalidArgument(f"invalid LUN {lun!r}: a block device path under /dev")


@dataclass(frozen=True)
class GetManager(Request):
    """which host is manager, at which generation"""

    op: ClassVar[str] = "manager.status"
    Result: ClassVar[Any] = ManagerStatus

    domain: str | None = arg(_DOMAIN_HELP, None)


@dataclass(frozen=True)
class ReleaseManager(Request):
    """make this host give the manager role up (another host takes it at once)"""

    op: ClassVar[str] = "manager.release"
    Result: ClassVar[Any] = Released

    domain: str | None = arg(_DOMAIN_HELP, None)


@dataclass(frozen=True)
class ListHosts(Request):
    """host ids, their sanlock state and what they hold"""

    op: ClassVar[str] = "host.list"
    Result: ClassVar[Any] = list[HostInfo]

    domain: str | None = arg(_DOMAIN_HELP, None)


@dataclass(frozen=True)
class GetStatus(Request):
    """domains this host's daemon serves: lockspace, role, prepared volumes"""

    op: ClassVar[str] = "status"
    Result: ClassVar[Any] = list[ServiceStatus]


@dataclass(frozen=True)
class Reload(Request):
    """make the daemon pick up domains attached or detached since it started"""

    op: ClassVar[str] = "reload"
    Result: ClassVar[Any] = list[str]


@dataclass(frozen=True)
class GetMetrics(Request):
    """the daemon's metrics, Prometheus text format"""

    op: ClassVar[str] = "metrics"
    Result: ClassVar[Any] = str


# Running VMs: the steps of a live migration (vmmigrate.py), each run on one host

_PID_HELP = "the VM's qemu process on this host (started by 'sharedlvm run')"


def _pid_from_path(value: Any) -> Any:
    """An HTTP route's ``{pid}`` arrives as text."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


def _pid_arg() -> Any:
    return arg(_PID_HELP, positional=True, cli_parse=int, decode=_pid_from_path)


def _check_pid(pid: int) -> None:
    if not 1 < pid < 2**22:
        raise InvalidArgument(f"invalid pid {pid}")


def check_migration_uri(uri: str) -> None:
    if not uri.startswith(("unix:", "tcp:")) or len(uri) > 200 \
            or any(c.isspace() or c == "," for c in uri):
        raise InvalidArgument(f"invalid migration uri {uri!r}: unix:PATH or tcp:HOST:PORT")


def _versions(text: str) -> dict[str, int]:
    try:
        value = json.loads(text)
    except ValueError:
        raise InvalidArgument(f"invalid versions {text!r}: give a JSON object "
                              '{"VOLUME": VERSION, ...}') from None
    return value  # type: ignore[no-any-return]


def _check_versions(versions: Any) -> None:
    if not isinstance(versions, dict) or not versions or len(versions) > 64 or not all(
            isinstance(k, str) and type(v) is int and 0 < v < 2**64
            for k, v in versions.items()):
        raise InvalidArgument("invalid versions: a JSON object of 1 to 64 volumes, each "
                              "with its lease version (a positive integer)")
    for volume in versions:
        check_uuid(volume)


@dataclass(frozen=True)
class ListVms(Request):
    """VMs started by 'sharedlvm run' on this host: their qemu pids, volumes, state"""

    op: ClassVar[str] = "vm.list"
    Result: ClassVar[Any] = list[VmInfo]


@dataclass(frozen=True)
class _VmRequest(Request):
    pid: int = _pid_arg()

    def __post_init__(self) -> None:
        _check_pid(self.pid)


@dataclass(frozen=True)
class VmIncoming(_VmRequest):
    """make a migration's destination VM (run --incoming) listen for the stream"""

    op: ClassVar[str] = "vm.incoming"
    Result: ClassVar[Any] = Done


@dataclass(frozen=True)
class VmMigrateOut(_VmRequest):
    """migrate a VM to a listening destination; release its leases once qemu is done"""

    op: ClassVar[str] = "vm.migrate-out"
    Result: ClassVar[Any] = MigratedOut
    long_running: ClassVar[bool] = True

    uri: str = arg("the destination qemu's migration address (unix:PATH, tcp:HOST:PORT)",
                   "")
    timeout: float = arg("cancel the migration if it has not completed in this many "
                         "seconds (the VM runs on here)", 600.0, cli_parse=float)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_migration_uri(self.uri)
        if not 1 <= self.timeout <= 86400:
            raise InvalidArgument(f"invalid timeout {self.timeout}: 1 to 86400 seconds")


@dataclass(frozen=True)
class _VmVersions(_VmRequest):
    versions: dict[str, int] = arg(
        "the lease version of each volume, as the source's migrate-out answered: a JSON "
        "object", cli_parse=_versions, default_factory=dict,
        schema={"type": "object", "additionalProperties": {"type": "integer"}})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_versions(self.versions)


@dataclass(frozen=True)
class VmTakeOver(_VmVersions):
    """take a migrated VM over: its leases at the source's versions, refresh, resume"""

    op: ClassVar[str] = "vm.take-over"
    Result: ClassVar[Any] = TakenOver


@dataclass(frozen=True)
class VmResume(_VmVersions):
    """resume a migration's source after a failed handoff: its leases back, cont"""

    op: ClassVar[str] = "vm.resume"
    Result: ClassVar[Any] = Done


@dataclass(frozen=True)
class VmSnapshot(_VmRequest):
    """snapshot a running VM's disk: a new leaf, which the VM writes from now on"""

    op: ClassVar[str] = "vm.snapshot"
    Result: ClassVar[Any] = VolumeInfo

    volume: str | None = arg("the volume to snapshot (default: the one the VM writes)",
                             None)
    tags: dict[str, str] = _user_tags("user tag of the new leaf, key=value (repeatable)")
    request_id: str | None = arg("makes the request idempotent", None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.volume is not None:
            check_uuid(self.volume)
        _check_tags(self.tags)
        _check_common(self)


@dataclass(frozen=True)
class VmMerge(_VmRequest):
    """merge a volume of a running VM's disk into the one below it, live"""

    op: ClassVar[str] = "vm.merge"
    Result: ClassVar[Any] = VolumeInfo

    volume: str = arg("the volume merged away: the VM's leaf, or the volume under it", "")
    request_id: str | None = arg("makes the request idempotent", None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.volume:
            raise InvalidArgument("give --volume: the volume to merge into its parent")
        check_uuid(self.volume)
        _check_common(self)


@dataclass(frozen=True)
class VmQuit(_VmRequest):
    """end a VM's qemu (a migration's source once the destination runs)"""

    op: ClassVar[str] = "vm.quit"
    Result: ClassVar[Any] = Done


def _check_common(request: Any) -> None:
    if request.request_id is not None:
        check_request_id(request.request_id)
