"""The per-host sharedlvm daemon.

sanlock ties a lease to the process that holds it, so the manager role lives in one
long-lived process per host (volume leases live in their consumers). For every domain
attached on the host the daemon joins the domain's lockspace (the ``ids`` LV), and
competes for the manager lease; while it holds it, it is the only process on any host
that writes LVM metadata (docs/design.md rules 1-2). CLI commands that change metadata
reach it over a root-only unix socket (rpc.py), so the process that writes is the
process that holds the lease.

SIGTERM: give up the manager role and exit. The lockspaces stay joined (sanlock renews
them): leaving one would take the consumers' leases in it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import socketserver
import threading
import time
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import codec, errors, leases, operations, rpc
from . import domain as domain_mod
from . import metrics as metrics_mod
from .command import Runner
from .copies import CopySettings
from .hangwatch import HangWatch
from .mailbox import MAILBOX_VERSION, Message, PollSettings
from .metrics import Metrics
from .model import VolumeInfo
from .paths import HostPaths
from .requests import ExtendVolume, PublishVolume, Request
from .service import DomainService, ServiceSettings
from .units import MiB
from .vmwatch import ThinSettings, VmWatcher

if TYPE_CHECKING:
    from .http_api import HttpApi

log = logging.getLogger(__name__)


CONFIG_FILE = "daemon.toml"  # under the host's config dir: /etc/sharedlvm/daemon.toml


@dataclass(frozen=True)
class DaemonConfig:
    # How often a daemon that is not manager tries the manager lease. A free lease is
    # acquired in milliseconds, so this bounds a clean handover (target < 1 s).
    manager_poll: float = 0.5
    # After `manager release`, leave the role to others this long before competing.
    release_holdoff: float = 10.0
    # The manager reads the outboxes of hosts that asked in the last `mailbox_hot`
    # seconds every `mailbox_poll` (low latency for a busy orchestrator), and sweeps
    # every live host every `mailbox_sweep` reading one sector each (low idle I/O:
    # the first request of an idle host waits up to one sweep). See mailbox.py.
    mailbox_poll: float = 0.005
    mailbox_sweep: float = 2.0
    mailbox_hot: float = 30.0
    # The most the idle sweep may read, KiB/s: past it (more than 256 live hosts on a
    # 4 KiB-sector LUN, 2,048 on 512 B) the sweep slows to stay within it, so an idle
    # manager's reads do not grow with the hosts (2,000 live hosts on 4 KiB sectors:
    # a sweep every 16 s; hot hosts are still read every `mailbox_poll`).
    mailbox_idle_kib: int = 512
    # The deepest chain a snapshot may make (images.py): a read of a cluster that no
    # overlay has walks the whole chain, and qemu opens every volume of it.
    max_chain: int = 32
    # Each copy (full clone, upload, download) at most this many bytes/s, 0 for no
    # limit: copies run on the asking hosts, and many at once can fill the SAN's links
    # that running VMs need.
    copy_rate: int = 0
    # A daemon that makes no progress this long (SIGSTOP, a deadlock) is killed by its
    # watcher process (hangwatch.py), so that sanlock frees its leases and another
    # host becomes manager: a hung manager would otherwise keep the role forever.
    # Longer than any single step of the daemon's loop (a metadata command is bounded
    # by 6 x io_timeout + 30 s: 90 s at the default io_timeout).
    hang_timeout: float = 120.0
    # The manager copies each shard's LVM metadata into the domain (backup.py) when
    # it changed, at most this often per shard, and at once after a takeover.
    backup_interval: float = 60.0
    # The HTTP API (http_api.py): off unless an address is set, e.g. "0.0.0.0:8750"
    # (with TLS, or http_insecure below).
    http_listen: str = ""
    # The bearer token, readable by root only; relative paths are under the config dir.
    http_token_file: str = "http-token"
    # TLS: both set, or plain HTTP.
    http_cert: str = ""
    http_key: str = ""
    # Plain HTTP sends the bearer token and every request in clear text, so without
    # TLS the API listens only on a loopback address. True allows plain HTTP on any
    # address: for a network the operator trusts (or a TLS proxy in front).
    http_insecure: bool = False
    # Running VMs' thin qcow2 volumes (vmwatch.py): grown by `thin_chunk_mib` when less
    # than `thin_free_mib` is left in the LV (vdsm: 2.5 GiB chunks, extended when about
    # half a chunk is left; smaller here because thin LVs start at 1 GiB: 512 MiB is
    # what a guest writing 250 MB/s fills in 2 s, an idle manager's mailbox sweep),
    # and checked every `thin_check` seconds besides qemu's write-threshold event.
    thin_chunk_mib: int = 1024
    thin_free_mib: int = 512
    thin_check: float = 2.0
    # libvirt, for the watch of VMs libvirt runs (vmwatch_libvirt.py, recorded by
    # libvirt's qemu hook: 'sharedlvm libvirt install').
    libvirt_uri: str = "qemu:///system"

    @classmethod
    def load(cls, paths: HostPaths) -> DaemonConfig:
        """Defaults, overridden by ``[daemon]`` in etc/sharedlvm/daemon.toml if present."""
        path = paths.config_dir / CONFIG_FILE
        try:
            data = tomllib.loads(path.read_text()).get("daemon", {})
        except FileNotFoundError:
            return cls()
        except tomllib.TOMLDecodeError as exc:
            raise errors.InvalidArgument(f"{path}: {exc}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise errors.InvalidArgument(f"{path}: unknown setting(s) {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            default = getattr(cls, key)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise errors.InvalidArgument(f"{path}: {key} must be true or false")
                values[key] = value
            elif isinstance(default, str):
                if not isinstance(value, str):
                    raise errors.InvalidArgument(f"{path}: {key} must be a string")
                values[key] = value
            elif not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise errors.InvalidArgument(f"{path}: {key} must be a positive number")
            else:
                values[key] = float(value)
        config = cls(**values)
        if config.thin_free_mib >= config.thin_chunk_mib:
            raise errors.InvalidArgument(
                f"{path}: thin_free_mib ({config.thin_free_mib:g}) must be less than "
                f"thin_chunk_mib ({config.thin_chunk_mib:g}): a grow must leave the LV "
                "above its next threshold")
        if config.http_listen:
            # HttpApi refuses it too; here it stops the daemon before it joins anything.
            tls = bool(config.http_cert and config.http_key)
            try:
                from .http_api import HttpApi  # aiohttp only where HTTP is on

                HttpApi.check_listen(config.http_listen, tls, config.http_insecure)
            except errors.InvalidArgument as exc:
                raise errors.InvalidArgument(f"{path}: {exc}") from None
        return config

    def show(self) -> str:
        lines = ["[daemon]"]
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                lines.append(f"{f.name} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                lines.append(f'{f.name} = "{value}"')
            else:
                lines.append(f"{f.name} = {value}")
        return "\n".join(lines)


class Daemon:
    """The daemon: its domains' services, the socket server, the dispatch of requests.

    Implements handlers.Context: handlers reach the domains through it."""

    def __init__(self, paths: HostPaths, runner: Runner,
                 config: DaemonConfig | None = None) -> None:
        self.paths = paths
        self.runner = runner
        self.config = config or DaemonConfig()
        self.stopping = threading.Event()
        self._services: dict[str, DomainService] = {}
        self._services_lock = threading.Lock()
        self.sanlock_fd = -1
        self.server: socketserver.UnixStreamServer | None = None
        self.metrics = Metrics()
        self.vms = VmWatcher(self.paths, self, ThinSettings(
            chunk=int(self.config.thin_chunk_mib) * MiB,
            free=int(self.config.thin_free_mib) * MiB, fallback=self.config.thin_check),
            self.stopping, self.config.libvirt_uri)

    # Life cycle

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT. The sanlock daemon of this host must run."""
        watch = HangWatch(self.config.hang_timeout)
        watch.start()  # before any thread exists
        self.paths.ensure()
        lock_fd = self._only_daemon()  # after the fork: the watcher must not hold it
        leases.use_run_dir(self.paths.sanlock_run_dir)
        self.sanlock_fd = leases.register()
        self.reload()
        self.server = self._make_server()
        for signo in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signo, lambda *_: self.stopping.set())
        server_thread = threading.Thread(target=self.server.serve_forever, name="rpc",
                                         daemon=True)
        server_thread.start()
        http = self._start_http()
        threading.Thread(target=metrics_mod.run_writer, name="metrics", daemon=True,
                         args=(self.stopping, self.paths.state_dir / "metrics.prom",
                               self.render_metrics)).start()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True,
                         args=(watch,)).start()
        self.vms.start()
        (self.paths.run_dir / "daemon.pid").write_text(f"{os.getpid()}\n")
        log.info("sharedlvm daemon ready (pid %d, socket %s)", os.getpid(),
                 rpc.socket_path(self.paths.run_dir))
        _notify_ready()
        self.stopping.wait()
        log.info("stopping: giving the manager role up (lockspaces and consumers' leases stay)")
        if http is not None:
            http.stop()
        self.server.shutdown()
        with self._services_lock:
            for service in self._services.values():
                service.stopped.set()
            for service in self._services.values():
                service.stop()
        rpc.socket_path(self.paths.run_dir).unlink(missing_ok=True)
        (self.paths.run_dir / "daemon.pid").unlink(missing_ok=True)
        watch.stop()
        os.close(lock_fd)

    def _only_daemon(self) -> int:
        """One daemon per host: a second one would register a second sanlock client,
        compete with the first for the manager lease (sanlock answers it EEXIST while
        the first holds it), take over the socket the first serves, and remove it when
        it exits (found by the fault harness: a restart retried under load). The lock
        dies with the process, so a crashed daemon never blocks its successor."""
        path = self.paths.run_dir / "daemon.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                pid = (self.paths.run_dir / "daemon.pid").read_text().strip()
            except OSError:
                pid = "unknown"
            raise errors.Busy(f"a sharedlvm daemon already runs on this host (pid {pid}, "
                              f"{path} is locked)") from None
        return fd

    def _heartbeat(self, watch: HangWatch) -> None:
        """Beat while every domain's loop makes progress (or waits in a bounded call)."""
        interval = self.config.hang_timeout / 4
        while not self.stopping.wait(interval):
            stuck = [s.domain.name for s in self.services()
                     if not s.alive(self.config.hang_timeout)]
            if stuck:
                log.error("no progress in domain(s) %s: not telling the watcher",
                          ", ".join(stuck))
                continue
            watch.beat()

    def _start_http(self) -> HttpApi | None:
        c = self.config
        if not c.http_listen:
            return None

        def under_config(name: str) -> Path | None:
            return (self.paths.config_dir / name) if name else None

        token_file = under_config(c.http_token_file)
        assert token_file is not None
        # aiohttp is imported only where the HTTP API is on: hosts without it (the
        # qemu-guest bed runs the system Python) still run the daemon.
        from .http_api import HttpApi, read_token

        api = HttpApi(self.dispatch, self.render_metrics, c.http_listen,
                      read_token(token_file), under_config(c.http_cert),
                      under_config(c.http_key), insecure=c.http_insecure,
                      spool=self.paths.state_dir / "spool")
        api.start()
        return api

    def _make_server(self) -> socketserver.UnixStreamServer:
        path = rpc.socket_path(self.paths.run_dir)
        path.unlink(missing_ok=True)
        daemon = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                daemon.handle_connection(self.request)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        old_umask = os.umask(0o077)  # the socket is root-only: 0600
        try:
            return Server(str(path), Handler)
        finally:
            os.umask(old_umask)

    def _settings(self) -> ServiceSettings:
        c = self.config
        return ServiceSettings(c.manager_poll, PollSettings(c.mailbox_poll, c.mailbox_sweep,
                                                            c.mailbox_hot,
                                                            c.mailbox_idle_kib * 1024),
                               c.backup_interval)

    # handlers.Context

    @property
    def release_holdoff(self) -> float:
        return self.config.release_holdoff

    @property
    def max_chain(self) -> int:
        return self.config.max_chain

    @property
    def copy_settings(self) -> CopySettings:
        return CopySettings(rate=self.config.copy_rate)

    def ask(self, request: Request) -> Any:
        return self.dispatch(request)

    # vmwatch.Host: what the watches of running VMs ask of the daemon

    def volume_info(self, domain: str, volume: str) -> VolumeInfo:
        from .volume import get_volume

        return get_volume(self.domain(domain), volume)

    def grow_thin(self, domain: str, volume: str, target: int) -> int:
        """Grow a running VM's thin volume's LV to ``target`` bytes through the manager
        (this host, or through the mailbox); the LV's size. The request id names the
        target: asked again (a restarted daemon), it is answered from the journal, not
        done twice."""
        try:
            info: VolumeInfo = self.dispatch(ExtendVolume(
                volume=volume, allocation=str(target),
                request_id=f"thin-{volume}-{target}", domain=domain))
            return info.size
        except errors.InvalidArgument:
            # Refused only when the LV is already larger than the target (grown by a
            # daemon that died before its refresh, or by hand): refresh only. Read
            # here, not before every extend: the hot path asks the manager at once.
            size = self.volume_info(domain, volume).size
            if size < target:
                raise
            return size

    def refresh_thin(self, domain: str, volume: str) -> None:
        """Map a grown LV's new size on this host."""
        d = self.domain(domain)
        shard = d.volume_shard(volume)
        # Only a mapping that exists: the VM may have exited meanwhile, and a refresh
        # that mapped the LV again would be an activation without a lease.
        if shard.activator.path(shard.vg_name, volume) is None:
            raise errors.Unsupported(f"volume {volume} is not active on this host: "
                                     "nothing to refresh")
        shard.activator.refresh(shard.vg_name, volume)

    def lease_versions(self, domain: str, volumes: list[str]) -> dict[str, int]:
        """The version of each volume's lease as written on the LUN."""
        from .volume import get_volume

        service = self.service(domain)
        return {v: service.layout.lease_version(get_volume(service.domain, v))
                for v in volumes}

    def observe(self, what: str, ok: bool, seconds: float) -> None:
        self.metrics.observe(what, ok, seconds)

    def reload(self) -> list[str]:
        """Start services for domains attached since the last look; drop detached ones."""
        names = domain_mod.attached_domains(self.paths)
        with self._services_lock:
            for name in names:
                if name not in self._services:
                    d = domain_mod.Domain.open(self.paths, self.runner, name)
                    service = DomainService(d, lambda: self.sanlock_fd, self._settings(),
                                            self.stopping, self._answer_mail)
                    self._services[name] = service
                    service.start()
            for name in list(self._services):
                if name not in names:
                    self._services.pop(name).stop(leave=True)  # detached
        return names

    def services(self) -> list[DomainService]:
        with self._services_lock:
            return list(self._services.values())

    def service(self, name: str | None) -> DomainService:
        with self._services_lock:
            if name is None:
                if len(self._services) != 1:
                    raise errors.InvalidArgument(
                        "no domain is attached on this host" if not self._services else
                        f"several domains are attached ({', '.join(self._services)}): "
                        "use --domain")
                return next(iter(self._services.values()))
            try:
                return self._services[name]
            except KeyError:
                raise errors.DomainNotFound(
                    f"domain {name} is not attached on this host") from None

    def domain(self, name: str | None) -> domain_mod.Domain:
        return self.service(name).domain

    def forget(self, name: str) -> None:
        with self._services_lock:
            self._services.pop(name, None)

    # Requests

    def handle_connection(self, sock: socket.socket) -> None:
        try:
            op, fields_ = rpc.read_request(sock)
            request = operations.decode(op, fields_)
            log.debug("request %s", request)
            answer = {"ok": True, "result": codec.to_wire(self.dispatch(request))}
        except errors.Error as exc:
            answer = {"ok": False, "error": exc.to_wire()}
        except Exception as exc:  # a bug: answer it rather than hang the client
            log.exception("request failed")
            answer = {"ok": False, "error": errors.Error(f"internal error: {exc!r}").to_wire()}
        with contextlib.suppress(OSError):
            rpc.send_answer(sock, answer)

    def dispatch(self, request: Request) -> Any:
        """Run a request here, on this host's manager role, or forward it to the
        manager through the mailbox, as its row in the operations table says."""
        op = operations.get(request.op)
        start = time.monotonic()
        ok = False
        try:
            if op.check_here is not None:
                op.check_here(self, request)
            if op.manager_only and not (op.runs_here and op.runs_here(request)):
                service = self.service(request.domain_name())
                if not service.manager.active and op.forward and op.idempotent:
                    # forwarded only with a request id: exactly-once across failovers
                    result = service.forward(request)
                else:
                    result = self.execute_as_manager(service, request)
            else:
                result = op.handler(self, request)
            ok = True
            return result
        finally:
            if request.op not in ("status", "metrics"):
                self.metrics.observe(request.op, ok, time.monotonic() - start)

    def execute_as_manager(self, service: DomainService, request: Request) -> Any:
        op = operations.get(request.op)
        with service.manager.lock.shared():
            service.require_manager()
            return op.handler(self, request)

    def _answer_mail(self, service: DomainService, msg: Message) -> dict[str, Any] | None:
        """The manager's answer to a request from another host's outbox."""
        payload = msg.payload
        try:
            if payload.get("v") != MAILBOX_VERSION:
                raise errors.Unsupported(f"mailbox request version {payload.get('v')!r} is "
                                         f"not supported (this manager: {MAILBOX_VERSION})")
            asked = payload.get("time")
            age = time.time() - asked if isinstance(asked, int | float) else 0.0
            if age > self._mailbox_expiry(service):
                # The asker gave up long ago (it waits host-dead time + 60 s): a request
                # left in the outbox of a host that died is not run when it comes back.
                raise errors.Timeout(f"request {payload.get('request_id')} expired: "
                                     f"asked {age:.0f} s ago")
            request = operations.decode(payload.get("op"), payload.get("fields"))
            mail_op = operations.get(request.op)
            if not mail_op.forward or (mail_op.runs_here and mail_op.runs_here(request)):
                raise errors.InvalidArgument(f"{request.op} cannot be asked of the manager "
                                             "through the mailbox")
            # The asking host named the domain by its own config (or not at all).
            request = dataclasses.replace(request, domain=service.domain.name)  # type: ignore[call-arg]
            if isinstance(request, PublishVolume):  # the host that asks is the one that holds
                request = dataclasses.replace(request, host_id=msg.host_id)
            log.info("mailbox: host %d asks %s (request %s)", msg.host_id, request.op,
                     payload.get("request_id"))
            start = time.monotonic()
            ok = False
            try:
                result = self.execute_as_manager(service, request)
                ok = True
            finally:
                self.metrics.observe(request.op, ok, time.monotonic() - start)
            return {"ok": True, "result": codec.to_wire(result)}
        except (errors.Fenced, errors.NotManager) as exc:
            if not service.manager.active:
                return None  # not manager any more: the next manager answers it
            return {"ok": False, "error": exc.to_wire()}
        except errors.Error as exc:
            return {"ok": False, "error": exc.to_wire()}
        except Exception as exc:  # a bug must not stall the mailbox for every host
            log.exception("mailbox request of host %d failed", msg.host_id)
            return {"ok": False, "error": errors.Error(f"internal error: {exc!r}").to_wire()}

    @staticmethod
    def _mailbox_expiry(service: DomainService) -> float:
        """How old a request in an outbox may be: the asker's own timeout, and 5
        minutes for clocks that differ between hosts."""
        return leases.host_dead_seconds(service.domain.record.io_timeout) + 60 + 300

    def render_metrics(self) -> str:
        gauges: list[tuple[str, str, dict[str, str], float]] = []
        for s in self.services():
            labels = {"domain": s.domain.name, "host_id": str(s.domain.host_id)}
            gauges += [
                ("lockspace_joined", "1 if this host joined the domain's lockspace.",
                 labels, float(s.joined)),
                ("manager", "1 if this host holds the manager lease.", labels,
                 float(s.manager.active)),
                ("manager_generation", "Manager generation of this host's term (0: none).",
                 labels, float(s.manager.generation or 0)),
                ("prepared_volumes", "Volumes whose lease the daemon holds.", labels,
                 float(len(s.prepared))),
                ("mailbox_read_bytes_total", "Bytes read from the mailbox LV.", labels,
                 float(s.mailbox.bytes_read)),
                ("mailbox_requests_served_total",
                 "Requests from other hosts served through the storage mailbox.", labels,
                 float(s.mailbox_server.served)),
            ]
        return self.metrics.render(gauges)


def _notify_ready() -> None:
    """systemd Type=notify readiness, without a dependency: one datagram."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, \
            contextlib.suppress(OSError):
        sock.sendto(b"READY=1", address)


def run_daemon(paths: HostPaths, log_file: Path | None = None) -> None:
    config = DaemonConfig.load(paths)
    logging.basicConfig(level=logging.INFO, filename=str(log_file) if log_file else None,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    Daemon(paths, Runner(), config).run()
