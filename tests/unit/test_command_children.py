"""Children of the runner die with the process that runs them (issue 9, item 3):
an `lvm` left behind by a killed manager daemon could commit after another host
became manager."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_command_dies_with_the_process_that_runs_it() -> None:
    # The command runs from a thread, as in the daemon.
    code = ("import threading, time\n"
            "from sharedlvm.command import Runner\n"
            "threading.Thread(target=Runner().run, args=(['sleep', '300'],)).start()\n"
            "time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while True:  # setpriv execs the command: wait until it has
            children = _children(parent.pid)
            if children and Path(f"/proc/{children[0]}/comm").read_text().strip() == "sleep":
                break
            assert time.monotonic() < deadline, "the command did not start"
            time.sleep(0.05)
        (child,) = children
        os.kill(parent.pid, signal.SIGKILL)  # the daemon dies: OOM, crash, kill -9
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(child):
            assert time.monotonic() < deadline, f"the command {child} outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()


def test_a_missing_command_is_still_a_one_line_error() -> None:
    import pytest

    from sharedlvm import errors
    from sharedlvm.command import Runner

    with pytest.raises(errors.CommandError) as info:
        Runner().run(["no-such-command-here"])
    assert info.value.rc == 127 and "command not found" in str(info.value)
