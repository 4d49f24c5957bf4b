"""The state file ``DIR/sim.json`` of a simulation, shared by both backends.

``sim up`` records in it what it made (``backend``: ``loop`` or ``vm``, then the LUNs,
host roots or guests); every later command reads it to find, and undo, exactly that.
The loop backend (:mod:`sharedlvm_testbed.sim`) and the vm backend
(:mod:`sharedlvm_testbed.vmbed.vmsim`) both import this module and not each other's
state code, so neither needs the other at import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sharedlvm import errors

STATE_FILE = "sim.json"
LOOP_BACKEND = "loop"
VM_BACKEND = "vm"
BACKENDS = (LOOP_BACKEND, VM_BACKEND)
MIN_LUN_SIZE = 4 * 1024**3


def read_state(directory: Path) -> dict[str, Any]:
    """The state file of the simulation in directory (either backend)."""
    try:
        data = json.loads((directory / STATE_FILE).read_text())
    except FileNotFoundError:
        raise errors.NotFound(f"no simulation in {directory} ({STATE_FILE} missing)") \
            from None
    except ValueError as exc:
        raise errors.Error(f"{directory / STATE_FILE} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise errors.Error(f"{directory / STATE_FILE} is not a simulation state")
    return data


def write_state(directory: Path, data: dict[str, Any]) -> None:
    """Replace the state file atomically: a reader sees the old or the new one."""
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(directory / STATE_FILE)


def backend_of(directory: Path) -> str:
    """``loop`` or ``vm``: which backend made the simulation in directory."""
    return str(read_state(directory).get("backend", LOOP_BACKEND))


def check_up_args(directory: Path, hosts: int, max_hosts: int, size: int,
                  sector_size: int) -> None:
    """What ``sim up`` refuses, before it makes anything (both backends)."""
    if not 1 <= hosts <= max_hosts:
        raise errors.InvalidArgument(f"invalid host count {hosts}: must be 1..{max_hosts}")
    if sector_size not in (512, 4096):
        raise errors.InvalidArgument(f"invalid sector size {sector_size}: use 512 or 4096")
    if size < MIN_LUN_SIZE:
        raise errors.InvalidArgument("a simulated LUN needs at least 4G")
    if (directory / STATE_FILE).exists():
        raise errors.AlreadyExists(f"a simulation already runs in {directory}")
