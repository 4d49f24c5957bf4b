"""The simulated-hosts test bed, shared by the tests, the benchmarks and the demo.

A :class:`Cluster` is a ``sim up`` bed (file-backed LUNs on loop devices, one
``SHAREDLVM_ROOT`` per host, each host with its own sanlock daemon and sharedlvm
daemon) with a domain formatted by host 1, which becomes its manager, and attached on
the others. Each :class:`Host` runs the real ``sharedlvm`` command with its own root,
talks to its daemon, or opens the domain read-only through the Python API. Cleanup
goes through ``sim down``: daemons stopped by pid, exactly the bed's loop devices
detached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharedlvm import Client, partitions
from sharedlvm import domain as domain_mod
from sharedlvm.command import Runner
from sharedlvm.lvm import Lvm, LvmConfig
from sharedlvm.paths import ROOT_ENV, HostPaths
from sharedlvm_testbed import sim
from sharedlvm_testbed.simhost import DaemonProcess, SanlockProcess

GiB = 1024**3
IO_TIMEOUT = 1  # seconds: joins take ~3 s and a dead host frees after 68 s


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

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, **{ROOT_ENV: str(self.root)})

    def cli(self, *args: str, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``sharedlvm ARGS`` as this host; check=True asserts exit 0."""
        proc = subprocess.run([sys.executable, "-m", "sharedlvm", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"host{self.index}: sharedlvm {' '.join(args)} failed "
                                 f"rc={proc.returncode}: {proc.stderr.strip()}")
        return proc

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "sharedlvm", *args], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @property
    def client(self) -> Client:
        """The client library, talking to this host's daemon."""
        return Client(self.root, timeout=120)

    def with_volume(self, vol: str, code: str, *args: str, read_only: bool = False) -> str:
        """Run Python ``code`` as a consumer holding ``vol`` (``sharedlvm run``), its
        device path in ``sys.argv[1]`` and ``args`` after it; its stdout."""
        spec = f"{vol}:ro" if read_only else vol
        return self.cli("run", "--volume", spec, "--", sys.executable, "-c", code, "{0}",
                        *args).stdout

    @contextlib.contextmanager
    def registered(self) -> Iterator[int]:
        """A consumer registered with this host's sanlock and holding nothing yet
        (``sharedlvm run -- sleep``): its pid, for ``volume prepare --pid``. Killed
        (its whole process group) on the way out."""
        proc = self.popen("run", "--", "sleep", "600")
        try:
            yield consumer_pid(proc, "sleep")
        finally:
            stop_consumer(proc)

    def prepared_images(self) -> list[str]:
        return list(self.status().get("images", {}))

    def status(self) -> dict[str, Any]:
        """This host's daemon's view of the cluster's domain ({} if it has none)."""
        found = {s.domain: s for s in self.client.status()}.get(self.cluster.name)
        return dataclasses.asdict(found) if found else {}

    def domain(self) -> domain_mod.Domain:
        """The domain opened in the test process: always read-only (not the daemon)."""
        return domain_mod.Domain.open(self.paths, Runner(), self.cluster.name)

    @property
    def sanlock(self) -> SanlockProcess:
        return SanlockProcess(self.paths, Runner(), self.cluster.bed.dir / "build")

    @property
    def daemon(self) -> DaemonProcess:
        return DaemonProcess(self.paths)

    def refused(self, *args: str) -> str:
        """``sharedlvm ARGS`` as this host, which must fail the way bad input does:
        exit 1 and one line on stderr (returned)."""
        proc = self.cli(*args, check=False)
        assert proc.returncode == 1, proc
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("sharedlvm: "), \
            proc.stderr
        return str(proc.stderr)

    def restart_daemon(self, timeout: float = 60) -> None:
        """Stop and start this host's daemon (it reads daemon.toml again); returns once
        it has joined the domain's lockspace."""
        self.daemon.stop()
        self.daemon.start()
        deadline = time.monotonic() + timeout
        while not self.status().get("joined"):
            assert time.monotonic() < deadline, f"host{self.index}: daemon did not join"
            time.sleep(0.2)

    def freeze(self) -> None:
        """SIGSTOP the host's sanlock and daemon: a hung host."""
        for pid in (self.sanlock.pid, self.daemon.pid):
            if pid:
                os.kill(pid, signal.SIGSTOP)

    def thaw(self, pids: list[int]) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)

    def crash(self) -> None:
        """Power loss, as far as leases go (``sim kill``)."""
        sim.crash_services(Runner(), self.cluster.bed, self.paths)


