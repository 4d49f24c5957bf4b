"""The fault-injection harness of issue 9 ("The harness"), as a library.

``bench/torture.py`` is its command line; ``tests/integration/test_torture.py`` runs a
short seeded version in ``make test``. What it does, on a loop-device test bed of
``hosts`` simulated hosts (``tests/bed.py``, io_timeout 1 s):

- **Operations**, from one worker thread per host, a seeded random mix: volume create
  (raw, qcow2 thin or preallocated, raw with ~2-3 KiB of user tags), extend (relative
  and absolute), delete (with and without ``--wipe``), prepare/teardown (exclusive
  and shared), ``sharedlvm run`` consumers that write with the double-writer detector
  (``python -m sharedlvm_testbed.devcount``), manager release, and volume lists that
  must show every acknowledged volume. Create, extend and delete carry request ids;
  one that fails with a timeout, a lost connection or ``Fenced`` is asked again with
  the same id (on the same host, another after 30 s) until it gets a definite answer,
  as an orchestrator does. A request id is never reused for other arguments. Every
  create tags its volume ``sl.user.rid=<request id>``, so the disk says which request
  made each LV.
- **Faults**, from one seeded thread, one at a time, each followed by a settle (dead
  daemons restarted, a manager awaited) and a quiesced check: SIGKILL of the manager's
  or another host's daemon (restarted), SIGSTOP + SIGCONT of a daemon (1-3 s), a host
  crash (sanlock and daemon SIGKILLed, its consumers killed as a power loss would,
  then restarted; at most one per ``crash_interval``), SIGKILL of an ``lvm`` or
  ``qemu-img`` child of the manager's daemon (found by parent pid, killed by pid),
  failpoints (every daemon runs with ``SHAREDLVM_FAILPOINT=<name>:<file>``; removing
  the file arms it, the first daemon to reach the point exits), a torn record in a
  host's mailbox outbox, and a torn record in a free slot of the journal's request log
  (followed by a request whose id lands in that bucket).
- **Ledger and invariants**: every request with its outcome; checked after every fault
  (operations paused until none is in flight) and at the end (after a manager handover,
  so a manager ran its recovery): never two writers (devcount exit 3 / ``TWO
  WRITERS``), no consumer still writing a volume whose delete was acknowledged, no
  counter going backwards, no delete acknowledged while a prepare held the lease,
  every acknowledged create on disk exactly once and ready, every acknowledged delete
  absent, sizes as acknowledged, no LV from a failed or unknown request, no two volumes
  on one lease slot, ``vgck`` clean, nothing ``creating``/``removing`` after recovery,
  a replay of recent request ids answers as the first time, every request answered
  within ``answer_deadline``, and a manager within the bound after every fault
  (host-dead time + margin after a host crash, ``fast_bound`` otherwise).

Decisions come from ``random.Random`` streams derived from the seed (one per worker,
one for faults, one for checks), each drawing a fixed number of values per step:
the same seed gives the same sequence of decisions; what they land on (which volume
exists, who is manager) depends on timing.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

# isort: split
from bed import IO_TIMEOUT, Cluster, Host, destroy_cluster, make_cluster
from torturevm import VM_TAG, VmActor

import sharedlvm
from sharedlvm import Client, errors, failpoints, ondisk
from sharedlvm import journal as journal_mod
from sharedlvm import mailbox as mailbox_mod
from sharedlvm.command import Runner
from sharedlvm.domain import shard_vg_name
from sharedlvm_testbed import sim

MiB = 1024**2
GiB = 1024**3
HOST_DEAD = 8 * IO_TIMEOUT + 60  # sanlock: renewal failure + watchdog term
DEVCOUNT = "sharedlvm_testbed.devcount"
# Newer sharedlvm prepares a volume for a consumer process registered with sanlock
# (``volume prepare V --pid PID``: the lease lives in the writer); older ones hold the
# lease in the daemon. The harness drives whichever it finds.
PREPARE_TAKES_PID = "pid" in inspect.signature(Client.prepare_volume).parameters
# A "VM" for a prepared volume: started registered (``sharedlvm run -- python -c``), it
# waits for the harness to write the device path the prepare returned into a file,
# then writes with devcount in this very process (which holds the lease); "hold" for
# a shared lease or a qcow2 volume (devcount would overwrite its header): it only
# holds, until SIGTERM.
VM_CODE = """\
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
path_file, state, host = sys.argv[1:4]
deadline = time.monotonic() + 120
while not os.path.exists(path_file):
    if time.monotonic() > deadline:
        sys.exit(5)
    time.sleep(0.05)
device = open(path_file).read().strip()
if device == "hold":
    while True:
        time.sleep(3600)
from sharedlvm_testbed import devcount
sys.exit(devcount.main([device, "--host-id", host, "--state", state, "--interval", "0.05"]))
"""

OP_WEIGHTS = [("create-raw", 14), ("create-qcow2", 5), ("create-bigtags", 1), ("extend", 8),
              ("delete", 8), ("prepare", 4), ("teardown", 4), ("consume", 7),
              ("release-manager", 1), ("list", 3), ("snapshot", 3), ("clone", 2),
              ("merge", 2), ("upload", 1), ("image-delete", 1)]
FAULT_WEIGHTS = [("kill-manager-daemon", 3), ("kill-daemon", 2), ("stop-manager-daemon", 2),
                 ("stop-daemon", 1), ("host-crash", 2), ("kill-lvm-child", 3),
                 ("kill-qemu-img-child", 1), ("failpoint", 2), ("torn-outbox", 2),
                 ("torn-journal", 2), ("kill-copier", 1)]
# Not a definite answer: the request may or may not have run. Asked again, same id.
UNCERTAIN = {"Timeout", "LostConnection", "Fenced"}
# Refused on the asking host before anything was sent: definite the first time, but
# not after an uncertain attempt (the first one may still run).
LOCAL = {"DaemonNotRunning", "NotManager", "LockspaceError(not joined)"}
# A delete refused before it touched anything.
CLEAN_REFUSALS = LOCAL | {"VolumeInUse", "VolumeHeld", "Busy", "VolumeNotFound", "NotFound",
                          "LeaseHeld", "InvalidArgument", "HasChildren", "ReadOnlyVolume"}
# Newer sharedlvm says of each error class whether it is the request's final answer
# (``final``) or a refusal that changed nothing (``changes_nothing``); any other error
# leaves the request pending in the journal, to be rolled forward when it is repeated
# or by the next manager. A client that follows that contract asks again with the
# same id; the harness does so NONFINAL_TRIES times, then records the request as
# failed but open (its effect may still come) and accepts either outcome for it.
# Older sharedlvm has no such attributes: every error is a final answer there.
ERRORS_SAY_FINAL = hasattr(errors.Error, "final")
NONFINAL_TRIES = 8
REPLAYABLE = ("create-raw", "create-qcow2", "create-bigtags", "create-journal", "extend",
              "delete", "delete-wipe", "snapshot", "clone", "merge", "upload",
              "image-delete")


@dataclass
class Config:
    seed: int
    minutes: float  # of operations and faults, after the bed is up
    hosts: int = 4
    shards: int = 2  # LUNs of the domain: operations land in every shard
    crashes: bool | None = None  # None: on when minutes >= 5
    crash_interval: float = 300.0  # at most one host crash per this many seconds
    first_crash_after: float = 60.0
    fault_gap: tuple[float, float] = (5.0, 12.0)  # seconds between faults
    prepare_writers: bool = False  # devcount on prepared volumes' paths (issue 9 hole 2)
    vms: bool = True  # the VM actor (torturevm.py): a qemu snapshotted, merged, migrated
    workdir: Path | None = None
    lun_size: int = 24 * GiB
    max_volumes: int = 16
    max_consumers: int = 6
    answer_deadline: float = 400.0  # a request must get a definite answer by then
    fast_bound: float = 10.0  # time without a manager after a fault with no host crash
    crash_margin: float = 20.0  # ... and after a host crash: HOST_DEAD + this
    verbose: bool = True

    @property
    def crash_bound(self) -> float:
        return HOST_DEAD + self.crash_margin

    @property
    def crashes_on(self) -> bool:
        return self.minutes >= 5 if self.crashes is None else self.crashes


@dataclass
class Req:
    rid: str
    kind: str
    host: int
    call: Callable[[Client], Any]
    t_sent: float
    status: str = "inflight"  # inflight | acked | failed | abandoned
    error: str = ""
    message: str = ""
    result: Any = None
    t_done: float = 0.0
    attempts: int = 0
    uncertain: bool = False
    open: bool = False  # failed with an error that is not final: may still take effect
    nonfinal: int = 0
    volume: str = ""


@dataclass
class Vol:
    uuid: str
    rid: str
    fmt: str
    capacity: int
    size: int
    state: str = "present"  # present | deleted | maybe
    busy: bool = False
    extended: bool = False
    size_known: bool = True
    t_deleted: float = 0.0
    why_maybe: str = ""
    failures: list[str] = field(default_factory=list)  # failed deletes and extends
    parent: str | None = None  # a snapshot's: the volume below it
    leaf: bool = True  # as far as the harness knows: nothing on top of it
    image: str = ""

    def history(self) -> str:
        return f"; earlier failed requests on it: {', '.join(self.failures)}" if (
            self.failures) else ""


@dataclass
class Prep:
    host: int
    volume: str
    shared: bool
    holder_pid: int  # the process whose sanlock connection holds the lease
    t_ack: float
    path: str
    t_teardown: float | None = None
    writer: Consumer | None = None


@dataclass
class Consumer:
    cid: int
    host: int
    volume: str
    kind: str  # run | prepared
    proc: subprocess.Popen[bytes]
    state_file: Path
    err_file: Path
    t_start: float
    t_stop: float
    stopping: bool = False
    t_kill: float = 0.0
    path_file: Path | None = None
    writer: int | None = None  # pid of the process running devcount (holds the lease)
    started: bool = False
    done: bool = False
    killed_with_host: bool = False
    flagged: set[str] = field(default_factory=set)


@dataclass
class OpStats:
    tried: int = 0
    acked: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    abandoned: int = 0
    retries: int = 0


@dataclass
class Outage:
    start: float
    end: float
    bound: float
    cause: str


@dataclass
class Result:
    seed: int
    table: str
    violations: list[str]
    acked: int
    tried: int
    faults: int
    harness_errors: list[str]
    workdir: Path

    @property
    def ok(self) -> bool:
        return not self.violations


def pick(weights: list[tuple[str, int]], x: float) -> str:
    """The weighted choice that x in [0, 1) falls on."""
    t = x * sum(w for _, w in weights)
    for name, w in weights:
        if t < w:
            return name
        t -= w
    return weights[-1][0]


def error_class(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return "LostConnection"
    if type(exc) is errors.Error:
        text = str(exc)
        if text.startswith("bad answer from the sharedlvm daemon"):
            return "LostConnection"
        if text.startswith("internal error"):
            return "InternalError"
        return "Error"
    if isinstance(exc, errors.LockspaceError) and "not joined" in str(exc):
        return "LockspaceError(not joined)"
    if isinstance(exc, errors.Error):
        return type(exc).__name__
    return f"python:{type(exc).__name__}"


def discover_failpoints() -> list[str]:
    """The failpoint names the product's code reaches (``failpoint("name")``)."""
    names: set[str] = set()
    for path in sorted(Path(sharedlvm.__file__).parent.rglob("*.py")):
        if path.name != "failpoints.py":
            names.update(re.findall(r'failpoint\(\s*"([^"]+)"', path.read_text()))
    return sorted(names)


