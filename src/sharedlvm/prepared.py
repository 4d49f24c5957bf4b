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
from dataclasses import asdict, dataclass
from pathlib import Path

from . import errors
from . import volume as volume_mod
from .domain import Domain
from .lease_layout import LeaseLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preparation:
    volume: str
    pid: int
    shared: bool


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
        self._lock = threading.Lock()
        self._held: dict[str, Preparation] = self._load()

    # State on disk (the run dir: it dies with a reboot, as the leases do)

    def _load(self) -> dict[str, Preparation]:
        try:
            data = json.loads(self.state_file.read_text())
            found = {p["volume"]: Preparation(str(p["volume"]), int(p["pid"]),
                                              bool(p["shared"])) for p in data}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as exc:
            log.error("ignoring %s: %s", self.state_file, exc)
            return {}
        for vol, prep in list(found.items()):
            if not pid_alive(prep.pid):  # its lease died with it: drop the mapping too
                log.info("volume %s was prepared for process %d, which is gone", vol,
                         prep.pid)
                with contextlib.suppress(errors.Error):
                    self.domain.deactivate_volume(vol)
                del found[vol]
        return found

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(p) for p in self._held.values()]))
        os.replace(tmp, self.state_file)

    # What the daemon reports

    def __contains__(self, volume: str) -> bool:
        return volume in self._held

    def __len__(self) -> int:
        return len(self._held)

    def snapshot(self) -> dict[str, bool]:
        with self._lock:
            return {vol: p.shared for vol, p in self._held.items()}

    # Prepare and teardown

    def prepare(self, volume: str, pid: int, shared: bool) -> str:
        """Acquire the lease for ``pid``, activate, return the device path. Again for
        the same process and mode: the same path; anything else is refused."""
        self.require_joined()
        if not pid_alive(pid):
            raise errors.InvalidArgument(f"no process {pid} on this host")
        with self._lock:
            held = self._held.get(volume)
            if held is not None and pid_alive(held.pid):
                if (held.pid, held.shared) != (pid, shared):
                    mode = "shared" if held.shared else "exclusive"
                    raise errors.Busy(f"volume {volume} is already prepared here for "
                                      f"process {held.pid} ({mode})")
                return volume_mod.volume_path(self.domain, volume, read_only=shared)
            info = volume_mod.get_volume(self.domain, volume)
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
            self._held[volume] = Preparation(volume, pid, shared)
            self._save()
            return path

    def teardown(self, volume: str) -> None:
        """Release the lease on the consumer's behalf (if it still runs) and
        deactivate the volume on this host."""
        with self._lock:
            prep = self._held.get(volume)
            if prep is None:
                raise errors.NotFound(f"volume {volume} is not prepared on this host")
            info = volume_mod.get_volume(self.domain, volume)
            if pid_alive(prep.pid):
                with contextlib.suppress(errors.LeaseError):  # it may have released it
                    self.layout.release_volume(info, pid=prep.pid)
            self.domain.deactivate_volume(volume)
            del self._held[volume]
            self._save()
