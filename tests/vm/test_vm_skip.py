"""Where this machine cannot run qemu guests, the vm tests are skipped with the reason
printed, never silently: run one vm module with qemu (and apt-get, which would
install it) off PATH and read what pytest says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_vm_tests_without_qemu_are_skipped_with_the_reason_printed() -> None:
    # /usr/bin holds qemu-system-x86_64 and apt-get; /usr/sbin and /sbin what else
    # the fixtures might reach for.
    env = dict(os.environ, PATH="/usr/sbin:/sbin")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-rs", "-p", "no:cacheprovider",
         str(HERE / "test_vm_refresh.py")],
        env=env, capture_output=True, text=True, timeout=300, cwd=HERE.parents[1])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "3 skipped" in out and "passed" not in out and "failed" not in out, out  # all
    # Printed as it happens (stderr) and in pytest's summary, with the reason.
    assert "SKIP vm refresh: qemu-system-x86_64 is missing and there is no apt-get" in out, out
    assert "SKIPPED" in out and "no apt-get" in out, out
