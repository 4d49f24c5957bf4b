"""libvirt: the XML of a disk on a sharedlvm image, the lock driver's configuration and
the qemu hook that prepares and tears down chains.

libvirt starts qemu, so libvirt holds the leaf's lease, in the qemu process: a
``<lease>`` element in the domain XML (lockspace = the domain's, key = the leaf
volume, target = the lease slot on the LUN) is acquired by libvirt's sanlock lock
driver for qemu (registered with sanlock in qemu's child before exec) just before its
CPUs start, released whenever libvirt pauses it or qemu ends, acquired again at a
resume and by a migration's destination -- always without the version, which the
watch checks instead (vmwatch_libvirt.py). sharedlvm prepares the chain around that,
from libvirt's qemu hook (``/etc/libvirt/hooks/qemu``, which must be fast, be
idempotent and never call libvirt):

- ``prepare``: the chain of every disk whose source is in a sharedlvm image
  directory is activated and linked there, after checks: the disk names its image's
  current leaf, the XML holds that leaf's ``<lease>`` (the exact lockspace, key, path
  and offset: without it libvirt would run qemu with no lease), and no host holds the
  leaf's lease (a second start on another host is refused here, before anything is
  activated; libvirt's own acquire is the last word). This activation precedes the
  lease by the time libvirt takes to fork qemu: libvirt acquires only in qemu's child,
  so nothing can take the lease first and still be opened by this qemu (a volume
  deleted meanwhile has no lease at its slot any more, and libvirt's acquire fails).
- ``started``: qemu runs (its CPUs too, unless started paused or a migration's
  destination): it must be registered with sanlock (libvirt's lock manager is
  sanlock), and the VM is recorded for the daemon's watch with its leaf's lease
  version (thin growth, ENOSPC resume through libvirt: vmwatch_libvirt.py). The
  volumes under the leaf get no lease: a libvirt ``<lease>`` is always exclusive,
  and a lease a third party acquires for qemu's pid breaks libvirt's release.
  Read-only and shareable disks on sharedlvm images are refused for that reason.
- ``release``: qemu is gone: the links go, and the volumes nothing else on this
  host uses are deactivated.
- ``migrate`` (the destination, before anything): the XML's image paths are rewritten
  to this host's root (the same in production; the test bed's simulated hosts differ),
  and the VM is marked incoming: its ``prepare`` skips the holder check (the source
  holds the leaf until the handoff) and its ``started`` the lease check.

Learned from libvirt's src/locking/lock_driver_sanlock.c, src/locking/domain_lock.c
and src/qemu/qemu_process.c (registered in the child, acquired at the CPUs' start,
released at every pause, the destination's state string parsed and dropped) and
docs/hooks.rst (phases and their stdin); written for sharedlvm.
"""

from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from . import errors, images
from .domain import Domain
from .lease_layout import LeaseLayout
from .model import VolumeFormat

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# an image directory's entry: <root>/run/sharedlvm/<domain>/<image>/<volume>
IMAGE_PATH = re.compile(rf"^(?P<root>.*)/run/sharedlvm/(?P<domain>[^/]+)/"
                        rf"(?P<image>{_UUID})/(?P<volume>{_UUID})$")

# libvirt's sanlock lock driver: sharedlvm names every lease in the domain XML, and
# libvirt never makes leases of its own (those would live in a directory of files).
SANLOCK_CONF = """\
# libvirt's sanlock lock driver, configured by sharedlvm ('sharedlvm libvirt install').
# Each VM's leases are <lease> elements in its domain XML ('sharedlvm libvirt disk-xml'),
# acquired in its qemu process: libvirt makes no leases of its own.
auto_disk_leases = 0
require_lease_for_disks = 0
"""
QEMU_CONF_LINE = 'lock_manager = "sanlock"'


# The disk XML


@dataclass(frozen=True)
class DiskXml:
    image: str
    leaf: str
    path: str  # the leaf in the image directory (prepared by the hook)
    format: str
    lockspace: str
    lease_path: str
    lease_offset: int
    disk: str
    lease: str


