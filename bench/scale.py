#!/usr/bin/env python3
"""sharedlvm at scale: metadata operations at 100 to 10,000 volumes vs bare LVM.

On one simulated bed (2 hosts; host 1 formats the domain, is its manager and does all
the work; one sharded domain over enough loop-device LUNs that no shard passes
``SHARD_VOLUMES`` at the largest population) it grows the domain to each population
by creating volumes through the manager's daemon (that build is timed too), and at
each population measures, in the same run:

- sharedlvm: K rounds of create / extend (to an absolute size, +1 extent) / delete of
  an extra volume, a request to the manager's daemon over its socket as the CLI sends
  it (p50, p95); creates per second with 1 and with 4 concurrent requesters (a thread
  and a client each); ``volume list`` through the daemon, and the same listing run in
  this process (``volume.list_volumes``: what the daemon runs for it, without the
  socket);
- the baselines, interleaved round by round with the above: bare ``lvm lvcreate`` /
  ``lvextend`` / ``lvremove`` (the same 7 volume tags, 1 extent) and their creates per
  second with 1 and 4 requesters, ``lvs`` for the list:

  - ``defaults``: one VG of as many LVs as the domain has volumes, LVM's default
    settings (backup and archive on, ``use_aio = 1``) but for the device filter and,
    to leave the machine's state alone, ``hints = "none"`` and a private locking dir
    (``activation`` follows the kernel: this test machine has no device-mapper). The
    floor users have today;
  - ``sl settings``: the same VG with sharedlvm's ``--config`` and ``lvm.conf``
    (``domain.make_lvm``: backups off, ``use_aio = 0``);
  - ``shard``: one VG of as many LVs as the domain's largest shard, sharedlvm's
    settings: the "same shard size" of the 1.2x target.

  The baseline VGs are filled with one ``vgcfgrestore`` of generated metadata (LVs
  like a ``vgcfgbackup`` of an ``lvcreate``'s, 1 extent each), ``lvcreate`` one by
  one taking most of an hour at 10,000.

It also measures the idle mailbox read I/O of a manager with 2,000 live host ids (a
``MailboxServer`` run as the daemon runs it, no requests; its own ``bytes_read``
only), and prints the size of the ``leases`` LV that 10,000 volume leases need.

Run as root: ``.venv/bin/python bench/scale.py [--rounds 20] [--counts 100,1000,10000]
[--quick] [--report FILE]`` (15 minutes in full on a 2-core test machine, most of it
building the 10,000 volumes; ``--quick``: 100 and 1,000 volumes, 10 rounds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import string
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import pct  # first: it puts tests/ (the test bed) on the path

# isort: split
from bed import Cluster, GiB, destroy_cluster, make_cluster

from sharedlvm import Client, codec, errors, tags, volume
from sharedlvm.command import Runner
from sharedlvm.daemon import DaemonConfig
from sharedlvm.devmapper import available as device_mapper_available
from sharedlvm.domain import Domain, make_lvm
from sharedlvm.lease_layout import LEASES_GROWTH
from sharedlvm.leases import align_for
from sharedlvm.lvm import Lvm, LvmConfig
from sharedlvm.mailbox import MAX_HOSTS, Mailbox, MailboxServer, PollSettings
from sharedlvm.model import Allocation, VolumeFormat, VolumeInfo, VolumeState
from sharedlvm.paths import HostPaths
from sharedlvm.rpc import MAX_ANSWER
from sharedlvm.shards import SHARD_VOLUMES

EXTENT = 128 * 1024 * 1024
MiB = 1024 * 1024
REQUESTERS = (1, 4)
LISTS = 5  # `volume list` samples per population (seconds each at 10,000)

# LVM's defaults but what keeps it on our device and off the machine's own state.
DEFAULTS_CONFIG = """\
devices {{
    filter = [ "a|^{device}$|", "r|.*|" ]
    global_filter = [ "a|^{device}$|", "r|.*|" ]
    hints = "none"
}}
global {{
    activation = {activation}
    locking_dir = "{lock_dir}"
}}
"""


def say(text: str) -> None:
    """Progress, on stderr: stdout is the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def volume_tags() -> list[str]:
    """A raw volume's tags as the manager writes them, for the bare LVs."""
    return tags.volume_tags(image=str(uuid.uuid4()), parent=None, fmt=VolumeFormat.RAW,
                            alloc=Allocation.PREALLOCATED, generation=1,
                            lease=random.randint(1, 10000), state=VolumeState.READY)


