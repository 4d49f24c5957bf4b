"""Images and copies (issue 10) against dd, bare qemu-img and bare lvcreate, measured
in the same run.

A 2-host loop bed (a sparse-file LUN). Every sharedlvm operation is asked on host 2,
which is not manager (requests go through the storage mailbox; copies run on host 2).

- Full clone of a 4 GiB raw volume 10% and 100% full (random data), into a raw
  volume, against ``dd bs=1M oflag=direct`` of the whole device and a bare
  ``qemu-img convert -n -W -T none -t none``, both between the same devices: the
  source volume and another raw volume of the same domain (targets: >= 5x dd on the
  10%-full disk, >= 0.9x bare qemu-img).
- Snapshot and linked-clone latency against one bare ``lvcreate`` with a volume's
  tags, by an LVM process with sharedlvm's settings (this kernel has no
  device-mapper: LVM needs them to run at all) on a scratch loop LUN (target <= 1.5x).
- Merge of a snapshot holding 1 GiB of data, against a bare ``qemu-img commit`` of
  the same shape between loop devices.

Baselines on the source device run inside a ``sharedlvm run`` consumer and are timed
there: they pay no lease or activation. Medians; ratio = baseline / sharedlvm for
speeds (higher is better), sharedlvm / baseline for latencies (lower is better).

    .venv/bin/python bench/images.py [--rounds 3] [--latency-rounds 10]

Run on an idle machine; takes about 8 minutes and 20 GB of free space in /tmp.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bed import destroy_cluster, make_cluster, scratch_lun

from sharedlvm.domain import LVM_CONF
from sharedlvm.lvm import Lvm

MiB = 1024**2
GiB = 1024**3
SIZE = 4 * GiB
TAGS = ["sl.image=0b8a7c1e-1111-4111-8111-111111111111", "sl.parent=none",
        "sl.format=qcow2", "sl.alloc=thin", "sl.gen=3", "sl.lease=12", "sl.state=ready"]


class Stopwatch:
    seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self._start


def run(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout


@contextmanager
def loop_device(directory: Path, name: str, size: int) -> Iterator[str]:
    """A bare device: a loop device on a sparse file, like the bed's LUN."""
    path = directory / name
    with open(path, "wb") as f:
        f.truncate(size)
    dev = run("losetup", "--find", "--show", str(path)).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)
        path.unlink()


FILL = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
percent = int(sys.argv[2])
chunk = 4 << 20
size = os.lseek(fd, 0, os.SEEK_END)
step = chunk * 100 // percent
for offset in range(0, size, step):
    os.pwrite(fd, os.urandom(chunk), offset)
os.fsync(fd)
"""

TIMED = """
import subprocess, sys, time
argv = [a.replace("@SRC@", sys.argv[1]).replace("@DST@", sys.argv[2]) for a in sys.argv[3:]]
start = time.monotonic()
subprocess.run(argv, check=True, capture_output=True)
print(time.monotonic() - start)
"""


def timed_on(host: Any, volume: str, target: str, argv: list[str]) -> float:
    """``argv`` inside one consumer holding ``volume`` read-only (@SRC@, its device)
    and ``target`` (@DST@), timed there: no lease or activation in the figure."""
    out = host.cli("run", "--volume", f"{volume}:ro", "--volume", target, "--",
                   sys.executable, "-c", TIMED, "{0}", "{1}", *argv).stdout
    return float(out.strip().splitlines()[-1])


def extents(c: Any, volume: str) -> str:
    """Where a volume's LV lies on the LUN (its PV and first extent)."""
    return next(lv.devices for vg in c.raw_lvm().vgs() for lv in c.raw_lvm().lvs(vg.name)
                if lv.name == volume)


def full_clones(c: Any, rounds: int, rows: list[list[str]]) -> None:
    """Each round writes one region of the LUN three ways: the baselines into a raw
    volume, then (that volume deleted) the clone into the same extents. A region's
    cost depends on its history (on a sparse file the first write allocates blocks,
    and qemu-img's zeroing of a raw target turns them back into unwritten extents that
    the next O_DIRECT write converts: dd of the same 4 GiB took 5 s or 14 s by what
    ran before it), so each timed run follows an untimed run of the same kind, and
    the clone follows the baseline convert, which leaves what a clone leaves."""
    h2 = c.hosts[1]
    for percent in (10, 100):
        src = h2.client.create_volume(SIZE)
        h2.cli("run", "--volume", src.uuid, "--", sys.executable, "-c", FILL, "{0}",
               str(percent))
        ours, dd, bare = [], [], []
        for _ in range(rounds):
            dst = h2.client.create_volume(SIZE)
            dd_argv = ["dd", "if=@SRC@", "of=@DST@", "bs=1M", "oflag=direct",
                       "iflag=direct"]
            convert_argv = ["qemu-img", "convert", "-T", "none", "-t", "none", "-n", "-W",
                            "-f", "raw", "-O", "raw", "@SRC@", "@DST@"]
            for argv, times in ((dd_argv, dd), (convert_argv, bare)):
                timed_on(h2, src.uuid, dst.uuid, argv)  # the same run before: untimed
                times.append(timed_on(h2, src.uuid, dst.uuid, argv))
            where = extents(c, dst.uuid)
            h2.client.delete_volume(dst.uuid)
            with Stopwatch() as watch:
                clone = h2.client.clone_volume(src.uuid, linked=False)
            ours.append(watch.seconds)
            if extents(c, clone.uuid) != where:
                raise SystemExit(f"the clone was not made where the baselines wrote "
                                 f"({extents(c, clone.uuid)}, not {where})")
            h2.client.delete_volume(clone.uuid)
        h2.client.delete_volume(src.uuid)
        a, d, b = (statistics.median(x) for x in (ours, dd, bare))
        rows.append([f"full clone, 4 GiB raw {percent}% full", f"{a:.2f} s",
                     f"dd {d:.2f} s", f"{d / a:.2f}x dd",
                     "target >= 5x" if percent == 10 else ""])
        rows.append([f"full clone, 4 GiB raw {percent}% full", f"{a:.2f} s",
                     f"qemu-img convert {b:.2f} s", f"{b / a:.2f}x bare",
                     "target >= 0.9x"])


