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
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from . import errors, journal, lvm_mda, ondisk
from .domain import Domain
from .errors import Fenced
from .shards import Shard

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


# How long a passed fencing check stands for the next ones (Manager.check). A create is
# four writes (the lease, the volume index, the LVM commit, and before them the
# request's own check), each checked: a full check reads the domain record and asks
# sanlock twice, 12% of a create at 1,000 volumes (measured with py-spy). What a check
# can see cannot change faster than this matters: another host can become manager
# only after this host's lease expired or was released, and expiry takes 8 x io_timeout
# of failed renewals (sanlock reports the lockspace's trouble, which the check reads,
# seconds before that); a release, a fence and a new term clear the last check. The
# seqno checks around each LVM commit, which see any other writer of a shard, are never
# skipped. Timed on CLOCK_BOOTTIME, which goes on while the host is suspended: a host
# that wakes from a pause checks afresh.
CHECK_REUSE = 0.1


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def metadata_timeout(io_timeout: int) -> float:
    """How long one metadata command may run. Another host can take the manager
    lease only after this host's lockspace renewal failed (8 x io_timeout after its
    last renewal, which was at most 2 x io_timeout ago) and the watchdog term
    (60 s) passed: a command that ends within 6 x io_timeout + 30 s ends while the
    role is surely still this host's."""
    return 6 * io_timeout + 30.0


class RoleLock:
    """Operations hold the role shared (several run at once, one per shard at a time:
    Domain.manager_lock); taking, releasing and giving up the role hold it exclusive,
    waiting for the running operations. Waiting exclusive holders go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._owner: int | None = None  # thread holding it exclusive
        self._depth = 0
        self._waiting = 0
        self._mine = threading.local()  # this thread's shared holds

    def held_shared(self) -> bool:
        """This thread runs an operation under the role (it must not wait for
        exclusive: that would wait for itself)."""
        return getattr(self._mine, "shared", 0) > 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:  # the exclusive holder may run operations (recovery)
                self._depth += 1
            else:
                while self._owner is not None or self._waiting:
                    self._cond.wait()
                self._shared += 1
                self._mine.shared = getattr(self._mine, "shared", 0) + 1
        try:
            yield
        finally:
            with self._cond:
                if self._owner == me:
                    self._depth -= 1
                else:
                    self._shared -= 1
                    self._mine.shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
            else:
                self._waiting += 1
                while self._owner is not None or self._shared:
                    self._cond.wait()
                self._waiting -= 1
                self._owner, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None
                self._cond.notify_all()


class Manager:
    def __init__(self, domain: Domain, lease: ManagerLease,
                 recover: Callable[[], list[str]] = list,
                 on_term: Callable[[], None] = lambda: None) -> None:
        """``recover``: finishes what a previous manager left (volume.recover); it
        returns what it could not finish, which is reported and left for later: one
        stuck volume must not cost the domain its manager. ``on_term``: forgets what
        a term keeps (the lease slot map), when a term begins, before any
        operation, and when it ends, before the lease is given up."""
        self.domain = domain
        self.lease = lease
        self._recover = recover
        self._on_term = on_term
        self.recovery_problems: list[str] = []
        self.recovering = False
        self.token: int | None = None
        self.generation: int | None = None
        # (token, boot time) of the last check that passed
        self._checked: tuple[int, float] | None = None
        # Each shard VG's seqno after this manager's last commit to it.
        self.seqnos: dict[str, int] = {}
        self.lock = RoleLock()

    @property
    def active(self) -> bool:
        return self.token is not None

    @property
    def serving(self) -> bool:
        """Manager, and done with the takeover's recovery."""
        return self.active and not self.recovering

    def try_take(self) -> bool:
        """Try to become manager; True if this host is manager afterwards."""
        with self.lock.exclusive():
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
        self._checked = None
        self._on_term()
        self.token = token
        self.generation = record.manager_generation
        d.reload_shards()
        shards = [s for s in d.shards() if s.luns]
        with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
            seqnos = list(pool.map(self._lvm_seqno, shards))
        self.seqnos = {s.vg_name: n for s, n in zip(shards, seqnos, strict=True)}
        d.become_manager(self.check, self.before_write, self.after_write,
                         metadata_timeout(record.io_timeout))
        log.info("host %d is manager of %s at generation %d (lease version %d)",
                 d.host_id, d.name, self.generation, token)
        self.recover()

    @staticmethod
    def _lvm_seqno(shard: Shard) -> int:
        return shard.lvm.vg(shard.vg_name).seqno

    @classmethod
    def _seqno(cls, shard: Shard) -> int:
        """The shard VG's committed seqno: read from its metadata area (one O_DIRECT
        read, lvm_mda), or from LVM when that cannot be read."""
        head = lvm_mda.read_head(shard.luns[0]) if shard.luns else None
        if head is None or head.vg_name != shard.vg_name:
            return cls._lvm_seqno(shard)
        return head.seqno

    def before_write(self, shard: Shard) -> None:
        """Before each metadata command: the fencing check, and the shard VG's
        sequence number still the one this manager's last commit left. Any other value
        means that another process wrote the metadata meanwhile (a second manager, a
        stray lvm): stop before writing, and say so. A value read from the metadata
        area that differs is confirmed with LVM before it counts."""
        self.check()
        expected = self.seqnos.get(shard.vg_name)
        if expected is None:  # a shard added in this term: its first write
            self.seqnos[shard.vg_name] = self._lvm_seqno(shard)
            return
        seqno = self._seqno(shard)
        if seqno != expected:
            seqno = self._lvm_seqno(shard)
        if seqno != expected:
            self._fence(f"the metadata of VG {shard.vg_name} is at seqno {seqno}, this "
                        f"manager's last commit left {expected}: another host or "
                        "process wrote it")

    def after_write(self, shard: Shard) -> None:
        """After each metadata command (also a failed one): one commit at most, or
        something else committed during it."""
        before = self.seqnos.get(shard.vg_name)
        seqno = self._seqno(shard)
        if before is not None and not before <= seqno <= before + 1:
            seqno = self._lvm_seqno(shard)
        self.seqnos[shard.vg_name] = seqno
        if before is not None and seqno > before + 1:
            self._fence(f"the metadata of VG {shard.vg_name} went from seqno {before} to "
                        f"{seqno} across one command: another host or process wrote it")

    def check(self) -> None:
        """The fencing-token check run before every metadata write (LVM, journal,
        lease). A check that passed less than CHECK_REUSE ago stands for this one."""
        if self.token is None or self.generation is None:
            raise Fenced(f"host {self.domain.host_id} is not the manager of domain "
                         f"{self.domain.name}")
        token, started = self.token, _boottime()
        checked = self._checked
        if checked is not None and checked[0] == token and \
                0 <= started - checked[1] < CHECK_REUSE:
            return
        self._full_check()
        self._checked = (token, started)

    def _full_check(self) -> None:
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
        self._checked = None
        self.token = None
        self.generation = None
        self.domain.become_reader()
        with contextlib.suppress(Exception):
            self._on_term()
        with contextlib.suppress(errors.Error):
            self.lease.release()

    def release(self) -> None:
        """Give the role up cleanly (another host can take it at once): after the
        running operations, or at once from within one (domain remove)."""
        held = self.lock.held_shared()
        with contextlib.nullcontext() if held else self.lock.exclusive():
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
