"""``sharedlvm run``: hold volume leases for a command's whole life, like flock(1).

The process registers with this host's sanlock daemon, acquires the volume leases for
itself, activates the volumes and then execs the command, keeping the sanlock
connection open across exec. The leases therefore belong to the consumer's pid: they
are released when it exits or is killed, and if the host loses its lockspace sanlock
kills it before the lease can expire and be taken by another host (DESIGN.md rule 3).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NoReturn

from . import errors, leases
from . import volume as volume_mod
from .domain import Domain
from .lease_layout import LeaseLayout


def parse_volume_arg(text: str) -> tuple[str, bool]:
    """``UUID`` (exclusive) or ``UUID:ro`` (shared, read-only)."""
    vol, sep, mode = text.partition(":")
    if sep and mode not in ("ro", "rw"):
        raise errors.InvalidArgument(f"invalid volume {text!r}: use UUID or UUID:ro")
    return volume_mod.check_uuid(vol), mode == "ro"


def exec_with_leases(domain: Domain, volumes: Sequence[tuple[str, bool]],
                     argv: Sequence[str]) -> NoReturn:
    if not argv:
        raise errors.InvalidArgument("no command given after --")
    layout = LeaseLayout(domain)
    leases.use_run_dir(domain.paths.sanlock_run_dir)
    infos = [volume_mod.get_volume(domain, vol) for vol, _ in volumes]
    fd = leases.register()
    devices = []
    for info, (_, shared) in zip(infos, volumes, strict=True):
        layout.acquire_volume(info, shared=shared, fd=fd)
        devices.append(volume_mod.volume_path(domain, info.uuid))
    env = dict(os.environ, SHAREDLVM_DEVICES=" ".join(devices), SHAREDLVM_DEVICE=devices[0])
    final = [arg.format(*devices) if "{" in arg else arg for arg in argv]
    os.set_inheritable(fd, True)  # the sanlock connection, and so the leases, survive exec
    os.execvpe(final[0], final, env)