def journal_bucket(request_id: str) -> int:
    buckets = getattr(journal_mod, "REQUEST_BUCKETS", 1024)
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % buckets


def parse_tags(lv_tags: tuple[str, ...] | list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(sl.* metadata, sl.user.* tags) of an LV, values still encoded (we compare ours
    made only of safe characters)."""
    meta: dict[str, str] = {}
    user: dict[str, str] = {}
    for tag in lv_tags:
        if not tag.startswith("sl."):
            continue
        key, _, value = tag[3:].partition("=")
        if key.startswith("user."):
            user[key[5:]] = value
        else:
            meta[key] = value
    return meta, user


def compact_tags(lv_tags: tuple[str, ...] | list[str]) -> str:
    """LV tags for a log line: long user tags counted, not printed."""
    pads = [t for t in lv_tags if t.startswith("sl.user.pad")]
    rest = [t for t in lv_tags if t not in pads]
    return ",".join(rest) + (f" (+{len(pads)} padding tags)" if pads else "")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(x) for x in path.read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants, by pid (``sharedlvm run`` may fork its
    consumer into a process group of its own)."""
    for victim in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def argv_of(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


class EventLog:
    def __init__(self, path: Path, echo: bool) -> None:
        self.path = path
        self.echo = echo
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed by close()

    def __call__(self, message: str, echo: bool = False) -> None:
        line = (f"{time.monotonic() - self.t0:8.2f} [{threading.current_thread().name}] "
                f"{message}")
        with self._lock:
            self._file.write(line + "\n")
            if echo and self.echo:
                print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._file.close()


class Gate:
    """Workers pass it to start an operation; a check closes it and waits until no
    operation is in flight (retries included)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.paused = 0
        self.active = 0

    def enter(self, stop: threading.Event) -> bool:
        with self.cond:
            while self.paused and not stop.is_set():
                self.cond.wait(0.5)
            if stop.is_set():
                return False
            self.active += 1
            return True

    def leave(self) -> None:
        with self.cond:
            self.active -= 1
            self.cond.notify_all()

    def pause(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            self.paused += 1
            while self.active and time.monotonic() < deadline:
                self.cond.wait(0.2)
            return self.active == 0

    def resume(self) -> None:
        with self.cond:
            self.paused -= 1
            self.cond.notify_all()


class Torture:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.lock = threading.RLock()
        self.requests: dict[str, Req] = {}
        self.volumes: dict[str, Vol] = {}
        self.prepared: dict[tuple[int, str], Prep] = {}
        self.consumers: list[Consumer] = []
        self.op_stats: dict[str, OpStats] = defaultdict(OpStats)
        self.consumer_stats: Counter[str] = Counter()
        self.fault_stats: Counter[str] = Counter()
        self.fault_notes: dict[str, Counter[str]] = defaultdict(Counter)
        self.notes: Counter[str] = Counter()
        self.violations: list[tuple[str, str]] = []
        self.seen_violations: set[str] = set()
        self.harness_errors: list[str] = []
        self.crash_times: list[float] = []
        self.outages: list[Outage] = []
        self.stop_ops = threading.Event()
        self.stop_faults = threading.Event()
        self.stop_monitor = threading.Event()
        self.gate = Gate()
        self.stopped_pids: set[int] = set()
        self.host_locks: dict[int, threading.Lock] = {}
        self.host_uncertain: dict[int, bool] = {}
        self.daemon_pids: dict[int, int | None] = {}
        self.daemon_fp: dict[int, str] = {}
        self.vol_counts: dict[str, int] = {}
        self.next_cid = 0
        self.checks = 0
        self.replays = 0
        self.max_count = 0
        self.last_crash = float("-inf")
        self.t_ops_start = 0.0
        self.t_ops_end = 0.0
        self.wall_start = time.monotonic()
        self.t_end = 0.0
        self.sup_lock = threading.Lock()
        self.check_rng = random.Random(f"{cfg.seed}:checks")
        self.cluster: Cluster | None = None
        self.workdir = Path()
        self.upload_file = Path()
        self.log: EventLog | None = None
        self.vm_actor: VmActor | None = None

    # Small helpers

    def say(self, message: str, echo: bool = False) -> None:
        if self.log:
            self.log(message, echo)

    def violation(self, kind: str, message: str) -> None:
        """Record a broken invariant (each distinct message once)."""
        with self.lock:
            if message in self.seen_violations:
                return
            self.seen_violations.add(message)
            self.violations.append((kind, message))
        self.say(f"VIOLATION ({kind}): {message}", echo=True)

    def harness_error(self, what: str) -> None:
        text = f"{what}: {traceback.format_exc(limit=4)}"
        with self.lock:
            self.harness_errors.append(text)
        self.say(f"HARNESS ERROR {text}", echo=True)

    @property
    def c(self) -> Cluster:
        assert self.cluster is not None
        return self.cluster

    @property
    def hosts(self) -> list[Host]:
        return self.c.hosts

    def host(self, index: int) -> Host:
        return self.hosts[index - 1]

    def client(self, index: int, timeout: float = 150.0) -> Client:
        return Client(self.host(index).root, timeout=timeout)

    def dpid(self, host: Host) -> int | None:
        """The pid of the host's daemon, checked to be that daemon: a daemon that
        exited by itself (a failpoint, the hang watcher) leaves its pid file, and pids
        are reused quickly here (pid_max 32768). A stale pid file is removed, so that
        nothing (this harness, ``sim down``) signals whoever got that pid."""
        pid = host.daemon.pid
        if pid is None:
            return None
        if str(host.daemon.log_file) in argv_of(pid):
            return pid
        with contextlib.suppress(OSError):
            if host.daemon.pid_file.read_text().split()[0] == str(pid):
                host.daemon.pid_file.unlink()
        self.say(f"host{host.index}: stale daemon pid file (pid {pid} is another process)")
        return None

    def t(self, when: float) -> str:
        """A monotonic time as the log shows it."""
        return f"{when - (self.log.t0 if self.log else self.wall_start):.1f}"

    def recent_crash(self, start: float, end: float) -> bool:
        return any(start - self.cfg.crash_bound <= t <= end for t in self.crash_times)

    # Set-up

    def setup(self) -> None:
        cfg = self.cfg
        self.workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="sharedlvm-torture-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "consumers").mkdir(exist_ok=True)
        self.upload_file = self.workdir / "upload.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.upload_file),
                        "256M"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8M",
                        str(self.upload_file)], check=True, capture_output=True)
        self.fpdir = self.workdir / "failpoints"
        self.fpdir.mkdir(exist_ok=True)
        self.log = EventLog(self.workdir / "torture.log", cfg.verbose)
        self.failpoints = discover_failpoints()
        for name in self.failpoints:
            (self.fpdir / f"{name}.fired").touch()  # present = disarmed
        self.say(f"seed {cfg.seed}, {cfg.hosts} hosts, {cfg.minutes:g} min; failpoints: "
                 f"{', '.join(self.failpoints) or 'none'}; host crashes: "
                 f"{'on' if cfg.crashes_on else 'off'}; sharedlvm from "
                 f"{Path(sharedlvm.__file__).parent}; work dir {self.workdir}", echo=True)
        env = self.fp_env(0.0)
        self.cluster = make_cluster(self.workdir / "bed", hosts=cfg.hosts, size=cfg.lun_size,
                                    daemon_env=env, luns=cfg.shards)
        self.vg = self.c.name
        for h in self.hosts:
            self.host_locks[h.index] = threading.Lock()
            self.host_uncertain[h.index] = False
            self.daemon_pids[h.index] = self.dpid(h)
            if self.failpoints:
                self.daemon_fp[h.index] = self.failpoints[0]
        self.say("bed up: " + ", ".join(f"host{h.index} daemon {self.dpid(h)}"
                                        for h in self.hosts), echo=True)

    def fp_env(self, x: float) -> dict[str, str]:
        if not self.failpoints:
            return {}
        name = self.failpoints[int(x * len(self.failpoints)) % len(self.failpoints)]
        return {failpoints.ENV: f"{name}:{self.fpdir / (name + '.fired')}"}

    def start_daemon(self, host: Host, x: float) -> None:
        """Start the host's daemon (its sanlock too, if that is down)."""
        env = self.fp_env(x)
        for attempt in range(3):
            try:
                sim.start_services(Runner(), self.c.bed, host.paths, env)
                break
            except Exception:
                self.harness_error(f"starting host{host.index}'s services (try {attempt + 1})")
                time.sleep(1)
        if env:
            self.daemon_fp[host.index] = env[failpoints.ENV].split(":")[0]
        self.say(f"host{host.index}: daemon started, pid {self.dpid(host)}")

    # Requests with a request id: asked until definitely answered

    def new_req(self, rid: str, kind: str, host: int, call: Callable[[Client], Any],
                volume: str = "") -> Req:
        req = Req(rid, kind, host, call, time.monotonic(), volume=volume)
        with self.lock:
            assert rid not in self.requests, rid
            self.requests[rid] = req
            self.op_stats[kind].tried += 1
        return req

    def ask(self, req: Req, stats_kind: str | None = None) -> None:
        stats = self.op_stats[stats_kind or req.kind]
        host = req.host
        switch_at = time.monotonic() + 30
        while True:
            req.attempts += 1
            if req.attempts > 1:
                stats.retries += 1
            try:
                with self.host_locks[host]:
                    result = req.call(self.client(host))
            except Exception as exc:
                cls = error_class(exc)
                if cls in UNCERTAIN:
                    req.uncertain = True
                    with self.lock:
                        self.host_uncertain[host] = True
                nonfinal = (ERRORS_SAY_FINAL and cls not in UNCERTAIN and cls not in LOCAL
                            and isinstance(exc, errors.Error)
                            and not (getattr(exc, "final", False)
                                     or getattr(exc, "changes_nothing", False)))
                if nonfinal:
                    req.nonfinal += 1
                    if req.nonfinal >= NONFINAL_TRIES:
                        req.open = True
                        with self.lock:
                            self.notes["requests left open (not-final error after "
                                       f"{NONFINAL_TRIES} tries)"] += 1
                        self.finish(req, stats, "failed", cls, str(exc))
                        return
                elif cls not in UNCERTAIN and not (req.uncertain and cls in LOCAL):
                    self.finish(req, stats, "failed", cls, str(exc))
                    return
                if time.monotonic() - req.t_sent > self.cfg.answer_deadline:
                    self.finish(req, stats, "abandoned", cls, str(exc))
                    self.violation("no definite answer",
                                   f"request {req.rid} ({req.kind}) got no definite answer "
                                   f"in {self.cfg.answer_deadline:g} s ({req.attempts} "
                                   f"attempts, last: {cls}: {exc})")
                    return
                self.say(f"{req.rid}: {cls} on host{host}, asking again ({exc})")
                time.sleep(1.0 if nonfinal else 0.5)
                if cls in LOCAL or time.monotonic() > switch_at:  # that host cannot ask now
                    host = host % len(self.hosts) + 1
                    switch_at = time.monotonic() + 30
                continue
            with self.lock:
                self.host_uncertain[host] = False
            self.finish(req, stats, "acked", "", "", result)
            return

    def finish(self, req: Req, stats: OpStats, status: str, cls: str, message: str,
               result: Any = None) -> None:
        with self.lock:
            req.status, req.error, req.message, req.result = status, cls, message, result
            req.t_done = time.monotonic()
            if status == "acked":
                stats.acked += 1
            elif status == "failed":
                stats.failed[cls] += 1
            else:
                stats.abandoned += 1
        self.say(f"{req.rid} {req.kind}" + (f" of {req.volume}" if req.volume else "")
                 + f" on host{req.host}: {status}"
                 + (f" {cls}: {message}" if cls else "")
                 + (f" -> {getattr(result, 'uuid', result)}" if result is not None else ""))

    def once(self, kind: str, host: int, call: Callable[[Client], Any]) -> tuple[bool, Any, str]:
        """An operation without a request id: asked once."""
        stats = self.op_stats[kind]
        with self.lock:
            stats.tried += 1
        try:
            result = call(self.client(host))
        except Exception as exc:
            cls = error_class(exc)
            with self.lock:
                stats.failed[cls] += 1
            self.say(f"{kind} on host{host}: failed {cls}: {exc}")
            return False, None, cls
        with self.lock:
            stats.acked += 1
        self.say(f"{kind} on host{host}: ok")
        return True, result, ""

    # Operations

    def worker(self, host: Host) -> None:
        rng = random.Random(f"{self.cfg.seed}:ops:{host.index}")
        n = 0
        while not self.stop_ops.is_set():
            kind = pick(OP_WEIGHTS, rng.random())
            p = [rng.random() for _ in range(6)]
            pause = 0.05 + 0.45 * rng.random()
            n += 1
            self.say(f"decides op {n}: {kind} " + " ".join(f"{x:.3f}" for x in p))
            if not self.gate.enter(self.stop_ops):
                break
            try:
                self.do_op(host, kind, p, n)
            except Exception:
                self.harness_error(f"host{host.index} op {kind}")
            finally:
                self.gate.leave()
            self.stop_ops.wait(pause)

    def live_count(self) -> int:
        """Volumes the workers can use (those whose fate is open do not count; they
        are deleted again like the others)."""
        with self.lock:
            return sum(v.state == "present" for v in self.volumes.values())

    def do_op(self, host: Host, kind: str, p: list[float], n: int) -> None:
        live = self.live_count()
        if kind.startswith("create") and live >= self.cfg.max_volumes:
            kind = "delete"
        if kind in ("extend", "delete", "prepare", "consume") and live < 3:
            kind = "create-raw"
        rid = f"s{self.cfg.seed}-h{host.index}-{n}"
        {"create-raw": self.op_create, "create-qcow2": self.op_create,
         "create-bigtags": self.op_create, "extend": self.op_extend,
         "delete": self.op_delete, "prepare": self.op_prepare,
         "teardown": self.op_teardown, "consume": self.op_consume,
         "release-manager": self.op_release, "list": self.op_list,
         "snapshot": self.op_snapshot, "clone": self.op_clone, "merge": self.op_merge,
         "upload": self.op_upload, "image-delete": self.op_image_delete,
         }[kind](host, kind, p, rid)

    def pick_volume(self, x: float, pred: Callable[[Vol], bool], busy: bool,
                    open_too: bool = False) -> Vol | None:
        """A volume believed present. ``busy``: for a metadata change, which takes it
        (one at a time per volume, so the ledger stays exact); otherwise (a consumer,
        a prepare) any, also one being deleted or extended right now: those races
        are what the leases are for."""
        with self.lock:
            cands = sorted((v for v in self.volumes.values()
                            if (v.state == "present" or (open_too and v.state == "maybe"
                                                         and "left open" in v.why_maybe))
                            and not (busy and v.busy) and pred(v)),
                           key=lambda v: v.rid)
            if not cands:
                return None
            vol = cands[int(x * len(cands))]
            if busy:
                vol.busy = True
            return vol

    def op_create(self, host: Host, kind: str, p: list[float], rid: str,
                  request_id: str | None = None) -> Req:
        rid = request_id or rid + "-c"
        tags = {"rid": rid, "torture": str(self.cfg.seed)}
        fmt, alloc = "raw", None
        if kind == "create-qcow2":
            fmt = "qcow2"
            size = [512 * MiB, 1 * GiB, 2 * GiB][int(p[1] * 3)]
            alloc = "preallocated" if p[2] < 0.3 else "thin"
            if alloc == "preallocated":
                size = 512 * MiB
        elif kind == "create-bigtags":
            size = 128 * MiB
            for i in range(20 + int(p[1] * 10)):  # 2.2-3.3 KiB of user tags
                tags[f"pad{i:02d}"] = "x" * 100
        else:
            size = [128 * MiB, 256 * MiB, 384 * MiB, 512 * MiB][int(p[1] * 4)]

        def call(c: Client) -> Any:
            return c.create_volume(size, format=fmt, alloc=alloc, tags=tags, request_id=rid)

        req = self.new_req(rid, kind, host.index, call)
        self.ask(req)
        if req.status == "acked":
            info = req.result
            with self.lock:
                self.volumes[info.uuid] = Vol(info.uuid, rid, fmt, info.capacity, info.size,
                                              image=info.image)
                req.volume = info.uuid
        return req

    def op_snapshot(self, host: Host, kind: str, p: list[float], rid: str) -> None:
        """A new qcow2 leaf over a leaf (images.py). A chain is kept short: a volume
        already a snapshot is snapshotted again only sometimes."""
        vol = self.pick_volume(p[0], lambda v: v.leaf and (v.parent is None or p[2] < 0.3),
                               busy=True)
        if vol is None:
            self.op_list(host, "list", p, rid)
            return
        rid += "-s"
        tags = {"rid": rid, "torture": str(self.cfg.seed)}
        try:
            req = self.new_req(rid, "snapshot", host.index,
                               lambda c: c.snapshot_volume(vol.uuid, tags=tags,
                                                           request_id=rid), vol.uuid)
            self.ask(req)
            with self.lock:
                if req.status == "acked":
                    info = req.result
                    self.volumes[info.uuid] = Vol(info.uuid, rid, "qcow2", info.capacity,
                                                  info.size, parent=vol.uuid,
                                                  image=info.image)
                    vol.leaf = False
                    req.volume = info.uuid
                elif req.status == "failed":
                    vol.failures.append(f"{req.rid} ({req.error}, t={self.t(req.t_done)})")
        finally:
            with self.lock:
                vol.busy = False

    def op_clone(self, host: Host, kind: str, p: list[float], rid: str) -> None:
        """A full clone (copies.py), copied on the asking host under the source's
        shared leases: raced by deletes and consumers of the source, faults on the
        copier and its qemu-img, failovers between its reserve and its publish."""
        vol = self.pick_volume(p[0], lambda v: v.capacity <= 512 * MiB, busy=False)
        if vol is None:
            self.op_list(host, "list", p, rid)
            return
        rid += "-k"
        tags = {"rid": rid, "torture": str(self.cfg.seed)}
        fmt = "qcow2" if p[1] < 0.3 else None
        self.ask_new_volume(self.new_req(
            rid, "clone", host.index,
            lambda c: c.clone_volume(vol.uuid, linked=False, format=fmt, tags=tags,
                                     request_id=rid), vol.uuid))

    def ask_new_volume(self, req: Req) -> None:
        """Ask ``req``, whose answer is a new volume of a new image; follow it."""
        self.ask(req)
        with self.lock:
            if req.status == "acked":
                info = req.result
                self.volumes[info.uuid] = Vol(info.uuid, req.rid, info.format.value,
                                              info.capacity, info.size, image=info.image)
                req.volume = info.uuid

    def op_upload(self, host: Host, kind: str, p: list[float], rid: str) -> None:
        """A qcow2 file of the harness imported (copies.py), copied on the asking host."""
        if self.live_count() >= self.cfg.max_volumes:
            self.op_list(host, "list", p, rid)
            return
        rid += "-u"
        tags = {"rid": rid, "torture": str(self.cfg.seed)}
        self.ask_new_volume(self.new_req(
            rid, "upload", host.index,
            lambda c: c.upload_volume(self.upload_file, tags=tags, request_id=rid)))

    def op_image_delete(self, host: Host, kind: str, p: list[float], rid: str) -> None:
        """Every volume of an image, the leaf first (images.py), while its volumes are
        left alone by the other workers."""
        with self.lock:
            cands = sorted({v.image for v in self.volumes.values()
                            if v.image and v.state == "present"})
            members: list[Vol] = []
            if cands:
                image = cands[int(p[0] * len(cands))]
                members = [v for v in self.volumes.values() if v.image == image
                           and v.state in ("present", "maybe")]
            if not members or any(v.busy for v in members):
                members = []
            for v in members:
                v.busy = True
        if not members:
            self.op_list(host, "list", p, rid)
            return
        rid += "-i"
        try:
            req = self.new_req(rid, "image-delete", host.index,
                               lambda c: c.delete_image(image, request_id=rid))
            self.ask(req)
            with self.lock:
                if req.status == "acked":
                    gone = set(req.result.volumes)
                    for v in members:
                        if v.uuid in gone:
                            v.state, v.t_deleted = "deleted", time.monotonic()
                elif req.open or req.status == "abandoned":
                    for v in members:
                        v.state, v.why_maybe = "maybe", "image delete left open"
        finally:
            with self.lock:
                for v in members:
                    v.busy = False

    def op_merge(self, host: Host, kind: str, p: list[float], rid: str) -> None:
        """A snapshot merged into the volume below it (images.py), raced by consumers
        of its image; crashed at its failpoints by the fault side."""
        vol = self.pick_volume(p[0], lambda v: v.parent is not None, busy=True)
        if vol is None:
            self.op_list(host, "list", p, rid)
            return
        rid += "-m"
        with self.lock:
            parent = self.volumes.get(vol.parent or "")
        try:
            req = self.new_req(rid, "merge", host.index,
                               lambda c: c.merge_volume(vol.uuid, request_id=rid), vol.uuid)
            self.ask(req)
            with self.lock:
                if req.status == "acked":
                    vol.state, vol.t_deleted = "deleted", time.monotonic()
                    for other in self.volumes.values():
                        if other.parent == vol.uuid:
                            other.parent = vol.parent
                    if parent is not None:
                        parent.size = req.result.size  # grown for the snapshot's data
                        parent.leaf = parent.leaf or vol.leaf
                elif req.open or req.status == "abandoned":
                    vol.state, vol.why_maybe = "maybe", "merge left open"
                    if parent is not None:
                        parent.size_known = False
                elif req.status == "failed":
                    vol.failures.append(f"{req.rid} ({req.error}, t={self.t(req.t_done)})")
        finally:
            with self.lock:
                vol.busy = False

    def op_extend(self, host: Host, kind: str, p: list[float], rid: str) -> None:
        vol = self.pick_volume(p[0], lambda v: v.capacity < (1536 * MiB if v.fmt == "raw"
                                                             else 4 * GiB), busy=True)
        if vol is None:
            self.op_list(host, "list", p, rid)
            return
        try:
            if p[1] < 0.5:
                size = "+128M" if vol.fmt == "raw" else "+512M"
            else:
                size = f"{vol.capacity // MiB + 256}M"
            req = self.new_req(rid + "-e", "extend", host.index,
                               lambda c: c.extend_volume(vol.uuid, size, request_id=rid + "-e"),
                               vol.uuid)
            self.ask(req)
            with self.lock:
                if req.status == "acked":
                    vol.capacity, vol.size = req.result.capacity, req.result.size
                    vol.extended = True
                elif req.status == "abandoned" or req.open:
                    vol.size_known = False
                if req.status == "failed":
                    vol.failures.append(f"{req.rid} ({req.error}, t={self.t(req.t_done)})")
        finally:
            with self.lock:
                vol.busy = False

    def op_delete(self, host: Host, kind: str, p: list[float], rid: str) -> None:
        vol = self.pick_volume(p[0], lambda v: True, busy=True, open_too=True)
        if vol is None:
            self.op_list(host, "list", p, rid)
            return
        wipe = p[1] < 0.3
        try:
            req = self.new_req(rid + "-d", "delete-wipe" if wipe else "delete", host.index,
                               lambda c: c.delete_volume(vol.uuid, wipe=wipe,
                                                         request_id=rid + "-d"), vol.uuid)
            self.ask(req)
            with self.lock:
                if req.status == "failed":
                    vol.failures.append(f"{req.rid} ({req.error}, t={self.t(req.t_done)})")
                if req.status == "acked":
                    vol.state, vol.t_deleted = "deleted", req.t_done
                    below = self.volumes.get(vol.parent or "")
                    if below is not None:  # the leaf again (images.py)
                        below.leaf = True
                elif vol.state == "maybe" and req.error == "VolumeNotFound":
                    vol.state = "deleted"  # the delete left open took effect meanwhile
                elif req.status == "abandoned":
                    vol.state, vol.why_maybe = "maybe", f"delete {req.rid} unanswered"
                elif req.open:
                    vol.state, vol.why_maybe = "maybe", f"delete {req.rid} left open"
                elif wipe and req.error not in CLEAN_REFUSALS:
                    # marked removing before it failed: the next manager rolls it forward
                    vol.state, vol.why_maybe = "maybe", f"wipe-delete {req.rid} failed"
            if req.status == "acked":
                self.check_deleted_unused(vol, req)
        finally:
            with self.lock:
                vol.busy = False

    def check_deleted_unused(self, vol: Vol, req: Req) -> None:
        """Right after a delete was acknowledged: no lease holder may still be using it."""
        with self.lock:
            preps = [pr for pr in self.prepared.values() if pr.volume == vol.uuid]
            cons = [c for c in self.consumers if c.volume == vol.uuid and not c.done]
        for pr in preps:
            if (pr.t_ack < req.t_sent and (pr.t_teardown is None or pr.t_teardown > req.t_done)
                    and pid_alive(pr.holder_pid)):
                self.violation("delete acknowledged while prepared",
                               f"delete {req.rid} of {vol.uuid} acknowledged while it was prepared "
                               f"on host{pr.host} for pid {pr.holder_pid} "
                               f"({'shared' if pr.shared else 'exclusive'}) since before the "
                               "request was sent")
        for c in cons:
            # the writer itself, not `run`, which outlives it a moment (it deactivates)
            if c.state_file.exists() and self.writer_alive(c) and "deleted" not in c.flagged:
                c.flagged.add("deleted")
                self.violation("delete acknowledged while a consumer wrote",
                               f"delete {req.rid} of {vol.uuid} acknowledged while consumer "
                               f"c{c.cid} (pid {c.writer}, host{c.host}, {c.kind}) was writing "
                               f"it: {read_text(c.state_file).strip()!r}")
                kill_tree(c.proc.pid)

    def op_prepare(self, host: Host, kind: str, p: list[float], rid: str) -> None:
        vol = self.pick_volume(p[0], lambda v: True, busy=False)
        if vol is None:
            return
        if (host.index, vol.uuid) in self.prepared:
            self.op_teardown(host, "teardown", p, rid)
            return
        shared = p[1] < 0.3
        if PREPARE_TAKES_PID:
            self.prepare_for_vm(host, vol, shared)
            return
        pid = self.dpid(host)
        ok, path, cls = self.once("prepare", host.index,
                                  lambda c: c.prepare_volume(vol.uuid, shared=shared))
        if not ok:
            if cls in UNCERTAIN:
                with contextlib.suppress(Exception):
                    self.client(host.index, 10).teardown_volume(vol.uuid)
            return
        if pid is None or self.dpid(host) != pid:
            self.notes["prepare answered by a daemon that then restarted"] += 1
            return
        entry = Prep(host.index, vol.uuid, shared, pid, time.monotonic(), str(path))
        with self.lock:
            self.prepared[(host.index, vol.uuid)] = entry
        if self.cfg.prepare_writers and not shared and vol.fmt == "raw":
            entry.writer = self.start_consumer(host, vol.uuid, "prepared", 1e9, 0.0,
                                               str(path))

    def prepare_for_vm(self, host: Host, vol: Vol, shared: bool) -> None:
        """A registered "VM" first, then ``prepare --pid`` for it: the lease is its."""
        with self.lock:
            vms = sum(not c.done and c.kind == "vm" for c in self.consumers)
        if vms >= self.cfg.max_consumers:
            return
        vm = self.start_consumer(host, vol.uuid, "vm", 1e9, 0.0)
        pid = self.consumer_pid(vm)
        if pid is None:
            self.notes["VMs that never ran (not registered in 30 s)"] += 1
            self.stop_consumer(vm)
            return
        ok, path, _ = self.once("prepare", host.index,
                                lambda c: c.prepare_volume(vol.uuid, pid, shared=shared))
        if not ok:
            self.stop_consumer(vm)
            with contextlib.suppress(Exception):
                self.client(host.index, 10).teardown_volume(vol.uuid)
            return
        entry = Prep(host.index, vol.uuid, shared, pid, time.monotonic(), str(path), writer=vm)
        with self.lock:
            self.prepared[(host.index, vol.uuid)] = entry
        assert vm.path_file is not None
        tmp = vm.path_file.with_suffix(".tmp")
        tmp.write_text("hold" if shared or vol.fmt != "raw" else str(path))
        os.replace(tmp, vm.path_file)

    @staticmethod
    def writer_alive(cons: Consumer) -> bool:
        """The process writing with devcount (it holds the lease) still runs. Not the
        ``sharedlvm run`` parent: newer ones outlive their consumer a moment, to
        deactivate its volumes. Alive after a delete was acknowledged means alive,
        and holding the lease, during the whole delete."""
        if cons.writer is None and cons.proc.poll() is None:
            for pid in [cons.proc.pid, *descendants(cons.proc.pid)]:
                argv = argv_of(pid)
                if str(cons.state_file) in argv and (DEVCOUNT in argv[:3]
                                                     or argv[1:2] == ["-c"]):
                    cons.writer = pid
                    break
        return (cons.writer is not None and pid_alive(cons.writer)
                and str(cons.state_file) in argv_of(cons.writer))

    def consumer_pid(self, cons: Consumer, timeout: float = 30.0) -> int | None:
        """The registered consumer of a ``sharedlvm run``: the process (the run itself,
        or a child it forked) running our ``python -c`` with this consumer's state file."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and cons.proc.poll() is None:
            for pid in [cons.proc.pid, *descendants(cons.proc.pid)]:
                argv = argv_of(pid)
                if len(argv) > 3 and argv[1] == "-c" and str(cons.state_file) in argv:
                    return pid
            time.sleep(0.05)
        return None

    def op_teardown(self, host: Host, kind: str, p: list[float], rid: str) -> None:
        with self.lock:
            mine = sorted((k for k in self.prepared if k[0] == host.index),
                          key=lambda k: self.volumes[k[1]].rid if k[1] in self.volumes else k[1])
            if not mine:
                key = None
            else:
                key = mine[int(p[0] * len(mine))]
                entry = self.prepared[key]
                entry.t_teardown = time.monotonic()
        if key is None:
            self.op_list(host, "list", p, rid)
            return
        if entry.writer is not None:
            self.stop_consumer(entry.writer)  # the VM stops writing, then let go
        ok, _, cls = self.once("teardown", host.index,
                               lambda c: c.teardown_volume(key[1]))
        if ok or cls in ("NotFound", "VolumeNotFound") or not pid_alive(entry.holder_pid):
            with self.lock:
                self.prepared.pop(key, None)

    def op_consume(self, host: Host, kind: str, p: list[float], rid: str) -> None:
        with self.lock:
            alive = [c for c in self.consumers if not c.done and c.kind == "run"]
        if (len(alive) >= self.cfg.max_consumers
                or sum(c.host == host.index for c in alive) >= 2):
            self.op_list(host, "list", p, rid)
            return
        vol = self.pick_volume(p[0], lambda v: v.fmt == "raw" and (not v.extended or p[3] < 0.2),
                               busy=False)
        if vol is None:
            return
        duration = 2.0 + 18.0 * p[1]
        wait = 0.0 if p[2] < 0.6 else 1.0 + 7.0 * p[4]
        with self.lock:
            self.op_stats["consume"].tried += 1
            self.op_stats["consume"].acked += 1
        self.start_consumer(host, vol.uuid, "run", duration, wait)

    def op_release(self, host: Host, kind: str, p: list[float], rid: str) -> None:
        ok, released, _ = self.once("release-manager", host.index,
                                    lambda c: c.release_manager())
        if ok and released:
            self.notes["manager released by an operation"] += 1
            self.say(f"host{host.index} released the manager role", echo=False)

    def idle_snapshot(self) -> tuple[set[str], set[str]]:
        with self.lock:
            present = {v.uuid for v in self.volumes.values()
                       if v.state == "present" and not v.busy}
            deleted = {v.uuid for v in self.volumes.values()
                       if v.state == "deleted" and not v.busy}
        return present, deleted

    def op_list(self, host: Host, kind: str, p: list[float], rid: str) -> None:
        before_present, before_deleted = self.idle_snapshot()
        ok, vols, _ = self.once("list", host.index, lambda c: c.list_volumes())
        after_present, after_deleted = self.idle_snapshot()
        if not ok:
            return
        listed = {v.uuid for v in vols}
        for uuid_ in sorted((before_present & after_present) - listed):
            self.violation("list misses an acknowledged volume",
                           f"volume {uuid_} (acknowledged, idle) missing from host{host.index}'s "
                           "volume list")
        for uuid_ in sorted(before_deleted & after_deleted & listed):
            self.violation("list shows a deleted volume",
                           f"volume {uuid_} (delete acknowledged) still in host{host.index}'s "
                           "volume list")

    # Consumers

    def start_consumer(self, host: Host, volume: str, kind: str, duration: float, wait: float,
                       path: str | None = None) -> Consumer:
        """kind "run": devcount under ``sharedlvm run --volume``; "vm": a registered
        process waiting for a prepared device (VM_CODE); "prepared": devcount on a
        device a daemon-held prepare returned (older sharedlvm)."""
        with self.lock:
            self.next_cid += 1
            cid = self.next_cid
        base = self.workdir / "consumers"
        state, err = base / f"c{cid}.state", base / f"c{cid}.err"
        path_file = base / f"c{cid}.path" if kind == "vm" else None
        counter = [sys.executable, "-m", DEVCOUNT, path or "{0}", "--host-id", str(host.index),
                   "--state", str(state), "--interval", "0.05"]
        if kind == "run":
            argv = [sys.executable, "-m", "sharedlvm", "run", "--volume", volume]
            if wait:
                argv += ["--wait", f"{wait:.1f}"]
            argv += ["--", *counter]
        elif kind == "vm":
            argv = [sys.executable, "-m", "sharedlvm", "run", "--", sys.executable, "-c",
                    VM_CODE, str(path_file), str(state), str(host.index)]
        else:
            argv = counter
        with open(err, "wb") as errf:
            proc = subprocess.Popen(argv, env=host.env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=errf,
                                    start_new_session=True)
        now = time.monotonic()
        cons = Consumer(cid, host.index, volume, kind, proc, state, err, now, now + duration,
                        path_file=path_file)
        with self.lock:
            self.consumers.append(cons)
            self.consumer_stats[f"started ({kind})"] += 1
        self.say(f"consumer c{cid} ({kind}) on host{host.index} for {volume}: pid {proc.pid}"
                 + (f", {duration:.1f} s" if duration < 1e6 else "")
                 + (f", --wait {wait:.1f}" if wait else ""))
        return cons

    def stop_consumer(self, cons: Consumer, timeout: float = 10.0) -> None:
        """SIGTERM (``sharedlvm run`` passes it on to its consumer), then SIGKILL."""
        if cons.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(cons.proc.pid, signal.SIGTERM)
            try:
                cons.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_tree(cons.proc.pid)
                cons.proc.wait(5)
        self.supervise_once()

    def supervise(self) -> None:
        while not self.stop_monitor.is_set():
            try:
                self.supervise_once()
                self.watch_daemons()
            except Exception:
                self.harness_error("supervisor")
            self.stop_monitor.wait(0.2)

    def supervise_once(self) -> None:
        with self.sup_lock:
            self._supervise_once()

    def _supervise_once(self) -> None:
        with self.lock:
            alive = [c for c in self.consumers if not c.done]
        for c in alive:
            with self.lock:
                vol = self.volumes.get(c.volume)
                deleted = vol is not None and vol.state == "deleted"
            writing = self.writer_alive(c)  # after the ledger: alive now = after the ack
            rc = c.proc.poll()
            text = read_text(c.state_file)
            if text and not c.started:
                c.started = True
                self.consumer_started(c, text)
            if "TWO WRITERS" in text and "two" not in c.flagged:
                c.flagged.add("two")
                self.violation("two writers",
                               f"TWO WRITERS on {c.volume}: consumer c{c.cid} (host{c.host}, "
                               f"{c.kind}): {text.strip()!r}")
            if rc is None:
                if deleted and c.started and writing and "deleted" not in c.flagged:
                    c.flagged.add("deleted")
                    self.violation("consumer writing a deleted volume",
                                   f"consumer c{c.cid} (pid {c.writer}, host{c.host}, {c.kind}) "
                                   f"still writing {c.volume} after its delete was acknowledged: "
                                   f"{text.strip()!r}")
                    kill_tree(c.proc.pid)
                now = time.monotonic()
                if now >= c.t_stop and not c.stopping:
                    c.stopping, c.t_kill = True, now + 5
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(c.proc.pid, signal.SIGTERM)
                elif c.stopping and now >= c.t_kill:
                    kill_tree(c.proc.pid)
                continue
            self.consumer_finished(c, rc, text)

    def consumer_started(self, c: Consumer, text: str) -> None:
        m = re.search(r"^start (\d+)", text, re.M)
        if not m:
            return
        start = int(m.group(1))
        with self.lock:
            before = self.vol_counts.get(c.volume, 0)
        if start < before:
            self.violation("counter went back",
                           f"counter of {c.volume} went back: consumer c{c.cid} (host{c.host}) "
                           f"found {start}, an earlier consumer had written {before}")

    def consumer_finished(self, c: Consumer, rc: int, text: str) -> None:
        c.done = True
        m = re.search(r"^count (\d+)", text, re.M)
        count = int(m.group(1)) if m else None
        if count is not None:
            with self.lock:
                self.vol_counts[c.volume] = max(self.vol_counts.get(c.volume, 0), count)
                self.max_count = max(self.max_count, count)
        err = read_text(c.err_file)
        if rc == 3 and "two" not in c.flagged:
            c.flagged.add("two")
            self.violation("two writers",
                           f"TWO WRITERS on {c.volume}: consumer c{c.cid} (host{c.host}) exit 3: "
                           f"{err.strip()!r}")
        if rc == 4 or "CORRUPT" in text:
            self.violation("corrupt counter",
                           f"corrupt counter record on {c.volume}: consumer c{c.cid} "
                           f"(host{c.host}): {text.strip()!r}")
        if rc == 0:
            outcome = "wrote and stopped" if c.started else "stopped without writing"
        elif c.killed_with_host:
            outcome = "killed with its host"
        elif rc < 0 or rc > 128:  # killed, or a run that passes on its consumer's signal
            signo = -rc if rc < 0 else rc - 128
            name = signal.Signals(signo).name if signo in signal.valid_signals() else signo
            outcome = (f"stopped before writing ({name})" if not c.started
                       else f"killed while writing ({name})")
        elif rc == 1:
            outcome = "refused: " + cli_error_class(err)
        else:
            outcome = f"exit {rc}"
        with self.lock:
            self.consumer_stats[outcome] += 1
        self.say(f"consumer c{c.cid} ({c.kind}) on host{c.host} ended rc={rc}: {outcome}"
                 + (f", count {count}" if count is not None else "")
                 + (f"; {err.strip().splitlines()[-1]}" if err.strip() else ""))

    def watch_daemons(self) -> None:
        """A prepare whose holder died is gone: with older sharedlvm the holder is the
        daemon (killed, failpoint, crash: the lease went with it), with newer ones the
        consumer process."""
        for h in self.hosts:
            pid = self.dpid(h)
            if pid != self.daemon_pids.get(h.index):
                self.say(f"host{h.index}: daemon pid {self.daemon_pids.get(h.index)} -> {pid}")
                with self.lock:
                    self.daemon_pids[h.index] = pid
                    self.host_uncertain[h.index] = False
        with self.lock:
            for key, pr in list(self.prepared.items()):
                if pid_alive(pr.holder_pid):
                    continue
                del self.prepared[key]
                if not PREPARE_TAKES_PID:
                    self.notes["prepared leases gone with their daemon"] += 1
                    if pr.writer is not None and pr.writer.proc.poll() is None:
                        self.notes["prepared-volume writers left without a lease"] += 1

    def kill_consumers_of(self, host: int) -> None:
        with self.lock:
            victims = [c for c in self.consumers if c.host == host and not c.done]
        for c in victims:
            c.killed_with_host = True
            if c.proc.poll() is None:
                kill_tree(c.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(5)

    # The manager

    def manager_once(self, timeout: float = 1.5) -> tuple[int | None, int]:
        """(host index of the manager, how many daemons say they are manager)."""
        m, count, _ = self.manager_term(timeout)
        return m, count

    def manager_term(self, timeout: float = 1.5) -> tuple[int | None, int, int | None]:
        """(manager host index, how many daemons say they are manager, its generation)."""
        found: list[tuple[int, int | None]] = []
        for h in self.hosts:
            if not self.dpid(h):
                continue
            try:
                for s in self.client(h.index, timeout).status():
                    if s.domain == self.vg and s.manager:
                        found.append((h.index, s.generation))
            except Exception:
                continue
        if not found:
            return None, 0, None
        return found[0][0], len(found), found[0][1]

    def wait_manager(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while True:
            m, _ = self.manager_once()
            if m is not None or time.monotonic() > deadline:
                return m
            time.sleep(0.25)

    def monitor(self) -> None:
        """Time without a manager: without the same manager, in the same term
        (generation), in two polls running. A role that passes from host to host
        every second (a takeover that cannot finish its recovery) is no manager."""
        start: float | None = None
        last: tuple[int | None, int | None] = (None, None)
        while not self.stop_monitor.is_set():
            t = time.monotonic()
            try:
                found, count, generation = self.manager_term()
            except Exception:
                self.harness_error("monitor")
                found, count, generation = None, 0, None
            now = time.monotonic()
            if count > 1:
                self.notes["polls where two daemons said they were manager"] += 1
            m = found if found is not None and (found, generation) == last else None
            last = (found, generation)
            if m is None and start is None:
                start = t
                self.say("no manager")
            elif m is not None and start is not None:
                self.close_outage(start, now)
                start = None
            self.stop_monitor.wait(0.25)
        if start is not None:
            self.close_outage(start, time.monotonic())

    def close_outage(self, start: float, end: float) -> None:
        crash = self.recent_crash(start, end)
        bound = self.cfg.crash_bound if crash else self.cfg.fast_bound
        outage = Outage(start, end, bound, "host crash" if crash else "fast")
        with self.lock:
            self.outages.append(outage)
        self.say(f"manager back after {end - start:.1f} s ({outage.cause}, bound {bound:g} s)")
        if end - start > bound:
            self.violation("no manager within the bound",
                           f"no manager for {end - start:.1f} s from "
                           f"t={start - self.wall_start:.0f} s (bound {bound:g} s, "
                           f"{outage.cause})")

    # Faults

    def faults(self) -> None:
        rng = random.Random(f"{self.cfg.seed}:faults")
        lo, hi = self.cfg.fault_gap
        n = 0
        while True:
            gap = lo + (hi - lo) * rng.random()
            kind = pick(FAULT_WEIGHTS, rng.random())
            p = [rng.random() for _ in range(6)]
            if self.stop_faults.wait(gap) or time.monotonic() >= self.t_ops_end:
                return
            n += 1
            self.say(f"decides fault {n}: {kind} " + " ".join(f"{x:.3f}" for x in p))
            kind = self.allowed(kind)
            self.say(f"fault #{n}: {kind}", echo=True)
            try:
                self.inject(kind, p)
            except Exception:
                self.harness_error(f"fault {kind}")
            try:
                self.settle(p[5])
                self.check(final=False)
            except Exception:
                self.harness_error(f"check after {kind}")

    def allowed(self, kind: str) -> str:
        now = time.monotonic()
        if kind == "host-crash" and not (
                self.cfg.crashes_on and now - self.last_crash >= self.cfg.crash_interval
                and now - self.t_ops_start >= self.cfg.first_crash_after
                and self.t_ops_end - now >= self.cfg.crash_bound + 20):
            return "kill-daemon"
        if kind == "failpoint" and not self.failpoints:
            return "kill-manager-daemon"
        return kind

    def inject(self, kind: str, p: list[float]) -> None:
        if kind in ("kill-manager-daemon", "kill-daemon", "stop-manager-daemon", "stop-daemon",
                    "host-crash"):
            m = self.wait_manager(self.cfg.fast_bound)
            want_manager = kind.endswith("manager-daemon") or (kind == "host-crash" and p[0] < 0.5)
            others = [h for h in self.hosts if h.index != m]
            if want_manager and m is not None:
                target = self.host(m)
            else:
                target = others[int(p[1] * len(others))]
            role = "manager" if target.index == m else "non-manager"
            if kind.startswith("kill"):
                self.kill_daemon(target, role, p)
            elif kind.startswith("stop"):
                self.stop_daemon(target, role, p)
            else:
                self.host_crash(target, role, p)
        elif kind == "kill-copier":
            self.kill_copier(p)
        elif kind in ("kill-lvm-child", "kill-qemu-img-child"):
            self.kill_child("lvm" if kind == "kill-lvm-child" else "qemu-img", kind, p)
        elif kind == "failpoint":
            self.fire_failpoint(p)
        elif kind == "torn-outbox":
            self.torn_outbox(p)
        elif kind == "torn-journal":
            self.torn_journal(p)

    def count_fault(self, kind: str, note: str = "") -> None:
        with self.lock:
            self.fault_stats[kind] += 1
            if note:
                self.fault_notes[kind][note] += 1

    def kill_daemon(self, host: Host, role: str, p: list[float]) -> None:
        pid = self.dpid(host)
        if pid is None:
            self.count_fault("kill-daemon", "skipped: not running")
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        host.daemon.pid_file.unlink(missing_ok=True)
        self.count_fault(f"kill-{'manager-' if role == 'manager' else ''}daemon")
        self.say(f"SIGKILL host{host.index}'s daemon pid {pid} ({role})", echo=True)
        time.sleep(0.5 + 2.0 * p[2])
        self.start_daemon(host, p[3])

    def stop_daemon(self, host: Host, role: str, p: list[float]) -> None:
        pid = self.dpid(host)
        if pid is None:
            self.count_fault("stop-daemon", "skipped: not running")
            return
        seconds = 1.0 + 2.0 * p[2]
        with self.lock:
            self.stopped_pids.add(pid)
        os.kill(pid, signal.SIGSTOP)
        self.count_fault(f"stop-{'manager-' if role == 'manager' else ''}daemon")
        self.say(f"SIGSTOP host{host.index}'s daemon pid {pid} ({role}) for {seconds:.1f} s",
                 echo=True)
        try:
            time.sleep(seconds)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            with self.lock:
                self.stopped_pids.discard(pid)

    def host_crash(self, host: Host, role: str, p: list[float]) -> None:
        self.kill_consumers_of(host.index)  # power loss: the consumers die with the host
        if self.vm_actor is not None:
            self.vm_actor.host_crashed(host.index)
        host.crash()
        now = time.monotonic()
        with self.lock:
            self.crash_times.append(now)
            self.last_crash = now
        self.count_fault("host-crash", role)
        self.say(f"host{host.index} crashed ({role}): sanlock and daemon SIGKILLed, consumers "
                 "killed", echo=True)
        time.sleep(1.0 + 2.0 * p[2])
        self.start_daemon(host, p[3])

    def kill_child(self, name: str, kind: str, p: list[float]) -> None:
        """SIGKILL the first ``name`` child of the manager's daemon seen in 12 s (the
        role may move meanwhile: the manager is looked up again every second)."""
        delay = 0.0 if p[2] < 0.3 else 0.15 * p[3]
        # Mostly a metadata write (the interesting case: killed before, during or
        # after its commit), sometimes whatever runs (a report, a refresh).
        writes = {"lvcreate", "lvextend", "lvremove", "lvchange"} if (
            name == "lvm" and p[4] < 0.7) else None
        deadline = time.monotonic() + 12
        m, pid, again = None, None, 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= again:
                m, _ = self.manager_once()
                pid = self.dpid(self.host(m)) if m is not None else None
                again = time.monotonic() + 1.0
            for child in children(pid) if pid else []:
                argv = argv_of(child)
                if not argv or os.path.basename(argv[0]) != name:
                    continue
                if writes and (len(argv) < 2 or argv[1] not in writes):
                    continue
                if delay:
                    time.sleep(delay)
                if parent_of(child) != pid:
                    continue  # finished meanwhile (its pid may even be reused)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
                what = argv[1] if len(argv) > 1 else argv[0]
                self.count_fault(kind, what)
                self.say(f"SIGKILL {name} child {child} of host{m}'s daemon: "
                         f"{' '.join(argv[:2])} (after {delay * 1000:.0f} ms)", echo=True)
                return
            time.sleep(0.002)
        self.count_fault(kind, "no child seen in 12 s")

    def kill_copier(self, p: list[float]) -> None:
        """SIGKILL the first copy process seen in 12 s on any host: the copier (its
        writer dies with it) or the writer, its qemu-img."""
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            for h in self.hosts:
                pid = self.dpid(h)
                for child in children(pid) if pid else []:
                    if "sharedlvm.copier" not in argv_of(child):
                        continue
                    target = child
                    if p[3] < 0.5:
                        target = next(iter(children(child)), child)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(target, signal.SIGKILL)
                    what = "writer" if target != child else "copier"
                    self.count_fault("kill-copier", what)
                    self.say(f"SIGKILL the copy's {what} {target} on host{h.index}",
                             echo=True)
                    return
            time.sleep(0.01)
        self.count_fault("kill-copier", "no copy seen in 12 s")

    def fire_failpoint(self, p: list[float]) -> None:
        """Arm the failpoint the manager's daemon runs with (each daemon gets one name,
        drawn when it starts; the points sit on the manager's paths): the first daemon
        to reach it exits there."""
        m = self.wait_manager(self.cfg.fast_bound)
        name = self.daemon_fp.get(m) if m is not None else None
        if name is None:
            self.count_fault("failpoint", "skipped: no manager")
            return
        armed = [h for h in self.hosts if self.daemon_fp.get(h.index) == name and self.dpid(h)]
        kind = f"failpoint {name}"
        pids = {h.index: self.dpid(h) for h in armed}
        fired = self.fpdir / f"{name}.fired"
        fired.unlink(missing_ok=True)  # armed
        self.say(f"armed failpoint {name} in the daemons of hosts {sorted(pids)} (manager: "
                 f"host{m})", echo=True)
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and not fired.exists():
            time.sleep(0.05)
        try:
            os.close(os.open(fired, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            self.count_fault(kind, "not reached in 25 s")
            return
        except FileExistsError:
            pass
        deadline = time.monotonic() + 5
        dead: list[int] = []
        while time.monotonic() < deadline and not dead:
            dead = [i for i, pid in pids.items() if self.dpid(self.host(i)) != pid]
            time.sleep(0.05)
        self.count_fault(kind, "fired in host" + ",".join(map(str, dead)) if dead
                         else "fired, no daemon died")
        self.say(f"failpoint {name} fired: daemon of host(s) {dead} exited", echo=True)

    def lv_location(self, lv_name: str) -> tuple[str, int]:
        """(PV device, byte offset) of the start of a special LV: written through the
        LUN itself, as another host's torn write would land."""
        lvm = self.c.raw_lvm()
        seg = lvm.segments(self.vg, lv_name)[0]
        pe_start = {pv.name: pv.pe_start for pv in lvm.pvs()}[seg.pv]
        return seg.pv, pe_start + seg.pv_start * lvm.vg(self.vg).extent_size

    def torn_outbox(self, p: list[float]) -> None:
        n = len(self.hosts)
        first = int(p[0] * n)
        order = [self.hosts[(first + i) % n] for i in range(n)]
        pv, base = self.lv_location("mailbox")
        for h in order:
            lock = self.host_locks[h.index]
            if self.host_uncertain[h.index] or not lock.acquire(timeout=5):
                continue
            try:
                logs = {x.index: x.daemon.log_file for x in self.hosts}
                sizes = {i: f.stat().st_size if f.exists() else 0 for i, f in logs.items()}
                rid = f"torn-{self.cfg.seed}-{self.fault_stats['torn-outbox'] + 1}"
                off = mailbox_mod.outbox_offset(h.index)
                with ondisk.BlockFile(pv, writable=True, base=base) as dev:
                    seq = ondisk.peek_seq(dev.read(off, ondisk.BLOCK_SIZE),
                                          mailbox_mod.OUT_MAGIC) or 0
                    block = bytearray(ondisk.encode(mailbox_mod.OUT_MAGIC, seq + 1, {
                        "op": "volume.create", "request_id": rid, "host_id": h.index,
                        "fields": {"size": 128 * MiB, "tags": {"rid": rid},
                                   "request_id": rid}}))
                    block[64 + int(p[2] * 40)] ^= 0xFF  # inside the payload: bad checksum
                    dev.write(off, bytes(block))
                self.say(f"torn outbox record (seq {seq + 1}, request {rid}) written for "
                         f"host{h.index}", echo=True)
                time.sleep(2.5)  # one sweep: the manager reads it, and must ignore it
                seen = False
                for i, f in logs.items():
                    with contextlib.suppress(OSError), open(f, "rb") as fh:
                        fh.seek(sizes[i])
                        if f"outbox of host {h.index}".encode() in fh.read():
                            seen = True
                self.count_fault("torn-outbox", "reported by the manager" if seen
                                 else "no log line seen")
            finally:
                lock.release()
            return
        self.count_fault("torn-outbox", "skipped: every host busy")

    def torn_journal(self, p: list[float]) -> None:
        slots = getattr(journal_mod, "BUCKET_SLOTS", 8)
        buckets = getattr(journal_mod, "REQUEST_BUCKETS", 1024)
        first = getattr(journal_mod, "REQUESTS_OFFSET", 1024 * 1024)
        bucket_size = slots * ondisk.BLOCK_SIZE
        pv, base = self.lv_location("journal")
        n = self.fault_stats["torn-journal"] + 1
        # Under the ledger lock: a request registered later is sent after this write,
        # and no bucket of a request in flight (or unanswered) is touched.
        with self.lock, ondisk.BlockFile(pv, writable=True, base=base) as dev:
            busy = {journal_bucket(r.rid) for r in self.requests.values()
                    if r.status in ("inflight", "abandoned")}
            start = int(p[0] * buckets)
            for i in range(buckets):
                b = (start + i) % buckets
                if b in busy:
                    continue
                data = dev.read(first + b * bucket_size, bucket_size)
                free = [k for k in range(slots)
                        if not any(data[k * ondisk.BLOCK_SIZE:(k + 1) * ondisk.BLOCK_SIZE])]
                if not free:
                    continue
                k = free[int(p[1] * len(free))]
                block = bytearray(ondisk.encode(journal_mod.REQUEST_MAGIC, 1, {
                    "id": f"torn-{self.cfg.seed}-{n}", "op": "create", "state": "done",
                    "time": time.time(), "result": {}}))
                block[64 + int(p[2] * 30)] ^= 0xFF
                dev.write(first + b * bucket_size + k * ondisk.BLOCK_SIZE, bytes(block))
                break
            else:
                self.count_fault("torn-journal", "skipped: no free slot")
                return
        self.count_fault("torn-journal")
        self.say(f"torn request record written in journal bucket {b} slot {k}", echo=True)
        # A request whose id lands in that bucket, then its replay.
        j = 0
        while journal_bucket(f"s{self.cfg.seed}-j{n}-{j}-c") != b:
            j += 1
        host = self.hosts[int(p[3] * len(self.hosts))]
        req = self.op_create(host, "create-journal", [0.0, p[4], 0.0], "",
                             request_id=f"s{self.cfg.seed}-j{n}-{j}-c")
        if req.status == "acked":
            self.replay(req, host)

    # Settling and checking

    def settle(self, x: float) -> None:
        with self.lock:
            stopped = list(self.stopped_pids)
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for h in self.hosts:
            if self.dpid(h) is None:
                self.say(f"host{h.index}: daemon is down, starting it")
                self.start_daemon(h, x)
        now = time.monotonic()
        crash = self.recent_crash(now, now)
        bound = self.cfg.crash_bound if crash else self.cfg.fast_bound
        if self.wait_manager(bound + 30) is None:
            self.say("still no manager after the bound", echo=True)

    def check(self, final: bool) -> None:
        with self.lock:
            self.checks += 1
        quiet = self.gate.pause(self.cfg.answer_deadline + 30)
        try:
            if not quiet:
                self.say("check: operations still in flight, checking anyway", echo=True)
            self.check_disk(final, strict=quiet)
            if not final:
                self.replay_some()
        finally:
            self.gate.resume()

    def check_disk(self, final: bool, strict: bool = True) -> None:
        lvm = self.c.raw_lvm()
        lvs = []
        for index in range(self.cfg.shards):  # every shard's VG
            vg = shard_vg_name(self.vg, index)
            try:
                lvs += lvm.lvs(vg)
            except errors.Error as exc:
                self.violation("VG unreadable", f"cannot read VG {vg}: {exc}")
                return
            try:
                lvm.vgck(vg)
            except errors.Error as exc:
                self.violation("vgck", f"vgck {vg}: {exc}")
        found: list[tuple[str, str]] = []
        involved: set[str] = set()

        def bad(kind: str, text: str, *names: str) -> None:
            found.append((kind, text))
            involved.update(names)

        on_disk: dict[str, tuple[Any, dict[str, str]]] = {}
        by_rid: dict[str, list[str]] = defaultdict(list)
        slots: dict[int, list[str]] = defaultdict(list)
        for lv in lvs:
            meta, user = parse_tags(lv.tags)
            if "image" not in meta:
                continue
            on_disk[lv.name] = (lv, meta)
            if user.get(VM_TAG) != "1":  # the VM actor's: it keeps its own ledger
                by_rid[user.get("rid", "")].append(lv.name)
            slot = meta.get("lease", "")
            if not slot.isdigit() or int(slot) == 0:
                bad("lease slot", f"volume {lv.name} has no usable lease slot "
                    f"(sl.lease={slot!r})", lv.name)
            else:
                slots[int(slot)].append(lv.name)
        for number, names in sorted(slots.items()):
            if len(names) > 1:
                bad("lease slot", f"lease slot {number} used by {len(names)} volumes: "
                    f"{sorted(names)}", *names)
        with self.lock:
            for rid, names in sorted(by_rid.items()):
                req = self.requests.get(rid)
                states = {name: on_disk[name][1].get("state", "?") for name in names}
                if req is None:
                    bad("orphan LV", f"LV(s) {states} carry request id {rid!r}, which no "
                        "request of this run used", *names)
                    continue
                if len(names) > 1:
                    bad("create executed twice", f"request {rid} ({req.kind}, {req.status}) "
                        f"made {len(names)} volumes: {states}", *names)
                if req.status == "acked":
                    if req.result.uuid not in names:
                        bad("create executed twice", f"create {rid} was answered "
                            f"{req.result.uuid}, but the disk has {states} for it", *names)
                    continue
                if req.status == "inflight" and strict:
                    bad("orphan LV", f"create {rid} still in flight during a quiet check",
                        *names)
                for name, state in states.items():
                    if name in self.volumes:
                        continue  # already adopted
                    if req.status == "failed" and req.open:
                        self.notes["volumes of creates left open (adopted)"] += 1
                    elif req.status == "failed" and state == "creating" and not final:
                        self.notes["failed qcow2 creates left creating until the next "
                                   "takeover"] += 1
                        continue
                    elif req.status == "failed":
                        bad("failed create left a volume", f"create {rid} failed "
                            f"({req.error}: {req.message}) but left volume {name} ({state})",
                            name)
                    # Adopt it (abandoned creates too): workers may delete it, and the
                    # next checks follow it like any other volume.
                    lv, meta = on_disk[name]
                    self.volumes[name] = Vol(name, rid, meta.get("format", "raw"),
                                             int(meta.get("capacity", lv.size)), lv.size,
                                             state="present" if state == "ready" else "maybe",
                                             why_maybe=f"adopted {state}",
                                             image=meta.get("image", ""))
                    self.notes["volumes adopted from failed or unanswered creates"] += 1
            for vol in sorted(self.volumes.values(), key=lambda v: v.rid):
                if vol.busy and not strict:
                    continue
                here = on_disk.get(vol.uuid)
                state = here[1].get("state", "?") if here else "absent"
                if vol.state == "deleted":
                    if here:
                        bad("deleted volume on disk", f"volume {vol.uuid} ({vol.rid}) is on "
                            f"disk ({state}) after its delete was acknowledged", vol.uuid)
                    continue
                if vol.state == "maybe":
                    if here is None:
                        vol.state = "deleted"
                        self.notes[f"volumes gone after: {vol.why_maybe.split()[0]}"] += 1
                    elif state == "ready":
                        # (a delete left open may still be rolled forward at any
                        # takeover: its volume stays "maybe", never picked again)
                        if "left open" not in vol.why_maybe:
                            vol.state = "present"
                            self.notes["volumes still there after: "
                                       f"{vol.why_maybe.split()[0]}"] += 1
                    elif final:
                        bad("half-done after recovery", f"volume {vol.uuid} ({vol.rid}) is "
                            f"{state} after the final recovery ({vol.why_maybe})", vol.uuid)
                    continue
                if here is None:
                    bad("acknowledged volume missing", f"volume {vol.uuid} ({vol.rid}, "
                        "created and never deleted successfully) is missing from the disk"
                        + vol.history(), vol.uuid)
                    vol.state = "deleted"  # reported once; followed as gone from now on
                    continue
                lv, meta = here
                if state != "ready":
                    bad("acknowledged volume not ready", f"volume {vol.uuid} ({vol.rid}) is "
                        f"{state}, acknowledged ready", vol.uuid)
                if vol.size_known and lv.size != vol.size:
                    bad("size differs from the acknowledged one", f"volume {vol.uuid} "
                        f"({vol.rid}, {vol.fmt}) is {lv.size} bytes on disk, {vol.size} "
                        "acknowledged" + vol.history(), vol.uuid)
                    vol.size = lv.size
                if (vol.size_known and vol.fmt == "qcow2"
                        and meta.get("capacity") != str(vol.capacity)):
                    bad("size differs from the acknowledged one", f"qcow2 volume {vol.uuid} "
                        f"({vol.rid}) has capacity {meta.get('capacity')} on disk, "
                        f"{vol.capacity} acknowledged" + vol.history(), vol.uuid)
                    vol.capacity = int(meta.get("capacity") or 0)
        if final:
            for name, (_, meta) in sorted(on_disk.items()):
                if meta.get("state") != "ready":
                    bad("half-done after recovery", f"volume {name} is {meta.get('state')} "
                        "after the final recovery", name)
        # Chains (images.py): no overlay over a missing volume, no chain forked, no
        # internal volume left with nothing on top after recovery.
        on_top: dict[str, list[str]] = defaultdict(list)
        for name, (_, meta) in on_disk.items():
            parent = meta.get("parent", "none")
            if parent != "none":
                on_top[parent].append(name)
                if parent not in on_disk:
                    bad("chain broken", f"volume {name} is on top of {parent}, which is "
                        "not on the disk", name)
        for parent, names in sorted(on_top.items()):
            same = [n for n in names if parent in on_disk
                    and on_disk[n][1].get("image") == on_disk[parent][1].get("image")]
            if len(same) > 1:
                bad("chain forked", f"volume {parent} has {len(same)} snapshots on top: "
                    f"{sorted(same)}", parent, *same)
        if final:
            for name, (_, meta) in sorted(on_disk.items()):
                if meta.get("role") == "internal" and not on_top.get(name):
                    bad("internal volume with nothing on top", f"volume {name} is internal "
                        "(read-only) after the final recovery, with no snapshot over it",
                        name)
        for kind, text in found:
            self.violation(kind, text)
        if found:
            self.say("those volumes on disk:\n" + "\n".join(
                f"    {lv.name} {lv.size} {compact_tags(lv.tags)}" for lv in lvs
                if lv.name in involved))

    def replay(self, orig: Req, host: Host) -> None:
        # Already answered once: a refusal on the asking host is no answer, ask again.
        rep = Req(orig.rid, "replay", host.index, orig.call, time.monotonic(),
                  uncertain=True, volume=orig.volume)
        with self.lock:
            self.op_stats["replay"].tried += 1
            self.replays += 1
        self.ask(rep, "replay")
        if rep.status == "failed":
            self.violation("replay failed",
                           f"replay of {orig.rid} ({orig.kind}) on host{host.index} failed: "
                           f"{rep.error}: {rep.message}")
        elif rep.status == "acked":
            first, again = orig.result, rep.result
            same = (getattr(first, "uuid", None) == getattr(again, "uuid", None)
                    and getattr(first, "capacity", None) == getattr(again, "capacity", None))
            if not same:
                self.violation("replay answered differently",
                               f"replay of {orig.rid} ({orig.kind}) answered {again!r}, the "
                               f"first answer was {first!r}")

    def replay_some(self) -> None:
        rng = self.check_rng
        now = time.monotonic()
        with self.lock:
            cands = sorted((r for r in self.requests.values()
                            if r.status == "acked" and r.kind in REPLAYABLE
                            and now - r.t_done < 600), key=lambda r: r.rid)
        for _ in range(3):
            x, y = rng.random(), rng.random()
            if cands:
                self.replay(cands[int(x * len(cands))], self.hosts[int(y * len(self.hosts))])

    # The run

    def run(self) -> Result:
        threads: list[threading.Thread] = []
        try:
            self.setup()
            self.t_ops_start = time.monotonic()
            self.t_ops_end = self.t_ops_start + self.cfg.minutes * 60
            if self.cfg.vms:
                self.vm_actor = VmActor(self)
            for name, target, args in (
                    [("monitor", self.monitor, ()), ("consumers", self.supervise, ()),
                     ("faults", self.faults, ())]
                    + [(f"host{h.index}", self.worker, (h,)) for h in self.hosts]
                    + ([("vm", self.vm_actor.run, ())] if self.vm_actor else [])):
                t = threading.Thread(target=target, args=args, name=name, daemon=True)
                t.start()
                threads.append(t)
            while time.monotonic() < self.t_ops_end:
                time.sleep(min(5.0, max(0.0, self.t_ops_end - time.monotonic())))
            self.finish_run(threads)
        except BaseException:
            self.harness_error("run")
            raise
        finally:
            self.cleanup()
        return self.result()

    def finish_run(self, threads: list[threading.Thread]) -> None:
        self.say("time is up: stopping faults and operations", echo=True)
        self.stop_faults.set()
        for t in threads:
            if t.name == "faults":
                t.join(self.cfg.answer_deadline + 120)
        self.stop_ops.set()
        for t in threads:
            if t.name.startswith("host") or t.name == "vm":
                t.join(self.cfg.answer_deadline + 60)
        with self.lock:
            alive = [c for c in self.consumers if not c.done]
        for c in alive:
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for c in alive:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_tree(c.proc.pid)
                c.proc.wait(5)
        self.supervise_once()
        for name in self.failpoints:  # disarm
            (self.fpdir / f"{name}.fired").touch()
        self.settle(0.0)
        if self.vm_actor is not None:
            try:
                self.vm_actor.finish()  # stopped, its data verified, its images deleted
            except Exception:
                self.harness_error("vm actor finish")
        with self.lock:
            prepared = list(self.prepared)
        for host, vol in prepared:
            with contextlib.suppress(Exception):
                self.client(host, 30).teardown_volume(vol)
        with self.lock:
            self.prepared.clear()
        # Make a manager run its recovery: hand the role over, then wait until the new
        # manager serves (its recovery runs under the role's lock before any request).
        m = self.wait_manager(self.cfg.crash_bound)
        if m is not None:
            with contextlib.suppress(Exception):
                self.client(m, 30).release_manager()
            self.say(f"final handover: host{m} released the manager role", echo=True)
            time.sleep(1)
        new = self.wait_manager(self.cfg.fast_bound + 15)
        if new is None:
            self.violation("no manager within the bound", "no manager after the final handover")
        else:
            barrier = Req(f"barrier-{uuid.uuid4()}", "barrier", new,
                          lambda c: c.extend_volume(str(uuid.uuid4()), "+1M"), time.monotonic())
            self.ask(barrier, "barrier")
            self.say(f"final manager host{new}; barrier answered {barrier.error or 'ok'}")
        self.check(final=True)
        self.stop_monitor.set()
        for t in threads:
            if t.name in ("monitor", "consumers"):
                t.join(30)

    def cleanup(self) -> None:
        self.stop_faults.set()
        self.stop_ops.set()
        self.stop_monitor.set()
        if self.vm_actor is not None:
            self.vm_actor.cleanup()
        with self.lock:
            consumers = list(self.consumers)
            stopped = list(self.stopped_pids)
        for c in consumers:
            if c.proc.poll() is None:  # never a pid that may have been reused
                kill_tree(c.proc.pid)  # a forked consumer would outlive its run process
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(5)
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.cluster is not None:
            logs = self.workdir / "logs"
            logs.mkdir(exist_ok=True)
            for h in self.hosts:
                with contextlib.suppress(OSError):
                    shutil.copy(h.daemon.log_file, logs / f"host{h.index}-daemon.log")
            try:
                destroy_cluster(self.cluster)
            except Exception:
                self.harness_error("destroy_cluster")
        self.t_end = time.monotonic()

    # The report

    def result(self) -> Result:
        table = self.table()
        if self.log:
            self.log("\n" + table)
            self.log.close()
        tried = sum(s.tried for k, s in self.op_stats.items() if k not in ("replay", "barrier"))
        acked = sum(s.acked for k, s in self.op_stats.items() if k not in ("replay", "barrier"))
        return Result(self.cfg.seed, table, [f"{k}: {t}" for k, t in self.violations], acked, tried,
                      sum(self.fault_stats.values()), list(self.harness_errors), self.workdir)

    def table(self, examples: int = 5) -> str:
        cfg = self.cfg
        wall = ((self.t_end or time.monotonic()) - self.wall_start) / 60
        crashes = (f"on, at most one per {cfg.crash_interval:g} s" if cfg.crashes_on
                   else "off")
        out = [f"sharedlvm torture: seed {cfg.seed}, {cfg.hosts} hosts, io_timeout "
               f"{IO_TIMEOUT} s, {cfg.minutes:g} min of operations and faults "
               f"({wall:.1f} min wall)",
               f"failpoints: {', '.join(getattr(self, 'failpoints', [])) or 'none'}; host "
               f"crashes: {crashes}"
               f"{'; devcount on prepared volumes' if cfg.prepare_writers else ''}",
               "",
               f"{'operation':<16}{'tried':>7}{'acked':>7}{'failed':>7}{'no answer':>10}"
               f"{'retries':>8}  failed cleanly, by error class"]
        order = [k for k, _ in OP_WEIGHTS] + ["create-journal", "delete-wipe", "replay",
                                              "barrier"]
        kinds = [k for k in order if k in self.op_stats] + sorted(
            k for k in self.op_stats if k not in order)
        total = OpStats()
        for k in kinds:
            s = self.op_stats[k]
            failed = sum(s.failed.values())
            classes = ", ".join(f"{c} {n}" for c, n in s.failed.most_common())
            out.append(f"{k:<16}{s.tried:>7}{s.acked:>7}{failed:>7}{s.abandoned:>10}"
                       f"{s.retries:>8}  {classes}".rstrip())
            if k not in ("replay", "barrier"):
                total.tried += s.tried
                total.acked += s.acked
                total.failed.update(s.failed)
                total.abandoned += s.abandoned
                total.retries += s.retries
        out.append(f"{'total':<16}{total.tried:>7}{total.acked:>7}{sum(total.failed.values()):>7}"
                   f"{total.abandoned:>10}{total.retries:>8}  (replay and barrier apart)")
        out.append("")
        out.append(f"consumers (devcount under sharedlvm run"
                   f"{' or on a prepared path' if cfg.prepare_writers else ''}), "
                   f"highest count written {self.max_count}:")
        for k, n in sorted(self.consumer_stats.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"  {n:>6}  {k}")
        out.append("")
        out.append(f"{'fault':<32}{'injected':>9}  notes")
        for k in sorted(self.fault_stats):
            notes = ", ".join(f"{note} {n}" for note, n in self.fault_notes[k].most_common())
            out.append(f"{k:<32}{self.fault_stats[k]:>9}  {notes}".rstrip())
        out.append(f"{'total':<32}{sum(self.fault_stats.values()):>9}")
        out.append("")
        out.append(f"checks: {self.checks} quiet checks of the disk (lvs, tags, lease slots, "
                   f"vgck; the last after a final handover and recovery), {self.replays} "
                   "request ids replayed")
        for cause, bound in (("fast", cfg.fast_bound), ("host crash", cfg.crash_bound)):
            got = [o.end - o.start for o in self.outages if o.cause == cause]
            if got:
                out.append(f"time without a manager ({cause} faults): worst {max(got):.1f} s, "
                           f"bound {bound:g} s ({len(got)} outages)")
            else:
                out.append(f"time without a manager ({cause} faults): none seen "
                           f"(bound {bound:g} s)")
        if self.notes:
            out.append("notes:")
            out += [f"  {n:>6}  {k}" for k, n in sorted(self.notes.items())]
        if self.harness_errors:
            out.append(f"harness errors: {len(self.harness_errors)} (see torture.log)")
        out.append("")
        by_kind: dict[str, list[str]] = defaultdict(list)
        for kind, text in self.violations:
            by_kind[kind].append(text)
        out.append(f"invariant violations: {len(self.violations)}"
                   + (f" ({len(by_kind)} kinds)" if by_kind else ""))
        for kind, texts in by_kind.items():
            out.append(f"  {kind}: {len(texts)}")
            out += [f"    - {t}" for t in texts[:examples]]
            if len(texts) > examples:
                out.append(f"    - ... {len(texts) - examples} more in the log")
        out.append(f"log: {self.workdir / 'torture.log'}")
        return "\n".join(out)


def cli_error_class(stderr: str) -> str:
    """The error class behind the ``sharedlvm: ...`` line of a failed ``sharedlvm run``."""
    line = next((ln for ln in reversed(stderr.splitlines()) if ln.startswith("sharedlvm: ")),
                stderr.strip().splitlines()[-1] if stderr.strip() else "no message")
    for pattern, cls in (("is held by", "VolumeHeld"),
                         ("already held or joined by this host", "held on this host (EEXIST)"),
                         ("not found", "VolumeNotFound"),
                         ("segments; without device-mapper", "Unsupported (multi-segment)"),
                         ("not joined", "LockspaceError"), ("lockspace", "LockspaceError"),
                         ("is creating", "Busy"), ("is removing", "Busy")):
        if pattern in line:
            return cls
    return "other: " + re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "V", line)[:100]


def run_torture(cfg: Config) -> Result:
    return Torture(cfg).run()