@dataclass
class Cluster:
    bed: sim.SimBed
    name: str
    hosts: list[Host]
    domain_luns: int | None = None  # the domain uses the first N LUNs (None: all)

    @property
    def luns(self) -> list[str]:
        return [lun.device for lun in self.bed.luns]

    @property
    def first(self) -> Host:
        """Host 1: formatted the domain and is its manager unless a test moved it."""
        return self.hosts[0]

    def manager(self, timeout: float = 30) -> Host:
        """The host whose daemon holds the manager role now (waits for one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for host in self.hosts:
                try:
                    if host.daemon.pid and host.status().get("manager"):
                        return host
                except Exception:
                    continue
            time.sleep(0.1)
        raise AssertionError(f"no manager within {timeout} s")

    def new_manager_term(self, timeout: float = 30) -> Host:
        """The manager gives the role up and another host takes it: after a test wrote
        LVM metadata behind the manager's back (simulating a manager that died
        mid-request), which the manager would rightly refuse to write after."""
        old = self.manager()
        old.client.release_manager(self.name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = self.manager()
            if new is not old:
                return new
            time.sleep(0.1)
        raise AssertionError(f"no new manager in {timeout} s")

    def raw_lvm(self) -> Lvm:
        """A read-only LVM of the bed itself (not of any host), to inspect the disk
        (a partitioned LUN: its partitions)."""
        return inspect_lvm([p for lun in self.luns for p in partitions.members(lun)],
                           self.bed.dir)

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

    def clean(self) -> None:
        """Back to an empty domain between tests sharing a cluster: prepared volumes
        torn down, activations dropped, every volume deleted by the manager."""
        for host in self.hosts:
            if not host.daemon.pid:
                continue
            for image in host.prepared_images():
                host.client.teardown_image(image, domain=self.name)
            for vol in list(host.status().get("prepared", {})):
                host.client.teardown_volume(vol, domain=self.name)
            # volumes only: the daemon keeps using its journal, mailbox, ids, leases
            sim.release_host_devices(Runner(), host.paths,
                                     keep=domain_mod.SPECIAL_NAMES)
        manager = self.manager()
        # Leaves first: a volume with anything on top of it is not deleted.
        volumes = manager.cli_json("volume", "list")
        while volumes:
            parents = {v["parent"] for v in volumes}
            for vol in volumes:
                if vol["uuid"] not in parents:
                    manager.cli("volume", "delete", vol["uuid"])
            volumes = manager.cli_json("volume", "list")


def consumer_pid(proc: subprocess.Popen[str], comm: str, timeout: float = 30) -> int:
    """The consumer process of a ``sharedlvm run`` (the child of ``proc``), once it
    runs its command ``comm`` (registered, leases acquired)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sharedlvm run exited: {proc.communicate()}")
        for task in Path(f"/proc/{proc.pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    if Path(f"/proc/{child}/comm").read_text().strip() == comm:
                        return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no {comm} consumer under pid {proc.pid} in {timeout} s")


def stop_consumer(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to ``sharedlvm run``, which passes it on to its consumer; then wait."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def inspect_lvm(devices: list[str], directory: Path) -> Lvm:
    """A read-only LVM of the machine itself (not of any simulated host) on devices,
    to inspect what is on the disk; its config lives in directory/inspect-lvm."""
    system_dir = directory / "inspect-lvm"
    system_dir.mkdir(exist_ok=True)
    (system_dir / "lvm.conf").write_text("config {\n    checks = 1\n}\n")
    return Lvm(Runner(), LvmConfig(devices=tuple(devices), writable=False,
                                   system_dir=system_dir, lock_dir=system_dir / "lock",
                                   activation=False))


@contextlib.contextmanager
def scratch_lun(directory: Path, size: int, keep_view: bool = False,
                shell: bool = False) -> Iterator[tuple[str, Lvm, Lvm]]:
    """A loop device on a sparse file in ``directory``, outside any simulated host:
    (device, a read-only LVM on it, a writable one), detached afterwards."""
    image = directory / "scratch-lun.img"
    with open(image, "xb") as f:
        f.truncate(size)
    device = Runner().run(["losetup", "--find", "--show", str(image)]).out.strip()
    try:
        reader = inspect_lvm([device], directory)
        writer = Lvm(reader.runner, dataclasses.replace(reader.config, writable=True),
                     keep_view=keep_view, shell=shell)
        try:
            yield device, reader, writer
        finally:
            writer.close()
    finally:
        Runner().run(["losetup", "--detach", device], check=False)


def make_cluster(directory: Path, hosts: int = 3, size: int = 20 * GiB,
                 sector_size: int = 512, name: str = "dom1", attach: bool = True,
                 services: bool = True, extra: tuple[str, ...] = (),
                 daemon_env: dict[str, str] | None = None, luns: int = 1,
                 domain_luns: int | None = None) -> Cluster:
    """A bed of ``luns`` LUNs; with ``attach``, a domain formatted by host 1 (its
    manager) on the first ``domain_luns`` of them (all by default: a shard each) and
    attached on every other host, all joined to the lockspace."""
    bed = sim.sim_up(Runner(), directory, hosts, size, sector_size=sector_size, luns=luns,
                     services=services and attach, daemon_env=daemon_env)
    cluster = Cluster(bed, name, [], domain_luns)
    cluster.hosts = [Host(i + 1, root, cluster) for i, root in enumerate(bed.hosts)]
    try:
        if attach:
            first = cluster.hosts[0]
            first.cli("domain", "create", "--name", name, *lun_args(cluster), "--host-id", "1",
                      "--io-timeout", str(IO_TIMEOUT), *extra)
            assert cluster.manager() is first
            procs = [h.popen("domain", "attach", name, *lun_args(cluster), "--host-id",
                             str(h.host_id)) for h in cluster.hosts[1:]]
            for host, proc in zip(cluster.hosts[1:], procs, strict=True):
                _, err = proc.communicate(timeout=300)
                assert proc.returncode == 0, f"host{host.index} attach: {err}"
    except BaseException:
        sim.sim_down(Runner(), directory)
        raise
    return cluster


def lun_args(cluster: Cluster) -> list[str]:
    args: list[str] = []
    for lun in cluster.luns[:cluster.domain_luns]:
        args += ["--lun", lun]
    return args


def crash_cluster(directory: Path, point: str, hosts: int = 2) -> tuple[Cluster, Path]:
    """A cluster whose daemons exit at failpoint ``point`` (the first to reach it;
    the returned file exists once it fired)."""
    once = directory / "fired"
    return make_cluster(directory / "bed", hosts=hosts,
                        daemon_env={"SHAREDLVM_FAILPOINT": f"{point}:{once}"}), once


def destroy_cluster(cluster: Cluster) -> None:
    # a test may leave a host frozen: let it go so it can be stopped
    for host in cluster.hosts:
        for pid in (host.sanlock.pid, host.daemon.pid):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
    sim.sim_down(Runner(), cluster.bed.dir)
