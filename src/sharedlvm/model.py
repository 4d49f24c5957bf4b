"""What the operations return: volumes, domains, hosts, the manager role.

Plain frozen dataclasses with enums for the closed sets (volume state, format,
allocation), carried typed inside the daemon and through the client library, turned
into JSON only at the transport boundaries (codec.py). Parsing LV tags into a
:class:`VolumeInfo` is the tag schema's job (tags.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from .errors import InvalidArgument

# Each enum has UNKNOWN for a value on the disk this version does not know (written
# by a newer version, or damaged): such a volume is listed as it is and left alone,
# never a reason for a takeover or a listing to fail.

class VolumeFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"
    UNKNOWN = "unknown"


class Allocation(StrEnum):
    PREALLOCATED = "preallocated"
    THIN = "thin"
    UNKNOWN = "unknown"


class VolumeState(StrEnum):
    # Published by one LVM commit (raw) or after its content is valid (qcow2).
    READY = "ready"
    # LV made, content not yet valid: a new manager removes it (rolled back).
    CREATING = "creating"
    # Being wiped before removal: a new manager finishes it (rolled forward).
    REMOVING = "removing"
    # Its data is in its parent already: a running VM's live merge committed it there
    # and qemu went on with the parent (vmlive.merge). Stale: never opened again, only
    # removed ("volume merge" drops it; a new manager rolls that forward).
    MERGED = "merged"
    UNKNOWN = "unknown"


class VolumeRole(StrEnum):
    # The top of its chain: the one volume of an image that is written.
    LEAF = "leaf"
    # Below a snapshot in its chain: read-only, read through its children.
    INTERNAL = "internal"
    # A shared read-only base for linked clones in other images; never written.
    TEMPLATE = "template"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class VolumeInfo:
    uuid: str
    domain: str
    image: str
    parent: str | None
    format: VolumeFormat
    alloc: Allocation
    capacity: int
    size: int
    state: VolumeState
    generation: int
    tags: dict[str, str] = field(default_factory=dict)
    lease: int | None = None
    # The LV's segments where they were read (a create's answer: 1); 0 in `volume
    # list` and `volume info`, which read only names, sizes and tags.
    segments: int = 1
    role: VolumeRole = VolumeRole.LEAF

    @property
    def writable(self) -> bool:
        """Only a leaf is ever written (prepared exclusive, extended, resized)."""
        return self.role == VolumeRole.LEAF


@dataclass(frozen=True)
class ImageInfo:
    """An image: its chain of volumes from the base (first) to the leaf (last). The
    base may be a template of another image (a linked clone)."""

    image: str
    domain: str
    leaf: str
    chain: list[VolumeInfo]
    # Who holds each volume's lease, from the leases on disk (host ids); empty when
    # asked without a daemon on this host (sanlock is asked through it).
    holders: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class CopyProgress:
    """A copy running on this host (a full clone, an upload or a download)."""

    job: str  # its request id
    kind: str  # clone, upload, download
    source: str  # a volume UUID or a file
    target: str  # a volume UUID (once reserved) or a file
    capacity: int  # bytes of the disk being copied
    percent: float
    bytes_per_second: float
    seconds: float
    pid: int | None = None  # the copier: the process that holds the copy's leases


@dataclass(frozen=True)
class Downloaded:
    volume: str
    file: str
    format: VolumeFormat
    size: int  # bytes of the file written
    seconds: float


@dataclass(frozen=True)
class ImageDeleted:
    image: str
    volumes: list[str]  # removed, the leaf first


@dataclass(frozen=True)
class Deleted:
    uuid: str
    deleted: bool = True


@dataclass(frozen=True)
class Prepared:
    path: str


@dataclass(frozen=True)
class Done:
    ok: bool = True


@dataclass(frozen=True)
class LeaseVersions:
    """Volume -> the version of its lease (libvirt's started: the versions a VM's
    leases are held at, or will be acquired one past)."""

    versions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class VmInfo:
    """A VM started by ``sharedlvm run`` on this host, as its record and watch say."""

    pid: int  # its qemu: the PID of the ``vm`` commands
    domain: str
    writes: list[str]  # the volumes it writes
    reads: list[str]  # volumes it reads that run did not activate (former leaves)
    state: str  # "running", a migration's "incoming" or "migrated-out"
    watched: bool  # the daemon's watch is connected to its monitor


@dataclass(frozen=True)
class MigratedOut:
    """A live migration's source side, done: qemu completed the migration (the guest
    stopped, its images flushed and inactive) and the leases it held were released, at
    these versions (the destination acquires each only at its version)."""

    pid: int
    versions: dict[str, int]  # volume -> the lease version the source held
    downtime_ms: int  # the guest stopped on the source (qemu's own figure)


@dataclass(frozen=True)
class TakenOver:
    """A live migration's destination side, done: leases acquired at the source's
    versions, volumes refreshed, the VM resumed."""

    pid: int
    versions: dict[str, int]  # volume -> the version of the lease held now
    handoff_ms: float  # acquired, refreshed and resumed, in this many ms


@dataclass(frozen=True)
class Migrated:
    """A live migration, end to end (client.migrate_vm)."""

    pid: int  # the source's qemu (ended)
    dest_pid: int  # the destination's qemu, running with the leases
    versions: dict[str, int]
    downtime_ms: int  # qemu's own downtime
    handoff_ms: float  # added by the lease handoff: source released -> destination resumed


@dataclass(frozen=True)
class Released:
    released: bool


@dataclass(frozen=True)
class DomainRemoved:
    removed: str


@dataclass(frozen=True)
class ManagerStatus:
    domain: str
    manager: int | None
    generation: int
    last_manager: int
    this_host: bool


@dataclass(frozen=True)
class HostInfo:
    host_id: int
    state: str  # sanlock's view: live | failing | dead | free | unknown
    generation: int
    holds: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ServiceStatus:
    """One attached domain as this host's daemon runs it."""

    domain: str
    host_id: int
    joined: bool
    manager: bool
    generation: int | None
    prepared: dict[str, bool] = field(default_factory=dict)  # volume -> shared
    images: dict[str, bool] = field(default_factory=dict)  # prepared image -> shared
    copies: list[CopyProgress] = field(default_factory=list)


@dataclass(frozen=True)
class ShardInfo:
    """One VG of a domain (docs/design.md "Shards")."""

    index: int
    vg_name: str
    luns: list[str]
    volumes: int
    size: int
    free: int
    seqno: int


@dataclass(frozen=True)
class DomainInfo:
    name: str
    domain_uuid: str
    vg_uuid: str
    format_version: int
    host_id: int
    manager_host_id: int
    is_manager: bool
    io_timeout: int
    manager_generation: int
    luns: list[str]
    size: int
    free: int
    extent_size: int
    volumes: int
    metadata_size: int
    metadata_free: int
    seqno: int  # of shard 0
    created: float
    shards: list[ShardInfo]


_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def check_uuid(value: str, what: str = "volume") -> str:
    if not _UUID_RE.match(value):
        raise InvalidArgument(f"invalid {what} id {value!r}: expected a lowercase UUID")
    return value


def check_request_id(value: str) -> str:
    if not _REQUEST_ID_RE.match(value):
        raise InvalidArgument(
            f"invalid request id {value!r}: 1-128 letters, digits, '_', '.', ':', '-'")
    return value
