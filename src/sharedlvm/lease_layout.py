"""Where a domain's leases live, and the domain-level lease operations.

- The lockspace: the ``ids`` LV, one delta lease per host id.
- Slot 0 of the ``leases`` LV: the manager lease (resource ``manager``).
- Slot k >= 1: the lease of the volume tagged ``sl.lease=k`` (resource = volume UUID).

A slot is ``align`` bytes: sanlock's alignment for 2000 hosts, 1 MiB on 512 B
sectors and 8 MiB on 4 KiB sectors. The manager allocates slots, initializes the lease
before the volume is published (so a volume never exists without a usable lease), and
grows the ``leases`` LV by LEASES_GROWTH when the slots run out: the number of volumes
has no fixed cap.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from . import errors, leases, tags
from .domain import Domain
from .failpoints import failpoint
from .model import VolumeInfo

log = logging.getLogger(__name__)

MANAGER_RESOURCE = "manager"
MANAGER_SLOT = 0
LEASES_GROWTH = 1024 * 1024 * 1024  # vdsm grows its leases area in the same 1 GiB steps


class LeaseLayout:
    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self._sector_size: int | None = None
        self._used: set[int] | None = None
        self._count: int | None = None  # slots in the leases LV, for this manager term
        # Re-entrant: a fencing check inside an allocation (its lvextend, its lease
        # write) drops the role, and the role's end calls reset_slots (a plain lock
        # deadlocked the thread on itself; hostile review of 05dffcf).
        self._lock = threading.RLock()
        # Slots whose lease this process holds in exclusive(), from its acquire until
        # its release returned: a volume deleted meanwhile has no LV any more, and a
        # map rebuilt from the LVs must not hand its slot out (a new lease written
        # there, then the old holder's release writing its dblock over it, with an
        # lver the new lease never had: an acquire sanlock retries forever).
        self._held: set[int] = set()

    # Geometry

    @property
    def sector_size(self) -> int:
        if self._sector_size is None:
            out = self.domain.runner.run(["blockdev", "--getss", self.domain.config.luns[0]])
            self._sector_size = int(out.out.strip())
        return self._sector_size

    @property
    def align(self) -> int:
        return leases.align_for(self.sector_size)

    @property
    def lockspace(self) -> str:
        return self.domain.lockspace

    def ids_disk(self) -> leases.Disk:
        return leases.Disk(*self.domain.lv_location("ids", 0))

    def slot_disk(self, slot: int) -> leases.Disk:
        return leases.Disk(*self.domain.lv_location("leases", slot * self.align))

    def slot_count(self) -> int:
        return self.domain.lvm.lv(self.domain.vg_name, "leases").size // self.align

    # Formatting (domain create) and membership

    def format(self) -> None:
        """Write the lockspace and the manager lease of a new domain."""
        leases.init_lockspace(self.lockspace, self.ids_disk(), self.sector_size,
                              self.domain.record.io_timeout)
        leases.init_resource(self.lockspace, MANAGER_RESOURCE, self.slot_disk(MANAGER_SLOT),
                             self.sector_size)

    def join(self) -> None:
        leases.join_lockspace(self.lockspace, self.domain.host_id, self.ids_disk(),
                              self.domain.record.io_timeout)

    def joined(self) -> bool:
        """This host is in the lockspace now (sanlock has it, not being added or
        removed)."""
        try:
            return leases.lockspace_joined(self.lockspace, self.domain.host_id,
                                           self.ids_disk())
        except errors.LockspaceError:
            return False

    def leave(self) -> None:
        leases.leave_lockspace(self.lockspace, self.domain.host_id, self.ids_disk())

    def host_states(self) -> dict[int, leases.HostState]:
        return leases.host_states(self.lockspace)

    def live_hosts(self) -> set[int]:
        """Hosts that may still hold leases. "unknown" (sanlock has not watched the host
        long enough yet) counts as live: only "dead" and "free" are safe to ignore."""
        return {h for h, st in self.host_states().items() if st.state not in ("dead", "free")}

    # The manager lease

    def manager_lease(self, fd: int) -> SanlockManagerLease:
        return SanlockManagerLease(self, fd)

    # Volume leases

    def reset_slots(self) -> None:
        """Forget the cached slot map; the next allocation rebuilds it from the LVs."""
        with self._lock:
            self._used = None
            self._count = None

    def _scan_used(self) -> set[int]:
        used = {MANAGER_SLOT, *self._held}
        for lv in self.domain.volume_lvs():
            slot = tags.lease_slot(lv.tags)
            if slot is not None:
                used.add(slot)
        return used

    def allocate_volume_lease(self, volume_uuid: str) -> int:
        """Pick a free slot and initialize the volume's lease in it (manager only).

        The map of used slots and the slot count are built once per manager term and
        kept up to date by this process, the only one that allocates or grows the LV
        (no LVM read on the create path); the map is rebuilt from the LVs before the
        leases LV is grown, so slots of deleted volumes are reused first."""
        with self._lock:
            if self._used is None or self._count is None:
                self._used = self._scan_used()
                self._count = self.slot_count()
            count = self._count
            slot = next((s for s in range(count) if s not in self._used), None)
            if slot is None:
                self._used = self._scan_used()
                slot = next((s for s in range(count) if s not in self._used), None)
            if slot is None:
                lv = self.domain.lvm.lv(self.domain.vg_name, "leases")
                log.info("leases LV full (%d slots): growing by %d bytes", count,
                         LEASES_GROWTH)
                self.domain.lvm.lvextend(self.domain.vg_name, "leases",
                                         lv.size + LEASES_GROWTH)
                self._count = (lv.size + LEASES_GROWTH) // self.align
                self.domain.placement.forget(self.domain.shard(0))
                slot = count
            self.domain.require_manager_now()  # a lease write is a write: fenced too
            leases.init_resource(self.lockspace, volume_uuid, self.slot_disk(slot),
                                 self.sector_size)
            self._used.add(slot)
            return slot

    def _volume_disk(self, info: VolumeInfo) -> leases.Disk:
        if info.lease is None:
            raise errors.LeaseError(f"volume {info.uuid} has no lease slot")
        return self.slot_disk(info.lease)

    def acquire_volume(self, info: VolumeInfo, shared: bool, fd: int | None = None,
                       pid: int | None = None, version: int | None = None) -> None:
        """Acquire for this process (``fd``) or on behalf of a registered ``pid``;
        with ``version``, only at that lease version (a migration's handoff)."""
        disk = self._volume_disk(info)
        try:
            leases.acquire(self.lockspace, info.uuid, [disk], shared=shared, fd=fd, pid=pid,
                           version=version)
        except errors.LeaseHeld as exc:
            owners = leases.read_resource_owners(self.lockspace, info.uuid, [disk],
                                                 self.sector_size)
            mode = "shared" if len(owners) > 1 else "exclusive"
            raise errors.VolumeHeld(info.uuid, [o.host_id for o in owners], mode) from exc

    @contextlib.contextmanager
    def exclusive(self, info: VolumeInfo, fd: int,
                  later: Callable[[Callable[[], None]], None] | None = None) -> Iterator[None]:
        """The volume's lease, held exclusively by this process for the block: no
        consumer on any host can use the volume meanwhile (the manager holds it while
        it deletes, wipes or rewrites a volume). VolumeInUse naming the holders when
        anyone holds it, also a host that died but whose lease has not expired yet.
        ``later``: runs the release of a block that ended well instead of releasing
        at its end (after the answer: a delete)."""
        if info.lease is None:
            yield  # a volume without a lease slot cannot be leased by anyone either
            return
        disk = self._volume_disk(info)
        try:
            leases.acquire(self.lockspace, info.uuid, [disk], shared=False, fd=fd)
        except errors.LeaseError as exc:
            owners = leases.read_resource_owners(self.lockspace, info.uuid, [disk],
                                                 self.sector_size)
            if not owners:
                raise
            raise errors.VolumeInUse(info.uuid, sorted(o.host_id for o in owners)) from exc
        slot = info.lease
        with self._lock:
            self._held.add(slot)

        def release() -> None:
            failpoint("exclusive-release")
            try:
                leases.release(self.lockspace, info.uuid, [disk], fd=fd)
            except errors.Error as exc:  # maybe still held: the slot stays out of use
                log.warning("releasing the lease of %s (slot %d) failed: %s", info.uuid,
                            slot, exc)
                return
            with self._lock:
                self._held.discard(slot)

        try:
            yield
        except BaseException:
            release()  # a failed block: at once (a retry would find it held)
            raise
        if later is None:
            release()
        else:
            later(release)

    def release_volume(self, info: VolumeInfo, fd: int | None = None,
                       pid: int | None = None) -> None:
        leases.release(self.lockspace, info.uuid, [self._volume_disk(info)], fd=fd, pid=pid)

    def lease_version(self, info: VolumeInfo) -> int:
        return leases.read_version(self._volume_disk(info), self.sector_size)

    def holders(self, info: VolumeInfo) -> list[int]:
        disk = self._volume_disk(info)
        return [o.host_id for o in leases.read_resource_owners(
            self.lockspace, info.uuid, [disk], self.sector_size)]


class SanlockManagerLease:
    """The manager lease (slot 0), held by the daemon process (manager.ManagerLease)."""

    def __init__(self, layout: LeaseLayout, fd: int) -> None:
        self.layout = layout
        self.fd = fd

    def _disk(self) -> leases.Disk:
        return self.layout.slot_disk(MANAGER_SLOT)

    def acquire(self) -> int:
        disk = self._disk()
        leases.acquire(self.layout.lockspace, MANAGER_RESOURCE, [disk], shared=False,
                       fd=self.fd)
        version = self.held_version()
        if version is None:
            raise errors.LeaseError("manager lease acquired but not listed by sanlock")
        return version

    def held_version(self) -> int | None:
        for held in leases.inquire(self.fd):
            if held.lockspace == self.layout.lockspace and held.resource == MANAGER_RESOURCE:
                return held.version
        return None

    def release(self) -> None:
        if self.held_version() is not None:
            leases.release(self.layout.lockspace, MANAGER_RESOURCE, [self._disk()],
                           fd=self.fd)

    def lockspace_problem(self) -> str | None:
        layout = self.layout
        try:
            state = leases.host_states(layout.lockspace).get(layout.domain.host_id)
        except errors.Error as exc:
            return f"cannot read the lockspace: {exc}"
        if state is None or state.state not in ("live", "unknown"):
            return (f"this host's lockspace is "
                    f"{state.state if state else 'gone'} (renewal failed)")
        return None

    def owner(self) -> int | None:
        owners = leases.read_resource_owners(self.layout.lockspace, MANAGER_RESOURCE,
                                             [self._disk()], self.layout.sector_size)
        return owners[0].host_id if owners else None
