"""Full clones, uploads and downloads: copies run by the host that asks (docs/design.md
"Copies").

A copy into the domain is three steps, each exactly-once by a request id derived from
the copy's own:

1. **reserve** (the manager): the target volume is created ``creating``, with its
   lease slot, sized from ``qemu-img measure`` of the source. Nobody uses a
   ``creating`` volume; a manager that takes over removes those nobody holds.
2. **copy** (this host): the copier process (copier.py) holds the source chain's
   shared leases and the target's exclusive lease and runs ``qemu-img convert``.
3. **publish** (the manager): one LVM commit turns the target ``ready``, refused unless
   this host still holds its lease; the copier gives the lease back only after that.

A failure that another try would meet again (a bad source, a full domain) removes the
target. Any other failure (a killed copier, a lost manager, a daemon restarted under
the copy) leaves it ``creating`` for the retry of the same request id, which copies it
again from the start; if nobody retries, the next manager's takeover removes it.

A download needs no manager: the copier holds the chain's shared leases and writes a
new file on this host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import codec, errors, images, journal, qemu_img, tags
from .domain import Domain
from .model import (
    Allocation,
    CopyProgress,
    Downloaded,
    VolumeFormat,
    VolumeInfo,
    VolumeState,
)
from .requests import (
    CloneVolume,
    DeleteVolume,
    DownloadVolume,
    PublishVolume,
    Request,
    ReserveVolume,
    UploadVolume,
)
from .units import MiB, round_up
from .volume import (
    THIN_INITIAL_SIZE,
    LeaseAllocator,
    _intent,
    _lvcreate,
    _once,
    _recorded,
    get_volume,
    list_volumes,
)

log = logging.getLogger(__name__)

# A thin copy's LV is the measured data plus this much room for the consumer's first
# writes (the same room a new thin volume starts with), rounded up to this grain so
# that a retry measuring a source that changed a little asks for the same size.
THIN_GRAIN = 256 * MiB

Ask = Callable[[Request], Any]  # a request to the manager: run here or forwarded


def derived_id(request_id: str, step: str) -> str:
    """The request id of one step of a copy."""
    text = f"{request_id}:{step}"
    if len(text) <= 128:
        return text
    return f"copy-{hashlib.sha256(request_id.encode()).hexdigest()[:40]}:{step}"


def target_lv_size(fmt: VolumeFormat, alloc: Allocation, capacity: int,
                   required: int) -> int:
    """The LV of a copy's target: a raw volume is its capacity; a preallocated qcow2
    one its capacity and metadata; a thin qcow2 one what ``qemu-img measure`` says
    the copy takes, plus room for first writes, never more than preallocated."""
    full = capacity + qemu_img.metadata_overhead(capacity)
    if fmt == VolumeFormat.RAW:
        return capacity
    if alloc == Allocation.PREALLOCATED:
        return full
    return min(full, round_up(required + min(capacity, THIN_INITIAL_SIZE), THIN_GRAIN))


# The manager's two steps


@dataclass(frozen=True)
class _ReserveIntent:
    volume: str
    image: str
    size: int
    format: VolumeFormat
    alloc: Allocation
    lv_size: int
    tags: dict[str, str]
    shard: int


def reserve_volume(domain: Domain, request: ReserveVolume, allocate_lease: LeaseAllocator
                   ) -> VolumeInfo:
    """A volume made ``creating`` for the asking host to fill."""
    domain.require_manager()
    alloc = request.alloc
    assert alloc is not None
    with domain.request_lock(request.request_id):
        def plan() -> Any:
            if request.image is not None and list_volumes(domain, image=request.image):
                raise errors.AlreadyExists(f"image {request.image} already exists: a copy "
                                           "makes a new image")
            full = request.size + (qemu_img.metadata_overhead(request.size)
                                   if request.format == VolumeFormat.QCOW2 else 0)
            lv_size = min(max(request.lv_size, MiB), full)
            if request.format == VolumeFormat.RAW:
                lv_size = request.size
            shard = domain.placement.choose(lv_size)
            return codec.to_wire(_ReserveIntent(
                volume=str(uuid.uuid4()), image=request.image or str(uuid.uuid4()),
                size=request.size, format=request.format, alloc=alloc,
                lv_size=lv_size, tags=dict(request.tags), shard=shard.index))

        intent = _intent(domain, request.request_id, plan)

        def run(data: dict[str, Any], resumed: bool) -> Any:
            a = codec.from_wire(_ReserveIntent, data, "reserve intent")
            shard = domain.shard(a.shard)
            if not (resumed and shard.lvm.volume_lv(shard.vg_name, a.volume)):
                lease = allocate_lease(a.volume)
                domain.set_volume_shard(a.volume, shard)
                _lvcreate(domain, shard, a.volume, a.lv_size, tags.volume_tags(
                    image=a.image, parent=None, fmt=a.format, alloc=a.alloc,
                    generation=domain.record.manager_generation, lease=lease,
                    state=VolumeState.CREATING, capacity=a.size, user=a.tags))
            return codec.to_wire(get_volume(domain, a.volume))

        shard_index = int(intent.get("shard", 0)) if intent else 0
        try:
            with domain.manager_lock(domain.shard(shard_index)):
                result = _once(domain, request, "reserve", intent, run)
        except errors.Error:
            domain.placement.forget(domain.shard(shard_index))
            raise
    return codec.from_wire(VolumeInfo, result)  # type: ignore[no-any-return]


def publish_volume(domain: Domain, request: PublishVolume,
                   holders: Callable[[VolumeInfo], list[int]]) -> VolumeInfo:
    """A filled target made ``ready`` in one commit: only while the host that filled
    it holds its lease (its copier has finished writing and waits for this)."""
    domain.require_manager()
    vol = request.volume
    with domain.request_lock(request.request_id), \
            domain.manager_lock(domain.volume_shard(vol)):

        def run(a: dict[str, Any], resumed: bool) -> Any:
            info = get_volume(domain, vol)
            if info.state == VolumeState.READY:
                return codec.to_wire(info)
            if info.state != VolumeState.CREATING:
                raise errors.Busy(f"volume {vol} is {info.state}: not a copy's target")
            held = holders(info)
            if held != [request.host_id]:
                raise errors.LeaseError(
                    f"volume {vol} is not held by host {request.host_id} (holders: "
                    f"{', '.join(map(str, held)) or 'none'}): a copy's target is "
                    "published only while its copier holds it")
            domain.require_manager_now()
            shard = domain.volume_shard(vol)
            shard.lvm.change_tags(shard.vg_name, vol,
                                  add=[tags.state_tag(VolumeState.READY)],
                                  delete=[tags.state_tag(VolumeState.CREATING)])
            return codec.to_wire(get_volume(domain, vol))

        result = _once(domain, request, "publish", {"volume": vol}, run)
    return codec.from_wire(VolumeInfo, result)  # type: ignore[no-any-return]


def _recover_publish(domain: Domain, rec: journal.RequestRecord) -> Any:
    try:
        info = get_volume(domain, str(rec.args["volume"]))
    except errors.VolumeNotFound:
        return None
    return codec.to_wire(info) if info.state == VolumeState.READY else None


def recovery(domain: Domain) -> dict[str, Any]:
    """What volume.recover does with a pending request of this module: a reserve never
    answered is rolled back (its ``creating`` LV was removed), a publish answered if
    its volume is ready."""
    return {"reserve": lambda rec: None,
            "publish": lambda rec: _recover_publish(domain, rec)}


# This host's side


@dataclass
class _Job:
    job: str
    kind: str
    source: str
    target: str
    capacity: int
    started: float = field(default_factory=time.monotonic)
    percent: float = 0.0
    pid: int | None = None

    def progress(self) -> CopyProgress:
        seconds = time.monotonic() - self.started
        done = self.capacity * self.percent / 100
        return CopyProgress(job=self.job, kind=self.kind, source=self.source,
                            target=self.target, capacity=self.capacity,
                            percent=self.percent, seconds=round(seconds, 3),
                            bytes_per_second=round(done / seconds) if seconds > 0 else 0.0,
                            pid=self.pid)


class Copies:
    """The copies running on this host (for ``status``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}

    def add(self, job: _Job) -> None:
        with self._lock:
            if job.job in self._jobs:
                raise errors.Busy(f"copy {job.job} is already running on this host")
            self._jobs[job.job] = job

    def remove(self, job: _Job) -> None:
        with self._lock:
            if self._jobs.get(job.job) is job:
                del self._jobs[job.job]

    def snapshot(self) -> list[CopyProgress]:
        with self._lock:
            return [j.progress() for j in self._jobs.values()]


