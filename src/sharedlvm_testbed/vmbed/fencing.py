"""Self-fencing on real kernels: a host that loses its lease storage, or its power,
loses its leases to another host only after sanlock's host-dead time, and a host that
loses its storage is reset by its own watchdog before that.

Roles in a :class:`~sharedlvm_testbed.vmbed.GuestBed` of 2 or 3 guests, all running
``wdmd`` + ``sanlock daemon`` with the watchdog (softdog) and joined to one lockspace
at io_timeout :data:`IO_TIMEOUT`:

- guest 1 (host id 1) reaches the LUN through a linear device-mapper device of its own
  (``/dev/mapper/slfence``), holds lease ``storage`` for a consumer that keeps reading
  the LUN, and then loses its storage: ``dmsetup suspend`` makes all its I/O hang. Its
  delta lease stops being renewed, sanlock cannot kill the consumer (stuck in I/O), so
  wdmd stops petting softdog and the guest is reset; ``-no-reboot`` ends its qemu.
- guest 3 (host id 3, optional) holds lease ``power`` and is powered off (SIGKILL of
  its qemu) at the same moment.
- guest 2 (host id 2) tries to take both leases every 0.5 s from the start.

Every timestamp is taken on the machine (``time.monotonic``), by polling every
:data:`POLL_INTERVAL`; so an event is seen up to one poll plus one agent round trip
late. Both scenarios run at once on one boot: they share the lockspace, not a lease.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from sharedlvm.errors import CommandTimeout
from sharedlvm.leases import host_dead_seconds

from . import lease_guest
from .bed import GuestBed
from .errors import GuestAgentError, VmBedError
from .guest import Guest
from .vmsim import start_sanlock

log = logging.getLogger(__name__)
T = TypeVar("T")

IO_TIMEOUT = lease_guest.IO_TIMEOUT
POLL_INTERVAL = 0.5
SCRIPT = "/project/sharedlvm_testbed/vmbed/lease_guest.py"
STATE_DIR = "/run/slfence"
LUN_DEVICE = "/dev/vda"
DM_NAME = "slfence"
DM_DEVICE = f"/dev/mapper/{DM_NAME}"
STORAGE_RESOURCE = "storage"
POWER_RESOURCE = "power"
RESOURCES = (STORAGE_RESOURCE, POWER_RESOURCE)
# The latest the leases may move is host-dead time x 1.05 + 10 s (the bound the tests
# assert); wait a little past it so a late answer is measured, not cut off.
_WATCH_MARGIN = 30.0
# One python3 start in a guest takes ~3.5 s under TCG, a join ~3 x io_timeout more.
_GUEST_PYTHON_TIMEOUT = 120.0


@dataclass
class FencingTimeline:
    """What happened, on the machine's monotonic clock; None: not seen."""

    io_timeout: int
    power_loss: bool
    storage_lost: float | None = None
    power_lost: float | None = None
    consumer_stuck: float | None = None  # host 1's consumer first seen in state D
    consumer_gone: float | None = None  # host 1's consumer killed
    host1_reset: float | None = None  # host 1's qemu exited
    reset_by_watchdog: bool = False  # host 1's console shows softdog firing
    acquired: dict[str, float] = field(default_factory=dict)  # resource -> time
    last_refusal: dict[str, str] = field(default_factory=dict)  # resource -> error

    @property
    def host_dead_seconds(self) -> int:
        return host_dead_seconds(self.io_timeout)

    def after_storage_loss(self, moment: float | None) -> float | None:
        if moment is None or self.storage_lost is None:
            return None
        return moment - self.storage_lost

    def after_power_loss(self, moment: float | None) -> float | None:
        if moment is None or self.power_lost is None:
            return None
        return moment - self.power_lost

    @property
    def host1_fenced(self) -> float | None:
        """When host 1 stopped using the lease: reset or consumer killed, the first."""
        seen = [t for t in (self.host1_reset, self.consumer_gone) if t is not None]
        return min(seen) if seen else None

    def lines(self) -> list[str]:
        """The human timeline, relative to the storage loss of host 1."""
        dead = self.host_dead_seconds
        rule = f"sanlock host-dead time: 8x{self.io_timeout}+60 = {dead} s"
        events: list[tuple[float, str]] = []

        def add(moment: float | None, text: str) -> None:
            if moment is not None:
                events.append((moment, text))

        add(self.storage_lost, "lease storage of host 1 lost (dmsetup suspend)")
        add(self.power_lost, "host 3 lost power (qemu killed)")
        add(self.consumer_stuck, "host 1: its consumer is stuck in I/O (state D)")
        add(self.consumer_gone, "host 1: its consumer was killed")
        how = "by its watchdog (softdog)" if self.reset_by_watchdog else "(qemu exited)"
        add(self.host1_reset, f"host 1 reset {how}")
        add(self.acquired.get(STORAGE_RESOURCE),
            f"host 2 acquired host 1's lease ({rule})")
        power_moved = self.after_power_loss(self.acquired.get(POWER_RESOURCE))
        if power_moved is not None:
            add(self.acquired.get(POWER_RESOURCE),
                f"host 2 acquired host 3's lease ({power_moved:.1f} s after its power loss)")
        origin: float = 0.0
        if self.storage_lost is not None:
            origin = self.storage_lost
        elif events:
            origin = min(moment for moment, _ in events)
        return [f"t+{moment - origin:.1f} s {text}" for moment, text in sorted(events)]


