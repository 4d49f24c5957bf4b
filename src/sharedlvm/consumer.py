"""``sharedlvm run``: hold volume leases for a command's whole life, like flock(1).

``run`` forks. The child is the consumer: it becomes the leader of a process group of
its own, registers with this host's sanlock daemon, tells sanlock to kill that whole
process group (killpath) if the host loses its lockspace, acquires the volume leases
for itself, activates the volumes (read-only under a shared lease) and execs the
command, keeping the sanlock connection open across exec. The leases therefore
belong to the consumer's pid, die with it, and are never held by a helper that
outlives or predates it (docs/design.md rule 3); children of the command (``run --
sh -c '...'``) are in its process group and are killed with it.

The parent only waits: it passes on SIGINT, SIGTERM and SIGHUP to the consumer's
group, and when the consumer has exited it deactivates the volumes no process on this
host holds any more (no mapping is left over extents the manager may hand out again)
and exits with the consumer's status.

Without volumes, ``run -- COMMAND`` only registers the command with sanlock (and sets
its killpath): a VM launched that way can have its volumes prepared for it by the
daemon (``volume prepare VOLUME --pid PID``), which acquires on its behalf.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from . import errors, images, leases, qmp, vmwatch
from . import volume as volume_mod
from .domain import Domain
from .lease_layout import LeaseLayout
from .model import VolumeInfo, check_uuid
from .paths import HostPaths
from .requests import check_migration_uri

# How often ``run --wait`` tries again a lease another host holds. The holder's
# release is seen within this; sanlock answers a refused acquire in a few ms.
WAIT_POLL = 0.5
# sanlock runs this instead of killing only the registered pid: the whole group.
KILL = "/bin/kill"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# {0}, {1}, ...: the devices of the volumes, in the order given (the leaf for an image).
_PLACEHOLDER = re.compile(r"\{(\d+)\}")


def parse_volume_arg(text: str) -> tuple[str, bool]:
    """``UUID`` (exclusive) or ``UUID:ro`` (shared, read-only)."""
    vol, sep, mode = text.partition(":")
    if sep and mode not in ("ro", "rw"):
        raise errors.InvalidArgument(f"invalid volume {text!r}: use UUID or UUID:ro")
    return check_uuid(vol), mode == "ro"


def run_with_leases(paths: HostPaths, domain: Domain | None,
                    volumes: Sequence[tuple[str, bool]], argv: Sequence[str],
                    wait: float = 0.0, image: tuple[str, bool] | None = None,
                    incoming: str = "") -> int:
    """Run ``argv`` as a registered consumer holding ``volumes``, or the chain of
    ``image`` (its leaf exclusive unless read-only, the rest shared); its exit
    status. ``incoming``: qemu as a live migration's destination listening on that
    URI, its writable volumes active without their leases, which the handoff gives
    it (vmmigrate.py)."""
    if not argv:
        raise errors.InvalidArgument("no command given after --")
    if incoming:
        if not qmp.is_qemu(argv[0]) or domain is None:
            raise errors.InvalidArgument("--incoming is for a qemu-system-* VM with "
                                         "--volume or --image")
        check_migration_uri(incoming)
    if wait < 0:
        raise errors.InvalidArgument(f"invalid wait {wait}: must be >= 0 seconds")
    if (volumes or image) and domain is None:
        raise errors.InvalidArgument("volumes need a domain")
    chain_of: str | None = None
    if image is not None and domain is not None:
        info = images.image_info(domain, image[0])
        if not image[1]:
            images.require_writable(info.chain[-1], "write", "use IMAGE:ro")
        infos = info.chain
        modes = [image[1] or v.uuid != info.leaf for v in infos]
        chain_of = image[0]
    else:
        infos = ([volume_mod.get_volume(domain, vol) for vol, _ in volumes] if domain
                 else [])
        modes = [shared for _, shared in volumes]
        for vol, ro in zip(infos, modes, strict=True):
            if not ro:
                images.require_writable(vol, "write", "use UUID:ro")
    images.require_current(infos)
    if domain is not None and qmp.is_qemu(argv[0]):
        qmp.check_argv(list(argv))  # before anything is acquired or activated
    placeholders = 1 if chain_of is not None else len(infos)
    for arg in argv:
        for m in _PLACEHOLDER.finditer(arg):
            if int(m.group(1)) >= placeholders:
                raise errors.InvalidArgument(
                    f"{m.group(0)} in {arg!r}: this run has {placeholders} device(s), "
                    f"{{0}}..{{{max(placeholders - 1, 0)}}}")
    leases.use_run_dir(paths.sanlock_run_dir)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _consumer(domain, infos, modes, argv, wait, chain_of, paths, incoming)
    started = vmwatch.process_start(pid)
    try:
        return _supervise(pid, domain, infos, chain_of, paths)
    finally:
        vmwatch.remove_record(paths, pid, started)


def _consumer(domain: Domain | None, infos: list[VolumeInfo], shared: list[bool],
              argv: Sequence[str], wait: float, image: str | None = None,
              paths: HostPaths | None = None, incoming: str = "") -> NoReturn:
    try:
        os.setpgid(0, 0)
        for signo in FORWARDED:
            signal.signal(signo, signal.SIG_DFL)
        fd = leases.register()
        leases.killpath(fd, [KILL, "-KILL", "--", f"-{os.getpid()}"])
        devices: list[str] = []
        writable: list[tuple[str, str]] = []  # (uuid, the path the command opens)
        if domain is not None:
            layout = LeaseLayout(domain)
            deadline = time.monotonic() + wait
            # One global order (by uuid): two consumers waiting for the same volumes
            # can never each hold one the other waits for.
            for i in sorted(range(len(infos)), key=lambda i: infos[i].uuid):
                if incoming and not shared[i]:
                    continue  # the source's lease, until the handoff (vmmigrate.py)
                _acquire(layout, infos[i], shared[i], fd, deadline)
            devices = [volume_mod.volume_path(domain, info.uuid, read_only=ro)
                       for info, ro in zip(infos, shared, strict=True)]
            if image is not None:
                # The chain opens through the image directory: {0} is the leaf there.
                directory = images.link_chain(
                    domain, image, {i.uuid: d for i, d in zip(infos, devices, strict=True)})
                devices = [str(directory / infos[-1].uuid)]
                writable = [(infos[-1].uuid, devices[0])] if not shared[-1] else []
            else:
                writable = [(info.uuid, dev) for info, dev, ro
                            in zip(infos, devices, shared, strict=True) if not ro]
        env = dict(os.environ, SHAREDLVM_DEVICES=" ".join(devices),
                   SHAREDLVM_DEVICE=devices[0] if devices else "")
        # Only {N} is replaced: any other brace (a shell's ${x}, JSON) stays as given.
        final = [_PLACEHOLDER.sub(lambda m: devices[int(m.group(1))], arg) for arg in argv]
        if domain is not None and paths is not None and qmp.is_qemu(final[0]):
            # A monitor of its own for the daemon's watch (vmwatch.py): qemu takes
            # several, so the caller's own monitors are untouched.
            me = os.getpid()
            monitor = vmwatch.monitor_path(paths, me)
            final += qmp.monitor_argv(monitor)
            if incoming:
                final += qmp.incoming_argv()
            vmwatch.write_record(paths, vmwatch.VmRecord(
                me, vmwatch.process_start(me) or 0, monitor, domain.name, tuple(writable),
                incoming))
        os.set_inheritable(fd, True)  # the sanlock connection, and the leases, survive exec
        os.execvpe(final[0], final, env)
    except errors.Error as exc:
        print(f"sharedlvm: {' '.join(str(exc).split())}", file=sys.stderr)
    except OSError as exc:
        print(f"sharedlvm: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)


def _supervise(pid: int, domain: Domain | None, infos: list[VolumeInfo],
               image: str | None = None, paths: HostPaths | None = None) -> int:
    def forward(signo: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signo)

    for signo in FORWARDED:
        signal.signal(signo, forward)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = 1 << 8
            break
        except InterruptedError:
            continue
    if domain is not None:
        if image is not None:
            images.unlink_chain(domain, image, [i.uuid for i in infos])
        deactivate_unused(domain, infos + _added_live(domain, paths, pid, infos), dead=pid)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell


def _added_live(domain: Domain, paths: HostPaths | None, pid: int,
                infos: list[VolumeInfo]) -> list[VolumeInfo]:
    """Volumes the VM's record names that ``run`` did not activate itself (a live
    snapshot's new leaf, vmlive.py): deactivated with the rest."""
    if paths is None:
        return []
    known = {i.uuid for i in infos}
    added = []
    for record in vmwatch.read_records(paths):
        if record.pid != pid:
            continue
        for uuid in [u for u, _ in record.volumes] + list(record.others):
            if uuid not in known:
                known.add(uuid)
                with contextlib.suppress(errors.Error):
                    added.append(volume_mod.get_volume(domain, uuid))
    return added


