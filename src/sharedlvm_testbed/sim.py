"""A local playground of simulated hosts sharing file-backed LUNs (like kind/minikube).

Two backends. ``loop`` (the default, this module): every host is a ``SHAREDLVM_ROOT``
on the machine's own kernel, with its own sanlock and sharedlvm daemons. ``vm``
(:mod:`sharedlvm_testbed.vmbed.vmsim`): every host is a qemu guest with its own kernel,
device-mapper and watchdog. ``sharedlvm-sim exec/kill/start/down`` work on both.

``sim up`` makes sparse LUN files, attaches each to a loop device (512 B or 4 KiB
logical sectors) and one ``SHAREDLVM_ROOT`` per host under DIR, and records all of it
in ``DIR/sim.json`` (:mod:`.state`). ``sim down`` undoes exactly what that file
records, and checks each loop device still points at our file before detaching it,
so it never touches what it did not make. The test bed and ``make demo`` use the same
code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from sharedlvm import errors
from sharedlvm.command import Runner
from sharedlvm.errors import CommandError
from sharedlvm.paths import ROOT_ENV, HostPaths

from .simhost import DaemonProcess, SanlockProcess
from .state import (
    LOOP_BACKEND,
    STATE_FILE,
    VM_BACKEND,
    backend_of,
    check_up_args,
    read_state,
    write_state,
)
from .vmbed.vmsim import VmSim

log = logging.getLogger(__name__)

MAX_HOSTS = 64


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
        write_state(self.dir, {"backend": LOOP_BACKEND,
                               "luns": [vars(lun) for lun in self.luns],
                               "hosts": [str(h) for h in self.hosts]})

    @classmethod
    def load(cls, directory: Path) -> SimBed:
        data = read_state(directory)
        if data.get("backend", LOOP_BACKEND) != LOOP_BACKEND:
            raise errors.InvalidArgument(f"the simulation in {directory} is not a loop one")
        return cls(directory, [SimLun(**lun) for lun in data["luns"]],
                   [Path(h) for h in data["hosts"]])


def sim_up(runner: Runner, directory: Path, hosts: int, size: int, sector_size: int = 512,
           luns: int = 1, services: bool = True,
           daemon_env: dict[str, str] | None = None) -> SimBed:
    """Make the LUNs and host roots; with ``services`` also start each host's sanlock
    daemon and sharedlvm daemon."""
    check_up_args(directory, hosts, MAX_HOSTS, size, sector_size)
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
            # A block device's read-only flag outlives a detach: never inherit one;
            # nor partitions a test added to it (partx) and did not delete.
            runner.run(["blockdev", "--setrw", device])
            runner.run(["partx", "--delete", device], check=False)
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


def vm_sim(directory: Path) -> VmSim | None:
    """The simulation in directory if the vm backend made it, else None."""
    if backend_of(directory) != VM_BACKEND:
        return None
    return VmSim.load(directory)


def sim_down(runner: Runner, directory: Path, bed: SimBed | None = None) -> None:
    """Remove everything the simulation in ``directory`` made; keep going on errors
    so one stuck piece does not leave the rest behind, then report the first."""
    if bed is None and (vm := vm_sim(directory)) is not None:
        vm.down()
        return
    bed = bed or SimBed.load(directory)
    problems: list[str] = []
    stop_services(runner, bed, [HostPaths(h) for h in bed.hosts])
    for host in bed.hosts:
        problems += release_host_devices(runner, HostPaths(host))
    for lun in bed.luns:
        if _backing_file(lun.device) == os.path.realpath(lun.file):
            # the kernel's partitions of a loop device outlive its detach
            runner.run(["partx", "--delete", lun.device], check=False)
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


def _loop_host(bed: SimBed, host: int) -> HostPaths:
    if not 1 <= host <= len(bed.hosts):
        raise errors.InvalidArgument(f"invalid host {host}: this simulation has hosts "
                                     f"1..{len(bed.hosts)}")
    return bed.host_paths(host - 1)


def sim_kill(runner: Runner, directory: Path, host: int) -> None:
    """Power loss of one host (in vm: SIGKILL of its qemu)."""
    if (vm := vm_sim(directory)) is not None:
        vm.kill(host)
        return
    bed = SimBed.load(directory)
    crash_services(runner, bed, _loop_host(bed, host))


def sim_start(runner: Runner, directory: Path, host: int) -> None:
    """Start a host's services again after ``sim kill`` (in vm: boot it first)."""
    if (vm := vm_sim(directory)) is not None:
        vm.start(host)
        return
    bed = SimBed.load(directory)
    start_services(runner, bed, _loop_host(bed, host))


def loop_host_command(directory: Path, host: int,
                      argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """argv and environment that run ``argv`` as host ``host`` of a loop simulation;
    ``sharedlvm ARGS`` runs this interpreter's sharedlvm."""
    bed = SimBed.load(directory)
    paths = _loop_host(bed, host)
    if argv and argv[0] == "sharedlvm":
        argv = [sys.executable, "-m", "sharedlvm", *argv[1:]]
    return argv, dict(os.environ, **{ROOT_ENV: str(paths.root)})


def start_services(runner: Runner, bed: SimBed, paths: HostPaths,
                   daemon_env: dict[str, str] | None = None) -> None:
    """The host's sanlock daemon, then its sharedlvm daemon; either is left alone if
    it already runs."""
    sanlock = SanlockProcess(paths, runner, bed.dir / "build")
    if sanlock.pid is None:
        sanlock.start()
    daemon = DaemonProcess(paths)
    if daemon.pid is None:
        daemon.start(extra_env=daemon_env)


def crash_services(runner: Runner, bed: SimBed, paths: HostPaths) -> None:
    """SIGKILL the host's sanlock, then its daemon, by pid: power loss, as far as
    leases go. sanlock first: one that outlives the daemon even by milliseconds sees
    its client die and releases the daemon's leases cleanly (no failover wait)."""
    SanlockProcess(paths, runner, bed.dir / "build").kill()
    DaemonProcess(paths).kill()


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
            # (a shared lease's read-only flag would outlive the detach)
            runner.run(["blockdev", "--setrw", device], check=False)
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
