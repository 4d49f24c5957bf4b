#!/usr/bin/env python3
"""What a volume's tags cost each LVM command of its shard: fold or drop them?

Every LVM command parses the text of every LV in its VG, tags included. This measures,
in one run, `lvcreate` + `lvremove` of one LV in VGs of the same number of LVs (a
full shard: ``SHARD_VOLUMES``), sharedlvm's settings, whose LVs carry:

- ``sharedlvm``: the tags the manager writes today (7 per raw volume);
- ``defaults dropped``: the same without the two whose value is the default of a raw
  volume (``sl.parent=none``, ``sl.alloc=preallocated``): 5;
- ``folded``: the same facts in 2 tags (``sl.image=UUID`` and one
  ``sl.v=FORMAT:ALLOC:STATE:GEN:LEASE``);
- ``none``: no tags at all (the floor).

The VGs are filled with one ``vgcfgrestore`` each (bench/scale.py ``fill_vg``); the
rounds are interleaved across the VGs, so the machine's noise falls on all alike.
Run as root: ``.venv/bin/python bench/tags.py [--lvs 500] [--rounds 30]`` (~2 minutes).
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from benchlib import pct  # first: it puts tests/ (the test bed) on the path
from scale import EXTENT, Loops, fill_vg, make_bare_vg, sharedlvm_lvm, volume_tags

from sharedlvm.shards import SHARD_VOLUMES


def dropped_tags() -> list[str]:
    return [t for t in volume_tags() if t not in ("sl.parent=none", "sl.alloc=preallocated")]


def folded_tags() -> list[str]:
    facts = dict(t.split("=", 1) for t in volume_tags())
    return [f"sl.image={facts['sl.image']}",
            "sl.v=" + ":".join(facts[k] for k in ("sl.format", "sl.alloc", "sl.state",
                                                   "sl.gen", "sl.lease"))]


VARIANTS: list[tuple[str, Callable[[], list[str]]]] = [
    ("sharedlvm", volume_tags), ("defaults dropped", dropped_tags),
    ("folded", folded_tags), ("none", list)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lvs", type=int, default=SHARD_VOLUMES)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="sharedlvm-tags-"))
    loops = Loops()
    try:
        vgs = []
        for index, (label, make) in enumerate(VARIANTS):
            device = loops.attach(tmp / f"lun{index}.img", (args.lvs + 40) * EXTENT)
            lvm = sharedlvm_lvm(tmp / "root", device)()
            vg = f"sltags{index}x{random.randrange(10**6)}"
            make_bare_vg(lvm, vg, device, make)
            fill_vg(lvm, vg, args.lvs, tmp, make)
            text = sum(len(t) + 3 for t in make())
            vgs.append((label, make, lvm, vg, text))
        times: dict[str, list[float]] = {label: [] for label, *_ in vgs}
        for _ in range(args.rounds):
            for label, make, lvm, vg, _text in vgs:
                name = str(uuid.uuid4())
                start = time.perf_counter()
                lvm.lvcreate(vg, name, EXTENT, make())
                lvm.lvremove(vg, [name])
                times[label].append((time.perf_counter() - start) / 2)
        base = pct(times["sharedlvm"], 0.5)
        print(f"One LVM command (lvcreate/lvremove, mean of the pair) in a VG of "
              f"{args.lvs} LVs, p50 of {args.rounds} rounds\n")
        print("| tags | tag text per LV | p50 ms | p95 ms | vs sharedlvm |")
        print("|---|---:|---:|---:|---:|")
        for label, make, _lvm, _vg, text in vgs:
            p50, p95 = pct(times[label], 0.5), pct(times[label], 0.95)
            print(f"| {label} ({len(make())}) | {text} B | {p50 * 1000:.1f} | "
                  f"{p95 * 1000:.1f} | {p50 / base:.2f}x |")
        for _label, _make, lvm, vg, _text in vgs:
            lvm.vgremove(vg)
    finally:
        loops.detach_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