@dataclass(frozen=True)
class CopySettings:
    rate: int = 0  # bytes/s of each copy, 0: no limit


class _Copier:
    """The daemon's end of one copier process (copier.py's line protocol)."""

    def __init__(self, domain: Domain, job: dict[str, Any]) -> None:
        self.proc = domain.runner.spawn([sys.executable, "-m", "sharedlvm.copier"],
                                        stderr=None)
        self.send({"job": job})

    def send(self, data: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(data).encode() + b"\n")
        self.proc.stdin.flush()

    def event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            raise errors.ImageError(f"the copier exited (status {rc}) before it was done")
        data = json.loads(line)
        if data.get("event") == "error":
            raise errors.from_wire(data.get("error"))
        return data  # type: ignore[no-any-return]

    def finish(self, timeout: float = 120) -> None:
        """EOF: the copier gives its leases back, deactivates and exits; killed if it
        has not within ``timeout`` (its writer, registered with sanlock on its own,
        keeps the target's lease until it is gone itself)."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def kill(self) -> None:
        """After a failure: asked to stop (it is past the copy or has failed itself,
        and cleans up), killed if it does not."""
        self.finish(timeout=30)


def _run_copy(domain: Domain, copies: Copies, job: _Job, spec: dict[str, Any],
              target: Callable[[dict[str, Any]], dict[str, Any] | None]) -> _Copier | None:
    """Run one copier until its data is copied: ``target(measured)`` answers where the
    copy goes (None: nowhere, it was done before). Returns the copier, still holding
    its leases until ``finish``; on any failure the copier is stopped and the failure
    raised."""
    copies.add(job)
    copier: _Copier | None = None
    try:
        copier = _Copier(domain, spec)
        job.pid = copier.proc.pid
        measured = copier.event()
        if measured.get("event") != "measured":
            raise errors.Error(f"copier: unexpected {measured.get('event')!r}")
        where = target(measured)
        if where is None:
            copier.finish()
            return None
        copier.send(where)
        while True:
            ev = copier.event()
            if ev.get("event") == "progress":
                job.percent = float(ev.get("percent", 0.0))
            elif ev.get("event") == "copied":
                job.percent = 100.0
                return copier
    except BaseException:
        if copier is not None:
            copier.kill()
        raise
    finally:
        copies.remove(job)


def _copy_in(domain: Domain, ask: Ask, copies: Copies, settings: CopySettings, *,
             kind: str, request_id: str, source_name: str, source: dict[str, Any],
             capacity: int, fmt: VolumeFormat, alloc: Allocation, image: str | None,
             user_tags: dict[str, str], domain_name: str | None) -> VolumeInfo:
    job = _Job(job=request_id, kind=kind, source=source_name, target="", capacity=capacity)
    reserved: list[VolumeInfo] = []

    def target(measured: dict[str, Any]) -> dict[str, Any] | None:
        lv = target_lv_size(fmt, alloc, capacity, int(measured["required"]))
        info: VolumeInfo = ask(ReserveVolume(
            size=capacity, format=fmt, alloc=alloc, lv_size=lv, image=image,
            tags=user_tags, request_id=derived_id(request_id, "reserve"),
            domain=domain_name))
        reserved.append(info)
        job.target = info.uuid
        # A repeated request is answered as first recorded (creating): its volume as
        # it is now says whether it was published since.
        now = get_volume(domain, info.uuid)
        if now.state == VolumeState.READY:
            reserved[0] = now
            return None  # never copied over again
        return {"target": info.uuid}

    spec = {"id": _job_dir(request_id), "root": str(domain.paths.root),
            "domain": domain.name, "source": source, "target_format": fmt.value,
            "rate": settings.rate, "capacity": capacity}
    try:
        copier = _run_copy(domain, copies, job, spec, target)
        if copier is None:
            return reserved[0]
        try:
            published: VolumeInfo = ask(PublishVolume(
                reserved[0].uuid, domain.host_id,
                request_id=derived_id(request_id, "publish"),
                domain=domain_name))
        finally:
            copier.finish()
        log.info("%s %s: volume %s published (%s, %.1f s)", kind, request_id,
                 published.uuid, source_name, time.monotonic() - job.started)
        return published
    except errors.VolumeNotFound as exc:
        if reserved and exc.volume == reserved[0].uuid:
            raise errors.NotFound(
                f"the target {exc.volume} of copy {request_id} was rolled back (a manager "
                "took over while nobody held it): ask again with a new request id"
            ) from None
        raise
    except errors.Error as exc:
        if reserved and exc.final:
            _abandon(ask, reserved[0], request_id, domain_name, domain)
        elif reserved and exc.changes_nothing:
            # True of this try (a lease another try's copier holds), not of the
            # request: its target exists, and another try may still publish it.
            raise errors.Busy(f"copy {request_id}: {exc}") from exc
        raise


def _abandon(ask: Ask, target: VolumeInfo, request_id: str, domain_name: str | None,
             domain: Domain) -> None:
    """Remove a copy's target that will never be published (only while ``creating``:
    a published volume is never removed for a copy's failure)."""
    try:
        if get_volume(domain, target.uuid).state != VolumeState.CREATING:
            return
        ask(DeleteVolume(target.uuid, request_id=derived_id(request_id, "abandon"),
                         domain=domain_name))
    except errors.Error as exc:
        log.warning("copy %s: target %s left creating (%s): the next manager removes it",
                    request_id, target.uuid, exc)


