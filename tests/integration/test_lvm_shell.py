"""The manager's persistent ``lvm`` shell (lvm_shell.py) on a real loop LUN: results
and errors as a process would give them, what another process committed seen by the
next command, a hung shell killed at the timeout, a dead one replaced without
running a command twice, an idle one ending, and a shell dying with its daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bed import scratch_lun

from sharedlvm import errors
from sharedlvm.command import Runner
from sharedlvm.lvm import Lvm
from sharedlvm.lvm_shell import LvmShell, shell_safe

pytestmark = pytest.mark.integration

GiB = 1024**3
MiB = 1024**2
VG = "shellvg"
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def lun(tmp_path: Path) -> Iterator[tuple[str, Lvm, Lvm]]:
    with scratch_lun(tmp_path, 8 * GiB, keep_view=True, shell=True) as (dev, reader, writer):
        writer.pvcreate([dev])
        writer.vgcreate(VG, [dev], [])
        yield dev, reader, writer


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.05)


def test_commands_and_errors_as_a_process_gives_them(lun: tuple[str, Lvm, Lvm]) -> None:
    _, reader, lvm = lun
    lvm.lvcreate(VG, "a", 128 * MiB, ["sl.s=ready", "sl.f=raw"])
    pid = lvm.shell_pid
    assert pid is not None, "the write ran in no shell"
    lvm.lvextend(VG, "a", 256 * MiB)
    lvm.lvextend(VG, "a", 256 * MiB)  # LVM's "matches existing size": a no-op
    lvm.change_tags(VG, "a", add=["sl.s=removing"], delete=["sl.s=ready"])
    with pytest.raises(errors.AlreadyExists):
        lvm.lvcreate(VG, "a", 128 * MiB, [])
    with pytest.raises(errors.VolumeNotFound):
        lvm.lvextend(VG, "nosuch", 256 * MiB)
    with pytest.raises(errors.NoSpace):
        lvm.lvcreate(VG, "big", 64 * GiB, [])
    # The same shell answered every one, failures included.
    assert lvm.shell_pid == pid
    # What is on the disk, read by a separate LVM process.
    (a,) = (lv for lv in reader.lvs(VG) if lv.name == "a")
    assert a.size == 256 * MiB and set(a.tags) == {"sl.s=removing", "sl.f=raw"}
    # The view the shell's commands kept is what LVM has.
    mine, theirs = lvm.volume_lv(VG, "a"), reader.volume_lv(VG, "a")
    assert mine is not None and theirs is not None
    assert (mine.size, set(mine.tags)) == (theirs.size, set(theirs.tags))
    # A selection without white space runs in the shell; "removed" names come back.
    assert lvm.lvremove_selected(VG, "lv_name=a&&(lv_tags={sl.s=removing}||lv_tags={x})") \
        == ["a"]
    assert lvm.shell_pid == pid
    assert [lv.name for lv in reader.lvs(VG)] == []


def test_unsafe_arguments_run_as_a_process(lun: tuple[str, Lvm, Lvm]) -> None:
    _, reader, lvm = lun
    assert not shell_safe(["lvremove", "--select", "lv_name=a && lv_size>0"])
    assert not shell_safe(["lvcreate", "#x"]) and not shell_safe([""])
    lvm.lvcreate(VG, "a", 128 * MiB, [])
    assert lvm.lvremove_selected(VG, "lv_name=a && lv_size>0") == ["a"]
    assert reader.lvs(VG) == []


def test_another_process_commit_is_seen_by_the_next_command(
        lun: tuple[str, Lvm, Lvm]) -> None:
    dev, reader, lvm = lun
    lvm.lvcreate(VG, "mine", 128 * MiB, [])
    before = reader.vg(VG).seqno
    # Another LVM process commits between two of the shell's commands.
    other = Lvm(reader.runner, lvm.config)
    other.lvcreate(VG, "theirs", 128 * MiB, [])
    assert reader.vg(VG).seqno == before + 1
    # The shell does not write from metadata it read before: it sees "theirs".
    with pytest.raises(errors.AlreadyExists):
        lvm.lvcreate(VG, "theirs", 128 * MiB, [])
    lvm.lvcreate(VG, "next", 128 * MiB, [])
    assert reader.vg(VG).seqno == before + 2
    assert sorted(lv.name for lv in reader.lvs(VG)) == ["mine", "next", "theirs"]
    Runner().run(["lvm", "vgck", "--config", reader.config.text(), VG],
                 env={"LVM_SYSTEM_DIR": str(reader.config.system_dir)})


def test_a_hung_shell_is_killed_at_the_timeout(lun: tuple[str, Lvm, Lvm]) -> None:
    _, reader, lvm = lun
    lvm.lvcreate(VG, "a", 128 * MiB, [])
    pid = lvm.shell_pid
    assert pid is not None
    lvm.write_timeout = 1.0
    os.kill(pid, signal.SIGSTOP)  # a shell stuck on a dead path
    started = time.monotonic()
    with pytest.raises(errors.CommandTimeout):
        lvm.lvcreate(VG, "b", 128 * MiB, [])
    assert time.monotonic() - started < 10
    os.kill(pid, signal.SIGCONT)
    _wait_gone(pid)  # killed, never to wake up and commit
    assert [lv.name for lv in reader.lvs(VG)] == ["a"]
    # The next command gets a new shell.
    lvm.write_timeout = 60.0
    lvm.lvcreate(VG, "c", 128 * MiB, [])
    assert lvm.shell_pid not in (None, pid)
    assert sorted(lv.name for lv in reader.lvs(VG)) == ["a", "c"]


def test_a_dead_idle_shell_is_replaced_and_nothing_runs_twice(
        lun: tuple[str, Lvm, Lvm]) -> None:
    _, reader, lvm = lun
    lvm.lvcreate(VG, "a", 128 * MiB, [])
    pid = lvm.shell_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    seqno = reader.vg(VG).seqno
    lvm.lvcreate(VG, "b", 128 * MiB, [])  # no AlreadyExists: it ran once
    assert reader.vg(VG).seqno == seqno + 1
    assert lvm.shell_pid not in (None, pid)


def test_a_shell_killed_during_a_command_fails_it_and_drops_the_view(
        lun: tuple[str, Lvm, Lvm]) -> None:
    _, reader, lvm = lun
    lvm.lvcreate(VG, "a", 128 * MiB, [])
    assert lvm.volume_lv(VG, "a") is not None  # the view is loaded
    pid = lvm.shell_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    killer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal, time
        time.sleep(0.5)
        os.kill({pid}, signal.SIGKILL)
    """)])
    try:
        with pytest.raises(errors.LvmError, match="lvm shell ended"):
            lvm.lvcreate(VG, "b", 128 * MiB, [])
    finally:
        killer.wait(timeout=30)
    # The view was dropped: read again from LVM, it is what is on the disk.
    assert lvm._views is not None and VG not in lvm._views
    assert sorted(lv.name for lv in lvm.volume_lvs(VG)) == \
        sorted(lv.name for lv in reader.lvs(VG))


