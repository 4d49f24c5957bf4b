"""``sharedlvm-sim up --backend vm``: sharedlvm itself (sanlock with the watchdog, the
daemon, the CLI) running in three qemu guests on one LUN file.

One module, one boot (TCG guests are slow to start), tests in order:

1. the playground CLI: ``sim up --backend vm``, ``sim exec`` (domain create on host 1,
   attach on hosts 2 and 3, a volume created from host 3 through the manager on
   host 1), and bad input refused with one line and a non-zero exit;
2. the ``leases`` LV grown by the manager while other guests have it active (real
   device-mapper, a table of the old size): a guest that then takes a lease in the
   new slots reloads its table first, and sanlock holds the lease at that offset;
3. host power loss while host 1 is manager AND runs a devcount consumer that holds a
   volume lease (host 2 runs one waiting for the lease): the manager role and the
   lease move to surviving guests no earlier than sanlock allows and within the
   host-dead time x 1.05 + 10 s; host 2 carries on where host 1 stopped, then lets go.
   The counter record on the volume never shows two writers;
4. ``sim down`` kills every guest by pid and leaves no qemu behind.

Skipped, with the reason printed, when this machine cannot run qemu guests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from bed import inspect_lvm

from sharedlvm.command import Runner
from sharedlvm.leases import host_dead_seconds
from sharedlvm_testbed.vmbed import HostUnsupported, build_image, ensure_host_packages
from sharedlvm_testbed.vmbed.vmsim import LUN_DEVICE, VmSim

pytestmark = [pytest.mark.vm, pytest.mark.slow]

IO_TIMEOUT = 2  # host-dead time 8 x 2 + 60 = 76 s
DOMAIN = "vmdom"
STATE = "/run/devcount"
GiB = 1024**3
MiB = 1024**2
# The LUN has 4 KiB sectors: a lease slot is 8 MiB (sanlock's alignment for 2,000
# hosts), so the smallest leases LV (one 128 MiB extent) has 16 slots, and the next
# test fills them with a few volumes (it would take 127 on 512 B sectors).
SECTOR = 4096
SLOT = 8 * MiB
LEASES_SIZE = 128 * MiB


def _skip(reason: str) -> None:
    print(f"\nSKIP vm sim: {reason}", file=sys.stderr)
    pytest.skip(reason)


SHAREDLVM_SIM = [sys.executable, "-m", "sharedlvm_testbed"]  # ``sharedlvm-sim``


def sharedlvm_sim(*args: str, check: bool = True,
                  timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The real ``sharedlvm-sim`` command on the machine."""
    proc = subprocess.run([*SHAREDLVM_SIM, *args], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"sharedlvm-sim {' '.join(args)}: rc={proc.returncode} "
                             f"{proc.stderr.strip()}")
    return proc


