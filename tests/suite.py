"""`make test`: the whole suite as two pytest runs side by side.

The VM bed's tests (tests/vm) spend most of their ~6 minutes waiting: guests booting
under TCG, sanlock's host-dead time inside the guests (84 s at io_timeout 3). The loop
bed's tests spend theirs waiting on sanlock and LVM on loop devices. Nothing is shared
between the two beds (the VM bed's LUN is a guest disk, not a loop device; its sanlock
daemons run in the guests), so they run at once, and the VM bed's output is printed
after the loop bed's. The loop bed's sanlock daemons run at real-time priority (their
default), so the guests' CPU cannot delay a lease renewal of a simulated host.

    python tests/suite.py [pytest options...]

Exits non-zero when either run fails (or collects nothing). Both pytest processes
die with this one (setpriv's parent-death signal) and are killed on SIGTERM/SIGINT.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--")


def main(argv: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", *argv]
    log_dir = ROOT / "build"
    log_dir.mkdir(exist_ok=True)
    vm_log = log_dir / "test-vm.log"
    children: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.kill()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    start = time.monotonic()
    with vm_log.open("wb") as out:
        vm = subprocess.Popen([*DIE_WITH_PARENT, *pytest, "tests/vm"], cwd=ROOT,
                              stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
        children.append(vm)
        print(f"VM bed tests (tests/vm) running alongside, output in {vm_log}", flush=True)
        loop = subprocess.Popen([*DIE_WITH_PARENT, *pytest, "tests", "--ignore=tests/vm"],
                                cwd=ROOT, stdin=subprocess.DEVNULL)
        children.append(loop)
        loop_rc = loop.wait()
        loop_done = time.monotonic() - start
        vm_rc = vm.wait()
    vm_done = time.monotonic() - start
    print(f"\n===== VM bed tests (tests/vm), run alongside: {vm_log} =====", flush=True)
    sys.stdout.buffer.write(vm_log.read_bytes())
    print(f"\nsuite: loop bed rc={loop_rc} in {loop_done:.0f} s, "
          f"VM bed rc={vm_rc} in {vm_done:.0f} s", flush=True)
    return 0 if loop_rc == 0 and vm_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
