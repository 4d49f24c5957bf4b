"""The ``vm`` backend of ``sharedlvm-sim``: each simulated host is a qemu guest.

``sharedlvm-sim up --backend vm --hosts N --dir DIR`` boots N guests (:mod:`.guest`)
that all attach ``DIR/lun0.img`` as one shared virtio disk (``/dev/vda``), and starts
in each, as a real host would run them: ``wdmd`` (arming softdog), ``sanlock daemon``
with the watchdog, and the sharedlvm daemon, all under ``SHAREDLVM_ROOT=/host``. The
guests outlive the command: ``DIR/sim.json`` records each guest's qemu pid, and every
later command (``sim exec``, ``sim kill``, ``sim start``, ``sim down``) adopts the
guests from it, checking that each pid is still that guest's qemu before it signals
anything.

The guests run this checkout's code: the directory holding the ``sharedlvm`` and
``sharedlvm_testbed`` packages is shared at ``/project`` and is on the guests'
PYTHONPATH, and ``sharedlvm ARGS`` in ``sim exec`` runs as ``python3 -m sharedlvm ARGS``
in the guest.

A guest's root file system lives in its RAM: ``sim kill`` (power loss) loses its
attached domains, so after ``sim start`` the host attaches them again, like a
re-installed host. The LUN file is the only thing that survives.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from sharedlvm import errors
from sharedlvm.command import Runner
from sharedlvm.paths import ROOT_ENV

from ..state import STATE_FILE, VM_BACKEND, check_up_args, read_state, write_state
from .bed import run_each
from .debs import ensure_host_packages
from .errors import VmBedError
from .guest import Guest, GuestResult
from .image import GuestImage, build_image

log = logging.getLogger(__name__)

MAX_HOSTS = 16  # 512 MiB each; TCG guests share the machine's cores
GUEST_ROOT = "/host"  # SHAREDLVM_ROOT inside every guest
LUN_DEVICE = "/dev/vda"
DAEMON_LOG = f"{GUEST_ROOT}/daemon.log"
GUEST_ENV = {ROOT_ENV: GUEST_ROOT}
SANLOCK_ENV = {"SANLOCK_RUN_DIR": f"{GUEST_ROOT}/run/sanlock"}
# Under TCG one python3 start is ~3.5 s and the daemon's first status a few more.
_DAEMON_START_TIMEOUT = 120.0


def package_share_dir() -> Path:
    """The directory that holds the ``sharedlvm_testbed`` package and, beside it, the
    ``sharedlvm`` package (shared at /project): this checkout's ``src``."""
    share = Path(__file__).resolve().parents[2]
    if not (share / "sharedlvm" / "__init__.py").is_file():
        raise VmBedError(f"{share} does not hold the sharedlvm package beside "
                         "sharedlvm_testbed: the guests could not import it")
    return share


def guest_argv(argv: Sequence[str]) -> list[str]:
    """``sharedlvm ARGS`` runs as the guest's ``python3 -m sharedlvm ARGS``."""
    argv = [str(arg) for arg in argv]
    if argv and argv[0] == "sharedlvm":
        return ["python3", "-m", "sharedlvm", *argv[1:]]
    return argv