def parallel(threads: int, items: int, work: Callable[[int], None]) -> float:
    """Run ``work(thread)`` ``items`` times over ``threads`` threads, each taking the
    next item as it finishes one; stops them all at the first error. Wall seconds."""
    lock, stop = threading.Lock(), threading.Event()
    left = [items]

    def loop(thread: int) -> None:
        while not stop.is_set():
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            try:
                work(thread)
            except BaseException:
                stop.set()
                raise

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for future in [pool.submit(loop, t) for t in range(threads)]:
                future.result()
    except BaseException:
        stop.set()
        raise
    return time.perf_counter() - start


def timed(times: dict[str, list[float]], op: str, call: Callable[[], object]) -> None:
    start = time.perf_counter()
    call()
    times.setdefault(op, []).append(time.perf_counter() - start)


# The sharedlvm side

class Ours:
    """The domain, through host 1's daemon (the manager)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.root = cluster.first.root
        self.client = self.new_client()
        self.count = 0
        self.reader: Domain | None = None  # host 1's domain, opened read-only here
        self.list_error = ""  # why `volume list` through the daemon failed
        self.list_bytes = 0  # its answer, as JSON

    def new_client(self) -> Client:
        return Client(self.root, timeout=300)

    def grow(self, target: int, threads: int) -> tuple[int, float]:
        """Create volumes up to ``target``; (volumes added, seconds)."""
        clients = [self.new_client() for _ in range(threads)]
        added = target - self.count
        done = [0]
        lock = threading.Lock()

        def create(thread: int) -> None:
            clients[thread].create_volume(EXTENT, domain=self.cluster.name)
            with lock:
                done[0] += 1
                if done[0] % 500 == 0:
                    say(f"  {self.count + done[0]} volumes")

        seconds = parallel(threads, added, create) if added > 0 else 0.0
        self.count = target
        return added, seconds

    def shard_volumes(self) -> list[int]:
        info = self.client.domain_info(self.cluster.name)
        return [s.volumes for s in info.shards]

    def round(self, times: dict[str, list[float]]) -> None:
        name = self.cluster.name
        vol: list[str] = []
        timed(times, "create", lambda: vol.append(
            self.client.create_volume(EXTENT, domain=name).uuid))
        timed(times, "extend", lambda: self.client.extend_volume(
            vol[0], str(2 * EXTENT), domain=name))
        timed(times, "delete", lambda: self.client.delete_volume(vol[0], domain=name))

    def rate(self, threads: int, total: int) -> float:
        """Creates per second with ``threads`` requesters; the volumes deleted after."""
        clients = [self.new_client() for _ in range(threads)]
        made: list[str] = []
        seconds = parallel(threads, total, lambda t: made.append(
            clients[t].create_volume(EXTENT, domain=self.cluster.name).uuid))
        left = list(made)
        lock = threading.Lock()

        def delete(thread: int) -> None:
            with lock:
                vol = left.pop()
            clients[thread].delete_volume(vol, domain=self.cluster.name)

        parallel(threads, len(made), delete)
        return total / seconds

    def list(self, times: dict[str, list[float]]) -> None:
        """``volume list`` through the daemon, as the CLI and the client library ask
        ("list"); and the same listing in this process, what the daemon runs for it
        (and the CLI where no daemon answers) without the socket ("list in process")."""
        name = self.cluster.name
        found: list[int] = []
        try:
            timed(times, "list", lambda: found.append(len(
                self.client.list_volumes(domain=name))))
        except errors.Error as exc:
            self.list_error = f"{type(exc).__name__}: {exc}"
        if self.reader is None:
            self.reader = Domain.open(self.cluster.first.paths, Runner(), name)
        reader = self.reader
        listed: list[list[VolumeInfo]] = []
        timed(times, "list in process", lambda: listed.append(volume.list_volumes(reader)))
        self.list_bytes = len(json.dumps(codec.to_wire(listed[0])))
        for n in [*found, len(listed[0])]:
            if n != self.count:
                raise AssertionError(f"volume list: {n} volumes, expected {self.count}")


# The bare side

class ConfiguredLvm(Lvm):
    """An Lvm whose every command gets ``text`` as its --config (LVM's defaults for
    everything it does not set): the same commands and arguments as sharedlvm's."""

    def __init__(self, config: LvmConfig, text: str) -> None:
        super().__init__(Runner(), config)
        self._config_text = text


