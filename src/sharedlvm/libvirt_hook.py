"""libvirt's qemu hook (``/etc/libvirt/hooks/qemu NAME PHASE SUBPHASE EXTRA``, the
domain XML on stdin): what each phase does is in libvirt.py. It talks to this host's
sharedlvm daemon only (never to libvirt, which waits for it), and is idempotent:
libvirt runs ``release`` after a failed start too, and again for nothing prepared."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TextIO

from . import errors, vmwatch
from . import requests as rq
from .client import Client
from .libvirt import Disk, leases_of, rewrite_root, sharedlvm_disks
from .paths import ROOT_ENV, HostPaths

log = logging.getLogger(__name__)

PHASES = ("prepare", "started", "release", "migrate")
# A migration's destination mark older than this is stale (the migration never came
# to its prepare): a plain start must check the leaf's holders again.
INCOMING_FOR = 600.0


def _marker(paths: HostPaths, vm: str) -> Path:
    """A migration's destination, from its ``migrate`` phase until ``started``."""
    return paths.run_dir / "libvirt" / f"{vm}.incoming"


def qemu_pid(name: str, run_dir: Path = Path("/run/libvirt/qemu")) -> int:
    """The domain's qemu, from libvirt's pid file (the hook runs in libvirtd's
    namespace: its /run/libvirt)."""
    path = run_dir / f"{name}.pid"
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text().strip())
        if time.monotonic() > deadline:
            raise errors.NotFound(f"no pid file {path} for libvirt domain {name}")
        time.sleep(0.05)


def run_hook(paths: HostPaths, argv: list[str], xml: str, out: TextIO) -> int:
    if len(argv) < 2:
        raise errors.InvalidArgument("usage: qemu NAME PHASE SUBPHASE EXTRA (libvirt's hook)")
    name, phase = argv[0], argv[1]
    if phase not in PHASES:
        return 0
    try:
        tree = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise errors.InvalidArgument(f"the domain XML on stdin does not parse: {exc}") \
            from exc
    vm = tree.findtext("uuid", "").strip()
    if phase == "migrate":
        # the destination, before its prepare: paths under this host's root (printed
        # whole: an empty output would keep the source's)
        rewritten = rewrite_root(xml, str(paths.root))
        out.write(rewritten)
        if sharedlvm_disks(ET.fromstring(rewritten)):
            marker = _marker(paths, vm)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(name)
        return 0
    disks = sharedlvm_disks(tree)
    if not disks:
        return 0
    client = Client(paths.root, timeout=120)
    marker = _marker(paths, vm)
    with contextlib.suppress(FileNotFoundError):  # a migration that never came
        if time.time() - marker.stat().st_mtime > INCOMING_FOR:
            marker.unlink()
    incoming = marker.exists()
    if phase == "prepare":
        _check(disks)
        _prepare(client, tree, vm, disks, incoming)
    elif phase == "started":
        pid = qemu_pid(name)
        held: dict[str, int] = {}
        for disk in disks:
            answer = client.call(rq.LibvirtStarted(disk.image, vm, disk.domain, pid=pid))
            held.update(answer.versions)
        started = vmwatch.process_start(pid)
        if started is not None:
            vmwatch.write_record(paths, vmwatch.VmRecord(
                pid, started, f"libvirt:{vm}", disks[0].domain,
                tuple((d.volume, d.source) for d in disks), held=tuple(sorted(held.items()))))
        marker.unlink(missing_ok=True)
    else:  # release: qemu is gone
        failed: list[str] = []
        for disk in disks:
            try:
                client.call(rq.LibvirtRelease(disk.image, vm, disk.domain))
            except errors.Error as exc:
                failed.append(f"{disk.target}: {exc}")
        _marker(paths, vm).unlink(missing_ok=True)
        if failed:
            raise errors.Error("release: " + "; ".join(failed))
    return 0


def _check(disks: list[Disk]) -> None:
    """What the hook cannot do safely is refused before anything is activated."""
    for disk in disks:
        if disk.read_only:
            raise errors.Unsupported(
                f"disk {disk.target}: a read-only or shareable disk on a sharedlvm image "
                "is not supported under libvirt (its lease would be shared, which a "
                "libvirt <lease> cannot be)")
    images = [d.image for d in disks]
    for image in set(images):
        if images.count(image) > 1:
            raise errors.InvalidArgument(f"image {image} is given to more than one disk")
    if len({d.domain for d in disks}) > 1:
        raise errors.Unsupported("disks on images of several sharedlvm domains: one "
                                 "domain per libvirt domain")


def _prepare(client: Client, tree: ET.Element, vm: str, disks: list[Disk],
             incoming: bool) -> None:
    leases = {lease.key: f"{lease.lockspace}:{lease.key}:{lease.path}:{lease.offset}"
              for lease in leases_of(tree)}
    done: list[Disk] = []
    try:
        for disk in disks:
            client.call(rq.LibvirtPrepare(
                disk.image, vm, disk.domain, volume=disk.volume,
                lease=leases.get(disk.volume, ""), read_only=disk.read_only,
                incoming=incoming))
            done.append(disk)
    except errors.Error as exc:
        for disk in reversed(done):
            with contextlib.suppress(errors.Error):
                client.call(rq.LibvirtRelease(disk.image, vm, disk.domain))
        raise errors.Error(f"disk {disk.target}: {exc}") from exc


def hook_main(argv: list[str], root: str = "/") -> int:
    """libvirt's qemu hook: ``NAME PHASE SUBPHASE EXTRA``, the domain XML on stdin.
    Exit 0 lets libvirt go on; otherwise the error, one line on stderr, is what
    libvirt reports (a failed prepare or started stops the domain's start)."""
    os.environ[ROOT_ENV] = root
    try:
        return run_hook(HostPaths.from_env(), argv, sys.stdin.read(), sys.stdout)
    except errors.Error as exc:
        print(f"sharedlvm: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