def _job_dir(request_id: str) -> str:
    """A directory name for a copy: never a request id itself (``..`` is a valid id)."""
    return hashlib.sha256(request_id.encode()).hexdigest()[:24]


def _answered(domain: Domain, request_id: str | None) -> VolumeInfo | None:
    """A copy asked again after it was published: its first answer, from the journal
    (any host reads it), whatever happened to the source or the volume since."""
    if request_id is None:
        return None
    rec = _recorded(domain, derived_id(request_id, "publish"))
    if rec is not None and rec.state == journal.DONE and rec.result is not None:
        return codec.from_wire(VolumeInfo, rec.result)  # type: ignore[no-any-return]
    return None


def _source_chain(domain: Domain, volume: str) -> tuple[VolumeInfo, list[VolumeInfo]]:
    source = get_volume(domain, volume)
    if source.state != VolumeState.READY:
        raise errors.Busy(f"volume {volume} is {source.state}, not ready")
    return source, images.chain(domain, volume)


def _default_alloc(fmt: VolumeFormat, alloc: Allocation | None) -> Allocation:
    alloc = alloc or (Allocation.THIN if fmt == VolumeFormat.QCOW2 else Allocation.PREALLOCATED)
    if fmt == VolumeFormat.RAW and alloc == Allocation.THIN:
        raise errors.InvalidArgument("raw volumes are always preallocated; thin needs qcow2")
    return alloc


