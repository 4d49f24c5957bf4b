"""Volumes prepared on this host for a consumer process: leases held in the writer.

A lease must live in the process that writes (docs/design.md rule 3): if it lived in
the daemon, a daemon that crashed, was OOM-killed or restarted would drop the lease
while the VM kept writing, and another host could take it. So ``volume prepare
VOLUME --pid PID`` acquires the volume's lease *on behalf of* PID, a process
registered with this host's sanlock (started by ``sharedlvm run``, which registers
itself, sets a killpath for its process group and execs the consumer), and
activates the volume (read-only for a shared lease). The lease is PID's: it dies
with PID, survives the daemon, and on lockspace loss sanlock kills PID's process
group. ``volume teardown`` releases it on PID's behalf and deactivates.

``image prepare IMAGE --pid PID`` does the same for a whole chain (images.py): the
leaf exclusive (shared with ``--shared``), every volume below it shared and
read-only, each activated and linked into the image's directory, where qemu resolves
the backing files. A read-only volume (a template under several linked clones) may
be prepared for several consumers of this host at once, each holding its own shared
lease; it is deactivated when the last of them is torn down.

What is prepared is recorded in the host's run dir, so a restarted daemon knows it
again (and forgets what belonged to processes that died meanwhile, deactivating
their volumes). This is where the live-migration handoff and the monitor of thin
volumes in use will live.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import errors, images, leases
from . import volume as volume_mod
from .domain import Domain
from .lease_layout import LeaseLayout
from .model import VolumeInfo
from .requests import LibvirtPrepare

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preparation:
    volume: str
    pid: int
    shared: bool
    # A libvirt domain's (its UUID): ``pid`` 0 until its qemu started (libvirt.py)
    vm: str = ""


@dataclass(frozen=True)
class ImagePreparation:
    image: str
    pid: int
    shared: bool
    volumes: list[str] = field(default_factory=list)  # base first
    vm: str = ""


def _live(prep: Preparation | ImagePreparation) -> bool:
    """Its consumer runs, or is a libvirt domain's qemu about to (released by the
    hook's release, which libvirt runs after a failed start too)."""
    return (prep.vm != "" and prep.pid == 0) or pid_alive(prep.pid)


def _who(prep: Preparation | ImagePreparation) -> str:
    return f"libvirt domain {prep.vm}" if prep.vm else f"process {prep.pid}"


def _loaded_live(prep: Preparation | ImagePreparation) -> bool:
    """At the daemon's start: a libvirt domain's preparation whose qemu had not
    started is dropped (its started or release may have found no daemon: nothing
    would ever release it); if that qemu still starts, its started hook fails."""
    return pid_alive(prep.pid)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


