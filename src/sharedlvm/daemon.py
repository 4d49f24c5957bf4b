"""The per-host sharedlvm daemon.

sanlock ties a lease to the process that holds it, so the manager role and the
leases of prepared volumes live in one long-lived process per host. For every domain
attached on the host the daemon joins the domain's lockspace (the ``ids`` LV), and
competes for the manager lease; while it holds it, it is the only process on any host
that writes LVM metadata (DESIGN.md rules 1-2). CLI commands that change metadata
reach it over a root-only unix socket (rpc.py), so the process that writes is the
process that holds the lease.

SIGTERM: give up the manager role, release volume leases, leave lockspaces, exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import socketserver
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import domain as domain_mod
from . import errors, leases, rpc, units
from . import metrics as metrics_mod
from . import volume as volume_mod
from .command import Runner
from .failpoints import failpoint
from .lease_layout import LeaseLayout
from .leases import host_dead_seconds
from .mailbox import Mailbox, new_request_id
from .manager import Fenced, Manager
from .metrics import Metrics
from .paths import HostPaths

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
    # The HTTP API (http_api.py): off unless an address is set, e.g. "0.0.0.0:8750".
    http_listen: str = ""
    # The bearer token, readable by root only; relative paths are under the config dir.
    http_token_file: str = "http-token"
    # TLS: both set, or plain HTTP.
    http_cert: str = ""
    http_key: str = ""

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
            if isinstance(getattr(cls, key), str):
                if not isinstance(value, str):
                    raise errors.InvalidArgument(f"{path}: {key} must be a string")
                values[key] = value
            elif not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise errors.InvalidArgument(f"{path}: {key} must be a positive number")
            else:
                values[key] = float(value)
        return cls(**values)

    def show(self) -> str:
        lines = ["[daemon]"]
        for f in fields(self):
            value = getattr(self, f.name)
            lines.append(f'{f.name} = "{value}"' if isinstance(value, str) else
                         f"{f.name} = {value}")
        return "\n".join(lines)


class DomainService:
    """One attached domain inside the daemon: lockspace, manager role, prepared volumes."""

    def __init__(self, daemon: Daemon, domain: domain_mod.Domain) -> None:
        self.daemon = daemon
        self.domain = domain
        self.layout = LeaseLayout(domain)
        self.manager = Manager(domain, self.layout.manager_lease(daemon.sanlock_fd))
        self.domain.lease_allocator = self.layout.allocate_volume_lease
        self.joined = False
        self.holdoff_until = 0.0
        self.prepared: dict[str, bool] = {}  # volume uuid -> shared
        self.stopped = threading.Event()
        self.mailbox = Mailbox(domain)
        self.mailbox_lock = threading.Lock()  # one request in flight per host
        self.next_seq: int | None = None
        self.answered: dict[int, int] = {}  # manager: host id -> last seq answered
        self.hot: dict[int, float] = {}  # manager: host id -> time of its last request
        self.last_sweep = 0.0
        self.live_cache: tuple[float, set[int]] = (0.0, set())
        self.thread = threading.Thread(target=self._loop, name=f"domain-{domain.name}",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        d = self.domain
        while not (self.stopped.is_set() or self.daemon.stopping.is_set()):
            try:
                if not self.joined:
                    log.info("joining lockspace of %s as host %d (io_timeout %d s)", d.name,
                             d.host_id, d.record.io_timeout)
                    self.layout.join()
                    self.joined = True
                    log.info("joined lockspace of %s", d.name)
                if (not self.manager.active and time.monotonic() >= self.holdoff_until
                        and self.manager.try_take()):
                    self.layout.reset_slots()
                    self.answered = {}
                    self.last_sweep = 0.0
                if self.manager.active:
                    self.serve_mailbox()
            except errors.Error as exc:
                log.error("domain %s: %s", d.name, exc)
                self.stopped.wait(2.0)
            except Exception:
                # Never let this thread die: a manager that holds the lease but no
                # longer serves would block every host. Log, back off, go on.
                log.exception("domain %s: unexpected error", d.name)
                self.stopped.wait(2.0)
            config = self.daemon.config
            self.stopped.wait(config.mailbox_poll if self.manager.active
                              else config.manager_poll)

    def _live(self) -> set[int]:
        """Live host ids, from sanlock at most once a second."""
        now = time.monotonic()
        if now - self.live_cache[0] > 1.0:
            self.live_cache = (now, self.layout.live_hosts())
        return self.live_cache[1]

    def serve_mailbox(self) -> None:
        """Manager: execute new requests in the outboxes of live hosts and reply."""
        now = time.monotonic()
        config = self.daemon.config
        # Its own outbox too: a request this host sent before it took the role waits
        # there for an answer.
        live = self._live() | {self.domain.host_id}
        to_read = {h for h, t in self.hot.items() if now - t < config.mailbox_hot} & live
        if now - self.last_sweep >= config.mailbox_sweep:
            self.last_sweep = now
            for host, seq in self.mailbox.peek_seqs(sorted(live),
                                                    self.layout.sector_size).items():
                if host not in self.answered:
                    self.answered[host] = self.mailbox.answered(host)
                if seq > self.answered[host]:
                    to_read.add(host)
        for msg in self.mailbox.read_outboxes(sorted(to_read)):
            if msg.host_id not in self.answered:
                self.answered[msg.host_id] = self.mailbox.answered(msg.host_id)
            if msg.seq <= self.answered[msg.host_id]:
                continue
            op, args = msg.payload.get("op"), msg.payload.get("args")
            if op not in MAILBOX_OPS or not isinstance(args, dict):
                answer = rpc.answer_error(errors.InvalidArgument(f"unknown request {op!r}"))
            else:
                log.info("mailbox: host %d asks %s (request %s)", msg.host_id, op,
                         args.get("request_id"))
                try:
                    answer = {"ok": True, "result": self.daemon.dispatch(
                        str(op), dict(args, _manager_only=True))}
                except (Fenced, errors.NotManager):
                    return  # not manager any more: the next manager answers it
                except errors.Error as exc:
                    answer = rpc.answer_error(exc)
            self.hot[msg.host_id] = time.monotonic()
            failpoint("mailbox-before-reply")
            self.mailbox.reply(msg.host_id, msg.seq, answer)
            self.answered[msg.host_id] = msg.seq
            self.daemon.metrics.mailbox_requests_served += 1

    def forward(self, op: str, args: dict[str, Any]) -> Any:
        """Not manager: ask the manager through this host's outbox and wait."""
        if not self.joined:
            raise errors.LockspaceError(f"host {self.domain.host_id} has not joined the "
                                        f"lockspace of domain {self.domain.name} yet")
        # A request id makes the request exactly-once across a manager failover.
        args = dict(args, request_id=args.get("request_id") or new_request_id())
        timeout = host_dead_seconds(self.domain.record.io_timeout) + 60
        with self.mailbox_lock:
            if self.next_seq is None:
                self.next_seq = self.mailbox.last_sent() + 1
            seq = self.next_seq
            self.next_seq += 1
            answer = self.mailbox.call(op, args, seq, timeout)
        if answer.get("ok"):
            return answer.get("result")
        raise rpc.rebuild_error(str(answer.get("kind")), str(answer.get("error")))

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=60)
        self.manager.release()
        for vol in list(self.prepared):
            with contextlib.suppress(errors.Error):
                self.teardown(vol)
        if self.joined:
            with contextlib.suppress(errors.Error):
                self.layout.leave()
            self.joined = False

    def require_manager(self) -> None:
        if not self.manager.active:
            self.domain.require_writer()  # raises NotManager naming the manager
        self.manager.check()

    def prepare(self, vol: str, shared: bool) -> str:
        volume_mod.check_uuid(vol)
        if not self.joined:
            raise errors.LockspaceError(f"host {self.domain.host_id} has not joined the "
                                        f"lockspace of domain {self.domain.name} yet")
        if vol in self.prepared:
            if self.prepared[vol] != shared:
                raise errors.Busy(f"volume {vol} is already prepared here "
                                  f"({'shared' if self.prepared[vol] else 'exclusive'})")
            return volume_mod.volume_path(self.domain, vol)
        info = volume_mod.get_volume(self.domain, vol)
        self.layout.acquire_volume(info, shared=shared, fd=self.daemon.sanlock_fd)
        try:
            path = volume_mod.volume_path(self.domain, vol)
        except BaseException:
            self.layout.release_volume(info, fd=self.daemon.sanlock_fd)
            raise
        self.prepared[vol] = shared
        return path

    def teardown(self, vol: str) -> None:
        volume_mod.check_uuid(vol)
        if vol not in self.prepared:
            raise errors.NotFound(f"volume {vol} is not prepared on this host")
        info = volume_mod.get_volume(self.domain, vol)
        self.domain.activator.deactivate(self.domain.vg_name, vol)
        self.layout.release_volume(info, fd=self.daemon.sanlock_fd)
        del self.prepared[vol]