# How long sanlock may take to free a dead consumer's leases: within moments when idle,
# but each release is a write on the lease area, queued behind whatever else the
# host's storage is doing (seen: over 2 s on a busy loop bed).
RELEASE_WAIT = 15.0


def deactivate_unused(domain: Domain, infos: list[VolumeInfo], dead: int | None = None
                      ) -> None:
    """Deactivate the volumes no process on this host holds; a volume another local
    process still holds stays. ``dead``: the consumer that held them, gone: its leases
    are waited for until sanlock has freed them all (up to RELEASE_WAIT)."""
    layout = LeaseLayout(domain)
    if dead is not None:
        deadline = time.monotonic() + RELEASE_WAIT
        while time.monotonic() < deadline:
            try:
                if not leases.inquire(pid=dead):
                    break
            except errors.Error:  # sanlock forgot the process: nothing left held
                break
            time.sleep(0.05)
    for info in infos:
        deadline = time.monotonic() + 2.0
        while domain.host_id in layout.holders(info) and time.monotonic() < deadline:
            time.sleep(0.05)
        if domain.host_id in layout.holders(info):
            continue
        with contextlib.suppress(errors.Error):
            domain.deactivate_volume(info.uuid)


def _acquire(layout: LeaseLayout, info: VolumeInfo, shared: bool, fd: int,
             deadline: float) -> None:
    while True:
        try:
            layout.acquire_volume(info, shared=shared, fd=fd)
            return
        except errors.LeaseHeld:
            if time.monotonic() + WAIT_POLL > deadline:
                raise
        time.sleep(WAIT_POLL)
