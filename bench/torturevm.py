"""The fault harness's VM actor (``bench/torturelib.py``): running VMs' operations under
the harness's faults.

One qemu at a time (no guest: ``-M none``, written through its own HMP ``qemu-io``, as
tests/qemu_vm.py does) on a thin qcow2 image of 1 GiB (its LVs fully allocated: the
loop bed maps only single-segment LVs, and growth is not what this actor attacks), on
a random host. A seeded mix of steps, each through the host daemons' API as an
orchestrator would ask it: writes (4 MiB at one of 32 slots, a fresh pattern, then a
flush; acknowledged only once both returned), live snapshots (``vm snapshot``), live
merges of the leaf or the volume under it (``vm merge``, asked again when the answer
says it may be half done), live migrations to another host (``run --image --incoming``
there, then ``client.migrate_vm``), and a stop that verifies the image and deletes it.

The ledger: each slot's acknowledged pattern (a write whose outcome is unknown leaves
the slot either its old or its new pattern). Invariants:
- every acknowledged write reads back from the image, read alone on another host once
  the VM is gone (after a host crash took the VM too: flushed writes survive);
- after any step the image's chain on the LUN is the chain qemu reads (no volume the
  VM writes outside the image, no volume of the image qemu skipped) and no volume of
  it is left ``merged`` once the step is over;
- a VM the harness did not stop is running (a step never leaves it paused or gone,
  except a migration that says the VM may run at the destination, which is adopted);
- the VMs' volumes take part in the harness's disk checks (lease slots, chains,
  nothing half-done after recovery); they are tagged ``vm=1`` and skipped by its
  request-id ledger, which knows only the workers' requests.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qemu_vm import Qemu

from sharedlvm import client as client_mod
from sharedlvm import errors

if TYPE_CHECKING:
    from bed import Host
    from torturelib import Torture

MiB = 1024**2
SLOT = 4 * MiB
SLOTS = 32
VM_TAG = "vm"  # user tag of every volume the actor makes (skipped by the rid ledger)
STEPS = [("write", 10), ("snapshot", 3), ("merge", 3), ("migrate", 2), ("stop", 1)]


@dataclass
class Vm:
    image: str
    qemu: Qemu
    ledger: dict[int, set[int]] = field(default_factory=dict)  # slot -> acceptable
    lost: bool = False  # killed with its host: verified once it is back

    @property
    def host(self) -> int:
        return self.qemu.host.index


class VmActor:
    def __init__(self, torture: Torture) -> None:
        self.t = torture
        self.rng = random.Random(f"{torture.cfg.seed}:vm")
        self.vm: Vm | None = None
        self.lost: list[Vm] = []
        self.qemus: list[Qemu] = []  # every qemu started (a migration's destinations too)
        self.killed: set[int] = set()  # their run processes a host crash killed
        self.n = 0
        self.dir = torture.workdir / "vms"
        self.dir.mkdir(exist_ok=True)

    def say(self, text: str) -> None:
        self.t.say(f"vm: {text}")

    def count(self, step: str, outcome: str) -> None:
        with self.t.lock:
            self.t.notes[f"vm {step}: {outcome}"] += 1

    # The thread

    def run(self) -> None:
        while not self.t.stop_ops.is_set():
            step = _pick(self.rng.random())
            x = [self.rng.random() for _ in range(4)]
            if not self.t.gate.enter(self.t.stop_ops):
                break
            try:
                self.step(step, x)
            except Exception:
                self.t.harness_error(f"vm step {step}")
            finally:
                self.t.gate.leave()
            self.t.stop_ops.wait(0.2 + 0.5 * self.rng.random())

    def step(self, step: str, x: list[float]) -> None:
        self.n += 1
        vm = self.vm
        if vm is not None and vm.qemu.proc.pid in self.killed:
            self.vm = None  # killed with its host: verified at the end
            vm.lost = True
            self.lost.append(vm)
            self.count("host crash", "VM killed with its host")
            return
        if vm is not None and vm.qemu.proc.poll() is not None and not vm.lost:
            self.t.violation("vm gone", f"the VM of image {vm.image} (qemu {vm.qemu.pid}, "
                             f"host{vm.host}) ended without being stopped: "
                             f"{vm.qemu.output()[-300:]!r}")
            self.vm = None
            self.verify(vm, "ended by itself")
            return
        if vm is None:
            self.start(x)
            return
        getattr(self, f"do_{step}")(vm, x)

    def live_hosts(self) -> list[int]:
        return [h.index for h in self.t.hosts if self.t.dpid(h) is not None]

    # Steps

    def start(self, x: list[float]) -> None:
        hosts = self.live_hosts()
        if not hosts:
            return
        host = self.t.host(hosts[int(x[0] * len(hosts))])
        rid = f"vm{self.t.cfg.seed}-{self.n}"
        try:
            vol = self.t.client(host.index).create_volume(
                1024 * MiB, format="qcow2", alloc="thin", tags={VM_TAG: "1", "rid": rid},
                request_id=rid)
        except (errors.Error, OSError) as exc:
            self.count("start", f"create refused ({type(exc).__name__})")
            return
        try:
            qemu = self.qemu(host, vol.image, f"vm{self.n}")
        except Exception as exc:
            self.count("start", "qemu did not start")
            self.say(f"image {vol.image}: qemu did not start on host{host.index}: {exc}")
            self.delete(vol.image)
            return
        self.vm = Vm(vol.image, qemu)
        self.count("start", "ok")
        self.say(f"image {vol.image} runs on host{host.index} as qemu {qemu.pid}")

    def do_write(self, vm: Vm, x: list[float]) -> None:
        slot, pattern = int(x[0] * SLOTS), 1 + int(x[1] * 254)
        before = vm.ledger.get(slot, {0})
        vm.ledger[slot] = before | {pattern}  # unknown until acknowledged
        try:
            vm.qemu.write(slot * SLOT, SLOT, pattern)
            vm.qemu.hmp('qemu-io drive0 "flush"')
        except Exception as exc:
            self.count("write", "failed")
            if vm.qemu.proc.poll() is None and not vm.lost:
                self.t.violation("vm write failed", f"image {vm.image}: a write to slot "
                                 f"{slot} on host{vm.host} failed: {exc}")
            return
        vm.ledger[slot] = {pattern}
        self.count("write", "ok")

    def do_snapshot(self, vm: Vm, x: list[float]) -> None:
        try:
            new = self.t.client(vm.host).vm_snapshot(vm.qemu.pid, tags={VM_TAG: "1"})
        except (errors.Error, OSError) as exc:
            self.count("snapshot", f"failed ({type(exc).__name__})")
            self.say(f"image {vm.image}: snapshot failed: {type(exc).__name__}: {exc}")
            # (a switch with no answer leaves both volumes the VM's: the chain is
            # checked after the next step that succeeds)
            self.check_vm(vm, "failed snapshot", chain=False)
            return
        self.count("snapshot", "ok")
        self.say(f"image {vm.image}: snapshot, writes {new.uuid}")
        self.check_vm(vm, "snapshot")

    def do_merge(self, vm: Vm, x: list[float]) -> None:
        chain = self.chain(vm)
        if chain is None or len(chain) < 2:
            return
        pick = chain[-1] if len(chain) == 2 or x[0] < 0.5 else chain[-2]
        outcome = ""
        # Asked again, as an orchestrator would, while the answer says it may be half
        # done (a VM paused for its pivot waits for a manager: after a host crash, up
        # to the host-dead time).
        deadline = time.monotonic() + self.t.cfg.crash_bound + 30
        while True:
            try:
                self.t.client(vm.host).vm_merge(vm.qemu.pid, pick)
                outcome = "ok"
                break
            except (errors.Error, OSError) as exc:
                outcome = f"failed ({type(exc).__name__})"
                self.say(f"image {vm.image}: merge of {pick} failed: "
                         f"{type(exc).__name__}: {exc}")
                if getattr(exc, "changes_nothing", False) or isinstance(
                        exc, errors.InvalidArgument | errors.Unsupported) or \
                        time.monotonic() > deadline or vm.qemu.proc.poll() is not None:
                    break
                time.sleep(2)
        self.count("merge", outcome)
        self.check_vm(vm, "merge", chain=outcome == "ok")

    def do_migrate(self, vm: Vm, x: list[float]) -> None:
        others = [h for h in self.live_hosts() if h != vm.host]
        if not others:
            return
        dest_host = self.t.host(others[int(x[0] * len(others))])
        uri = f"unix:{self.dir}/mig{self.n}.sock"
        try:
            dest = self.qemu(dest_host, vm.image, f"vm{self.n}-in", uri)
        except Exception as exc:
            self.count("migrate", "destination did not start")
            self.say(f"image {vm.image}: destination did not start: {exc}")
            return
        source = vm.qemu
        try:
            done = client_mod.migrate_vm(self.t.client(source.host.index), source.pid,
                                         self.t.client(dest_host.index), dest.pid, uri)
        except (errors.Error, OSError) as exc:
            self.count("migrate", f"failed ({type(exc).__name__})")
            self.say(f"image {vm.image}: migration failed: {type(exc).__name__}: {exc}")
            self.after_failed_migration(vm, dest, exc)
        else:
            self.count("migrate", "ok")
            self.say(f"image {vm.image}: migrated to host{dest_host.index} as qemu "
                     f"{dest.pid} (handoff {done.handoff_ms:.0f} ms)")
            with contextlib.suppress(subprocess.TimeoutExpired):
                source.proc.wait(5)  # quit by migrate_vm (not if its daemon was down)
            source.stop()
            vm.qemu = dest
        self.check_vm(vm, "migrate", chain=vm.qemu is dest)

    def after_failed_migration(self, vm: Vm, dest: Qemu, exc: Exception) -> None:
        """The VM runs on exactly one side: the source (dest ended), or, when the
        handoff says the destination may have run it, the destination if it runs."""
        source_runs = vm.qemu.proc.poll() is None and _status(vm.qemu) == "running"
        dest_runs = dest.proc.poll() is None and _status(dest) == "running"
        if source_runs and dest_runs:
            self.t.violation("vm runs twice", f"image {vm.image}: after a failed migration "
                             f"both qemu {vm.qemu.pid} (host{vm.host}) and {dest.pid} "
                             f"(host{dest.host.index}) run ({exc})")
        if dest_runs and not source_runs:
            vm.qemu.stop()
            vm.qemu = dest
            self.count("migrate", "failed, adopted at the destination")
            return
        dest.stop()
        if not source_runs:
            self.count("migrate", "failed, VM stopped on both sides")
            self.say(f"image {vm.image}: stopped on both sides after a failed migration")

    def do_stop(self, vm: Vm, x: list[float]) -> None:
        vm.qemu.stop()
        self.vm = None
        self.verify(vm, "stopped")

    # Checks

    def chain(self, vm: Vm) -> list[str] | None:
        try:
            info = self.t.client(vm.host).image_info(vm.image)
        except (errors.Error, OSError) as exc:
            self.say(f"image {vm.image}: no chain now ({type(exc).__name__}: {exc})")
            return None
        return [v.uuid for v in info.chain]

    def check_vm(self, vm: Vm, after: str, chain: bool = True) -> None:
        """After a step: the VM runs; after one that succeeded, qemu reads exactly the
        image's chain and nothing of it is left merged."""
        if vm.qemu.proc.poll() is not None or vm.lost:
            return
        status = _status(vm.qemu)
        if status != "running":
            self.t.violation("vm not running", f"image {vm.image}: qemu {vm.qemu.pid} on "
                             f"host{vm.host} is {status} after a {after}")
        if not chain:
            return
        try:
            info = self.t.client(vm.host).image_info(vm.image)
        except (errors.Error, OSError):
            return
        files = _qemu_chain(vm.qemu)
        ours = [os.path.basename(os.path.realpath(f)) for f in files]
        devices = {v.uuid: _device_of(self.t, vm.host, v.uuid) for v in info.chain}
        expect = [os.path.basename(os.path.realpath(d)) if d else f"<{u} not active>"
                  for u, d in reversed(list(devices.items()))]
        if ours != expect:
            self.t.violation("vm chain differs", f"image {vm.image} after a {after}: qemu "
                             f"reads {files}, the LUN says {[v.uuid for v in info.chain]} "
                             f"(devices {expect})")
        merged = [v.uuid for v in info.chain if v.state == "merged"]
        if merged:
            self.t.violation("merged volume left", f"image {vm.image}: {merged} still "
                             f"in its chain after a {after}")

    def verify(self, vm: Vm, why: str) -> None:
        """Every acknowledged write reads back from the image, read on a live host
        (waiting for a crashed host's leases), then the image deleted."""
        hosts = self.live_hosts()
        if not hosts:
            self.lost.append(vm)
            return
        host = self.t.host(hosts[int(self.rng.random() * len(hosts))])
        slots = sorted(vm.ledger)
        argv = [sys.executable, "-m", "sharedlvm", "run", "--image", f"{vm.image}:ro",
                "--wait", "150", "--", "qemu-io", "-r", "-f", "qcow2"]
        for slot in slots:  # a slot's first and last bytes: a torn write shows
            argv += ["-c", f"read -v {slot * SLOT} 16",
                     "-c", f"read -v {(slot + 1) * SLOT - 16} 16"]
        argv.append("{0}")
        proc = subprocess.run(argv, env=host.env, capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            self.t.violation("vm data unreadable", f"image {vm.image} ({why}) could not be "
                             f"read on host{host.index}: {proc.stderr.strip()[-300:]}")
            return
        found = _first_bytes(proc.stdout)
        bad = [f"slot {s}: {found.get(s * SLOT)}..{found.get((s + 1) * SLOT - 16)} not in "
               f"{sorted(vm.ledger[s])}" for s in slots
               if found.get(s * SLOT) not in vm.ledger[s]
               or found.get((s + 1) * SLOT - 16) not in vm.ledger[s]]
        if bad:
            self.t.violation("vm data lost", f"image {vm.image} ({why}): acknowledged "
                             f"writes do not read back on host{host.index}: {bad[:5]}")
        else:
            self.count("verify", f"ok ({why})")
        self.delete(vm.image)

    def delete(self, image: str) -> None:
        for host in self.live_hosts():
            try:
                self.t.client(host).delete_image(image, request_id=f"vm-del-{image}")
                return
            except (errors.Error, OSError) as exc:
                self.say(f"image {image}: delete on host{host} failed: {exc}")

    # Faults and the end

    def qemu(self, host: Host, image: str, name: str, incoming: str = "") -> Qemu:
        q = Qemu(host, image, self.dir, name, incoming=incoming, image=True)
        self.qemus.append(q)
        return q

    def host_crashed(self, index: int) -> None:
        """A power loss on ``index`` ends every qemu there with it (flushed writes
        survive), whatever step the VM thread is in: it finds out at its next step."""
        from torturelib import kill_tree

        for q in self.qemus:
            if q.host.index == index and q.proc.poll() is None:
                self.killed.add(q.proc.pid)
                kill_tree(q.proc.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    q.proc.wait(10)

    def finish(self) -> None:
        """At the end: the running VM stopped, every VM verified."""
        if self.vm is not None:
            self.check_vm(self.vm, "last step")
            vm, self.vm = self.vm, None
            vm.qemu.stop()
            self.verify(vm, "stopped at the end")
        lost, self.lost = self.lost, []
        for vm in lost:
            with contextlib.suppress(Exception):
                vm.qemu.stop()
            self.verify(vm, "killed with its host")

    def cleanup(self) -> None:
        from torturelib import kill_tree

        for q in self.qemus:
            if q.proc.poll() is None:
                kill_tree(q.proc.pid)


def _pick(x: float) -> str:
    total = sum(w for _, w in STEPS)
    for name, weight in STEPS:
        if x * total < weight:
            return name
        x -= weight / total
    return STEPS[-1][0]


def _status(q: Qemu) -> str:
    try:
        return q.status()
    except Exception as exc:
        return f"unknown ({exc})"


def _qemu_chain(q: Qemu) -> list[str]:
    """The files of the drive's chain as qemu reads them, the active layer first."""
    from sharedlvm.qmp import _plain

    for dev in q.qmp.execute("query-block"):
        image = (dev.get("inserted") or {}).get("image")
        files = []
        while image:
            files.append(_plain(image.get("filename")))
            image = image.get("backing-image")
        if files:
            return files
    return []


def _device_of(t: Torture, host: int, volume: str) -> str | None:
    d = t.host(host).domain()
    shard = d.volume_shard(volume)
    path: str | None = shard.activator.path(shard.vg_name, volume)
    return path


def _first_bytes(out: str) -> dict[int, int]:
    """qemu-io ``read -v`` dumps: offset -> its first byte."""
    found: dict[int, int] = {}
    for line in out.splitlines():
        head, _, rest = line.partition(":")
        if not rest:
            continue
        try:
            offset = int(head, 16)
            first = int(rest.split()[0], 16)
        except (ValueError, IndexError):
            continue
        found.setdefault(offset, first)
    return found