class Bare:
    """One VG on its own loop device, and the Lvm that runs the bare commands on it."""

    def __init__(self, label: str, vg: str, device: str, make: Callable[[], Lvm]) -> None:
        self.label = label
        self.vg = vg
        self.device = device
        self.make = make
        self.lvm = make()

    def round(self, times: dict[str, list[float]]) -> None:
        name = str(uuid.uuid4())
        lv_tags = volume_tags()
        timed(times, "create", lambda: self.lvm.lvcreate(self.vg, name, EXTENT, lv_tags))
        timed(times, "extend", lambda: self.lvm.lvextend(self.vg, name, 2 * EXTENT))
        timed(times, "delete", lambda: self.lvm.lvremove(self.vg, [name]))

    def rate(self, threads: int, total: int) -> float:
        """lvcreate per second from ``threads`` processes at a time (each thread its
        own Lvm: only LVM's own VG lock orders them); removed after in one command."""
        lvms = [self.make() for _ in range(threads)]
        made: list[str] = []

        def create(thread: int) -> None:
            name = str(uuid.uuid4())
            lvms[thread].lvcreate(self.vg, name, EXTENT, volume_tags())
            made.append(name)

        seconds = parallel(threads, total, create)
        self.lvm.lvremove(self.vg, made)
        return total / seconds

    def list(self, times: dict[str, list[float]]) -> None:
        timed(times, "list", lambda: self.lvm.lvs(self.vg))
        times["list in process"] = times["list"]


def sharedlvm_lvm(root: Path, device: str) -> Callable[[], Lvm]:
    """sharedlvm's settings: its --config and its lvm.conf (use_aio = 0)."""
    return lambda: make_lvm(HostPaths(root), Runner(), [device], writable=True)


def defaults_lvm(system_dir: Path, device: str) -> Callable[[], Lvm]:
    """LVM's default settings in a private LVM_SYSTEM_DIR (backups and archives go
    there, as they would to /etc/lvm), an lvm.conf that sets nothing."""
    system_dir.mkdir(parents=True, exist_ok=True)
    # (LVM refuses an lvm.conf without a setting: this one is its default value)
    (system_dir / "lvm.conf").write_text("config {\n    checks = 1\n}\n")
    lock_dir = system_dir / "lock"
    config = LvmConfig(devices=(device,), writable=True, system_dir=system_dir,
                       lock_dir=lock_dir, activation=device_mapper_available())
    text = DEFAULTS_CONFIG.format(device=device, lock_dir=lock_dir,
                                  activation=1 if config.activation else 0)
    return lambda: ConfiguredLvm(config, text)


class Loops:
    """The loop devices this benchmark attaches for its baselines, detached by path
    (and only while they still show our backing file)."""

    def __init__(self) -> None:
        self.attached: list[tuple[str, Path]] = []

    def attach(self, image: Path, size: int) -> str:
        with open(image, "xb") as f:
            f.truncate(size)
        device = Runner().run(["losetup", "--find", "--show", "--sector-size", "512",
                               str(image)]).out.strip()
        self.attached.append((device, image))
        return device

    def detach_all(self) -> None:
        for device, image in reversed(self.attached):
            backing = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
            try:
                ours = os.path.realpath(backing.read_text().strip()) == os.path.realpath(image)
            except OSError:
                ours = False
            if ours:
                Runner().run(["losetup", "--detach", device], check=False)
            image.unlink(missing_ok=True)
        self.attached.clear()


def make_bare_vg(lvm: Lvm, vg: str, device: str,
                 make_tags: Callable[[], list[str]] = volume_tags) -> None:
    """PV and VG like a shard's (128 MiB metadata area and extents), and one LV made by
    lvcreate: the template of the generated ones."""
    lvm.pvcreate([device])
    lvm.vgcreate(vg, [device], ["sharedlvm.bench"])
    lvm.lvcreate(vg, str(uuid.uuid4()), EXTENT, make_tags())