class Daemon:
    def __init__(self, paths: HostPaths, runner: Runner,
                 config: DaemonConfig | None = None) -> None:
        self.paths = paths
        self.runner = runner
        self.config = config or DaemonConfig()
        self.stopping = threading.Event()
        self.services: dict[str, DomainService] = {}
        self.services_lock = threading.Lock()
        self.sanlock_fd = -1
        self.server: socketserver.UnixStreamServer | None = None
        self.metrics = Metrics()

    # Life cycle

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT. The sanlock daemon of this host must run."""
        self.paths.ensure()
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
        (self.paths.run_dir / "daemon.pid").write_text(f"{os.getpid()}\n")
        log.info("sharedlvm daemon ready (pid %d, socket %s)", os.getpid(),
                 rpc.socket_path(self.paths.run_dir))
        _notify_ready()
        self.stopping.wait()
        log.info("stopping: releasing roles and leases, leaving lockspaces")
        if http is not None:
            http.stop()
        self.server.shutdown()
        with self.services_lock:
            for service in self.services.values():
                service.stopped.set()
            for service in self.services.values():
                service.stop()
        rpc.socket_path(self.paths.run_dir).unlink(missing_ok=True)
        (self.paths.run_dir / "daemon.pid").unlink(missing_ok=True)

    def _start_http(self) -> HttpApi | None:
        c = self.config
        if not c.http_listen:
            return None
        from .http_api import HttpApi, read_token

        def under_config(name: str) -> Path | None:
            return (self.paths.config_dir / name) if name else None

        token_file = under_config(c.http_token_file)
        assert token_file is not None
        api = HttpApi(self, c.http_listen, read_token(token_file),
                      under_config(c.http_cert), under_config(c.http_key))
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

    def reload(self) -> list[str]:
        """Start services for domains attached since the last look; drop detached ones."""
        names = domain_mod.attached_domains(self.paths)
        with self.services_lock:
            for name in names:
                if name not in self.services:
                    d = domain_mod.Domain.open(self.paths, self.runner, name)
                    service = DomainService(self, d)
                    self.services[name] = service
                    service.start()
            for name in list(self.services):
                if name not in names:
                    self.services.pop(name).stop()
        return names

    # Requests

    def handle_connection(self, sock: socket.socket) -> None:
        try:
            op, args = rpc.read_request(sock)
            log.debug("request %s %s", op, args)
            answer = {"ok": True, "result": self.dispatch(op, args)}
        except errors.Error as exc:
            answer = rpc.answer_error(exc)
        except Exception as exc:  # a bug: answer it rather than hang the client
            log.exception("request failed")
            answer = rpc.answer_error(errors.Error(f"internal error: {exc!r}"))
        with contextlib.suppress(OSError):
            rpc.send_answer(sock, answer)

    def service(self, name: str | None) -> DomainService:
        with self.services_lock:
            if name is None:
                if len(self.services) != 1:
                    raise errors.InvalidArgument(
                        "no domain is attached on this host" if not self.services else
                        f"several domains are attached ({', '.join(self.services)}): "
                        "use --domain")
                return next(iter(self.services.values()))
            try:
                return self.services[name]
            except KeyError:
                raise errors.DomainNotFound(
                    f"domain {name} is not attached on this host") from None

    def dispatch(self, op: str, args: dict[str, Any]) -> Any:
        handler = _HANDLERS.get(op)
        if handler is None:
            raise errors.InvalidArgument(f"unknown request {op!r}")
        start = time.monotonic()
        ok = False
        try:
            result = handler(self, args)
            ok = True
            return result
        finally:
            if op not in ("status", "metrics"):
                self.metrics.observe(op, ok, time.monotonic() - start)

    def render_metrics(self) -> str:
        gauges: list[tuple[str, str, dict[str, str], float]] = []
        with self.services_lock:
            services = list(self.services.values())
        for s in services:
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
            ]
        return self.metrics.render(gauges)


def _str(args: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = args.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise errors.InvalidArgument(f"{key} must be a string")
    return value


def _on_manager(daemon: Daemon, args: dict[str, Any], op: str,
                fn: Callable[[domain_mod.Domain], Any]) -> Any:
    """Run ``fn`` here if this daemon is manager; otherwise send the request to the
    manager through the storage mailbox (any host can ask)."""
    service = daemon.service(_str(args, "domain", required=False))
    if not service.manager.active and op in MAILBOX_OPS and not args.get("_manager_only"):
        public = {k: v for k, v in args.items() if not k.startswith("_")}
        return service.forward(op, public)
    with service.manager.lock:
        service.require_manager()
        return fn(service.domain)


def _volume_create(daemon: Daemon, args: dict[str, Any]) -> Any:
    size = args.get("size")
    if not isinstance(size, int) or isinstance(size, bool):
        raise errors.InvalidArgument("size must be an integer number of bytes")
    user_tags = [tuple(t) for t in args.get("tags", [])]
    return _on_manager(daemon, args, "volume.create", lambda d: volume_mod.create_volume(
        d, size, fmt=str(args.get("format", "raw")), alloc=_str(args, "alloc", False),
        image=_str(args, "image", False),
        user_tags=[(str(k), str(v)) for k, v in user_tags],
        request_id=_str(args, "request_id", False)).as_dict())


def _volume_extend(daemon: Daemon, args: dict[str, Any]) -> Any:
    text = _str(args, "size") or ""
    units.parse_resize(text, 0)
    vol = _str(args, "volume") or ""
    return _on_manager(daemon, args, "volume.extend", lambda d: volume_mod.extend_volume(
        d, vol, lambda current: units.parse_resize(text, current),
        request_id=_str(args, "request_id", False)).as_dict())


def _volume_delete(daemon: Daemon, args: dict[str, Any]) -> Any:
    vol = _str(args, "volume") or ""
    service = daemon.service(_str(args, "domain", required=False))
    if vol in service.prepared:
        raise errors.Busy(f"volume {vol} is prepared on this host; tear it down first")

    def delete(d: domain_mod.Domain) -> Any:
        return volume_mod.delete_volume(d, vol, wipe=bool(args.get("wipe")),
                                        request_id=_str(args, "request_id", False),
                                        check_free=service.layout.check_volume_free)
    return _on_manager(daemon, args, "volume.delete", delete)


def _domain_remove(daemon: Daemon, args: dict[str, Any]) -> Any:
    service = daemon.service(_str(args, "domain", required=False))

    def remove(d: domain_mod.Domain) -> Any:
        force = bool(args.get("force"))
        d.check_removable(force)
        # A host that just left is seen free at this host's next renewal (every
        # 2 x io_timeout): allow for that before refusing.
        deadline = time.monotonic() + 3 * d.record.io_timeout + 1
        while True:
            others = sorted(h for h in service.layout.live_hosts() if h != d.host_id)
            if not others or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if others:
            raise errors.Busy(f"host(s) {', '.join(map(str, others))} still use domain "
                              f"{d.name}: detach them first")
        with daemon.services_lock:
            daemon.services.pop(d.name, None)
        service.stop()  # releases the role, leaves the lockspace
        d.destroy(force)
        return {"removed": d.name}
    return _on_manager(daemon, args, "domain.remove", remove)


def _manager_release(daemon: Daemon, args: dict[str, Any]) -> Any:
    service = daemon.service(_str(args, "domain", required=False))
    service.holdoff_until = time.monotonic() + daemon.config.release_holdoff
    was = service.manager.active
    service.manager.release()
    return {"released": was}


def _status(daemon: Daemon, args: dict[str, Any]) -> Any:
    with daemon.services_lock:
        services = list(daemon.services.values())
    return [{"domain": s.domain.name, "host_id": s.domain.host_id, "joined": s.joined,
             "manager": s.manager.active, "generation": s.manager.generation,
             "prepared": dict(s.prepared)} for s in services]


def _prepare(daemon: Daemon, args: dict[str, Any]) -> Any:
    service = daemon.service(_str(args, "domain", required=False))
    return {"path": service.prepare(_str(args, "volume") or "", bool(args.get("shared")))}


def _teardown(daemon: Daemon, args: dict[str, Any]) -> Any:
    service = daemon.service(_str(args, "domain", required=False))
    service.teardown(_str(args, "volume") or "")
    return {"ok": True}


def _manager_status(daemon: Daemon, args: dict[str, Any]) -> Any:
    service = daemon.service(_str(args, "domain", required=False))
    record = service.domain.read_record()
    owner = service.manager.lease.owner() if service.joined else None
    live = service.layout.live_hosts() if service.joined else set()
    manager = owner if owner in live else None
    return {"domain": service.domain.name, "manager": manager,
            "generation": record.manager_generation, "last_manager": record.manager_host_id,
            "this_host": service.manager.active}


def _host_list(daemon: Daemon, args: dict[str, Any]) -> Any:
    service = daemon.service(_str(args, "domain", required=False))
    if not service.joined:
        raise errors.LockspaceError(f"host {service.domain.host_id} has not joined the "
                                    f"lockspace of {service.domain.name} yet")
    holds: dict[int, list[str]] = {}
    owner = service.manager.lease.owner()
    if owner:
        holds.setdefault(owner, []).append("manager")
    for info in volume_mod.list_volumes(service.domain):
        if info.lease is None:
            continue
        holders = service.layout.holders(info)
        mode = "shared" if len(holders) > 1 else "exclusive"
        for host in holders:
            holds.setdefault(host, []).append(f"{info.uuid} ({mode})")
    states = service.layout.host_states()
    return [{"host_id": h, "state": st.state, "generation": st.generation,
             "holds": holds.get(h, [])} for h, st in sorted(states.items())]


# Requests a non-manager host forwards to the manager through the storage mailbox.
MAILBOX_OPS = frozenset({"volume.create", "volume.extend", "volume.delete"})

_HANDLERS: dict[str, Callable[[Daemon, dict[str, Any]], Any]] = {
    "manager.status": _manager_status,
    "metrics": lambda daemon, args: daemon.render_metrics(),
    "host.list": _host_list,
    "status": _status,
    "reload": lambda daemon, args: daemon.reload(),
    "volume.create": _volume_create,
    "volume.extend": _volume_extend,
    "volume.delete": _volume_delete,
    "volume.prepare": _prepare,
    "volume.teardown": _teardown,
    "domain.remove": _domain_remove,
    "manager.release": _manager_release,
}


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
