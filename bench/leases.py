#!/usr/bin/env python3
"""Leases on real sanlock: acquire/release latency, clean handover, crash failover.

On a simulated 3-host bed (one sanlock daemon and one sharedlvm daemon per host,
io_timeout 1 s) it measures, in the same run:

- acquire and release of free volume leases through sharedlvm's lease layer (which
  finds the lease slot on the LUN), vs the bare sanlock binding call on the same
  lease (the baseline), p50/p95;
- a clean manager handover (`manager release` until another host is manager; target
  < 1 s);
- a manager failover after the manager host's sanlock and daemon are SIGKILLed, vs
  sanlock's host-dead time for the io_timeout (8 x io_timeout + 60 s); target ratio
  <= 1.05, plus 3 s.

Run as root: ``.venv/bin/python bench/leases.py [--rounds 50] [--no-failover]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchlib import pct  # first: it puts tests/ (the test bed) on the path

# isort: split
from bed import IO_TIMEOUT, Cluster, destroy_cluster, make_cluster

from sharedlvm import leases
from sharedlvm import volume as volume_mod
from sharedlvm.lease_layout import LeaseLayout


def lease_latency(cluster: Cluster, rounds: int) -> dict[str, list[float]]:
    host = cluster.hosts[1]
    manager = cluster.first
    vols = [manager.cli_json("volume", "create", "--size", "128M")["uuid"]
            for _ in range(rounds)]
    domain = host.domain()
    layout = LeaseLayout(domain)
    leases.use_run_dir(host.paths.sanlock_run_dir)
    fd = leases.register()
    infos = [volume_mod.get_volume(domain, v) for v in vols]
    times: dict[str, list[float]] = {"acquire": [], "release": [], "bare acquire": [],
                                     "bare release": []}
    for info in infos:
        start = time.perf_counter()
        layout.acquire_volume(info, shared=False, fd=fd)
        times["acquire"].append(time.perf_counter() - start)
        start = time.perf_counter()
        layout.release_volume(info, fd=fd)
        times["release"].append(time.perf_counter() - start)
    for info in infos:
        disk = layout.slot_disk(info.lease or 0)
        start = time.perf_counter()
        leases.acquire(layout.lockspace, info.uuid, [disk], shared=False, fd=fd)
        times["bare acquire"].append(time.perf_counter() - start)
        start = time.perf_counter()
        leases.release(layout.lockspace, info.uuid, [disk], fd=fd)
        times["bare release"].append(time.perf_counter() - start)
    return times


def handover(cluster: Cluster) -> float:
    old = cluster.manager()
    start = time.perf_counter()
    old.cli("manager", "release")
    while True:
        for h in cluster.hosts:
            if h is not old and h.status().get("manager"):
                return time.perf_counter() - start
        time.sleep(0.02)


def failover(cluster: Cluster) -> float:
    old = cluster.manager()
    start = time.monotonic()
    old.crash()
    while time.monotonic() - start < leases.host_dead_seconds(IO_TIMEOUT) + 120:
        for h in cluster.hosts:
            if h is not old and h.status().get("manager"):
                return time.monotonic() - start
        time.sleep(0.1)
    raise SystemExit("no failover")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--handovers", type=int, default=5)
    parser.add_argument("--no-failover", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sharedlvm-bench-") as tmp:
        cluster = make_cluster(Path(tmp) / "bed", hosts=3)
        try:
            times = lease_latency(cluster, args.rounds)
            print(f"sharedlvm leases on sanlock 3.8, io_timeout {IO_TIMEOUT} s, 3 simulated "
                  f"hosts, {args.rounds} free volume leases (ms)")
            print(f"{'operation':<10} {'sharedlvm p50':>14} {'p95':>8} {'bare sanlock p50':>17} "
                  f"{'p95':>8} {'ratio p50':>10}")
            for op in ("acquire", "release"):
                ours, bare = times[op], times[f"bare {op}"]
                print(f"{op:<10} {pct(ours, .5) * 1e3:>14.2f} {pct(ours, .95) * 1e3:>8.2f} "
                      f"{pct(bare, .5) * 1e3:>17.2f} {pct(bare, .95) * 1e3:>8.2f} "
                      f"{pct(ours, .5) / pct(bare, .5):>9.2f}x")
            handovers = []
            for i in range(args.handovers):
                if i:  # past the releasing hosts' hold-off, or only they could take it
                    time.sleep(11)
                handovers.append(handover(cluster))
            print()
            print(f"clean handover (manager release -> another host is manager), "
                  f"{args.handovers} times: p50 {pct(handovers, .5):.2f} s, "
                  f"max {max(handovers):.2f} s (target < 1 s)")
            if not args.no_failover:
                dead = leases.host_dead_seconds(IO_TIMEOUT)
                took = failover(cluster)
                print(f"crash failover: {took:.1f} s; sanlock host-dead time "
                      f"{dead} s (8 x {IO_TIMEOUT} + 60); ratio {took / dead:.3f} "
                      f"(target <= 1.05, + 3 s: {dead * 1.05 + 3:.1f} s)")
        finally:
            destroy_cluster(cluster)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
