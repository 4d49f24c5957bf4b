#!/usr/bin/env python3
"""Latency of sharedlvm's metadata operations vs bare LVM, on the manager.

For each population (volumes already in the domain) it times, in the same run and on
the same LUN, K rounds of:

- sharedlvm create / extend (to an absolute size) / delete: a request to the manager
  host's daemon over its socket, as the CLI sends it (Python start-up of the CLI is
  not counted);
- bare ``lvcreate`` / ``lvextend`` / ``lvremove`` with the very same ``--config``.

and prints p50/p95 with the ratio sharedlvm / bare. It also prints the LVM metadata
size per volume, measured with ``vgcfgbackup``, projected to 10,000 volumes.

Run as root: ``.venv/bin/python bench/metadata_ops.py [--rounds 20] [--counts 100,1000]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchlib import pct  # first: it puts tests/ (the test bed) on the path

# isort: split
from bed import Cluster, GiB, destroy_cluster, make_cluster

from sharedlvm import tags
from sharedlvm.command import Runner
from sharedlvm.domain import make_lvm
from sharedlvm.lvm import Lvm

EXTENT = 128 * 1024 * 1024


class Stopwatch:
    """``with watch("op"): ...`` appends the block's wall time to that op's list."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    @contextmanager
    def __call__(self, op: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.times.setdefault(op, []).append(time.perf_counter() - start)



def populate(cluster: Cluster, lvm: Lvm, count: int) -> None:
    """Set-up only: fill the domain to ``count`` volumes with bare lvcreate (what the
    daemon would commit, minus the lease), 1,000 daemon round trips being slow."""
    have = len(cluster.first.cli_json("volume", "list"))
    for _ in range(have, count):
        lvm.lvcreate(cluster.name, str(uuid.uuid4()), EXTENT, [
            tags.make_tag("image", str(uuid.uuid4())), tags.make_tag("parent", "none"),
            tags.make_tag("format", "raw"), tags.make_tag("alloc", "preallocated"),
            tags.make_tag("gen", "1"), tags.make_tag("state", "ready"),
            tags.make_user_tag("vm", "bench-vm-0001")])


def metadata_bytes(lvm: Lvm, vg_name: str, directory: Path) -> int:
    backup = directory / "vg.backup"
    lvm.run("vgcfgbackup", "--file", str(backup), vg_name)
    return backup.stat().st_size


def measure(cluster: Cluster, lvm: Lvm, rounds: int) -> tuple[Stopwatch, Stopwatch]:
    """sharedlvm: a request to the manager's daemon over its socket (the daemon holds
    the manager lease, allocates and initializes a volume lease, commits, answers).
    bare: the LVM command alone, with the same --config."""
    host, vg = cluster.first, cluster.name
    ours, bare = Stopwatch(), Stopwatch()
    for _ in range(rounds):
        with ours("create"):
            vol = host.client.create_volume(EXTENT, domain=vg).uuid
        with ours("extend"):
            host.client.extend_volume(vol, str(2 * EXTENT), domain=vg)
        with ours("delete"):
            host.client.delete_volume(vol, domain=vg)
        name = str(uuid.uuid4())
        bare_tags = [tags.make_tag("image", str(uuid.uuid4())), tags.make_tag("parent", "none"),
                     tags.make_tag("format", "raw"), tags.make_tag("alloc", "preallocated"),
                     tags.make_tag("gen", "1"), tags.make_tag("state", "ready"),
                     tags.make_tag("lease", "1")]
        with bare("create"):
            lvm.lvcreate(vg, name, EXTENT, bare_tags)
        with bare("extend"):
            lvm.lvextend(vg, name, 2 * EXTENT)
        with bare("delete"):
            lvm.lvremove(vg, [name])
    return ours, bare


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--counts", default="100,1000")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    with tempfile.TemporaryDirectory(prefix="sharedlvm-bench-") as tmp:
        cluster = make_cluster(Path(tmp) / "bed", hosts=1, size=max(counts) * EXTENT
                               + 64 * GiB)
        try:
            lvm = make_lvm(cluster.first.paths, Runner(), cluster.luns, writable=True)
            print(f"sharedlvm metadata operations vs bare LVM, {args.rounds} rounds each, "
                  f"times in ms (request to the manager's daemon vs the bare LVM command, "
                  f"loop-device LUN)")
            header = (f"{'volumes':>8} {'op':<7} {'sharedlvm p50':>14} {'p95':>8} "
                      f"{'bare lvm p50':>13} {'p95':>8} {'ratio p50':>10} {'ratio p95':>10}")
            print(header)
            print("-" * len(header))
            per_volume = 0.0
            for count in counts:
                populate(cluster, lvm, count)
                base = metadata_bytes(lvm, cluster.name, Path(tmp))
                watch_ours, watch_bare = measure(cluster, lvm, args.rounds)
                for op, ours in watch_ours.times.items():
                    bare = watch_bare.times[op]
                    o50, o95 = pct(ours, 0.5) * 1000, pct(ours, 0.95) * 1000
                    b50, b95 = pct(bare, 0.5) * 1000, pct(bare, 0.95) * 1000
                    print(f"{count:>8} {op:<7} {o50:>14.1f} {o95:>8.1f} {b50:>13.1f} "
                          f"{b95:>8.1f} {o50 / b50:>9.2f}x {o95 / b95:>9.2f}x")
                per_volume = base / max(count, 1)
            mda = lvm.vg(cluster.name).mda_size
            print()
            print(f"LVM metadata text: {per_volume:.0f} bytes per volume (with tags); "
                  f"10,000 volumes = {per_volume * 10000 / 2**20:.1f} MiB; "
                  f"metadata area = {mda / 2**20:.0f} MiB "
                  f"(LVM needs room for 2 copies while committing)")
        finally:
            destroy_cluster(cluster)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
