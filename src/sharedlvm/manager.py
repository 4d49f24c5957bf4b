"""The manager role of one domain, held by this host's daemon process.

Manager = holder of the sanlock Paxos lease in slot 0 of ``leases`` (DESIGN.md rule
2). Taking the role:

1. acquire the manager lease for the daemon process; its lease version (``lver``)
   is the fencing token;
2. write ``manager_generation + 1`` and this host id to the domain record in
   ``journal`` before any other write, so a stale manager that wakes up finds a newer
   generation there;
3. recover what a previous manager left unfinished (volumes left ``creating`` or
   ``removing``);
4. only then switch the domain's LVM to read-write, with :meth:`Manager.check` as the
   guard LVM calls before every metadata command.

:meth:`check` verifies that sanlock still lists the lease as held by this process at
the same version and that the journal carries no newer generation. If either fails
the role is dropped at once, LVM goes back to read-only, and :class:`Fenced` is
raised: a stale manager makes no metadata write.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Protocol

from . import errors, journal, ondisk, tags
from .domain import Domain

log = logging.getLogger(__name__)


class Fenced(errors.Error):
    """This host lost the manager role; it must not write."""


class ManagerLease(Protocol):
    """The manager lease as the role needs it (implemented over sanlock in leases)."""

    def acquire(self) -> int:
        """Acquire for this process without waiting; return the lease version.
        Raises errors.LeaseHeld naming the holder when another live host has it."""
        ...

    def held_version(self) -> int | None:
        """The version at which this process holds the lease now, None if it does not."""
        ...

    def release(self) -> None: ...

    def owner(self) -> int | None:
        """Host id holding the lease according to the lease on disk, if any."""
        ...


class Manager:
    def __init__(self, domain: Domain, lease: ManagerLease) -> None:
        self.domain = domain
        self.lease = lease
        self.token: int | None = None
        self.generation: int | None = None
        self.lock = threading.RLock()  # one metadata operation at a time

    @property
    def active(self) -> bool:
        return self.token is not None

    def try_take(self) -> bool:
        """Try to become manager; True if this host is manager afterwards."""
        with self.lock:
            if self.active:
                return True
            try:
                token = self.lease.acquire()
            except errors.LeaseHeld:
                return False
            try:
                self._take_over(token)
            except BaseException:
                self._drop()
                raise
            return True

    def _take_over(self, token: int) -> None:
        d = self.domain
        with ondisk.BlockFile(d.special_path("journal"), writable=True) as dev:
            record = journal.read_domain_record(dev)
            record.manager_generation += 1
            record.manager_host_id = d.host_id
            journal.write_domain_record(dev, record)
        d.record = record
        self.token = token
        self.generation = record.manager_generation
        d.become_writer(self.check)
        log.info("host %d is manager of %s at generation %d (lease version %d)",
                 d.host_id, d.name, self.generation, token)
        self.recover()

    def check(self) -> None:
        """The fencing-token check run before every LVM metadata write."""
        if self.token is None or self.generation is None:
            raise Fenced(f"host {self.domain.host_id} is not the manager of domain "
                         f"{self.domain.name}")
        version = self.lease.held_version()
        if version != self.token:
            self._fence(f"the manager lease is no longer held (version {version}, "
                        f"expected {self.token})")
        current = self.domain.read_record()
        if current.manager_generation != self.generation:
            self._fence(f"the journal carries manager generation "
                        f"{current.manager_generation} (host {current.manager_host_id}), "
                        f"this host has {self.generation}")

    def _fence(self, why: str) -> None:
        d = self.domain
        msg = f"host {d.host_id} lost the manager role of domain {d.name}: {why}"
        log.error("%s; stopping all metadata writes", msg)
        self._drop()
        raise Fenced(msg)

    def _drop(self) -> None:
        self.token = None
        self.generation = None
        self.domain.become_reader()
        with contextlib.suppress(errors.Error):
            self.lease.release()

    def release(self) -> None:
        """Give the role up cleanly (another host can take it at once)."""
        with self.lock:
            if self.active:
                log.info("host %d releases the manager role of %s", self.domain.host_id,
                         self.domain.name)
            self._drop()

    def recover(self) -> None:
        """Finish what a previous manager left: ``creating`` volumes are rolled back
        (their content was never completed), ``removing`` ones rolled forward."""
        from . import volume as volume_mod  # volume imports domain; keep this one-way

        d = self.domain
        for lv in d.lvm.lvs(d.vg_name):
            meta, _ = tags.parse_tags(lv.tags)
            state = meta.get("state")
            if state == "creating":
                log.warning("recovery: removing %s left creating by a previous manager",
                            lv.name)
                d.activator.deactivate(d.vg_name, lv.name)
                d.lvm.lvremove(d.vg_name, [lv.name])
            elif state == "removing":
                log.warning("recovery: finishing the wipe and removal of %s", lv.name)
                volume_mod.finish_removal(d, lv.name)