def latencies(c: Any, work: Path, rounds: int, rows: list[list[str]]) -> None:
    h2 = c.hosts[1]
    base = h2.client.create_volume(SIZE, format="qcow2")
    snap: list[float] = []
    linked: list[float] = []
    bare: list[float] = []
    tpl = h2.client.create_volume(1 * GiB)
    h2.client.template_volume(tpl.uuid)
    # The baseline: one lvcreate with the volume's tags, by an LVM process with the
    # settings sharedlvm uses (its private lvm.conf; this kernel has no device-mapper,
    # so a bare lvcreate without them cannot run here), on a scratch LUN.
    with scratch_lun(work, 64 * GiB) as (dev, reader, _):
        (reader.config.system_dir / "lvm.conf").write_text(LVM_CONF)
        lvm = Lvm(reader.runner, dataclasses.replace(reader.config, writable=True))
        lvm.pvcreate([dev])
        lvm.vgcreate("benchvg", [dev], [])
        for i in range(rounds):
            with Stopwatch() as watch:
                top = h2.client.snapshot_volume(base.uuid)
            snap.append(watch.seconds)
            h2.client.delete_volume(top.uuid)
            with Stopwatch() as watch:
                clone = h2.client.clone_volume(tpl.uuid, linked=True)
            linked.append(watch.seconds)
            h2.client.delete_volume(clone.uuid)
            with Stopwatch() as watch:
                lvm.lvcreate("benchvg", f"lv{i}", 1 * GiB, TAGS)
            bare.append(watch.seconds)
    h2.client.delete_volume(base.uuid)
    h2.client.delete_volume(tpl.uuid)
    b = statistics.median(bare)
    for name, values in (("snapshot", snap), ("linked clone", linked)):
        a = statistics.median(values)
        rows.append([f"{name} latency (p50 of {rounds})", f"{a * 1000:.0f} ms",
                     f"lvcreate {b * 1000:.0f} ms", f"{a / b:.2f}x lvcreate",
                     "target <= 1.5x"])


def merges(c: Any, work: Path, rounds: int, rows: list[list[str]]) -> None:
    h2 = c.hosts[1]
    ours, bare = [], []
    write = ["-c", f"write -P 0x5c 0 {GiB}"]
    for _ in range(rounds):
        # Preallocated: the loop bed maps single-segment LVs only, and a thin parent
        # grown for the merge would get a second segment.
        base = h2.client.create_volume(SIZE, format="qcow2", alloc="preallocated")
        top = h2.client.snapshot_volume(base.uuid)
        h2.cli("run", "--image", base.image, "--", "qemu-io", "-f", "qcow2", *write, "{0}")
        with Stopwatch() as watch:
            h2.client.merge_volume(top.uuid)
        ours.append(watch.seconds)
        h2.client.delete_volume(base.uuid)
        # The same shape, bare: a qcow2 base and a 1 GiB overlay on loop devices.
        with loop_device(work, "base", SIZE + 64 * MiB) as b_dev, \
                loop_device(work, "top", 2 * GiB) as t_dev:
            run("qemu-img", "create", "-q", "-f", "qcow2", b_dev, str(SIZE))
            run("qemu-img", "create", "-q", "-f", "qcow2", "-b", b_dev, "-F", "qcow2", t_dev,
                str(SIZE))
            run("qemu-io", "-f", "qcow2", *write, t_dev)
            with Stopwatch() as watch:
                run("qemu-img", "commit", "-q", "-t", "none", "-d", "-f", "qcow2", t_dev)
            bare.append(watch.seconds)
    a, b = statistics.median(ours), statistics.median(bare)
    rows.append(["merge, 1 GiB in the snapshot", f"{a:.2f} s", f"qemu-img commit {b:.2f} s",
                 f"{a / b:.2f}x commit", ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-rounds", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-images-"))
    rows: list[list[str]] = []
    c = make_cluster(work / "bed", hosts=2, size=40 * GiB)
    try:
        full_clones(c, args.rounds, rows)
        latencies(c, work, args.latency_rounds, rows)
        merges(c, work, max(1, args.rounds - 1), rows)
    finally:
        destroy_cluster(c)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nsharedlvm images (bench/images.py): asked on a host that is not manager; "
          f"medians of {args.rounds} rounds (latencies: {args.latency_rounds}); "
          f"{os.cpu_count()} cores, loop devices on sparse files\n")
    print("| operation | sharedlvm | baseline | ratio | target |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
