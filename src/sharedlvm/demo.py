"""``make demo``: the main job on an embedded default, printing what happens.

A sparse-file LUN on a loop device, three simulated hosts (one ``SHAREDLVM_ROOT``
each), real LVM: host 1 formats a domain, hosts 2 and 3 attach it; volumes are
created, extended and deleted on the writer; a reader's attempt to write metadata is
refused twice (by sharedlvm and by LVM itself); data written on host 1 is read on
host 3. Everything is removed at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import errors
from .command import Runner
from .domain import make_lvm
from .paths import ROOT_ENV, HostPaths
from .sim import sim_down, sim_up
from .units import GiB

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def sharedlvm(root: Path, *args: str, expect_fail: bool = False) -> str:
    host = root.name
    print(f"{DIM}[{host}]{RESET} $ sharedlvm {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "sharedlvm", *args], capture_output=True,
                          text=True, env=dict(os.environ, **{ROOT_ENV: str(root)}), timeout=300)
    out = proc.stdout + proc.stderr
    for line in out.rstrip().splitlines():
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
        say("A 20 GiB sparse file as the shared LUN, and 3 simulated hosts")
        bed = sim_up(runner, directory, hosts=3, size=20 * GiB)
        try:
            run_story(bed.hosts, bed.luns[0].device)
        finally:
            say("Cleaning up: detaching loop devices, removing the LUN file")
            sim_down(runner, directory)
            print("    done")
    return 0


def run_story(hosts: list[Path], lun: str) -> None:
    h1, h2, h3 = hosts
    print(f"    LUN: {lun}; hosts: " + ", ".join(f"{h.name} (SHAREDLVM_ROOT={h})" for h in hosts))

    say("host1 formats the domain and becomes its metadata writer")
    sharedlvm(h1, "domain", "create", "--name", "demo", "--lun", lun, "--host-id", "1")

    say("host2 and host3 attach it: they verify the domain record and get read-only LVM")
    sharedlvm(h2, "domain", "attach", "demo", "--lun", lun, "--host-id", "2")
    sharedlvm(h3, "domain", "attach", "demo", "--lun", lun, "--host-id", "3")

    say("The writer creates volumes: metadata lives in LV tags, one LVM commit each")
    raw = json.loads(sharedlvm(h1, "volume", "create", "--size", "2G", "--tag", "vm=web-1",
                               "--json"))["uuid"]
    sharedlvm(h1, "volume", "create", "--size", "10G", "--format", "qcow2", "--tag", "vm=db-1")
    ordered = json.loads(sharedlvm(h1, "volume", "create", "--size", "1G", "--request-id",
                                   "order-42", "--json"))["uuid"]
    print("    (the same request again returns the first answer and creates nothing:)")
    sharedlvm(h1, "volume", "create", "--size", "1G", "--request-id", "order-42")

    say("Every host sees the same volumes")
    sharedlvm(h3, "volume", "list")

    say("A reader host may not change metadata: sharedlvm refuses ...")
    sharedlvm(h2, "volume", "create", "--size", "1G", expect_fail=True)
    print("    ... and so does LVM itself, called directly with host2's configuration:")
    lvm = make_lvm(HostPaths(h2), Runner(), [lun], writable=False)
    try:
        lvm.lvcreate("demo", "sneaky", GiB, [])
        raise SystemExit("demo: LVM accepted a write on a reader host")
    except errors.ReadOnlyDenied as exc:
        print(f"    lvcreate on host2: {exc}")

    say("Data written on host1 is read on host3 through its own mapping of the LV")
    p1 = sharedlvm(h1, "volume", "path", raw).strip()
    p3 = sharedlvm(h3, "volume", "path", raw).strip()
    message = b"hello from host1, written at offset 1 MiB".ljust(4096, b"\0")
    fd = os.open(p1, os.O_WRONLY)
    try:
        os.pwrite(fd, message, 1024 * 1024)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(p3, "rb") as f:
        f.seek(1024 * 1024)
        seen = f.read(4096).rstrip(b"\0").decode()
    print(f"    host3 reads: {seen!r}")
    sharedlvm(h1, "volume", "deactivate", raw)
    sharedlvm(h3, "volume", "deactivate", raw)

    say("The writer extends and deletes (--wipe zeroes the data first)")
    sharedlvm(h1, "volume", "extend", raw, "--size", "+1G")
    sharedlvm(h1, "volume", "delete", ordered, "--wipe")
    sharedlvm(h1, "volume", "delete", raw)

    say("Domain info, as a reader sees it")
    sharedlvm(h2, "domain", "info")

    say("Removing the domain: readers detach, the writer removes it")
    sharedlvm(h2, "domain", "detach")
    sharedlvm(h3, "domain", "detach")
    sharedlvm(h1, "domain", "remove", expect_fail=True)
    sharedlvm(h1, "domain", "remove", "--force")


if __name__ == "__main__":
    raise SystemExit(main())
