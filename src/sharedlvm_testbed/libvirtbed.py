"""A libvirtd per simulated host (the test bed only; production hosts run libvirt as
their system service).

Each host's libvirtd runs in its own mount namespace, where its private directories
under ``$ROOT/libvirt`` are bind-mounted on /etc/libvirt, /run/libvirt,
/var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt, beside a virtlogd of its
own (domains do not start without one). Configuration: sharedlvm's own (``sharedlvm
libvirt install``: the sanlock lock driver, the qemu hook) plus what this machine needs
(measured in TESTBED-NOTES, "libvirt on this machine"): qemu as root (no /dev/kvm
re-probe on every call), no cgroup controllers (two daemons would collide in
/sys/fs/cgroup/machine), a host UUID of its own (else "Attempt to migrate guest to the
same host"), and the host's sanlock run dir in the daemon's environment.

``python -m sharedlvm_testbed.libvirtbed inner BASE SANLOCK_RUN_DIR`` is the process
that ``unshare`` starts in the new namespace: it makes the mounts, starts virtlogd
and libvirtd in the foreground and stops both when it is stopped (SIGTERM) or its
parent dies. Every process is stopped by its pid, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from sharedlvm import libvirt
from sharedlvm.command import DIE_WITH_PARENT, Runner
from sharedlvm.paths import HostPaths

MOUNTS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
          "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}


class Libvirtd:
    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths
        self.base = paths.root / "libvirt"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.base / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def log(self) -> Path:
        return self.base / "libvirtd.log"

    def configure(self) -> None:
        for name in MOUNTS:
            (self.base / name).mkdir(parents=True, exist_ok=True)
        etc = self.base / "etc"
        host_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"sharedlvm-bed:{self.paths.root}")
        (etc / "libvirtd.conf").write_text(
            f'host_uuid = "{host_uuid}"\nlog_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n')
        (etc / "qemu.conf").write_text(
            'user = "root"\ngroup = "root"\ncgroup_controllers = [ ]\n'
            'namespaces = [ ]\nremember_owner = 0\n')
        libvirt.install(etc, str(self.paths.root))  # the product's own configuration

    def start(self, timeout: float = 60) -> None:
        self.spawn()
        self.wait(timeout)

    def spawn(self) -> None:
        """Start it; ``wait`` for it to answer (several hosts' start at once)."""
        self.configure()
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [*DIE_WITH_PARENT, "unshare", "--mount", "--propagation", "private", "--",
             sys.executable, "-m", "sharedlvm_testbed.libvirtbed", "inner", str(self.base),
             str(self.paths.sanlock_run_dir)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, close_fds=True)
        out.close()

    def wait(self, timeout: float = 60) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.virsh("version", check=False).returncode == 0:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"libvirtd of {self.paths.root} did not start: "
                                   f"{self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def virsh(self, *args: str, check: bool = True, timeout: float = 120,
              input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True,
                              text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} ({self.paths.root}) failed: "
                                 f"{proc.stderr.strip()}")
        return proc

    def qemu_pids(self) -> list[int]:
        pids = []
        for status in (self.base / "run" / "qemu").glob("*.xml"):  # a running domain
            with contextlib.suppress(ValueError, OSError):
                pids.append(int(status.with_suffix(".pid").read_text().strip()))
        return pids

    def stop(self) -> None:
        """Destroy what runs (qemu outlives libvirtd), then stop the daemons."""
        if self.proc is not None and self.proc.poll() is None:
            names = self.virsh("list", "--name", check=False).stdout.split()
            for name in names:
                self.virsh("destroy", name, check=False)
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None


def inner(base: Path, sanlock_run_dir: str) -> int:
    """In the new mount namespace: mounts, then virtlogd and libvirtd until stopped."""
    runner = Runner()
    for name, target in MOUNTS.items():
        Path(target).mkdir(parents=True, exist_ok=True)
        runner.run(["mount", "--bind", str(base / name), target])
    env = dict(os.environ, SANLOCK_RUN_DIR=sanlock_run_dir)
    children = [
        subprocess.Popen([*DIE_WITH_PARENT, "virtlogd", "--pid-file", "/run/libvirt/virtlogd.pid"],
                         env=env, close_fds=True),
    ]
    deadline = time.monotonic() + 10
    while not Path("/run/libvirt/virtlogd-sock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    children.append(subprocess.Popen(
        [*DIE_WITH_PARENT, "libvirtd", "--pid-file", "/run/libvirt/libvirtd.pid"], env=env,
        close_fds=True))
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while not stop and all(c.poll() is None for c in children):
        time.sleep(0.2)
    for child in reversed(children):
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "inner":
        sys.exit(inner(Path(sys.argv[2]), sys.argv[3]))
    sys.exit("usage: python -m sharedlvm_testbed.libvirtbed inner BASE SANLOCK_RUN_DIR")
