"""The simulated-hosts test bed, shared by the tests, the benchmarks and the demo.

A :class:`Cluster` is a ``sim up`` bed (file-backed LUNs on loop devices, one
``SHAREDLVM_ROOT`` per host) with a domain formatted by host 1 and attached on the
others. Each :class:`Host` runs the real ``sharedlvm`` command with its own root, or
opens the domain through the Python API. Cleanup goes through ``sim down``, which
detaches exactly the loop devices the bed made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharedlvm import domain as domain_mod
from sharedlvm import sim
from sharedlvm.command import Runner
from sharedlvm.lvm import Lvm, LvmConfig
from sharedlvm.paths import ROOT_ENV, HostPaths

GiB = 1024**3


@dataclass
class Host:
    index: int
    root: Path
    cluster: Cluster

    @property
    def host_id(self) -> int:
        return self.index

    @property
    def paths(self) -> HostPaths:
        return HostPaths(self.root)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``sharedlvm ARGS`` as this host; check=True asserts exit 0."""
        env = dict(os.environ, **{ROOT_ENV: str(self.root)})
        proc = subprocess.run([sys.executable, "-m", "sharedlvm", *args], env=env,
                              capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"sharedlvm {' '.join(args)} failed rc={proc.returncode}: "
                                 f"{proc.stderr.strip()}")
        return proc

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def domain(self) -> domain_mod.Domain:
        return domain_mod.Domain.open(self.paths, Runner(), self.cluster.name)


@dataclass
class Cluster:
    bed: sim.SimBed
    name: str
    hosts: list[Host]

    @property
    def luns(self) -> list[str]:
        return [lun.device for lun in self.bed.luns]

    @property
    def writer(self) -> Host:
        return self.hosts[0]

    def lun_args(self) -> list[str]:
        args: list[str] = []
        for lun in self.luns:
            args += ["--lun", lun]
        return args

    def raw_lvm(self) -> Lvm:
        """A read-only LVM of the bed itself (not of any host), to inspect the disk."""
        system_dir = self.bed.dir / "inspect-lvm"
        system_dir.mkdir(exist_ok=True)
        (system_dir / "lvm.conf").write_text("config {\n    checks = 1\n}\n")
        return Lvm(Runner(), LvmConfig(devices=tuple(self.luns), writable=False,
                                       system_dir=system_dir, lock_dir=system_dir / "lock",
                                       activation=False))

    def disk_state(self) -> dict[str, Any]:
        """What is on the disk: every VG and LV with tags, sizes and the VG seqno.

        Tests compare this before and after a refused operation: equal means nothing
        changed, down to the metadata sequence number."""
        lvm = self.raw_lvm()
        vgs = lvm.vgs()
        return {
            "vgs": [(vg.name, vg.seqno, vg.free, tuple(sorted(vg.tags))) for vg in vgs],
            "lvs": sorted((lv.vg_name, lv.name, lv.size, tuple(sorted(lv.tags)))
                          for vg in vgs for lv in lvm.lvs(vg.name)),
        }


def make_cluster(directory: Path, hosts: int = 3, size: int = 20 * GiB,
                 sector_size: int = 512, name: str = "dom1", attach: bool = True) -> Cluster:
    bed = sim.sim_up(Runner(), directory, hosts, size, sector_size=sector_size)
    cluster = Cluster(bed, name, [])
    cluster.hosts = [Host(i + 1, root, cluster) for i, root in enumerate(bed.hosts)]
    try:
        if attach:
            domain_mod.create_domain(cluster.hosts[0].paths, Runner(), name, cluster.luns,
                                     host_id=1)
            for host in cluster.hosts[1:]:
                domain_mod.attach_domain(host.paths, Runner(), name, cluster.luns,
                                         host.host_id)
    except BaseException:
        sim.sim_down(Runner(), directory)
        raise
    return cluster


def destroy_cluster(cluster: Cluster) -> None:
    sim.sim_down(Runner(), cluster.bed.dir)
