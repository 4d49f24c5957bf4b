"""The manager role of one domain, held by this host's daemon process.

Manager = holder of the sanlock Paxos lease in slot 0 of ``leases`` (docs/design.md rule
2). Taking the role:

1. acquire the manager lease for the daemon process; its lease version (``lver``)
   is the fencing token;
2. write ``manager_generation + 1`` and this host id to the domain record in
   ``journal`` before any other write, so a stale manager that wakes up finds a newer
   generation there;
3. recover what a previous manager left unfinished (volumes left ``creating`` or
   ``removing``, pending requests in the journal: volume.recover), reporting what it
   cannot finish without giving the role up;
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
from collections.abc import Callable
from typing import Protocol

from . import errors, journal, ondisk
from .domain import Domain
from .errors import Fenced

log = logging.getLogger(__name__)


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

    def lockspace_problem(self) -> str | None:
        """Why this host's lockspace cannot be trusted now (None: it can)."""
        ...


def metadata_timeout(io_timeout: int) -> float:
    """How long one metadata command may run. Another host can take the manager
    lease only after this host's lockspace renewal failed (8 x io_timeout after its
    last renewal, which was at most 2 x io_timeout ago) and the watchdog term
    (60 s) passed: a command that ends within 6 x io_timeout + 30 s ends while the
    role is surely still this host's."""
    return 6 * io_timeout + 30.0


class Manager:
    def __init__(self, domain: Domain, lease: ManagerLease,
                 recover: Callable[[], list[str]] = list) -> None:
        """``recover``: finishes what a previous manager left (volume.recover); it
        returns what it could not finish, which is reported and left for later: one
        stuck volume must not cost the domain its manager."""
        self.domain = domain
        self.lease = lease
        self._recover = recover
        self.recovery_problems: list[str] = []
        self.recovering = False
        self.token: int | None = None
        self.generation: int | None = None
        self.seqno: int | None = None  # the VG's seqno after this manager's last commit
        self.lock = threading.RLock()  # one metadata operation at a time

    @property
    def active(self) -> bool:
        return self.token is not None

    @property
    def serving(self) -> bool:
        """Manager, and done with the takeover's recovery."""
        return self.active and not self.recovering

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
        d.become_manager(self.check, self.before_write, self.after_write,
                         metadata_timeout(record.io_timeout))
        self.seqno = d.lvm.vg(d.vg_name).seqno
        log.info("host %d is manager of %s at generation %d (lease version %d)",
                 d.host_id, d.name, self.generation, token)
        self.recover()

    def before_write(self) -> None:
        """Before each metadata command: the fencing check, and the VG's sequence
        number still the one this manager's last commit left. Any other value means
        that another process wrote the metadata meanwhile (a second manager, a stray
        lvm): stop before writing, and say so."""
        self.check()
        d = self.domain
        seqno = d.lvm.vg(d.vg_name).seqno
        if self.seqno is not None and seqno != self.seqno:
            self._fence(f"the metadata of VG {d.vg_name} is at seqno {seqno}, this "
                        f"manager's last commit left {self.seqno}: another host or "
                        "process wrote it")

    def after_write(self) -> None:
        """After each metadata command (also a failed one): one commit at most, or
        something else committed during it."""
        d = self.domain
        seqno = d.lvm.vg(d.vg_name).seqno
        before, self.seqno = self.seqno, seqno
        if before is not None and seqno > before + 1:
            self._fence(f"the metadata of VG {d.vg_name} went from seqno {before} to "
                        f"{seqno} across one command: another host or process wrote it")

    def check(self) -> None:
        """The fencing-token check run before every LVM metadata write."""
        if self.token is None or self.generation is None:
            raise Fenced(f"host {self.domain.host_id} is not the manager of domain "
                         f"{self.domain.name}")
        version = self.lease.held_version()
        if version != self.token:
            self._fence(f"the manager lease is no longer held (version {version}, "
                        f"expected {self.token})")
        # sanlock keeps listing a lease as held after its lockspace failed (renewal
        # failure), until it has killed the holder: ask about the lockspace too.
        problem = self.lease.lockspace_problem()
        if problem:
            self._fence(problem)
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
        self.recovering = True
        try:
            self.recovery_problems = self._recover()
        finally:
            self.recovering = False
        for problem in self.recovery_problems:
            log.error("recovery of %s left: %s", self.domain.name, problem)
