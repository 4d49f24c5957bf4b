"""``make demo``: the main job on an embedded default, printing what happens.

A sparse-file LUN on a loop device, three simulated hosts (one ``SHAREDLVM_ROOT``,
one sanlock daemon and one sharedlvm daemon each), real LVM and sanlock: host 1 formats
a domain and becomes manager, hosts 2 and 3 attach; volumes are created, extended and
deleted by the manager, also when asked on another host (storage mailbox); LVM itself
refuses a metadata write anywhere else; a volume held by one host is refused to
another; images, templates and linked clones; a qemu writes a thin disk that its
host's daemon grows under it, and the VM migrates live to another host with its lease;
the manager role is handed over cleanly, then the manager host crashes and another takes over after
sanlock's host-dead time. Everything is removed at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sharedlvm import errors, qmp, rpc
from sharedlvm.command import Runner
from sharedlvm.domain import make_lvm
from sharedlvm.leases import host_dead_seconds
from sharedlvm.paths import ROOT_ENV, HostPaths
from sharedlvm.units import GiB

from .sim import sim_down, sim_up
from .simhost import DaemonProcess, SanlockProcess

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def sharedlvm(root: Path, *args: str, expect_fail: bool = False, quiet: bool = False) -> str:
    """Run ``sharedlvm ARGS`` as host ``root``, printing it and its output (``quiet``:
    neither, a look-up of the demo's own)."""
    host = root.name
    if not quiet:
        print(f"{DIM}[{host}]{RESET} $ sharedlvm {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "sharedlvm", *args], capture_output=True,
                          text=True, env=dict(os.environ, **{ROOT_ENV: str(root)}), timeout=300)
    out = proc.stdout + proc.stderr
    for line in ([] if quiet else out.rstrip().splitlines()):
        print(f"    {line}")
    if expect_fail:
        if proc.returncode == 0:
            raise SystemExit("demo: expected a refusal, but the command succeeded")
        print(f"    {DIM}(exit code {proc.returncode}: refused as it should be){RESET}")
    elif proc.returncode != 0:
        raise SystemExit(f"demo: command failed with exit code {proc.returncode}")
    return proc.stdout


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (loop devices and LVM)", file=sys.stderr)
        return 1
    runner = Runner()
    with tempfile.TemporaryDirectory(prefix="sharedlvm-demo-") as tmp:
        directory = Path(tmp)
        say("Two 10 GiB sparse files as the shared LUNs, 3 simulated hosts with their "
            "daemons")
        bed = sim_up(runner, directory, hosts=3, size=10 * GiB, luns=2)
        try:
            run_story(bed.hosts, [lun.device for lun in bed.luns])
        finally:
            say("Cleaning up: detaching loop devices, removing the LUN file")
            sim_down(runner, directory)
            print("    done")
    return 0


IO_TIMEOUT = 1  # seconds; production default is 10. Short, so the failover fits a demo.


def run_story(hosts: list[Path], luns: list[str]) -> None:
    h1, h2, h3 = hosts
    lun = luns[0]
    lun_args = [arg for device in luns for arg in ("--lun", device)]
    print(f"    LUNs: {', '.join(luns)}; each host has its own sanlock daemon and sharedlvm "
          "daemon")
    for h in hosts:
        print(f"    {h.name}: SHAREDLVM_ROOT={h}")

    say("host1 formats the domain, a shard (one VG) per LUN; its daemon joins the "
        "lockspace and becomes manager")
    sharedlvm(h1, "domain", "create", "--name", "demo", *lun_args, "--host-id", "1",
              "--io-timeout", str(IO_TIMEOUT))

    say("host2 and host3 attach it: they verify the domain record and join the lockspace")
    sharedlvm(h2, "domain", "attach", "demo", *lun_args, "--host-id", "2")
    sharedlvm(h3, "domain", "attach", "demo", *lun_args, "--host-id", "3")
    for h in hosts:
        sharedlvm(h, "manager", "status")

    say("The manager creates volumes: metadata in LV tags, a sanlock lease slot each, "
        "spread over the shards (each LVM command reads one shard's metadata)")
    raw = json.loads(sharedlvm(h1, "volume", "create", "--size", "2G", "--tag", "vm=web-1",
                               "--json"))["uuid"]
    sharedlvm(h1, "volume", "create", "--size", "10G", "--format", "qcow2", "--tag", "vm=db-1")
    ordered = json.loads(sharedlvm(h1, "volume", "create", "--size", "1G", "--request-id",
                                   "order-42", "--json"))["uuid"]
    print("    (the same request again returns the first answer and creates nothing:)")
    sharedlvm(h1, "volume", "create", "--size", "1G", "--request-id", "order-42")
    sharedlvm(h3, "volume", "list")

    say("Any host can ask: host3's request goes through the storage mailbox on the LUN "
        "and the manager (host1) does it")
    sharedlvm(h3, "volume", "create", "--size", "1G", "--tag", "asked-on=host3")
    print("    Only the manager's daemon writes metadata. Anywhere else LVM itself refuses,")
    print("    even when called directly with host2's configuration:")
    lvm = make_lvm(HostPaths(h2), Runner(), [lun], writable=False)
    try:
        lvm.lvcreate("demo", "sneaky", GiB, [])
        raise SystemExit("demo: LVM accepted a write on a reader host")
    except errors.ReadOnlyDenied as exc:
        print(f"    lvcreate on host2: {exc}")

    say("Volume leases live in the process that writes: host2 runs a writer under "
        "its volume's exclusive lease; host3 is refused")
    writer = subprocess.Popen(
        [sys.executable, "-m", "sharedlvm", "run", "--volume", raw, "--", sys.executable,
         "-c", "import os, time; fd = os.open(os.environ['SHAREDLVM_DEVICE'], os.O_WRONLY); "
         "os.pwrite(fd, b'hello from host2, written under its exclusive lease'.ljust("
         "4096, b'\\0'), 1 << 20); os.fsync(fd); print('    host2 wrote', flush=True); "
         "time.sleep(600)"], env=dict(os.environ, **{ROOT_ENV: str(h2)}),
        stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        print(writer.stdout.readline(), end="")
        sharedlvm(h3, "run", "--volume", raw, "--", "true", expect_fail=True)
        sharedlvm(h2, "host", "list")
    finally:
        writer.terminate()  # `run` passes it on to its consumer, then deactivates
        writer.communicate(timeout=30)
    print("    host3 now reads it under a shared lease, through its own read-only mapping:")
    sharedlvm(h3, "run", "--volume", f"{raw}:ro", "--", sys.executable, "-c",
              "import os; f=open(os.environ['SHAREDLVM_DEVICE'],'rb'); f.seek(1<<20); "
              "print('    host3 reads:', f.read(4096).rstrip(b'\\0').decode())")

    say("The manager extends and deletes (--wipe zeroes the data first)")
    sharedlvm(h1, "volume", "extend", raw, "--size", "+1G")
    sharedlvm(h1, "volume", "delete", ordered, "--wipe")

    say("Images: a new volume gets a base image and becomes a template; host2 and host3 "
        "each make a linked clone (a qcow2 overlay over it) and write their own overlay "
        "through the chain")
    raw = json.loads(sharedlvm(h1, "volume", "create", "--size", "1G", "--json"))["uuid"]
    sharedlvm(h1, "run", "--volume", raw, "--", "qemu-io", "-f", "raw", "-c",
              "write -P 0x42 0 2M", "{0}")
    sharedlvm(h2, "volume", "template", raw)
    clones = [json.loads(sharedlvm(h, "volume", "clone", raw, "--linked", "--json"))
              for h in (h2, h3)]
    for host, clone in zip((h2, h3), clones, strict=True):
        sharedlvm(host, "run", "--image", clone["image"], "--", "qemu-io", "-f", "qcow2",
                  "-c", f"write -P 0x{host.name[-1]}{host.name[-1]} 2M 1M", "{0}")
    print("    the template's data is read through each chain (qemu resolves the backing")
    print("    file, a bare volume UUID, in the host's image directory):")
    sharedlvm(h3, "run", "--image", f"{clones[0]['image']}:ro", "--", "qemu-img", "info",
              "--backing-chain", "{0}")
    snap = json.loads(sharedlvm(h1, "volume", "snapshot", clones[0]["uuid"], "--json"))
    sharedlvm(h1, "image", "info", clones[0]["image"])
    print("    a template with clones on top is not deleted:")
    sharedlvm(h1, "volume", "delete", raw, expect_fail=True)
    print("    host3 copies that chain into a new independent raw volume (the copy runs on")
    print("    host3, by qemu-img holding the chain's shared leases and the new volume's):")
    sharedlvm(h3, "volume", "clone", snap["uuid"], "--format", "raw")
    print("    the snapshot is merged back into the volume below it (its chain unused):")
    sharedlvm(h2, "volume", "merge", snap["uuid"])
    sharedlvm(h2, "image", "info", clones[0]["image"])

    running_vm(h1, h2, h3)

    say("Clean handover: host1 gives the manager role up; another host takes it at once")
    start = time.monotonic()
    sharedlvm(h1, "manager", "release")
    manager = wait_manager(hosts, exclude=h1)
    print(f"    {manager.name} is manager after {time.monotonic() - start:.2f} s")
    sharedlvm(manager, "manager", "status")

    dead = host_dead_seconds(IO_TIMEOUT)
    say(f"Crash: {manager.name}'s sanlock and sharedlvm daemons are SIGKILLed")
    print(f"    Its manager lease is not released. sanlock lets another host take it only "
          f"once {manager.name} is dead by its formula:\n    8 x io_timeout ({IO_TIMEOUT} s) "
          f"+ 60 s watchdog term = {dead} s. Waiting ...")
    start = time.monotonic()
    # sanlock first: alive, it would release the leases of a daemon that died
    SanlockProcess(HostPaths(manager), Runner(), manager.parent / "build").kill()
    DaemonProcess(HostPaths(manager)).kill()
    survivor = wait_manager([h for h in hosts if h != manager], timeout=dead + 60,
                            progress=start)
    took = time.monotonic() - start
    print(f"    {survivor.name} became manager {took:.1f} s after the crash "
          f"(sanlock's host-dead time: {dead} s)")
    sharedlvm(survivor, "manager", "status")
    asker = next(h for h in hosts if h not in (manager, survivor))
    print(f"    {asker.name} asks again; the new manager ({survivor.name}) does it:")
    sharedlvm(asker, "volume", "create", "--size", "1G")
    sharedlvm(survivor, "domain", "info")


class DemoVm:
    """A qemu with no guest, started by ``sharedlvm run`` on a host, written through a
    monitor of the demo's own (HMP qemu-io: what a guest's writes would do)."""

    def __init__(self, host: Path, vol: str, directory: Path, name: str,
                 incoming: str = "") -> None:
        self.socket = str(directory / f"{name}.qmp")
        before = set(_vm_pids(host))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sharedlvm", "run", "--volume", vol,
             *(["--incoming", incoming] if incoming else []), "--",
             "qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
             "-drive", "file={0},format=qcow2,if=none,id=drive0,cache=none,aio=native,"
             "werror=enospc", "-qmp", f"unix:{self.socket},server=on,wait=off"],
            env=dict(os.environ, **{ROOT_ENV: str(host)}), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.qmp = qmp.Qmp(self.socket)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("demo: qemu did not start") from None
                time.sleep(0.1)
        self.pid = next(p for p in _vm_pids(host) if p not in before)

    def io(self, command: str) -> None:
        self.qmp.execute("human-monitor-command",
                         {"command-line": f'qemu-io drive0 "{command}"'}, timeout=120)

    def stop(self) -> str:
        """End qemu (through ``run``, which deactivates); what it printed."""
        self.qmp.close()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""


def _vm_pids(host: Path) -> list[int]:
    return [int(p.stem) for p in (HostPaths(host).run_dir / "vms").glob("*.json")]


def _lv_size(host: Path, vol: str) -> int:
    return int(json.loads(sharedlvm(host, "volume", "info", vol, "--json", quiet=True))["size"])


def running_vm(h1: Path, h2: Path, h3: Path) -> None:
    say("Running VMs: host2 runs a qemu on a thin qcow2 volume (its LV starts at 1 GiB); "
        "host2's daemon watches it through a monitor of its own")
    vol = json.loads(sharedlvm(h2, "volume", "create", "--size", "4G", "--format",
                               "qcow2", "--alloc", "thin", "--json"))["uuid"]
    first = _lv_size(h2, vol)
    with tempfile.TemporaryDirectory(prefix="vm-", dir=h2.parent) as tmp:
        directory = Path(tmp)
        outputs: list[str] = []
        vm = DemoVm(h2, vol, directory, "source")
        vms = [vm]
        try:
            time.sleep(1.5)  # the daemon finds the VM and arms its write threshold
            print(f"    the guest writes 1 GiB; the LV is {first >> 20} MiB:")
            for i in range(16):
                vm.io(f"write -P {0x10 + i:#x} {i * 64}M 64M")
            deadline = time.monotonic() + 30
            while _lv_size(h2, vol) == first and time.monotonic() < deadline:
                time.sleep(0.2)
            grown = [ln.split(": ", 2)[-1] for ln in
                     (h2 / "daemon.log").read_text().splitlines()
                     if f"volume {vol} grown to" in ln]
            for line in grown:
                print(f"    host2's daemon: {line}")
            print(f"    the LV is now {_lv_size(h2, vol) >> 20} MiB: grown through the "
                  "manager (host1) by the storage mailbox, before the guest reached its end")

            say("Live migration: host3 starts the same VM waiting for the stream (its "
                "volume active, its lease still host2's); the lease moves with the writer")
            uri = f"unix:{directory}/migration.sock"
            dest = DemoVm(h3, vol, directory, "destination", incoming=uri)
            vms.append(dest)
            sharedlvm(h2, "vm", "migrate", str(vm.pid), "--to-root", str(h3),
                      "--to-pid", str(dest.pid), "--uri", uri)
            vms.remove(vm)
            outputs.append(vm.stop())  # the source's qemu quit by itself
            print("    on host3, every byte the guest wrote on host2 reads back:")
            for i in range(16):
                dest.io(f"read -P {0x10 + i:#x} {i * 64}M 64M")
            sharedlvm(h3, "image", "info", json.loads(sharedlvm(
                h3, "volume", "info", vol, "--json", quiet=True))["image"])
        finally:
            outputs += [v.stop() for v in vms]
    for out in outputs:
        if any("fail" in ln.lower() for ln in out.splitlines()):
            raise SystemExit(f"demo: a qemu-io request failed:\n{out[-1000:]}")
        requests = [ln for ln in out.splitlines() if ln.startswith(("wrote", "read"))]
        print(f"    qemu's own output: {len(requests)} requests, none failed")
    sharedlvm(h3, "volume", "delete", vol)


def wait_manager(hosts: list[Path], exclude: Path | None = None, timeout: float = 30,
                 progress: float | None = None) -> Path:
    deadline = time.monotonic() + timeout
    last_report = time.monotonic()
    while time.monotonic() < deadline:
        for h in hosts:
            if h == exclude:
                continue
            try:
                status = rpc.call(HostPaths(h).run_dir, "status", timeout=5)
            except errors.Error:
                continue
            if any(s["manager"] for s in status):
                return h
        if progress is not None and time.monotonic() - last_report >= 10:
            last_report = time.monotonic()
            print(f"    ... {time.monotonic() - progress:.0f} s", flush=True)
        time.sleep(0.1)
    raise SystemExit("demo: no host became manager in time")


if __name__ == "__main__":
    raise SystemExit(main())
