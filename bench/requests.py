#!/usr/bin/env python3
"""Requests from any host: latency through the storage mailbox, and its idle I/O.

On a simulated 3-host bed (sanlock + sharedlvm daemon per host) it measures in the
same run:

- p50/p95 of a volume create asked on a host that is not manager (its daemon writes
  the request to its outbox, the manager polls, executes, replies in the inbox), of
  the same create asked on the manager host itself, and of a bare ``lvcreate`` on the
  manager with the same --config (the baseline); target: non-manager <= 1.3x bare;
- the manager's idle mailbox read I/O (its own counter, over an idle window that
  starts once no host has asked for `mailbox_hot` seconds), per live host and
  projected to 250 live host ids; target <= 64 KiB/s (vdsm's mailbox reads about
  500 KiB/s).

Run as root: ``.venv/bin/python bench/requests.py [--rounds 30] [--idle 10]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from benchlib import pct  # first: it puts tests/ (the test bed) on the path

# isort: split
from bed import Cluster, destroy_cluster, make_cluster

from sharedlvm import tags
from sharedlvm.command import Runner
from sharedlvm.daemon import DaemonConfig
from sharedlvm.domain import make_lvm

SIZE = 128 * 1024 * 1024



def mailbox_bytes(cluster: Cluster) -> int:
    text = cluster.first.client.metrics()
    for line in text.splitlines():
        if line.startswith("sharedlvm_mailbox_read_bytes_total{") and 'host_id="1"' in line:
            return int(float(line.split()[-1]))
    raise SystemExit("no mailbox counter")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sharedlvm-bench-") as tmp:
        c = make_cluster(Path(tmp) / "bed", hosts=3)
        try:
            manager, other = c.first, c.hosts[2]
            lvm = make_lvm(manager.paths, Runner(), c.luns, writable=True)
            times: dict[str, list[float]] = {"asked on a non-manager host": [],
                                             "asked on the manager host": [],
                                             "bare lvcreate on the manager": []}
            for _ in range(args.rounds):
                start = time.perf_counter()
                other.client.create_volume(SIZE, domain=c.name)
                times["asked on a non-manager host"].append(time.perf_counter() - start)
                start = time.perf_counter()
                manager.client.create_volume(SIZE, domain=c.name)
                times["asked on the manager host"].append(time.perf_counter() - start)
                start = time.perf_counter()
                lvm.lvcreate(c.name, str(uuid.uuid4()), SIZE,
                             [tags.make_tag("image", str(uuid.uuid4())),
                              tags.make_tag("state", "ready"), tags.make_tag("lease", "1")])
                times["bare lvcreate on the manager"].append(time.perf_counter() - start)
            bare = pct(times["bare lvcreate on the manager"], 0.5)
            print(f"volume create, {args.rounds} rounds, 3 simulated hosts (ms)")
            print(f"{'':<30} {'p50':>8} {'p95':>8} {'p50 / bare':>11}")
            for name, values in times.items():
                print(f"{name:<30} {pct(values, .5) * 1e3:>8.1f} {pct(values, .95) * 1e3:>8.1f} "
                      f"{pct(values, .5) / bare:>10.2f}x")
            # idle: once the hosts that asked are no longer "hot" (mailbox_hot)
            time.sleep(DaemonConfig().mailbox_hot + 1)
            before = mailbox_bytes(c)
            time.sleep(args.idle)
            rate = (mailbox_bytes(c) - before) / args.idle
            live = len(c.hosts)
            print()
            print(f"idle mailbox reads by the manager: {rate / 1024:.1f} KiB/s with {live} live "
                  f"hosts ({rate / live / 1024:.1f} KiB/s per live host); projected for 250 "
                  f"live host ids: {rate / live * 250 / 1024:.0f} KiB/s "
                  f"(target 64 KiB/s; vdsm about 500 KiB/s)")
        finally:
            destroy_cluster(c)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