class FencingScenario:
    """Prepare the leases on a started bed, then lose storage (and power), and watch.

    ``echo`` gets each event line as it is seen (the demo prints them live).
    """

    def __init__(self, bed: GuestBed, *, power_loss: bool,
                 echo: Callable[[str], None] | None = None) -> None:
        needed = 3 if power_loss else 2
        if len(bed.guests) < needed:
            raise VmBedError(f"the fencing scenario needs {needed} started guests, "
                             f"the bed has {len(bed.guests)}")
        self.storage_host = bed[0]
        self.survivor = bed[1]
        self.power_host: Guest | None = bed[2] if power_loss else None
        self.echo = echo or (lambda line: None)
        self.timeline = FencingTimeline(IO_TIMEOUT, power_loss)
        self.consumer_pid: int | None = None

    @property
    def resources(self) -> tuple[str, ...]:
        return RESOURCES if self.power_host is not None else (STORAGE_RESOURCE,)

    # ---- setup ------------------------------------------------------------------

    def prepare(self) -> None:
        """dm device on host 1, lockspace + leases, daemons, joins, holders, poller."""
        host1 = self.storage_host
        _, sectors, _ = host1.run(["blockdev", "--getsz", LUN_DEVICE])
        # No udev in these guests: libdevmapper leaves the node to it, so make it.
        host1.run(["dmsetup", "create", DM_NAME, "--noudevsync", "--noudevrules",
                   "--table", f"0 {sectors.strip()} linear {LUN_DEVICE} 0"])
        host1.run(["dmsetup", "mknodes", DM_NAME])
        members = [(self.storage_host, 1, DM_DEVICE), (self.survivor, 2, LUN_DEVICE)]
        if self.power_host is not None:
            members.append((self.power_host, 3, LUN_DEVICE))
        _parallel([partial(_start_daemons, guest) for guest, _, _ in members])
        # sanlock writes the lockspace through its daemon, so this comes after.
        self._script(host1, "format", DM_DEVICE, *RESOURCES)
        # Joins take ~3 x io_timeout each: in parallel (TESTBED-NOTES).
        _parallel([partial(self._script, guest, "join", device, str(host_id))
                   for guest, host_id, device in members])

        holders = [partial(self._hold, self.storage_host, DM_DEVICE, STORAGE_RESOURCE)]
        if self.power_host is not None:
            holders.append(partial(self._hold, self.power_host, LUN_DEVICE, POWER_RESOURCE))
        pids = _parallel(holders)
        self.consumer_pid = pids[0]
        for resource in self.resources:
            self._script(self.survivor, "poll", LUN_DEVICE, resource,
                         str(RESOURCES.index(resource)), STATE_DIR)
        self._wait_refused()

    def _hold(self, guest: Guest, device: str, resource: str) -> int:
        _, out, _ = self._script(guest, "hold", device, resource,
                                 str(RESOURCES.index(resource)), STATE_DIR)
        return int(out.split()[-1])

    def _script(self, guest: Guest, *args: str) -> tuple[int, str, str]:
        return guest.run(["python3", "-P", SCRIPT, *args], timeout=_GUEST_PYTHON_TIMEOUT)

    def _wait_refused(self, timeout: float = 60.0) -> None:
        """Until host 2 was refused every lease once: they are held by live hosts."""
        deadline = time.monotonic() + timeout
        while True:
            state = self._survivor_state()
            if all(f"tries-{r}" in state for r in self.resources):
                return
            if any(f"acquired-{r}" in state for r in self.resources):
                raise VmBedError(f"host 2 acquired a lease that should be held: {state}")
            if time.monotonic() > deadline:
                raise VmBedError(f"host 2 never tried the leases: {state}")
            time.sleep(POLL_INTERVAL)

    def _survivor_state(self) -> dict[str, str]:
        """STATE_DIR of host 2 as {file name: content}."""
        _, out, _ = self.survivor.run(["grep", "-r", "", STATE_DIR], check=False,
                                      timeout=10)
        state: dict[str, str] = {}
        for line in out.splitlines():
            path, _, text = line.partition(":")
            state[path.rsplit("/", 1)[-1]] = text
        return state

    # ---- the failure and the watch ---------------------------------------------

    def run(self) -> FencingTimeline:
        """Lose host 1's storage (and host 3's power), then watch until the leases
        moved and host 1 is fenced, or until past the latest acceptable time."""
        t = self.timeline
        self.storage_host.run(["dmsetup", "suspend", DM_NAME])
        t.storage_lost = self._event("lease storage of host 1 lost (dmsetup suspend)")
        if self.power_host is not None:
            self.power_host.power_off()
            t.power_lost = self._event("host 3 lost power (qemu killed)")
        deadline = time.monotonic() + t.host_dead_seconds * 1.05 + 10 + _WATCH_MARGIN
        while time.monotonic() < deadline:
            started = time.monotonic()
            self._watch_host1()
            self._watch_survivor()
            moved = all(r in t.acquired for r in self.resources)
            if moved and t.host1_reset is not None:
                break
            if moved and started > max(t.acquired.values()) + 15:
                break  # host 1 was not reset in time; report what was seen
            time.sleep(max(0.0, POLL_INTERVAL - (time.monotonic() - started)))
        return t

    def _event(self, text: str) -> float:
        now = time.monotonic()
        origin = self.timeline.storage_lost or now
        self.echo(f"t+{now - origin:.1f} s {text}")
        log.info("fencing: %s", text)
        return now

    def _watch_host1(self) -> None:
        t = self.timeline
        if t.host1_reset is not None:
            return
        if not self.storage_host.is_running():
            console = self.storage_host.console_tail(60)
            t.reset_by_watchdog = "softdog" in console
            how = "by its watchdog (softdog)" if t.reset_by_watchdog else "(qemu exited)"
            t.host1_reset = self._event(f"host 1 reset {how}")
            self.storage_host.power_off()  # forget the pid; nothing left to kill
            return
        if t.consumer_gone is not None:
            return
        try:
            rc, out, _ = self.storage_host.run(
                ["cat", f"/proc/{self.consumer_pid}/stat"], check=False, timeout=5)
        except (GuestAgentError, CommandTimeout):
            return  # the guest is being reset under our feet
        if rc != 0:
            t.consumer_gone = self._event("host 1: its consumer was killed")
        elif t.consumer_stuck is None and out.rsplit(")", 1)[-1].split()[:1] == ["D"]:
            t.consumer_stuck = self._event("host 1: its consumer is stuck in I/O (state D)")

    def _watch_survivor(self) -> None:
        t = self.timeline
        state = self._survivor_state()
        for resource in self.resources:
            if f"tries-{resource}" in state:
                t.last_refusal[resource] = state[f"tries-{resource}"]
            if resource not in t.acquired and f"acquired-{resource}" in state:
                owner = "host 1" if resource == STORAGE_RESOURCE else "host 3"
                t.acquired[resource] = self._event(f"host 2 acquired {owner}'s lease")


def _start_daemons(guest: Guest) -> None:
    # With the watchdog, in sanlock's default run dir (lease_guest uses that).
    start_sanlock(guest, {})


def _parallel(actions: Sequence[Callable[[], T]]) -> list[T]:
    with ThreadPoolExecutor(max_workers=len(actions)) as pool:
        futures = [pool.submit(action) for action in actions]
    return [f.result() for f in futures]
