"""``sharedlvm run``: hold volume leases for a command's whole life, like flock(1).

The process registers with this host's sanlock daemon, acquires the volume leases for
itself, activates the volumes and then execs the command, keeping the sanlock
connection open across exec. The leases therefore belong to the consumer's pid: they
are released when it exits or is killed, and if the host loses its lockspace sanlock
kills it before the lease can expire and be taken by another host (DESIGN.md rule 3).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import NoReturn

from . import errors, leases
from . import volume as volume_mod
from .domain import Domain
from .lease_layout import LeaseLayout
from .volume import VolumeInfo

# How often ``run --wait`` tries again a lease another host holds. The holder's
# release is seen within this; sanlock answers a refused acquire in a few ms.
WAIT_POLL = 0.5


def parse_volume_arg(text: str) -> tuple[str, bool]:
    """``UUID`` (exclusive) or ``UUID:ro`` (shared, read-only)."""
    vol, sep, mode = text.partition(":")
    if sep and mode not in ("ro", "rw"):
        raise errors.InvalidArgument(f"invalid volume {text!r}: use UUID or UUID:ro")
    return volume_mod.check_uuid(vol), mode == "ro"


def exec_with_leases(domain: Domain, volumes: Sequence[tuple[str, bool]],
                     argv: Sequence[str], wait: float = 0.0) -> NoReturn:
    """Acquire, activate, exec. With ``wait`` > 0, a lease held by another host is
    tried again every WAIT_POLL s for up to ``wait`` s (a migration destination
    waiting for the source to let go) before failing with LeaseHeld."""
    if not argv:
        raise errors.InvalidArgument("no command given after --")
    if wait < 0:
        raise errors.InvalidArgument(f"invalid wait {wait}: must be >= 0 seconds")
    layout = LeaseLayout(domain)
    leases.use_run_dir(domain.paths.sanlock_run_dir)
    infos = [volume_mod.get_volume(domain, vol) for vol, _ in volumes]
    fd = leases.register()
    deadline = time.monotonic() + wait
    # One global order (by uuid): two consumers waiting for the same volumes can
    # never each hold one the other waits for.
    order = sorted(range(len(infos)), key=lambda i: infos[i].uuid)
    for i in order:
        _acquire(layout, infos[i], volumes[i][1], fd, deadline)
    devices = [volume_mod.volume_path(domain, info.uuid) for info in infos]
    env = dict(os.environ, SHAREDLVM_DEVICES=" ".join(devices), SHAREDLVM_DEVICE=devices[0])
    final = [arg.format(*devices) if "{" in arg else arg for arg in argv]
    os.set_inheritable(fd, True)  # the sanlock connection, and so the leases, survive exec
    os.execvpe(final[0], final, env)


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