_LV_ID_CHARS = string.ascii_letters + string.digits


def lv_id() -> str:
    raw = "".join(random.choices(_LV_ID_CHARS, k=32))
    cuts = (6, 4, 4, 4, 4, 4, 6)
    parts, at = [], 0
    for n in cuts:
        parts.append(raw[at:at + n])
        at += n
    return "-".join(parts)


def _block_end(text: str, open_brace: int) -> int:
    """Index of the brace closing the one at ``open_brace``."""
    depth = 0
    for i in range(open_brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced braces in LVM metadata")


def fill_vg(lvm: Lvm, vg: str, count: int, directory: Path,
            make_tags: Callable[[], list[str]] = volume_tags) -> None:
    """Bring ``vg`` to ``count`` LVs with one vgcfgrestore: its vgcfgbackup with LV
    sections added, copies of the first LV's (new name, id, tags, extent)."""
    have = lvm.vg(vg).lv_count
    if have >= count:
        return
    backup = directory / f"{vg}.vgcfg"
    lvm.run("vgcfgbackup", "--file", str(backup), vg)
    text = backup.read_text()
    section = text.index("\tlogical_volumes {")
    section_end = _block_end(text, text.index("{", section))
    first = re.compile(r"\n\t\t(\S+) \{\n").search(text, section)
    if first is None:
        raise ValueError(f"no LV in the backup of {vg}")
    template = text[first.start():_block_end(text, text.index("{", first.start())) + 1]
    used = {int(pe) + k for n, pe in re.findall(
        r'extent_count = (\d+).*?"pv0", (\d+)', text[section:section_end], re.S)
        for k in range(int(n))}
    pe_match = re.search(r"pe_count = (\d+)", text)
    if pe_match is None:
        raise ValueError(f"no pe_count in the backup of {vg}")
    pe_count = int(pe_match.group(1))
    free = (pe for pe in range(pe_count) if pe not in used)
    blocks = []
    for _ in range(count - have):
        lv_tags = ", ".join(f'"{t}"' for t in make_tags())
        block = template.replace(first.group(1), str(uuid.uuid4()), 1)
        block = re.sub(r'\bid = "[^"]+"', f'id = "{lv_id()}"', block, count=1)
        block = re.sub(r"tags = \[[^\]]*\]", f"tags = [{lv_tags}]".replace("\\", "\\\\"),
                       block, count=1)
        block = re.sub(r'"pv0", \d+', f'"pv0", {next(free)}', block, count=1)
        blocks.append(block)
    generated = directory / f"{vg}.generated"
    generated.write_text(text[:section_end] + "".join(blocks) + "\n\t" + text[section_end:])
    lvm.run("vgcfgrestore", "--file", str(generated), vg)
    found = lvm.vg(vg).lv_count
    if found != count:
        raise AssertionError(f"{vg}: {found} LVs after vgcfgrestore, expected {count}")
    backup.unlink()
    generated.unlink()


# The idle mailbox

def mailbox_idle(cluster: Cluster, seconds: float, sector: int) -> tuple[float, int, float]:
    """A MailboxServer over the domain (host 1's view), 2,000 live host ids, no
    requests, served every poll as the daemon does: (bytes/s, bytes per sweep, seconds
    between sweeps), from the first sweep to the last."""
    domain = Domain.open(cluster.first.paths, Runner(), cluster.name)
    box = Mailbox(domain)
    config = DaemonConfig()
    settings = PollSettings(config.mailbox_poll, config.mailbox_sweep, config.mailbox_hot,
                            config.mailbox_idle_kib * 1024)
    # At least two whole sweeps, however slow the budget makes them.
    seconds = max(seconds, 2.5 * settings.sweep_interval(MAX_HOSTS, sector))
    server = MailboxServer(box, settings, lambda: set(range(1, MAX_HOSTS + 1)),
                           lambda: sector, lambda msg: None)
    sweeps: list[tuple[float, int]] = []  # (start of a sweep, bytes read before it)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        before, last = box.bytes_read, server.last_sweep
        server.serve()
        if server.last_sweep != last:
            sweeps.append((server.last_sweep, before))
        time.sleep(settings.poll)
    if len(sweeps) < 2:
        raise AssertionError(f"{len(sweeps)} mailbox sweep(s) in {seconds} s")
    (t0, b0), (t1, b1) = sweeps[0], sweeps[-1]
    n = len(sweeps) - 1
    return (b1 - b0) / (t1 - t0), (b1 - b0) // n, (t1 - t0) / n


# The report

def ms(values: list[float], q: float) -> float:
    return pct(values, q) * 1000


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str = "") -> None:
        self.lines.append(line)

    def table(self, header: Sequence[str], rows: list[list[str]]) -> None:
        self.add("| " + " | ".join(header) + " |")
        self.add("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
        for row in rows:
            self.add("| " + " | ".join(row) + " |")
        self.add()

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None,
                        help="create/extend/delete rounds per population (20; --quick 10)")
    parser.add_argument("--counts", default=None,
                        help="populations, comma-separated (100,1000,10000)")
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 volumes only")
    parser.add_argument("--build-threads", type=int, default=4,
                        help="requesters creating the population (4)")
    parser.add_argument("--mailbox-seconds", type=float, default=20.0)
    parser.add_argument("--report", type=Path, help="also write the tables there")
    args = parser.parse_args()
    rounds = args.rounds or (10 if args.quick else 20)
    counts = sorted({int(c) for c in (args.counts or ("100,1000" if args.quick
                                                      else "100,1000,10000")).split(",")})
    top = counts[-1]
    rate_total = 4 * math.ceil(max(rounds, 8) / 4)  # creates per creates/s figure
    extra = rate_total + rounds + 50  # volumes above the population at any time
    shards = math.ceil(top / SHARD_VOLUMES) + 1
    per_shard = math.ceil((top + extra) / shards)
    leases_bytes = math.ceil((top + extra + 1) * align_for(512) / LEASES_GROWTH + 1) \
        * LEASES_GROWTH
    lun_size = math.ceil((per_shard * EXTENT + leases_bytes + 4 * GiB) / GiB) * GiB
    bare_size = (top + extra + 16) * EXTENT + 2 * GiB

    # sys.exit in the main thread runs the finally clauses below, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="sharedlvm-scale-"))
    written = (top + extra) * align_for(512) + 4 * GiB  # leases written, and room
    if shutil.disk_usage(tmp).free < written:
        shutil.rmtree(tmp)
        print(f"scale: {tmp.parent} has less than {written / GiB:.0f} GiB free",
              file=sys.stderr)
        return 1
    loops = Loops()
    cluster: Cluster | None = None
    report = Report()
    started = time.monotonic()
    try:
        say(f"bed: 2 hosts, {shards} LUNs of {lun_size // GiB} GiB (sparse) in {tmp}")
        cluster = make_cluster(tmp / "bed", hosts=2, size=lun_size, luns=shards,
                               domain_luns=shards)
        ours = Ours(cluster)

        say(f"idle mailbox, {MAX_HOSTS} live host ids, {args.mailbox_seconds:g} s per sector size")
        mailbox = {sector: mailbox_idle(cluster, args.mailbox_seconds, sector)
                   for sector in (512, 4096)}

        big_dev = loops.attach(tmp / "bare-big.img", bare_size)
        shard_dev = loops.attach(tmp / "bare-shard.img", bare_size)
        sl_big = sharedlvm_lvm(tmp / "bare-root", big_dev)
        sl_shard = sharedlvm_lvm(tmp / "bare-root", shard_dev)
        suffix = os.getpid()
        big_vg, shard_vg = f"slscale{suffix}big", f"slscale{suffix}shard"
        make_bare_vg(sl_big(), big_vg, big_dev)
        make_bare_vg(sl_shard(), shard_vg, shard_dev)
        bares = [Bare("defaults", big_vg, big_dev, defaults_lvm(tmp / "bare-defaults", big_dev)),
                 Bare("sl settings", big_vg, big_dev, sl_big),
                 Bare("shard", shard_vg, shard_dev, sl_shard)]

        builds: list[list[str]] = []
        latency: list[list[str]] = []
        rates: list[list[str]] = []
        lists: list[str] = []
        figures: dict[tuple[int, str], float] = {}  # (count, figure) -> value, targets
        stopped = ""  # why the run stopped early: what was measured is still reported
        try:
            for count in counts:
                say(f"population {count}: building through sharedlvm "
                    f"({args.build_threads} requesters)")
                added, seconds = ours.grow(count, args.build_threads)
                if added:
                    builds.append([f"{count:,}", f"{added:,}", str(args.build_threads),
                                   f"{seconds:.1f}", f"{added / seconds:.1f}"])
                shard_lvs = max(ours.shard_volumes())
                say(f"population {count}: bare VGs of {count} and {shard_lvs} LVs "
                    "(vgcfgrestore)")
                fill_vg(bares[1].lvm, big_vg, count, tmp)
                fill_vg(bares[2].lvm, shard_vg, shard_lvs, tmp)

                say(f"population {count}: {rounds} rounds of create/extend/delete")
                ours_times: dict[str, list[float]] = {}
                bare_times: dict[str, dict[str, list[float]]] = {b.label: {} for b in bares}
                for _ in range(rounds):
                    ours.round(ours_times)
                    for bare in bares:
                        bare.round(bare_times[bare.label])
                say(f"population {count}: volume list / lvs")
                ours.list_error = ""
                for _ in range(min(LISTS, rounds)):
                    ours.list(ours_times)
                    for bare in bares[:2]:
                        bare.list(bare_times[bare.label])
                lists.append(f"- `volume list` at {count:,} volumes: its answer is "
                             f"{ours.list_bytes:,} bytes of JSON (the socket's limit, "
                             f"rpc.MAX_ANSWER: {MAX_ANSWER:,})"
                             + (f"; through the daemon it **fails**: {ours.list_error}"
                                if ours.list_error else ""))
                for op in ("create", "extend", "delete", "list", "list in process"):
                    o = ours_times.get(op)
                    d, s = bare_times["defaults"][op], bare_times["shard"].get(op)
                    if not o:
                        latency.append([f"{count:,}", op, "fails", "-"] + ["-"] * 9)
                        continue
                    row = [f"{count:,}", op, f"{ms(o, .5):.1f}", f"{ms(o, .95):.1f}"]
                    for bare in bares:
                        b = bare_times[bare.label].get(op)
                        row += [f"{ms(b, .5):.1f}", f"{ms(b, .95):.1f}"] if b else ["-", "-"]
                    row += [fmt_ratio(ms(o, .5), ms(d, .5)),
                            fmt_ratio(ms(o, .5), ms(s, .5)) if s else "-",
                            fmt_ratio(ms(o, .95), ms(s, .95)) if s else "-"]
                    latency.append(row)
                    figures[(count, f"{op} p50")] = ms(o, .5)
                    if s:
                        figures[(count, f"{op} x shard")] = ms(o, .5) / ms(s, .5)

                for threads in REQUESTERS:
                    say(f"population {count}: creates/s, {threads} requester(s)")
                    ours_rate = ours.rate(threads, rate_total)
                    bare_rate = {bare.label: bare.rate(threads, rate_total) for bare in bares}
                    rates.append([f"{count:,}", str(threads), f"{ours_rate:.1f}"]
                                 + [f"{bare_rate[b.label]:.1f}" for b in bares]
                                 + [fmt_ratio(ours_rate, bare_rate["defaults"]),
                                    fmt_ratio(ours_rate, bare_rate["shard"])])
                    figures[(count, f"creates/s x{threads}")] = ours_rate
                say(f"population {count} done at {(time.monotonic() - started) / 60:.1f} min")
        except Exception as exc:
            stopped = f"{type(exc).__name__}: {exc}"
            say(f"stopped: {stopped}")
            traceback.print_exc()

        leases_lv = cluster.raw_lvm().lv(cluster.name, "leases").size
        wall = time.monotonic() - started
        report.add(f"## sharedlvm at scale ({rounds} rounds per figure, "
                   f"{rate_total} creates per creates/s figure; run took {wall / 60:.1f} min)")
        report.add()
        report.add(f"Domain: {shards} shards (one loop-device LUN each), manager host 1 of 2; "
                   "requests to the manager's daemon over its socket. Baselines: bare "
                   "`lvm lvcreate/lvextend/lvremove` (`lvs` for list), same tags and size, "
                   "in one VG of as many LVs as the domain has volumes, with LVM's "
                   "**defaults** (backup + archive on, use_aio=1) and with **sl "
                   "settings** (sharedlvm's config), and in one VG of the size of the "
                   "domain's largest **shard** (sl settings).")
        report.add()
        report.add("Build of the population through sharedlvm:")
        report.add()
        report.table(["volumes", "created", "requesters", "seconds", "creates/s"], builds)
        report.add("Latency, ms:")
        report.add()
        report.table(["volumes", "op", "sharedlvm p50", "p95", "defaults p50", "p95",
                      "sl settings p50", "p95", "shard p50", "p95", "vs defaults p50",
                      "vs shard p50", "vs shard p95"], latency)
        report.add("Creates per second:")
        report.add()
        report.table(["volumes", "requesters", "sharedlvm", "defaults", "sl settings",
                      "shard", "vs defaults", "vs shard"], rates)
        report.add(f"Idle mailbox, {MAX_HOSTS:,} live host ids, no requests "
                   f"(at least {args.mailbox_seconds:g} s, sweep every "
                   f"{DaemonConfig().mailbox_sweep:g} s or slower to stay within "
                   f"{DaemonConfig().mailbox_idle_kib} KiB/s):")
        report.add()
        report.table(["sector", "bytes per sweep", "s between sweeps", "KiB/s", "target"],
                     [[f"{sector} B", f"{per:,}", f"{period:.3f}", f"{rate / 1024:.1f}",
                       "<= 512 KiB/s"] for sector, (rate, per, period) in mailbox.items()])
        for sector in (512, 4096):
            need = align_for(sector) * 10_001
            steps = math.ceil(need / LEASES_GROWTH) * LEASES_GROWTH
            report.add(f"- `leases` LV for 10,000 volume leases + the manager's, {sector} B "
                       f"sectors: {align_for(sector) // MiB} MiB x 10,001 = "
                       f"{need / GiB:.2f} GiB ({steps // GiB} GiB in 1 GiB steps)")
        report.add(f"- `leases` LV in this run after {ours.count:,} volumes: "
                   f"{leases_lv / GiB:.0f} GiB")
        for line in lists:
            report.add(line)
        report.add()

        checks: list[list[str]] = []

        def check(target: str, key: tuple[int, str], ok: Callable[[float], bool],
                  unit: str) -> None:
            if key in figures:
                value = figures[key]
                checks.append([target, f"{value:.2f}{unit}", "yes" if ok(value) else "**no**"])

        for threads in REQUESTERS:
            check(f">= 25 creates/s at 1,000 ({threads} requester(s))",
                  (1000, f"creates/s x{threads}"), lambda v: v >= 25, "/s")
            check(f">= 20 creates/s at 10,000 ({threads} requester(s))",
                  (10000, f"creates/s x{threads}"), lambda v: v >= 20, "/s")
        check("extend p50 <= 60 ms at 10,000", (10000, "extend p50"), lambda v: v <= 60, " ms")
        for count in counts:
            for op in ("create", "extend", "delete"):
                check(f"{op} p50 <= 1.2x bare at the same shard size, {count:,}",
                      (count, f"{op} x shard"), lambda v: v <= 1.2, "x")
        for sector, (rate, _, period) in mailbox.items():
            checks.append([f"idle mailbox <= 512 KiB/s at 2,000 host ids ({sector} B sectors)",
                           f"{rate / 1024:.1f} KiB/s (a sweep every {period:.1f} s)",
                           "yes" if rate / 1024 <= 512 else "**no**"])
        report.add("Targets:")
        report.add()
        report.table(["target", "measured", "met"], checks)

        if stopped:
            report.add(f"**The run stopped early**: {stopped}")
        print(report.text(), end="")
        if args.report:
            args.report.write_text(report.text())
        return 1 if stopped else 0
    finally:
        say("cleaning up")
        try:
            if cluster is not None:
                destroy_cluster(cluster)
        finally:
            loops.detach_all()
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