def disk_xml(domain: Domain, image: str, target: str = "vda", bus: str = "virtio",
             alias: str = "") -> DiskXml:
    """The ``<disk>`` and ``<lease>`` elements of ``image`` for a domain XML."""
    if not re.fullmatch(r"[a-z]{2,3}[a-z]{1,2}", target):
        raise errors.InvalidArgument(f"invalid target device {target!r} (e.g. vda)")
    if bus not in ("virtio", "scsi", "sata"):
        raise errors.InvalidArgument(f"invalid bus {bus!r}: virtio, scsi or sata")
    alias = alias or f"ua-sharedlvm-{image}"
    if not re.fullmatch(r"ua-[A-Za-z0-9_-]+", alias):
        raise errors.InvalidArgument(f"invalid alias {alias!r}: ua- and letters, digits, "
                                     "'-' or '_' (libvirt's user aliases)")
    info = images.image_info(domain, image)
    leaf = info.chain[-1]
    images.require_current(info.chain)
    images.require_writable(leaf, "run a VM on it")
    if leaf.lease is None:
        raise errors.LeaseError(f"volume {leaf.uuid} has no lease slot")
    lease_disk = LeaseLayout(domain).slot_disk(leaf.lease)
    path = str(images.image_dir(domain, image) / leaf.uuid)
    fmt = "qcow2" if leaf.format == VolumeFormat.QCOW2 else "raw"
    disk = (
        "<disk type='block' device='disk'>\n"
        f"  <driver name='qemu' type='{fmt}' cache='none' io='native' "
        "error_policy='enospace' discard='unmap'/>\n"
        f"  <source dev={quoteattr(path)}/>\n"
        f"  <target dev='{target}' bus='{bus}'/>\n"
        f"  <alias name='{alias}'/>\n"
        "</disk>")
    lease = (
        "<lease>\n"
        f"  <lockspace>{domain.lockspace}</lockspace>\n"
        f"  <key>{leaf.uuid}</key>\n"
        f"  <target path={quoteattr(lease_disk.path)} offset='{lease_disk.offset}'/>\n"
        "</lease>")
    return DiskXml(image, leaf.uuid, path, fmt, domain.lockspace, lease_disk.path,
                   lease_disk.offset, disk, lease)


# Configuration


def hook_script(python: str, root: str) -> str:
    """The file installed as /etc/libvirt/hooks/qemu: libvirt runs hooks with a
    cleared environment, so the root (and the interpreter) are written in it."""
    return (f"#!{python}\n"
            "# libvirt's qemu hook, installed by 'sharedlvm libvirt install': prepares\n"
            "# and tears down the chains of disks on sharedlvm images.\n"
            "import sys\n\n"
            "from sharedlvm.libvirt_hook import hook_main\n\n"
            f"sys.exit(hook_main(sys.argv[1:], root={root!r}))\n")


def qemu_conf(text: str) -> str:
    """qemu.conf's ``text`` with libvirt's lock manager set to sanlock (a
    ``lock_manager`` line replaced, else added)."""
    lines = [ln for ln in text.splitlines()
             if not re.match(r"\s*lock_manager\s*=", ln)]
    return "\n".join([*lines, QEMU_CONF_LINE]) + "\n"


def install(etc: Path, root: str, python: str = sys.executable) -> list[Path]:
    """Write libvirt's configuration under ``etc`` (/etc/libvirt): the lock driver's,
    the lock manager in qemu.conf, the hook. Returns the files written."""
    hooks = etc / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    conf = etc / "qemu.conf"
    old = conf.read_text() if conf.exists() else ""
    written = []
    for path, text, mode in ((etc / "qemu-sanlock.conf", SANLOCK_CONF, 0o644),
                             (conf, qemu_conf(old), 0o644),
                             (hooks / "qemu", hook_script(python, root), 0o755)):
        tmp = path.with_name(f".{path.name}.sharedlvm")
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, path)
        written.append(path)
    return written


# The domain XML, as the hook reads it


@dataclass(frozen=True)
class Disk:
    target: str
    source: str
    domain: str
    image: str
    volume: str
    read_only: bool


@dataclass(frozen=True)
class Lease:
    lockspace: str
    key: str
    path: str
    offset: int