def test_an_idle_shell_ends(tmp_path: Path) -> None:
    with scratch_lun(tmp_path, 2 * GiB) as (_, reader, _):
        shell = LvmShell(Runner(), reader.config.system_dir,
                         reader.config.text(), {"LVM_SUPPRESS_FD_WARNINGS": "1"}, idle=1.0)
        out = shell.run(["pvs", "-o", "pv_name"], timeout=60)
        assert json.loads(out.out) == {"report": [{"pv": []}]}  # a fresh LUN: no PV
        pid = shell.pid
        assert pid is not None
        _wait_gone(pid, timeout=15)
        assert shell.pid is None
        # ... and the next command starts another.
        shell.run(["pvs"], timeout=60)
        assert shell.pid not in (None, pid)
        shell.close()


def test_the_shell_dies_with_its_daemon(tmp_path: Path) -> None:
    with scratch_lun(tmp_path, 2 * GiB) as (_, reader, _):
        script = textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from sharedlvm.command import Runner
            from sharedlvm.lvm_shell import LvmShell
            shell = LvmShell(Runner(), Path({str(reader.config.system_dir)!r}),
                             {reader.config.text()!r}, {{}})
            shell.run(["pvs"], timeout=60)
            print(shell.pid, flush=True)
            time.sleep(600)
        """)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                text=True, env=dict(os.environ, PYTHONPATH=str(SRC)))
        try:
            assert proc.stdout is not None
            pid = int(proc.stdout.readline())
            assert _alive(pid)
            proc.kill()  # the daemon dies, with no chance to clean up
            proc.wait(timeout=30)
            _wait_gone(pid)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
