"""Images and copies (issue 10) against bare qemu-img and LVM, measured in the same run.

A 2-host loop bed (a sparse-file LUN) and a source image of 2 GiB with 512 MiB of
random data (a qcow2 file). Each row is sharedlvm's operation, asked on host 2 (not
the manager: through the storage mailbox), and its baseline: the same qemu-img
command on plain loop devices over sparse files in the same filesystem (no LVM, no
leases, no manager), or bare lvcreate. Rounds are interleaved; medians are printed,
with sharedlvm / baseline as a ratio.

    .venv/bin/python bench/images.py [--rounds 3] [--data-mib 512]

Run on an idle machine (make test or another bench at the same time changes the
figures); takes about 3 minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bed import destroy_cluster, make_cluster

MiB = 1024**2
GiB = 1024**3
CONVERT = ["qemu-img", "convert", "-T", "none", "-t", "none"]


class Stopwatch:
    """``with watch: ...`` then ``watch.seconds``."""

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
    """A bare target: a loop device on a sparse file, like the bed's LUN."""
    path = directory / name
    with open(path, "wb") as f:
        f.truncate(size)
    dev = run("losetup", "--find", "--show", str(path)).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)
        path.unlink()


def make_source(directory: Path, data_mib: int) -> Path:
    raw = directory / "source.raw"
    with open(raw, "wb") as f:
        f.truncate(2 * GiB)
        for i in range(data_mib // 4):  # 4 MiB of data every 16 MiB
            f.seek(i * 16 * MiB)
            f.write(os.urandom(4 * MiB))
    src = directory / "source.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(raw), str(src))
    raw.unlink()
    return src


def timed_in_consumer(host: Any, volume: str, argv: list[str], target: str) -> float:
    """A bare qemu-img on ``volume`` (read-only, as sharedlvm's consumer), timed inside
    the consumer: the baseline pays no lease or activation."""
    code = ("import subprocess, sys, time; t = time.monotonic(); "
            f"subprocess.run({argv!r} + ['-f', 'qcow2', sys.argv[1], sys.argv[2]], "
            "check=True); print(time.monotonic() - t)")
    out = host.cli("run", "--volume", f"{volume}:ro", "--", sys.executable, "-c", code,
                   "{0}", target).stdout
    return float(out.strip().splitlines()[-1])


def one_round(c: Any, work: Path, src: Path, k: int,
              add: Callable[[str, float, float, str], None]) -> None:
    h2 = c.hosts[1]
    ours, base = Stopwatch(), Stopwatch()
    # Upload (import a cloud image) vs qemu-img convert into a bare device.
    with loop_device(work, "t1", 3 * GiB) as dev, base:
        run(*CONVERT, "-O", "qcow2", str(src), dev)
    with ours:
        vol = h2.client.upload_volume(src)
    add("upload (qcow2 file -> thin qcow2)", ours.seconds, base.seconds,
        "qemu-img convert file -> loop device")

    # Full clone, raw: flattened onto a new LV vs convert device -> bare device.
    with loop_device(work, "t2", 3 * GiB) as dev:
        secs = timed_in_consumer(h2, vol.uuid, [*CONVERT, "-n", "-W", "-O", "raw"], dev)
    with ours:
        clone = h2.client.clone_volume(vol.uuid, linked=False, format="raw")
    add("full clone (qcow2 -> raw LV)", ours.seconds, secs,
        "qemu-img convert device -> loop device")

    # Download vs convert device -> file.
    out_file, base_file = work / f"down{k}.qcow2", work / f"base{k}.qcow2"
    secs = timed_in_consumer(h2, vol.uuid, [*CONVERT[:4], "-O", "qcow2"], str(base_file))
    with ours:
        h2.client.download_volume(vol.uuid, out_file)
    add("download (-> qcow2 file)", ours.seconds, secs, "qemu-img convert device -> file")
    out_file.unlink()
    base_file.unlink()

    # Template + linked clone vs bare lvcreate of a 1 GiB LV + qemu-img create -b.
    h2.client.template_volume(clone.uuid)
    with ours:
        linked = h2.client.clone_volume(clone.uuid, linked=True)
    vg = f"bench{k}"
    with loop_device(work, "t3", 4 * GiB) as dev:
        run("pvcreate", "-q", dev)
        run("vgcreate", "-q", vg, dev)
        try:
            with base:
                run("lvcreate", "-q", "-y", "-an", "-Zn", "-L", "1G", "-n", "lc", vg)
                run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base", "-F",
                    "raw", str(work / "lc.qcow2"), "2G")
        finally:
            subprocess.run(["vgremove", "-q", "-f", vg], check=False)
            subprocess.run(["pvremove", "-q", dev], check=False)
    (work / "lc.qcow2").unlink(missing_ok=True)
    add("linked clone (template)", ours.seconds, base.seconds,
        "lvcreate + qemu-img create -b")

    # Leave nothing for the next round (image delete, the leaf first).
    for image in (linked.image, clone.image, vol.image):
        h2.client.delete_image(image)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-mib", type=int, default=512)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-images-"))
    rows: dict[str, tuple[list[float], list[float], str]] = {}

    def add(name: str, ours: float, base: float, baseline: str) -> None:
        a, b, _ = rows.setdefault(name, ([], [], baseline))
        a.append(ours)
        b.append(base)

    c = make_cluster(work / "bed", hosts=2, size=40 * GiB)
    try:
        src = make_source(work, args.data_mib)
        for k in range(args.rounds):
            one_round(c, work, src, k, add)
    finally:
        destroy_cluster(c)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nsharedlvm images and copies: {args.rounds} rounds, a 2 GiB source with "
          f"{args.data_mib} MiB of data; asked on a host that is not manager; medians\n")
    print("| operation | sharedlvm s | baseline s | ratio | baseline |")
    print("|---|---:|---:|---:|---|")
    for name, (ours_l, base_l, baseline) in rows.items():
        a, b = statistics.median(ours_l), statistics.median(base_l)
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {baseline} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
