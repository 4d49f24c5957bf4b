"""A qemu with no guest on a sharedlvm volume, for the tests of running VMs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bed import Cluster, Host

from sharedlvm import qmp, vmwatch


class Qemu:
    """A qemu started by ``sharedlvm run --volume VOL`` (``image``: ``--image VOL``, an
    image's chain) on a host (``incoming``: as a migration's destination), with a
    monitor of the test's own."""

    def __init__(self, host: Host, vol: str, directory: Path, name: str,
                 incoming: str = "", image: bool = False) -> None:
        self.host = host
        self.socket = str(directory / f"{name}.qmp")
        self.out = directory / f"{name}.out"
        self._out = self.out.open("w")
        before = {r.pid for r in vmwatch.read_records(host.paths)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sharedlvm", "run", "--image" if image else "--volume", vol,
             *(["--incoming", incoming] if incoming else []), "--",
             "qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
             "-drive", "file={0},format=qcow2,if=none,id=drive0,cache=none,aio=native,"
             "werror=enospc",
             "-qmp", f"unix:{self.socket},server=on,wait=off"],
            env=host.env, stdout=self._out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.qmp = qmp.Qmp(self.socket)
                    break
                except OSError:
                    assert self.proc.poll() is None, self.out.read_text()
                    assert time.monotonic() < deadline, "qemu did not start"
                    time.sleep(0.1)
            record = next(r for r in vmwatch.read_records(host.paths) if r.pid not in before)
        except BaseException:
            self.proc.terminate()  # run passes it on to qemu's process group
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            raise
        self.pid = record.pid
        self.device = record.volumes[0][1]

    def hmp(self, line: str) -> str:
        return str(self.qmp.execute("human-monitor-command", {"command-line": line},
                                    timeout=120))

    def write(self, offset: int, length: int, pattern: int) -> None:
        self.hmp(f'qemu-io drive0 "write -P {pattern:#x} {offset} {length}"')
        self.check("wrote ")

    def read_ok(self, offset: int, length: int, pattern: int) -> None:
        self.hmp(f'qemu-io drive0 "read -P {pattern:#x} {offset} {length}"')
        self.check("read ")

    def check(self, ok: str) -> None:
        """qemu-io prints each request's outcome on qemu's stdout: the last one is
        ``ok``, and none failed."""
        self._out.flush()
        lines = [ln for ln in self.out.read_text().splitlines()
                 if ln.startswith(("wrote ", "read ")) or "fail" in ln.lower()
                 or "error" in ln.lower()]
        assert lines and lines[-1].startswith(ok), lines[-3:]

    def threshold(self) -> int:
        """The write threshold armed on the volume's protocol node (0: none)."""
        nodes = self.qmp.execute("query-named-block-nodes", {"flat": True})
        return max(int(n.get("write_threshold", 0)) for n in nodes
                   if n.get("drv") == "host_device")

    def output(self) -> str:
        self._out.flush()
        return self.out.read_text()

    def status(self) -> str:
        return str(self.qmp.execute("query-status")["status"])

    def migration(self) -> str:
        return str((self.qmp.execute("query-migrate") or {}).get("status", "none"))

    def stop(self) -> None:
        self.qmp.close()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


def lv_size(cluster: Cluster, vol: str) -> int:
    """The LV's size as LVM has it on the LUN."""
    lvm = cluster.raw_lvm()
    return next(lv.size for vg in lvm.vgs() for lv in lvm.lvs(vg.name) if lv.name == vol)


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)