@dataclass
class VmSim:
    """A bed of guests recorded in ``dir/sim.json``; see the module docstring."""

    dir: Path
    lun_file: Path
    size: int
    sector_size: int
    share_dir: Path
    image: GuestImage
    pids: list[int | None]
    _guests: dict[int, Guest] = field(default_factory=dict, repr=False)

    @property
    def hosts(self) -> int:
        return len(self.pids)

    # ---- state file -------------------------------------------------------------

    def save(self) -> None:
        data = {
            "backend": VM_BACKEND,
            "lun": {"file": str(self.lun_file), "device": LUN_DEVICE,
                    "sector_size": self.sector_size, "size": self.size},
            "share_dir": str(self.share_dir),
            "image": {"directory": str(self.image.directory),
                      "kernel_version": self.image.kernel_version,
                      "has_udev": self.image.has_udev,
                      "kernel_file": self.image.kernel_file},
            "hosts": [{"name": f"host{i}", "qemu_pid": pid}
                      for i, pid in enumerate(self.pids, start=1)],
        }
        write_state(self.dir, data)

    @classmethod
    def from_state(cls, directory: Path, data: Mapping[str, Any]) -> VmSim:
        image = data["image"]
        return cls(directory, Path(data["lun"]["file"]), int(data["lun"]["size"]),
                   int(data["lun"]["sector_size"]), Path(data["share_dir"]),
                   GuestImage(Path(image["directory"]), image["kernel_version"],
                              bool(image["has_udev"]), image["kernel_file"]),
                   [h["qemu_pid"] for h in data["hosts"]])

    @classmethod
    def load(cls, directory: Path) -> VmSim:
        data = read_state(directory)
        if data.get("backend") != VM_BACKEND:
            raise errors.InvalidArgument(f"the simulation in {directory} is not a vm one")
        return cls.from_state(directory, data)

    # ---- guests -----------------------------------------------------------------

    def _check_host(self, host: int) -> None:
        if not 1 <= host <= self.hosts:
            raise errors.InvalidArgument(f"invalid host {host}: this simulation has "
                                         f"hosts 1..{self.hosts}")

    def guest(self, host: int) -> Guest:
        """Host ``host`` (1-based) as a Guest, adopted from its recorded pid."""
        self._check_host(host)
        guest = self._guests.get(host)
        if guest is None:
            guest = Guest(f"host{host}", self.image, self.lun_file, self.dir / f"host{host}",
                          share_dir=self.share_dir, sector_size=self.sector_size)
            pid = self.pids[host - 1]
            if pid is not None:
                guest.adopt(pid)
            self._guests[host] = guest
        return guest

    def close(self) -> None:
        """Let go of the guests' control connections (they keep running)."""
        for guest in self._guests.values():
            guest.disconnect()
        self._guests.clear()

    def __enter__(self) -> VmSim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def is_running(self, host: int) -> bool:
        self._check_host(host)
        pid = self.pids[host - 1]
        if pid is None:
            return False
        try:
            return self.guest(host).is_running()
        except VmBedError:
            return False

    def run(self, host: int, argv: Sequence[str], *, timeout: float = 300,
            check: bool = True, env: Mapping[str, str] | None = None) -> GuestResult:
        """Run argv in host's guest as that host (SHAREDLVM_ROOT=/host)."""
        if not self.is_running(host):
            raise VmBedError(f"host{host} is not running (sim start --host {host})")
        return self.guest(host).run(guest_argv(argv), timeout=timeout, check=check,
                                    env={**GUEST_ENV, **(env or {})})

    def spawn(self, host: int, argv: Sequence[str], *, log_file: str,
              env: Mapping[str, str] | None = None) -> int:
        """Start a long-lived process (a consumer) in host's guest; its guest pid."""
        if not self.is_running(host):
            raise VmBedError(f"host{host} is not running (sim start --host {host})")
        return self.guest(host).spawn(guest_argv(argv), log_file=log_file,
                                      env={**GUEST_ENV, **(env or {})})

    def start(self, host: int) -> None:
        """Boot host's guest (unless running) and start its services."""
        self._boot(host)
        self.save()
        start_services(self.guest(host))

    def kill(self, host: int) -> None:
        """Power loss: SIGKILL host's qemu (by pid). Its leases expire on their own."""
        if self.is_running(host):
            self.guest(host).power_off()
        self._guests.pop(host, None)
        self.pids[host - 1] = None
        self.save()

    def start_all(self) -> float:
        """Boot every stopped guest in parallel, then start services; boot seconds."""
        hosts = range(1, self.hosts + 1)
        started = time.monotonic()
        _raise_first(run_each([partial(self._boot, h) for h in hosts]))
        booted = time.monotonic() - started
        _raise_first(run_each([partial(self._services, h) for h in hosts]))
        return booted

    def _services(self, host: int) -> None:
        start_services(self.guest(host))

    def _boot(self, host: int) -> None:
        if self.is_running(host):
            return
        self._guests.pop(host, None)  # a guest reset by its watchdog: a new Guest
        self.pids[host - 1] = None
        guest = self.guest(host)
        guest.start()
        self.pids[host - 1] = guest.pid

    def down(self) -> None:
        """Kill every guest by pid and remove the LUN and the guests' directories.
        Keeps going on errors, then reports the first."""
        problems: list[str] = []
        for host in range(1, self.hosts + 1):
            try:
                if self.pids[host - 1] is not None:
                    self.kill(host)
            except errors.Error as exc:
                problems.append(f"host{host}: {exc}")
        if problems:  # keep the state file: a later ``sim down`` can try again
            raise errors.Busy("sim down left something behind: " + "; ".join(problems))
        self.lun_file.unlink(missing_ok=True)
        for host in range(1, self.hosts + 1):
            shutil.rmtree(self.dir / f"host{host}", ignore_errors=True)
        (self.dir / STATE_FILE).unlink(missing_ok=True)


