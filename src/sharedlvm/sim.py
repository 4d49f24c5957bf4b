"""A local playground of simulated hosts sharing file-backed LUNs (like kind/minikube).

``sim up`` makes sparse LUN files, attaches each to a loop device (512 B or 4 KiB
logical sectors) and one ``SHAREDLVM_ROOT`` per host under DIR, and records all of it
in ``DIR/sim.json``. ``sim down`` undoes exactly what that file records, and checks
each loop device still points at our file before detaching it, so it never touches
what it did not make. The test bed and ``make demo`` use the same code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import errors
from .command import Runner
from .errors import CommandError
from .paths import ROOT_ENV, HostPaths
from .simhost import DaemonProcess, SanlockProcess

log = logging.getLogger(__name__)

STATE_FILE = "sim.json"


@dataclass(frozen=True)
class SimLun:
    file: str
    device: str
    sector_size: int


@dataclass(frozen=True)
class SimBed:
    dir: Path
    luns: list[SimLun]
    hosts: list[Path]

    def host_env(self, index: int) -> dict[str, str]:
        return {ROOT_ENV: str(self.hosts[index])}

    def host_paths(self, index: int) -> HostPaths:
        return HostPaths(self.hosts[index])

    def save(self) -> None:
        data = {"luns": [vars(lun) for lun in self.luns], "hosts": [str(h) for h in self.hosts]}
        (self.dir / STATE_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> SimBed:
        try:
            data = json.loads((directory / STATE_FILE).read_text())
        except FileNotFoundError:
            raise errors.NotFound(f"no simulation in {directory} ({STATE_FILE} missing)") \
                from None
        return cls(directory, [SimLun(**lun) for lun in data["luns"]],
                   [Path(h) for h in data["hosts"]])


def sim_up(runner: Runner, directory: Path, hosts: int, size: int, sector_size: int = 512,
           luns: int = 1, services: bool = True,
           daemon_env: dict[str, str] | None = None) -> SimBed:
    """Make the LUNs and host roots; with ``services`` also start each host's sanlock
    daemon and sharedlvm daemon."""
    if not 1 <= hosts <= 64:
        raise errors.InvalidArgument(f"invalid host count {hosts}: must be 1..64")
    if sector_size not in (512, 4096):
        raise errors.InvalidArgument(f"invalid sector size {sector_size}: use 512 or 4096")
    if size < 4 * 1024**3:
        raise errors.InvalidArgument("a simulated LUN needs at least 4G")
    if (directory / STATE_FILE).exists():
        raise errors.AlreadyExists(f"a simulation already runs in {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    bed = SimBed(directory, [], [directory / f"host{i}" for i in range(1, hosts + 1)])
    try:
        for i in range(luns):
            lun_file = directory / f"lun{i}.img"
            with open(lun_file, "xb") as f:
                f.truncate(size)
            device = runner.run(["losetup", "--find", "--show", "--sector-size",
                                 str(sector_size), str(lun_file)]).out.strip()
            bed.luns.append(SimLun(str(lun_file), device, sector_size))
            bed.save()
        for host in bed.hosts:
            host.mkdir()
            HostPaths(host).ensure()
        bed.save()
        if services:
            for host in bed.hosts:
                start_services(runner, bed, HostPaths(host), daemon_env)
    except BaseException:
        sim_down(runner, directory, bed)
        raise
    return bed


def sim_down(runner: Runner, directory: Path, bed: SimBed | None = None) -> None:
    """Remove everything the simulation in ``directory`` made; keep going on errors
    so one stuck piece does not leave the rest behind, then report the first."""
    bed = bed or SimBed.load(directory)
    problems: list[str] = []
    stop_services(runner, bed, [HostPaths(h) for h in bed.hosts])
    for host in bed.hosts:
        problems += release_host_devices(runner, HostPaths(host))
    for lun in bed.luns:
        if _backing_file(lun.device) == os.path.realpath(lun.file):
            try:
                runner.run(["losetup", "--detach", lun.device])
            except CommandError as exc:
                problems.append(f"{lun.device}: {exc.last_line()}")
        Path(lun.file).unlink(missing_ok=True)
    for host in bed.hosts:
        shutil.rmtree(host, ignore_errors=True)
    shutil.rmtree(directory / "build", ignore_errors=True)
    (directory / STATE_FILE).unlink(missing_ok=True)
    if problems:
        raise errors.Busy("sim down left something behind: " + "; ".join(problems))


def start_services(runner: Runner, bed: SimBed, paths: HostPaths,
                   daemon_env: dict[str, str] | None = None) -> None:
    SanlockProcess(paths, runner, bed.dir / "build").start()
    DaemonProcess(paths).start(extra_env=daemon_env)


def stop_services(runner: Runner, bed: SimBed, hosts: list[HostPaths]) -> None:
    """The daemons first (they leave their lockspaces, all hosts at once), then each
    sanlock; by pid."""
    daemons = [DaemonProcess(paths) for paths in hosts]
    for daemon in daemons:
        daemon.request_stop()
    for daemon in daemons:
        daemon.wait_stopped()
    for paths in hosts:
        SanlockProcess(paths, runner, bed.dir / "build").stop()


def release_host_devices(runner: Runner, paths: HostPaths,
                         keep: frozenset[str] = frozenset()) -> list[str]:
    """Detach the loop devices a simulated host made for its activations, except
    those of LVs named in ``keep``."""
    problems: list[str] = []
    root = paths.activations_dir
    if not root.is_dir():
        return problems
    for record in sorted(root.glob("*/*")):
        if record.name in keep:
            continue
        try:
            data = json.loads(record.read_text())
        except (ValueError, OSError):
            continue
        device = data.get("device", "")
        if device and _backing_file(device) == os.path.realpath(data.get("pv", "")):
            try:
                runner.run(["losetup", "--detach", device])
            except CommandError as exc:
                problems.append(f"{device}: {exc.last_line()}")
                continue
        record.unlink(missing_ok=True)
    return problems


def _backing_file(device: str) -> str | None:
    try:
        text = (Path("/sys/block") / os.path.basename(device) / "loop/backing_file").read_text()
    except FileNotFoundError:
        return None
    return os.path.realpath(text.strip())