def resolve(path: str, limit: int = 16) -> re.Match[str] | None:
    """The image directory entry ``path`` is or leads to through symlinks (a cloud
    manager's own link, e.g. OpenNebula's disk.N), even while the entry itself does
    not exist yet (the hook makes it)."""
    for _ in range(limit):
        found = IMAGE_PATH.match(os.path.normpath(path))
        if found:
            return found
        try:
            target = os.readlink(path)
        except OSError:
            return None
        path = os.path.join(os.path.dirname(path), target)
    return None


def source_path(disk: ET.Element) -> str:
    """A <disk>'s source path (block device or file), '' for none."""
    source = disk.find("source")
    return (source.get("dev") or source.get("file") or "") if source is not None else ""


def sharedlvm_disks(root: ET.Element) -> list[Disk]:
    found = []
    for disk in root.iterfind("./devices/disk"):
        path = source_path(disk)
        match = resolve(path) if path else None
        if match is None:
            continue
        target = disk.find("target")
        found.append(Disk(target.get("dev", "?") if target is not None else "?", path,
                          match["domain"], match["image"], match["volume"],
                          disk.find("readonly") is not None
                          or disk.find("shareable") is not None))
    return found


def leases_of(root: ET.Element) -> list[Lease]:
    found = []
    for lease in root.iterfind("./devices/lease"):
        target = lease.find("target")
        if target is None:
            continue
        try:
            offset = int(target.get("offset", "0") or 0)
        except ValueError:
            raise errors.InvalidArgument(f"a <lease> offset is not a number: "
                                         f"{target.get('offset')!r}") from None
        found.append(Lease(lease.findtext("lockspace", ""), lease.findtext("key", ""),
                           target.get("path", ""), offset))
    return found


def add_leases(xml: str, open_domain: Callable[[str], Domain]) -> str:
    """``xml`` with a ``<lease>`` for each writable disk on a sharedlvm image that has
    none (a domain XML written by a cloud manager that knows nothing of leases, e.g.
    OpenNebula's deployment file): the leaf's, at its slot; and on such a disk's
    ``<driver>`` with no error policy, ``error_policy='enospace'`` (a write past a thin
    LV's end pauses the VM, which the watch resumes once grown, instead of failing
    the guest's write). A disk that does not name its image's leaf is refused.
    Returned whole; unchanged when nothing is missing."""
    try:
        tree = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise errors.InvalidArgument(f"the domain XML does not parse: {exc}") from exc
    devices = tree.find("devices")
    disks = [d for d in sharedlvm_disks(tree) if not d.read_only]
    have = {lease.key for lease in leases_of(tree)}
    added = False
    for element in tree.iterfind("./devices/disk"):
        driver, path = element.find("driver"), source_path(element)
        if path and driver is not None and element.find("readonly") is None \
                and resolve(path) and not driver.get("error_policy"):
            driver.set("error_policy", "enospace")
            added = True
    for disk in disks:
        found = disk_xml(open_domain(disk.domain), disk.image)
        if found.leaf != disk.volume:
            raise errors.InvalidArgument(
                f"disk {disk.target} names volume {disk.volume}, which is not image "
                f"{disk.image}'s leaf ({found.leaf})")
        if found.leaf in have or devices is None:
            continue
        devices.append(ET.fromstring(found.lease))
        have.add(found.leaf)
        added = True
    return ET.tostring(tree, encoding="unicode") + "\n" if added else xml


def rewrite_root(xml: str, root: str) -> str:
    """``xml`` with the image directory paths of its disks under this host's ``root``
    (a migration's destination: the same root in production, a simulated host's own
    in the test bed). Text substitution, so nothing else of libvirt's XML changes."""
    tree = ET.fromstring(xml)
    for disk in tree.iterfind("./devices/disk/source"):
        for attr in ("dev", "file"):
            path = disk.get(attr) or ""
            match = IMAGE_PATH.match(path)
            if match and match["root"] != root.rstrip("/"):
                new = f"{root.rstrip('/')}/run/sharedlvm/{match['domain']}/" \
                      f"{match['image']}/{match['volume']}"
                xml = xml.replace(f"{attr}='{path}'", f"{attr}='{new}'")
                xml = xml.replace(f'{attr}="{path}"', f'{attr}="{new}"')
    return xml