def vm_sim_up(runner: Runner, directory: Path, hosts: int, size: int,
              sector_size: int = 512) -> tuple[VmSim, float]:
    """Boot ``hosts`` guests on a new LUN file in ``directory``; the bed and how long
    the boot took. Nothing is left running if any step fails."""
    check_up_args(directory, hosts, MAX_HOSTS, size, sector_size)
    ensure_host_packages(runner)
    image = build_image(runner)
    directory.mkdir(parents=True, exist_ok=True)
    lun_file = directory / "lun0.img"
    with open(lun_file, "xb") as f:
        f.truncate(size)
    sim = VmSim(directory, lun_file, size, sector_size, package_share_dir(), image,
                [None] * hosts)
    sim.save()
    try:
        booted = sim.start_all()
        sim.save()
    except BaseException:
        sim.down()
        raise
    return sim, booted


def start_sanlock(guest: Guest, env: Mapping[str, str]) -> None:
    """wdmd (arming softdog), then sanlock with the watchdog; each unless running."""
    if guest.run(["test", "-S", "/run/wdmd/wdmd.sock"], check=False).rc != 0:
        guest.run(["wdmd"])
    if guest.run(["sanlock", "client", "status"], check=False, env=env).rc != 0:
        # -e: a stable host name. sanlock lets a host that rejoins under the name it
        # had take its host id back at once; under a new (random) name it must wait
        # the host-dead time first, as for any stranger.
        guest.run(["sanlock", "daemon", "-U", "root", "-G", "root", "-e",
                   f"sharedlvm-sim-{guest.name}"], env=env)
        guest.wait_ok(["sanlock", "client", "status"], 30, env=env)


def start_services(guest: Guest) -> None:
    """wdmd, sanlock with the watchdog, then the sharedlvm daemon; waits for each."""
    guest.run(["mkdir", "-p", SANLOCK_ENV["SANLOCK_RUN_DIR"], f"{GUEST_ROOT}/run/sharedlvm"])
    start_sanlock(guest, SANLOCK_ENV)
    socket = f"{GUEST_ROOT}/run/sharedlvm/daemon.sock"
    if guest.run(["test", "-S", socket], check=False).rc == 0:
        return
    guest.spawn(guest_argv(["sharedlvm", "daemon", "--log-file", DAEMON_LOG]),
                log_file=f"{GUEST_ROOT}/daemon.out", env=GUEST_ENV)
    try:
        guest.wait_ok(["test", "-S", socket], _DAEMON_START_TIMEOUT)
    except VmBedError as exc:
        tail = guest.run(["tail", "-n", "20", DAEMON_LOG, f"{GUEST_ROOT}/daemon.out"],
                         check=False).out
        raise VmBedError(f"{exc}\n{tail}") from exc


def _raise_first(errs: list[BaseException]) -> None:
    if errs:
        raise errs[0]
