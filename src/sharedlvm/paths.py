"""Host-local paths, all under one root.

Every file sharedlvm keeps on a host lives under ``HostPaths.root``: ``/`` in
production, anything else for simulated hosts that run side by side on one machine
(``SHAREDLVM_ROOT=/tmp/h2 sharedlvm ...``). Nothing else in the code builds host paths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "SHAREDLVM_ROOT"


@dataclass(frozen=True)
class HostPaths:
    root: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HostPaths:
        env = os.environ if environ is None else environ
        return cls(Path(env.get(ROOT_ENV) or "/"))

    @property
    def config_dir(self) -> Path:
        """Domains attached on this host, one JSON file each."""
        return self.root / "etc/sharedlvm"

    @property
    def domains_dir(self) -> Path:
        return self.config_dir / "domains"

    @property
    def lvm_system_dir(self) -> Path:
        """This host's private LVM_SYSTEM_DIR: its lvm.conf, archive and backup dirs.

        Private so that sharedlvm never reads or changes the host's own
        /etc/lvm/lvm.conf and so that simulated hosts do not share LVM state.
        """
        return self.config_dir / "lvm"

    @property
    def state_dir(self) -> Path:
        """Durable host-local state."""
        return self.root / "var/lib/sharedlvm"

    @property
    def run_dir(self) -> Path:
        """Runtime state that dies with a reboot: activations, sockets, pids."""
        return self.root / "run/sharedlvm"

    @property
    def lvm_lock_dir(self) -> Path:
        """LVM's file locks, private per host: simulated hosts must not serialize each
        other through a shared /run/lock/lvm, or races would be hidden."""
        return self.root / "run/lock/lvm"

    @property
    def activations_dir(self) -> Path:
        return self.run_dir / "activations"

    @property
    def sanlock_run_dir(self) -> Path:
        return self.root / "run/sanlock"

    def domain_config(self, name: str) -> Path:
        return self.domains_dir / f"{name}.json"

    def ensure(self) -> None:
        for path in (self.domains_dir, self.lvm_system_dir, self.state_dir, self.run_dir,
                     self.lvm_lock_dir, self.activations_dir):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