def sim_exec(directory: Path, host: int, *argv: str,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    return sharedlvm_sim("exec", "--dir", str(directory), "--host", str(host), "--",
                         *argv, check=check)


@dataclass
class Bed:
    dir: Path
    boot_line: str
    volume: str = ""
    timeline: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    try:
        ensure_host_packages(Runner())
        build_image(Runner())
    except HostUnsupported as exc:
        _skip(f"cannot run qemu guests here: {exc}")
    directory = tmp_path_factory.mktemp("vmsim")
    up = sharedlvm_sim("up", "--backend", "vm", "--hosts", "3", "--dir", str(directory),
                       "--size", "8G", "--sector-size", str(SECTOR), check=False)
    if up.returncode != 0 and "qemu did not start" in up.stderr:
        _skip(up.stderr.strip())
    assert up.returncode == 0, up.stderr
    print(f"\n{up.stdout.splitlines()[0]}", file=sys.stderr)
    pids = [h["qemu_pid"] for h in json.loads((directory / "sim.json").read_text())["hosts"]]
    try:
        yield Bed(directory, up.stdout.splitlines()[0])
    finally:
        _save_guest_logs(directory)
        sharedlvm_sim("down", "--dir", str(directory), check=False)
        # Every qemu of the bed is gone, whatever happened above.
        leftovers = [pid for pid in pids if pid and _qemu_alive(pid, directory)]
        assert not leftovers, f"qemu pids left running: {leftovers}"


def _save_guest_logs(directory: Path) -> None:
    """Each running guest's daemon and sanlock logs, kept beside the bed for a
    post-mortem (the guests' files live in their RAM)."""
    for host in (1, 2, 3):
        proc = sim_exec(directory, host, "cat", "/host/daemon.log", "/var/log/sanlock.log",
                        "/run/devcount.log", check=False)
        (directory / f"host{host}-logs.txt").write_text(proc.stdout + proc.stderr)


def _qemu_alive(pid: int, directory: Path) -> bool:
    try:
        return str(directory).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


def test_cli_domain_and_volume_across_guests(bed: Bed) -> None:
    d = bed.dir
    # The smallest leases LV: the next test makes the manager grow it.
    sim_exec(d, 1, "sharedlvm", "domain", "create", "--name", DOMAIN, "--lun", LUN_DEVICE,
             "--host-id", "1", "--io-timeout", str(IO_TIMEOUT),
             "--leases-size", str(LEASES_SIZE))
    attaches = [subprocess.Popen(
        [*SHAREDLVM_SIM, "exec", "--dir", str(d), "--host", str(h),
         "--", "sharedlvm", "domain", "attach", DOMAIN, "--lun", LUN_DEVICE,
         "--host-id", str(h)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for h in (2, 3)]
    for proc in attaches:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    info = json.loads(sim_exec(d, 2, "sharedlvm", "domain", "info", "--domain", DOMAIN,
                               "--json").stdout)
    assert info["manager_host_id"] == 1
    # Host 3 asks; the manager's daemon in guest 1 does it (mailbox on the shared LUN).
    vol = json.loads(sim_exec(d, 3, "sharedlvm", "volume", "create", "--domain", DOMAIN,
                              "--size", "1G", "--json").stdout)
    bed.volume = vol["uuid"]
    assert vol["size"] == GiB

    # Bad input: one line, non-zero, nothing run.
    bad = sim_exec(d, 7, "true", check=False)
    assert bad.returncode != 0 and "invalid host 7" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = sharedlvm_sim("exec", "--dir", str(d / "nowhere"), "--host", "1", "--", "true",
                        check=False)
    assert bad.returncode != 0 and "no simulation" in bad.stderr


def _leases_size(host: int, directory: Path) -> int:
    """Size of host's device-mapper device of the ``leases`` LV, as its kernel has it."""
    return int(sim_exec(directory, host, "blockdev", "--getsize64",
                        f"/dev/mapper/{DOMAIN}-leases").stdout)


def test_leases_lv_grown_by_manager_is_reloaded_before_use(bed: Bed) -> None:
    d = bed.dir
    # Every guest's daemon has used slot 0 (the manager lease), so each has the
    # leases LV active with the size it had then.
    for host in (1, 2, 3):
        assert _leases_size(host, d) == LEASES_SIZE
    # Host 3 fills the free slots (slot 0: manager, slot 1: the first test's volume),
    # through the client library in one process (a python start costs seconds in TCG).
    free = LEASES_SIZE // SLOT - 2
    fill = ("from sharedlvm.client import Client\n"
            f"c = Client()\nfor _ in range({free}): c.create_volume({128 * MiB})\n")
    sim_exec(d, 3, "python3", "-c", fill)
    assert _leases_size(1, d) == LEASES_SIZE
    # One more volume: no free slot, the manager (host 1) grows the LV by 1 GiB; on
    # this LUN the growth is a second segment, after the volumes.
    vol = json.loads(sim_exec(d, 3, "sharedlvm", "volume", "create", "--domain", DOMAIN,
                              "--size", "64M", "--json").stdout)["uuid"]
    assert _leases_size(2, d) == LEASES_SIZE  # host 2's table still maps the old size
    table = sim_exec(d, 1, "dmsetup", "table", f"{DOMAIN}-leases").stdout
    assert len(table.strip().splitlines()) == 2, table  # two linear segments

    # Host 2 runs a consumer of the new volume: its lease lives in slot 16, past the
    # end of host 2's device. sanlock in the consumer reports the lease it holds.
    run = sim_exec(d, 2, "sharedlvm", "run", "--domain", DOMAIN, "--volume", vol, "--",
                   "sanlock", "client", "status")
    assert _leases_size(2, d) == LEASES_SIZE + GiB
    held = [line for line in run.stdout.splitlines() if f":{vol}:" in line]
    assert len(held) == 1, run.stdout
    # "r LOCKSPACE:RESOURCE:PATH:OFFSET:LVER p PID"
    where = held[0].split()[1].split(":")[2:4]
    assert where[0] in (f"/dev/{DOMAIN}/leases", f"/dev/mapper/{DOMAIN}-leases"), held
    assert int(where[1]) == LEASES_SIZE, held
    # On the disk, read with sanlock's direct read on the manager's host (host 3 has
    # not used the new slots, so its table still ends at 128 MiB): the lease leader of
    # slot 16 is the new volume's, last owned by host 2.
    assert _leases_size(3, d) == LEASES_SIZE
    info = json.loads(sim_exec(d, 1, "sharedlvm", "domain", "info", "--domain", DOMAIN,
                               "--json").stdout)
    lockspace = info["domain_uuid"].replace("-", "")
    leader = sim_exec(d, 1, "sanlock", "direct", "read_leader", "-r",
                      f"{lockspace}:{vol}:/dev/{DOMAIN}/leases:{LEASES_SIZE}").stdout
    fields = dict(line.split(" ", 1) for line in leader.splitlines() if " " in line)
    assert fields.get("owner_id") == "2", leader
    assert int(fields["lver"]) >= 1, leader


def _consumer(sim: VmSim, host: int, volume: str) -> int:
    return sim.spawn(host, ["sharedlvm", "run", "--wait", "900", "--domain", DOMAIN,
                            "--volume", volume, "--", "python3", "-m",
                            "sharedlvm_testbed.devcount", "{0}", "--host-id", str(host),
                            "--state", STATE, "--interval", "0.05"],
                     log_file="/run/devcount.log")


def _state(sim: VmSim, host: int) -> dict[str, str]:
    """The devcount state file of host's consumer ({} while it waits for the lease)."""
    result = sim.run(host, ["cat", STATE], check=False, timeout=30)
    if result.rc != 0:
        return {}
    state = {}
    for line in result.out.splitlines():
        if line.startswith("TWO WRITERS"):
            state["TWO WRITERS"] = line
        else:
            key, _, text = line.partition(" ")
            state[key] = text
    return state


def _wait(what: str, check: Callable[[], bool], timeout: float,
          interval: float = 1.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _is_manager(sim: VmSim, host: int, generation: int) -> bool:
    return _manager_line(sim, host, generation) is not None


def _manager_line(sim: VmSim, host: int, generation: int) -> str | None:
    text = f"is manager of {DOMAIN} at generation {generation}"
    result = sim.run(host, ["grep", "-h", text, "/host/daemon.log"], check=False,
                     timeout=30)
    return result.out.strip() or None


def _guest_clock_offset(sim: VmSim, host: int) -> float:
    """Guest wall clock minus the machine's, to ~0.3 s (one agent round trip)."""
    before = time.time()
    guest = float(sim.run(host, ["date", "+%s.%N"]).out)
    return guest - (before + time.time()) / 2


def _log_time(line: str) -> float:
    """Wall time of a daemon log line ("2026-11-22 14:48:58,784 INFO ...")."""
    stamp, millis = line[:23].split(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


def test_power_loss_moves_manager_and_lease_devcount_sees_one_writer(bed: Bed) -> None:
    assert bed.volume, "needs the volume of the first test"
    dead = host_dead_seconds(IO_TIMEOUT)
    early = dead - 2 * IO_TIMEOUT - 1.0  # the last renewal can precede the death
    late = dead * 1.05 + 10
    with VmSim.load(bed.dir) as sim:
        _consumer(sim, 1, bed.volume)
        _wait("host 1's consumer to count", lambda: int(_state(sim, 1).get("count", 0)) >= 20,
              180)
        pid2 = _consumer(sim, 2, bed.volume)
        time.sleep(8)  # long enough for host 2's consumer to start and be refused
        assert _state(sim, 2) == {}, "host 2 counts while host 1 holds the lease"
        host1_last = int(_state(sim, 1)["count"])

        offsets = {h: _guest_clock_offset(sim, h) for h in (2, 3)}
        sim.kill(1)  # power loss of the manager and lease holder
        lost, lost_wall = time.monotonic(), time.time()
        moved = _wait("host 2's consumer to take the lease",
                      lambda: bool(_state(sim, 2)), late + 30)
        _wait("a new manager", lambda: any(_is_manager(sim, h, 2) for h in (2, 3)),
              late + 30 - (moved - lost))
        new_manager = next(h for h in (2, 3) if _is_manager(sim, h, 2))
        line = _manager_line(sim, new_manager, 2)
        assert line is not None
        # From the new manager's own log: exact to the guest clock's offset.
        manager_after = _log_time(line) - offsets[new_manager] - lost_wall
        bed.timeline.update(lease=moved - lost, manager=manager_after)
        started = int(_state(sim, 2)["start"])
    print(f"\npower loss of host 1 (host-dead time {dead} s): host {new_manager} manager "
          f"after {manager_after:.1f} s (its log); host 2's consumer counting after "
          f"{moved - lost:.1f} s (polled, includes its python start)", file=sys.stderr)
    assert early <= manager_after <= late
    # The consumer is seen once devcount (python, ~4 s under TCG) wrote its state,
    # polled every ~1.5 s: allow that on top.
    assert early <= moved - lost <= late + 8
    # Host 2 starts where host 1 stopped: host 1 may have written a few more after
    # its count was last read, never fewer.
    assert started >= host1_last

    # Host 2 lets go (a clean release): its last count is the one on the disk. (A
    # restarted host that waits for a held lease and takes it over cleanly is tested
    # on the loop bed; here it cost 80 s of the suite's budget.)
    with VmSim.load(bed.dir) as sim:
        sim.run(2, ["kill", "-TERM", str(pid2)])
        _wait("host 2's consumer to stop", lambda: "stopped" in _state(sim, 2), 60)
        final = _state(sim, 2)
        assert "TWO WRITERS" not in final and "CORRUPT" not in final
    # On the disk: the counter record is the last writer's last value, and LVM
    # metadata is consistent, read by the machine itself.
    record = _counter_record(bed.dir / "lun0.img")
    assert record == (int(final["count"]), 2)
    _check_lvm(bed.dir / "lun0.img")


def _counter_record(lun: Path) -> tuple[int, int]:
    """(count, host id) of the one devcount record on the LUN file."""
    from sharedlvm_testbed import devcount

    found = []
    with lun.open("rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            for block in range(data - data % devcount.BLOCK, hole, devcount.BLOCK):
                head = os.pread(fd, devcount.BLOCK, block)
                if head.startswith(devcount.MAGIC):
                    record = devcount.Record.unpack(head)
                    assert record is not None
                    found.append((record.count, record.host_id))
            offset = hole
    assert len(found) == 1, f"expected one counter record, found {found}"
    return found[0]


def _check_lvm(lun: Path) -> None:
    runner = Runner()
    device = runner.run(["losetup", "--find", "--show", "--read-only", str(lun)]).out.strip()
    try:
        lvm = inspect_lvm([device], lun.parent)
        lvm.vgck(DOMAIN)
        names = {lv.name for lv in lvm.lvs(DOMAIN)}
        assert {"ids", "leases", "mailbox", "journal"} <= names
    finally:
        runner.run(["losetup", "--detach", device])
