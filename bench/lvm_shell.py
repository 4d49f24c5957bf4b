"""The manager's persistent lvm shell vs one lvm process per command (lvm_shell.py).

A scratch loop LUN, one VG of N LVs with sharedlvm's tags and LVM settings (the host's
private lvm.conf with use_aio = 0, backup and archive off), then 30 rounds of
lvcreate + lvremove through sharedlvm's Lvm, with and without the shell, interleaved
(ABBA) so that the machine's drift falls on both. Prints p50/p95 and the ratio.

    .venv/bin/python bench/lvm_shell.py [--lvs 50,500] [--rounds 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bed import scratch_lun

from sharedlvm.domain import LVM_CONF
from sharedlvm.lvm import Lvm

TAGS = ["sl.image=0b8a7c1e-1111-4111-8111-111111111111", "sl.parent=none", "sl.format=raw",
        "sl.alloc=preallocated", "sl.gen=3", "sl.lease=12", "sl.state=ready"]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def measure(directory: Path, lvs: int, rounds: int) -> dict[str, list[float]]:
    with scratch_lun(directory, 200 * 1024**3) as (dev, reader, _):
        (reader.config.system_dir / "lvm.conf").write_text(LVM_CONF)  # use_aio = 0
        config = dataclasses.replace(reader.config, writable=True)
        shell, process = Lvm(reader.runner, config, shell=True), Lvm(reader.runner, config)
        process.pvcreate([dev])
        process.vgcreate("benchvg", [dev], [])
        for i in range(lvs):
            shell.lvcreate("benchvg", f"fill{i}", 128 * 1024**2, TAGS)
        times: dict[str, list[float]] = {"shell": [], "process": []}
        for k in range(rounds):
            order = [("shell", shell), ("process", process)]
            for name, lvm in (order if k % 2 else order[::-1]):
                start = time.monotonic()
                lvm.lvcreate("benchvg", f"t{k}{name}", 128 * 1024**2, TAGS)
                times[name].append(time.monotonic() - start)
                start = time.monotonic()
                lvm.lvremove("benchvg", [f"t{k}{name}"])
                times[name].append(time.monotonic() - start)
        shell.close()
        return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lvs", default="50,500")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print(f"lvcreate + lvremove through sharedlvm's Lvm, {args.rounds} rounds each, "
          "interleaved; ms per command")
    print("| LVs in the VG | shell p50 | p95 | process p50 | p95 | shell / process p50 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for lvs in (int(x) for x in args.lvs.split(",")):
        tmp = Path(tempfile.mkdtemp(prefix="sharedlvm-shell-"))
        try:
            t = measure(tmp, lvs, args.rounds)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        s50, p50 = statistics.median(t["shell"]) * 1000, statistics.median(t["process"]) * 1000
        print(f"| {lvs:,} | {s50:.1f} | {pct(t['shell'], 0.95):.1f} | {p50:.1f} | "
              f"{pct(t['process'], 0.95):.1f} | {s50 / p50:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
