"""Processes of a simulated host: its sanlock daemon and its sharedlvm daemon.

Used by ``sharedlvm-sim up/down``, the test bed and the demo; never by production
hosts, where sanlock and sharedlvm run as system services. Every process is started
with its pid recorded and stopped by that pid, never by name.

sanlock raises RLIMIT_MEMLOCK at start and exits if it cannot ("cannot set the limits
for memlock"), which happens in sandboxes without CAP_SYS_RESOURCE. Only there, the
daemon is started with a tiny LD_PRELOAD shim whose ``setrlimit`` returns 0, compiled
with gcc into the simulation's own directory. The shim is never part of the product.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sharedlvm import errors, rpc
from sharedlvm.command import Runner
from sharedlvm.paths import ROOT_ENV, HostPaths

SHIM_SOURCE = """\
/* sharedlvm test-only shim: lets sanlock start where RLIMIT_MEMLOCK cannot be raised */
#include <sys/resource.h>
int setrlimit(int resource, const struct rlimit *rlim) { (void)resource; (void)rlim; return 0; }
"""


def build_shim(runner: Runner, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    source, library = directory / "setrlimit_shim.c", directory / "setrlimit_shim.so"
    if not library.exists():
        source.write_text(SHIM_SOURCE)
        runner.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source)])
    return library


def needs_memlock_shim() -> bool:
    """True when sanlock could not raise RLIMIT_MEMLOCK to unlimited here: no
    CAP_SYS_RESOURCE (bit 24 of CapEff) and a finite hard limit."""
    import resource

    if resource.getrlimit(resource.RLIMIT_MEMLOCK)[1] == resource.RLIM_INFINITY:
        return False
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return not int(line.split()[1], 16) & (1 << 24)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def _read_pid(path: Path, expect: str) -> int | None:
    """The pid in a pid file, if that process is alive and is still the one that wrote
    it (its command line contains ``expect``): a daemon killed without cleaning up
    leaves its pid file behind, and pids wrap (32768 here), so a stale file may name
    an unrelated process that must never be signalled."""
    try:
        pid = int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    if not _pid_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    return pid if expect in cmdline else None


def _sigkill(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return not _pid_alive(pid)


class SanlockProcess:
    """The sanlock daemon of one simulated host (run dir ``$ROOT/run/sanlock``)."""

    def __init__(self, paths: HostPaths, runner: Runner, shim_dir: Path) -> None:
        self.paths = paths
        self.runner = runner
        self.shim_dir = shim_dir

    @property
    def run_dir(self) -> Path:
        return self.paths.sanlock_run_dir

    @property
    def pid(self) -> int | None:
        return _read_pid(self.run_dir / "sanlock.pid", "sanlock")

    def start(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {"SANLOCK_RUN_DIR": str(self.run_dir)}
        attempts: list[Path | None] = [None, build_shim(self.runner, self.shim_dir)]
        if needs_memlock_shim():
            attempts = attempts[1:]
        for shim in attempts:
            if shim is not None:
                env["LD_PRELOAD"] = str(shim)
            # -w 0: no watchdog (none on simulated hosts); the daemon forks itself.
            self.runner.run(["sanlock", "daemon", "-w", "0", "-U", "root", "-G", "root"],
                            env=env)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                pid = self.pid
                if pid and (self.run_dir / "sanlock.sock").exists():
                    return pid
                time.sleep(0.05)
        raise errors.LeaseError(f"sanlock did not start in {self.run_dir} "
                                "(see /var/log/sanlock.log)")

    def stop(self) -> None:
        """Clean stop: ask it to shut down (forcing leases out), then kill by pid."""
        pid = self.pid
        if pid is None:
            return
        self.runner.run(["sanlock", "client", "shutdown", "-f", "1"], check=False,
                        env={"SANLOCK_RUN_DIR": str(self.run_dir)}, timeout=10)
        if not _wait_gone(pid, 5):
            self.kill()

    def kill(self) -> None:
        """SIGKILL: a crashed sanlock, its lockspace leases stop being renewed."""
        _sigkill(self.pid)


class DaemonProcess:
    """The sharedlvm daemon of one simulated host, started in the background."""

    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths

    @property
    def pid_file(self) -> Path:
        return self.paths.run_dir / "daemon.pid"

    @property
    def log_file(self) -> Path:
        return self.paths.root / "daemon.log"

    @property
    def pid(self) -> int | None:
        return _read_pid(self.pid_file, "sharedlvm daemon")

    def start(self, timeout: float = 30, extra_env: dict[str, str] | None = None) -> int:
        self.paths.ensure()
        self.pid_file.unlink(missing_ok=True)
        env = dict(os.environ, **(extra_env or {}), **{ROOT_ENV: str(self.paths.root)})
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sharedlvm", "daemon", "--log-file",
                 str(self.log_file)],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True, close_fds=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise errors.Error(f"sharedlvm daemon exited with {proc.returncode}; "
                                   f"see {self.log_file}")
            with contextlib.suppress(errors.Error):
                rpc.call(self.paths.run_dir, "status", timeout=2)
                return proc.pid
            time.sleep(0.1)
        proc.kill()
        raise errors.Error(f"sharedlvm daemon did not answer in {timeout} s")

    def stop(self, timeout: float = 30) -> None:
        self.request_stop()
        self.wait_stopped(timeout)

    def request_stop(self) -> None:
        """SIGTERM: the daemon releases its leases and leaves its lockspaces."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def wait_stopped(self, timeout: float = 30) -> None:
        pid = self.pid
        if pid is not None and not _wait_gone(pid, timeout):
            self.kill()

    def kill(self) -> None:
        _sigkill(self.pid)
        self.pid_file.unlink(missing_ok=True)
