"""One attached domain inside the daemon: lockspace, manager role, mailbox, prepared volumes.

A :class:`DomainService` runs one thread that joins the domain's lockspace, competes
for the manager lease (every ``manager_poll``) and, while manager, serves the storage
mailbox (every ``mailbox_poll``). The parts it ties together live in their own
modules: the role in manager.py, the mailbox's both sides in mailbox.py, the leases
held for consumers in prepared.py.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import codec, copies, errors, images
from . import volume as volume_mod
from .backup import Backups
from .domain import Domain
from .lease_layout import LeaseLayout
from .leases import host_dead_seconds
from .mailbox import Mailbox, MailboxClient, MailboxServer, Message, PollSettings, new_request_id
from .manager import Manager
from .model import VolumeInfo
from .prepared import PreparedVolumes
from .requests import Request

log = logging.getLogger(__name__)

# How often a joined daemon checks that its host is still in the lockspace.
LOCKSPACE_CHECK = 5.0


@dataclass(frozen=True)
class ServiceSettings:
    manager_poll: float
    mailbox: PollSettings
    backup_interval: float = 60.0


class DomainService:
    def __init__(self, domain: Domain, sanlock_fd: Callable[[], int],
                 settings: ServiceSettings, stopping: threading.Event,
                 answer: Callable[[DomainService, Message], dict[str, Any] | None]) -> None:
        self.domain = domain
        self.layout = LeaseLayout(domain)
        self.sanlock_fd = sanlock_fd
        # Steps after an answer (a deleted volume's lease given back, its index entry
        # cleared), each kind in order on its own thread. A slot whose release is
        # queued stays out of this host's allocations (LeaseLayout._held); a term's end
        # waits for the queued releases (sanlock calls only, no lock of a request), so
        # the next manager, on any host, never writes a new lease over one this daemon
        # still holds; an index clear may wait for the journal, so nothing waits for it
        # but a clean stop.
        self._releases = ThreadPoolExecutor(1, thread_name_prefix=f"release-{domain.name}")
        self._clears = ThreadPoolExecutor(1, thread_name_prefix=f"index-{domain.name}")
        domain.later = lambda step: self._later(self._clears, step)
        self.manager = Manager(domain, self.layout.manager_lease(sanlock_fd()),
                               lambda: volume_mod.recover(
                                   domain, self.exclusive,
                                   {**images.recovery(domain, self.exclusive),
                                    **copies.recovery(domain)}),
                               on_term=self._on_term)
        self.settings = settings
        self.joined = False
        self.holdoff_until = 0.0
        self.stopped = threading.Event()
        self._daemon_stopping = stopping
        self.prepared = PreparedVolumes(
            domain, self.layout, domain.paths.run_dir / f"prepared-{domain.name}.json",
            self.require_joined)
        self.mailbox = Mailbox(domain)
        self.copies = copies.Copies()  # copies running on this host (copies.py)
        self.backups = Backups(domain, settings.backup_interval)
        self.mailbox_client = MailboxClient(self.mailbox)
        self.mailbox_server = MailboxServer(self.mailbox, settings.mailbox, self._live,
                                            lambda: self.layout.sector_size,
                                            lambda msg: answer(self, msg))
        self._live_cache: tuple[float, set[int]] = (0.0, set())
        self._tick = time.monotonic()  # the loop's last sign of life
        self._lockspace_seen = 0.0
        self._blocked = 0  # > 0 while the loop waits in a call that ends by itself
        self.thread = threading.Thread(target=self._loop, name=f"domain-{domain.name}",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        d = self.domain
        d.on_progress = self.tick
        while not (self.stopped.is_set() or self._daemon_stopping.is_set()):
            self.tick()
            try:
                if not self.joined:
                    log.info("joining lockspace of %s as host %d (io_timeout %d s)", d.name,
                             d.host_id, d.record.io_timeout)
                    with self._blocking():  # sanlock's join can take the host-dead time
                        self.layout.join()
                    self.joined = True
                    log.info("joined lockspace of %s", d.name)
                elif time.monotonic() - self._lockspace_seen > LOCKSPACE_CHECK:
                    self._check_lockspace()
                if (self.joined and not self.manager.active
                        and time.monotonic() >= self.holdoff_until
                        and self.manager.try_take()):
                    self.mailbox_server.reset()
                    self.backups.reset()
                if self.manager.active:
                    self.mailbox_server.serve()
                    self._backup()
            except errors.Error as exc:
                log.error("domain %s: %s", d.name, exc)
                self.stopped.wait(2.0)
            except Exception:
                # Never let this thread die: a manager that holds the lease but no
                # longer serves would block every host. Log, back off, go on.
                log.exception("domain %s: unexpected error", d.name)
                self.stopped.wait(2.0)
            self.stopped.wait(self.settings.mailbox.poll if self.manager.active
                              else self.settings.manager_poll)

    def _backup(self) -> None:
        """The shards' metadata backups (backup.py): a failure is logged, never fatal
        to the role (the next check tries again)."""
        try:
            self.backups.run()
        except errors.Fenced:
            raise
        except errors.Error as exc:
            log.error("domain %s: metadata backup failed: %s", self.domain.name, exc)
            self.backups.reset()
            self.backups.delay()

    def _check_lockspace(self) -> None:
        """A lockspace this host lost (storage gone long enough for renewal to fail,
        an admin's rem_lockspace) is joined again, not assumed forever."""
        self._lockspace_seen = time.monotonic()
        if not self.layout.joined():
            log.error("host %d is no longer in the lockspace of %s: joining again",
                      self.domain.host_id, self.domain.name)
            self.manager.release()
            self.joined = False

    def tick(self) -> None:
        self._tick = time.monotonic()

    @contextlib.contextmanager
    def _blocking(self) -> Iterator[None]:
        self._blocked += 1
        try:
            yield
        finally:
            self._blocked -= 1
            self.tick()

    def alive(self, timeout: float) -> bool:
        """The loop made progress in the last ``timeout`` seconds, or waits in a call
        that ends by itself."""
        return self._blocked > 0 or time.monotonic() - self._tick < timeout

    def _live(self) -> set[int]:
        """Live host ids, from sanlock at most once a second."""
        now = time.monotonic()
        if now - self._live_cache[0] > 1.0:
            self._live_cache = (now, self.layout.live_hosts())
        return self._live_cache[1]

    def exclusive(self, info: VolumeInfo, *,
                  release_later: bool = False) -> contextlib.AbstractContextManager[None]:
        """The volume's lease held exclusively by the daemon (the manager) for a block;
        ``release_later``: given back after the answer (volume.ExclusiveLease)."""
        later = self._release_later if release_later else None
        return self.layout.exclusive(info, self.sanlock_fd(), later)

    def _release_later(self, step: Callable[[], None]) -> None:
        if not self.manager.active:
            step()  # the term ended (fenced, released): its drain may be past
        else:
            self._later(self._releases, step)

    def _later(self, pool: ThreadPoolExecutor, step: Callable[[], None]) -> None:
        def run() -> None:
            try:
                step()
            except Exception as exc:  # a step's failure is its own, logged
                log.warning("domain %s: a step after an answer failed: %s",
                            self.domain.name, exc)
        try:
            pool.submit(run)
        except RuntimeError:  # shut down (the daemon stops): now, in this thread
            run()

    def _on_term(self) -> None:
        """A manager term begins or ends: the leases still to give back are given back
        first, then the term's slot map is forgotten."""
        with contextlib.suppress(RuntimeError):
            self._releases.submit(lambda: None).result()
        self.layout.reset_slots()

    def require_joined(self) -> None:
        if not self.joined:
            raise errors.LockspaceError(f"host {self.domain.host_id} has not joined the "
                                        f"lockspace of domain {self.domain.name} yet")

    def require_manager(self) -> None:
        if not self.manager.active:
            self.domain.require_manager()  # raises NotManager naming the manager
        self.manager.check()

    def forward(self, request: Request) -> Any:
        """Not manager: ask the manager through this host's outbox and wait. A request
        id makes the request exactly-once across a manager failover."""
        self.require_joined()
        request_id = getattr(request, "request_id", None)
        if request_id is None:
            request_id = new_request_id()
            request = request.with_request_id(request_id)
        timeout = host_dead_seconds(self.domain.record.io_timeout) + 60
        answer = self.mailbox_client.call(request.op, codec.to_wire(request), request_id,
                                          timeout)
        if answer.get("ok"):
            return codec.from_wire(request.Result, answer.get("result"), "result")
        raise errors.from_wire(answer.get("error"))

    def stop(self, leave: bool = False) -> None:
        """Stop serving: give the manager role up. The lockspace is left only with
        ``leave`` (the domain is detached or removed): leaving it would take every
        lease in it from its holders, and consumers' leases (``run``, prepared
        volumes) must outlive a daemon restart; sanlock keeps the host id renewed
        meanwhile, and a restarted daemon finds it joined."""
        self.stopped.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=60)
        self._clears.shutdown(wait=True)  # while still manager: the clears can run
        self.manager.release()
        self._releases.shutdown(wait=True)
        if leave and self.joined:
            with contextlib.suppress(errors.Error):
                self.layout.leave()
            self.joined = False