def full_clone(domain: Domain, ask: Ask, copies: Copies, settings: CopySettings,
               request: CloneVolume) -> VolumeInfo:
    """A new independent image with the content of ``request.volume`` (its chain
    flattened), copied on this host."""
    done = _answered(domain, request.request_id)
    if done is not None:
        return done
    source, chain = _source_chain(domain, request.volume)
    fmt = request.format or source.format
    alloc = _default_alloc(fmt, request.alloc)
    return _copy_in(domain, ask, copies, settings, kind="clone",
                    request_id=request.request_id or f"clone-{uuid.uuid4()}",
                    source_name=source.uuid, source={"volumes": [v.uuid for v in chain]},
                    capacity=source.capacity, fmt=fmt, alloc=alloc, image=request.image,
                    user_tags=request.tags, domain_name=request.domain)


UPLOAD_FORMATS = (VolumeFormat.RAW.value, VolumeFormat.QCOW2.value)


def upload(domain: Domain, ask: Ask, copies: Copies, settings: CopySettings,
           request: UploadVolume) -> VolumeInfo:
    """A new volume with the content of a raw or qcow2 file of this host."""
    done = _answered(domain, request.request_id)
    if done is not None:
        return done
    path = request.file
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise errors.NotFound(f"file {path} not found") from None
    except OSError as exc:
        raise errors.InvalidArgument(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):  # never a device: another volume, a LUN
        raise errors.InvalidArgument(f"{path} is not a regular file")
    given = request.file_format.value if request.file_format else None
    try:
        info = qemu_img.info(domain.runner, path, given)
    except errors.ImageError as exc:
        raise errors.InvalidArgument(f"{path} is not an image qemu-img can read: {exc}") \
            from None
    file_format = str(info.get("format"))
    if file_format not in UPLOAD_FORMATS:
        raise errors.InvalidArgument(
            f"{path} is a {file_format} image: upload takes raw or qcow2 files (convert it "
            "first: qemu-img convert -O qcow2)")
    if info.get("backing-filename"):
        raise errors.InvalidArgument(
            f"{path} has a backing file ({info['backing-filename']}): upload takes a "
            "whole image (flatten it first: qemu-img convert)")
    specific = (info.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file") or specific.get("encrypt"):
        raise errors.InvalidArgument(
            f"{path} has an external data file or encryption: upload takes a plain image "
            "(convert it first: qemu-img convert)")
    if file_format == VolumeFormat.QCOW2.value:
        bad = qemu_img.corruption(domain.runner, path)
        if bad is not None:
            raise errors.InvalidArgument(f"{path} is a damaged qcow2 image ({bad}): "
                                         "repair it first (qemu-img check -r)")
    capacity = int(info.get("virtual-size", 0))
    if capacity <= 0:
        raise errors.InvalidArgument(f"{path} is empty")
    fmt = request.format or VolumeFormat(file_format)
    alloc = _default_alloc(fmt, request.alloc)
    ReserveVolume(size=capacity, format=fmt, alloc=alloc)  # its checks, before any copy
    return _copy_in(domain, ask, copies, settings, kind="upload",
                    request_id=request.request_id or f"upload-{uuid.uuid4()}",
                    source_name=path, source={"file": path, "format": file_format},
                    capacity=capacity, fmt=fmt, alloc=alloc, image=request.image,
                    user_tags=request.tags, domain_name=request.domain)


def download(domain: Domain, copies: Copies, settings: CopySettings,
             request: DownloadVolume) -> Downloaded:
    """A new file of this host with the content of ``request.volume`` (its chain
    flattened)."""
    source, chain = _source_chain(domain, request.volume)
    fmt = request.format or source.format
    parent = os.path.dirname(request.file)
    if not os.path.isdir(parent):
        raise errors.NotFound(f"directory {parent} not found")
    try:  # made here, exclusively: an existing file is never overwritten
        os.close(os.open(request.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise errors.AlreadyExists(f"file {request.file} exists: download writes a new "
                                   "file") from None
    except OSError as exc:
        raise errors.InvalidArgument(f"cannot create {request.file}: {exc.strerror}") \
            from None
    job_id = f"download-{uuid.uuid4()}"
    job = _Job(job=job_id, kind="download", source=source.uuid, target=request.file,
               capacity=source.capacity)
    spec = {"id": _job_dir(job_id), "root": str(domain.paths.root), "domain": domain.name,
            "source": {"volumes": [v.uuid for v in chain]}, "target_format": fmt.value,
            "rate": settings.rate}
    try:
        copier = _run_copy(domain, copies, job, spec, lambda measured: {"file": request.file})
        assert copier is not None
        copier.finish()
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(request.file)
        raise
    seconds = time.monotonic() - job.started
    return Downloaded(volume=source.uuid, file=request.file, format=fmt,
                      size=os.stat(request.file).st_size, seconds=round(seconds, 3))