class PreparedVolumes:
    def __init__(self, domain: Domain, layout: LeaseLayout, state_file: Path,
                 require_joined: Callable[[], None]) -> None:
        self.domain = domain
        self.layout = layout
        self.state_file = state_file
        self.require_joined = require_joined
        self._lock = threading.RLock()
        # volume -> its preparations here, one per consumer (several only if shared)
        self._held: dict[str, list[Preparation]] = {}
        self._images: dict[str, ImagePreparation] = {}
        self._load()

    # State on disk (the run dir: it dies with a reboot, as the leases do)

    def _load(self) -> None:
        try:
            data = json.loads(self.state_file.read_text())
            if isinstance(data, list):  # before images: the list of preparations
                data = {"volumes": data, "images": []}
            preps = [Preparation(str(p["volume"]), int(p["pid"]), bool(p["shared"]),
                                 str(p.get("vm", ""))) for p in data["volumes"]]
            imgs = [ImagePreparation(str(i["image"]), int(i["pid"]), bool(i["shared"]),
                                     [str(v) for v in i["volumes"]], str(i.get("vm", "")))
                    for i in data["images"]]
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError) as exc:
            log.error("ignoring %s: %s", self.state_file, exc)
            return
        for prep in preps:
            if _loaded_live(prep):
                self._held.setdefault(prep.volume, []).append(prep)
            else:
                log.info("volume %s was prepared for process %d, which is gone",
                         prep.volume, prep.pid)
        for img in imgs:
            if _loaded_live(img):
                self._images[img.image] = img
            else:  # its leases died with it: drop its links too
                images.unlink_chain(self.domain, img.image, img.volumes)
        # What no live consumer holds any more: its mapping goes too.
        for vol in {p.volume for p in preps} - set(self._held):
            with contextlib.suppress(errors.Error):
                self.domain.deactivate_volume(vol)

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "volumes": [asdict(p) for preps in self._held.values() for p in preps],
            "images": [asdict(i) for i in self._images.values()]}))
        os.replace(tmp, self.state_file)

    # What the daemon reports

    def __contains__(self, volume: str) -> bool:
        return volume in self._held

    def __len__(self) -> int:
        return len(self._held)

    def snapshot(self) -> dict[str, bool]:
        """volume -> shared, for every volume prepared here."""
        with self._lock:
            return {vol: all(p.shared for p in preps) for vol, preps in self._held.items()}

    def images(self) -> dict[str, bool]:
        """image -> shared, for every image prepared here."""
        with self._lock:
            return {i.image: i.shared for i in self._images.values()}

    # Prepare and teardown

    def prepare(self, volume: str, pid: int, shared: bool) -> str:
        """Acquire the lease for ``pid``, activate, return the device path. Again for
        the same process and mode: the same path. A volume prepared here for another
        process is refused, unless both are shared (several readers of a template)."""
        self.require_joined()
        if not pid_alive(pid):
            raise errors.InvalidArgument(f"no process {pid} on this host")
        with self._lock:
            return self._prepare(volume_mod.get_volume(self.domain, volume), pid, shared)

    def _prepare(self, info: VolumeInfo, pid: int, shared: bool) -> str:
        volume = info.uuid
        images.require_current([info])
        if not shared:
            images.require_writable(info, "prepare for writing", "use --shared")
        live = [p for p in self._held.get(volume, []) if _live(p)]
        for held in live:
            if held.pid == pid and held.shared == shared:
                return volume_mod.volume_path(self.domain, volume, read_only=shared)
            if held.pid == pid or not (held.shared and shared):
                mode = "shared" if held.shared else "exclusive"
                raise errors.Busy(f"volume {volume} is already prepared here for "
                                  f"{_who(held)} ({mode})")
        try:
            self.layout.acquire_volume(info, shared=shared, pid=pid)
        except errors.LeaseError as exc:
            if "no such process registered" in str(exc):
                raise errors.InvalidArgument(
                    f"process {pid} is not registered with this host's sanlock: start "
                    "the consumer with 'sharedlvm run -- COMMAND'") from exc
            raise
        try:
            path = volume_mod.volume_path(self.domain, volume, read_only=shared)
        except BaseException:
            self.layout.release_volume(info, pid=pid)
            raise
        self._held[volume] = [*live, Preparation(volume, pid, shared)]
        self._save()
        return path

    def teardown(self, volume: str) -> None:
        """Release the lease on the consumers' behalf (those still running) and
        deactivate the volume on this host."""
        with self._lock:
            preps = self._held.get(volume)
            if not preps:
                raise errors.NotFound(f"volume {volume} is not prepared on this host")
            if any(p.vm for p in preps):
                raise errors.Busy(f"volume {volume} is prepared here for a libvirt domain: "
                                  "libvirt's to stop (virsh destroy)")
            users = [i.image for i in self._images.values() if volume in i.volumes]
            if users:
                raise errors.Busy(f"volume {volume} is prepared here as part of image(s) "
                                  f"{', '.join(users)}: tear the image down")
            for prep in list(preps):
                self._release(volume, prep)

    def _release(self, volume: str, prep: Preparation) -> None:
        """Give up one consumer's preparation of ``volume``; deactivate it once none
        is left here."""
        try:
            info: VolumeInfo | None = volume_mod.get_volume(self.domain, volume)
        except errors.VolumeNotFound:
            info = None
        # A libvirt domain's lease is libvirt's (and a qemu that outlived libvirt's
        # kill, stuck in the kernel, must keep it): never released here.
        if info is not None and pid_alive(prep.pid) and not prep.vm:
            with contextlib.suppress(errors.LeaseError):  # it may have released it
                self.layout.release_volume(info, pid=prep.pid)
        left = [p for p in self._held.get(volume, []) if p != prep and _live(p)]
        if left:
            self._held[volume] = left
        else:
            self._held.pop(volume, None)
            if info is not None:
                self.domain.deactivate_volume(volume)
        self._save()

    # Images

    def prepare_image(self, image: str, pid: int, shared: bool) -> str:
        """Prepare every volume of ``image``'s chain for ``pid`` (the leaf exclusive
        unless ``shared``, the rest shared), link them into the image directory and
        return the leaf's path there. All or nothing: a volume that cannot be
        prepared undoes the ones before it."""
        self.require_joined()
        if not pid_alive(pid):
            raise errors.InvalidArgument(f"no process {pid} on this host")
        with self._lock:
            held = self._images.get(image)
            if held is not None and _live(held) and \
                    (held.pid, held.shared, held.vm) != (pid, shared, ""):
                mode = "shared" if held.shared else "exclusive"
                raise errors.Busy(f"image {image} is already prepared here for "
                                  f"{_who(held)} ({mode})")
            info = images.image_info(self.domain, image)
            if not shared:
                images.require_writable(info.chain[-1], "prepare for writing", "use --shared")
            done: list[Preparation] = []
            devices: dict[str, str] = {}
            try:
                for vol in info.chain:
                    ro = shared or vol.uuid != info.leaf
                    mine = any(p.pid == pid and p.shared == ro
                               for p in self._held.get(vol.uuid, []))
                    devices[vol.uuid] = self._prepare(vol, pid, ro)
                    if not mine:
                        done.append(Preparation(vol.uuid, pid, ro))
                directory = images.link_chain(self.domain, image, devices)
            except BaseException:
                for prep in reversed(done):
                    with contextlib.suppress(errors.Error):
                        self._release(prep.volume, prep)
                raise
            self._images[image] = ImagePreparation(image, pid, shared, list(devices))
            self._save()
            return str(directory / info.leaf)

    def teardown_image(self, image: str) -> None:
        with self._lock:
            img = self._images.get(image)
            if img is None:
                raise errors.NotFound(f"image {image} is not prepared on this host")
            if img.vm:
                raise errors.Busy(f"image {image} is prepared here for libvirt domain "
                                  f"{img.vm}: libvirt's to stop (virsh destroy)")
            images.unlink_chain(self.domain, image, img.volumes)
            for vol in reversed(img.volumes):
                for prep in [p for p in self._held.get(vol, []) if p.pid == img.pid]:
                    self._release(vol, prep)
            del self._images[image]
            self._save()

    # libvirt domains (libvirt.py: the qemu hook's steps). libvirt holds the leaf's
    # lease in qemu (the domain XML's <lease>); these activate and link the chain
    # around it, keyed by the domain's UUID until its qemu's pid is known.

    def prepare_libvirt(self, req: LibvirtPrepare) -> str:
        """Activate and link ``req.image``'s chain for a libvirt domain about to start
        (checked: the disk names the leaf, the XML holds the leaf's lease at its slot,
        nobody holds that lease unless the domain is a migration's destination);
        returns the leaf's path in the image directory."""
        self.require_joined()
        with self._lock:
            held = self._images.get(req.image)
            if held is not None and _live(held) and held.vm != req.vm:
                raise errors.Busy(f"image {req.image} is already prepared here for "
                                  f"{_who(held)}")
            info = images.image_info(self.domain, req.image)
            images.require_current(info.chain)
            leaf = info.chain[-1]
            if req.volume != leaf.uuid:
                raise errors.InvalidArgument(
                    f"the disk names volume {req.volume}, which is not image "
                    f"{req.image}'s leaf ({leaf.uuid}): print its XML again ('sharedlvm "
                    f"libvirt disk-xml {req.image}')")
            if not req.read_only:
                self._check_lease(req, leaf)
            devices: dict[str, str] = {}
            done: list[Preparation] = []
            try:
                for vol in info.chain:
                    ro = req.read_only or vol.uuid != leaf.uuid
                    live = [p for p in self._held.get(vol.uuid, []) if _live(p)]
                    for other in live:
                        if other.vm != req.vm and not (other.shared and ro):
                            raise errors.Busy(f"volume {vol.uuid} is already prepared "
                                              f"here for {_who(other)}")
                    mine = [p for p in live if p.vm == req.vm]
                    devices[vol.uuid] = volume_mod.volume_path(self.domain, vol.uuid,
                                                               read_only=ro, info=vol)
                    if not mine:
                        prep = Preparation(vol.uuid, 0, ro, req.vm)
                        self._held[vol.uuid] = [*live, prep]
                        done.append(prep)
                directory = images.link_chain(self.domain, req.image, devices)
            except BaseException:
                for prep in reversed(done):
                    with contextlib.suppress(errors.Error):
                        self._release(prep.volume, prep)
                raise
            self._images[req.image] = ImagePreparation(req.image, 0, req.read_only,
                                                       list(devices), req.vm)
            self._save()
            return str(directory / leaf.uuid)

    def _check_lease(self, req: LibvirtPrepare, leaf: VolumeInfo) -> None:
        images.require_writable(leaf, "run a VM on it")
        if leaf.lease is None:
            raise errors.LeaseError(f"volume {leaf.uuid} has no lease slot")
        slot = self.layout.slot_disk(leaf.lease)
        want = f"{self.layout.lockspace}:{leaf.uuid}:{slot.path}:{slot.offset}"
        if req.lease != want:
            # libvirt would run qemu without the leaf's lease (or lock another slot)
            raise errors.InvalidArgument(
                f"the domain XML has no <lease> of volume {leaf.uuid} at its slot "
                f"(lockspace {self.layout.lockspace}, target {slot.path} offset "
                f"{slot.offset}): add the one 'sharedlvm libvirt disk-xml {req.image}' "
                "prints")
        if not req.incoming:  # a migration's source holds it until the handoff
            holders = self.layout.holders(leaf)
            if holders:
                raise errors.VolumeHeld(leaf.uuid, holders, "exclusive")

    def started_libvirt(self, image: str, vm: str, pid: int) -> dict[str, int]:
        """The domain's qemu runs as ``pid``: it must be registered with sanlock (by
        libvirt's lock manager, which then acquires the leaf's lease whenever qemu's
        CPUs start); the preparations become ``pid``'s. Answers the leaf's lease
        version: the one qemu holds it at, or, not held yet (a migration's
        destination, a domain started paused), the one on the LUN, which libvirt's
        acquire will raise by one."""
        with self._lock:
            img = self._images.get(image)
            if img is None or img.vm != vm:
                raise errors.NotFound(f"image {image} is not prepared on this host for "
                                      f"libvirt domain {vm}")
            if not pid_alive(pid):
                raise errors.InvalidArgument(f"no process {pid} on this host")
            leaf = img.volumes[-1]
            try:
                held = leases.inquire(pid=pid)
            except errors.LeaseError as exc:
                raise errors.LeaseError(
                    f"libvirt's qemu {pid} is not registered with this host's sanlock: "
                    "libvirt's lock manager must be sanlock ('sharedlvm libvirt install')"
                    f": {exc}") from exc
            mine = {h.resource: h.version for h in held
                    if h.lockspace == self.layout.lockspace and not h.shared}
            version = mine.get(leaf)
            if version is None:
                version = self.layout.lease_version(volume_mod.get_volume(self.domain, leaf))
            for vol in img.volumes:
                self._held[vol] = [replace(p, pid=pid) if p.vm == vm else p
                                   for p in self._held.get(vol, [])]
            self._images[image] = replace(img, pid=pid)
            self._save()
            return {leaf: version}

    def release_libvirt(self, image: str, vm: str) -> None:
        """The domain's qemu is gone (or never started): unlink, deactivate what
        nothing else here uses. Nothing prepared for it: nothing to do. A qemu that
        outlived libvirt's kill (stuck in the kernel) keeps its volumes and its lease:
        they go when it ends (at the daemon's next start, if not before)."""
        with self._lock:
            img = self._images.get(image)
            if img is None or img.vm != vm:
                return
            if img.pid and pid_alive(img.pid):
                raise errors.Busy(f"libvirt domain {vm}'s qemu {img.pid} still runs after "
                                  "libvirt's release: its volumes stay active and its "
                                  "lease its own until it ends")
            images.unlink_chain(self.domain, image, img.volumes)
            for vol in reversed(img.volumes):
                for prep in [p for p in self._held.get(vol, []) if p.vm == vm]:
                    self._release(vol, prep)
            del self._images[image]
            self._save()
