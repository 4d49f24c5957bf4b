"""The sharedlvm command.

Every operation of the daemon (operations.py) is a subcommand whose options come
from its request type's fields (requests.py): one table, no hand-written parser per
operation. A few commands run on this host only and have their own small parsers:
formatting and attaching domains, the daemon itself, ``run``.

Every failure is one line on stderr, ``sharedlvm: <message>``, with the exit code of
its error class (:data:`EXIT_CODES`; 2 for a command line that does not parse).
``--json`` output is for programs; the tables are for people.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__, codec, errors, operations, units
from . import domain as domain_mod
from . import requests as rq
from .client import Client
from .command import Runner
from .copies import CopySettings
from .leases import host_dead_seconds
from .model import DomainInfo, HostInfo, ImageInfo, ManagerStatus, VolumeInfo, check_uuid
from .operations import Operation
from .paths import HostPaths

DESCRIPTION = ("VM disks on shared SAN LUNs with plain LVM2 and sanlock storage leases: "
               "any host may ask, one manager writes LVM metadata.")

# Exit code of each error class (a test checks that none is missing). 1 for every
# error today: scripts tell errors apart by --json output of the client library.
EXIT_CODES: dict[type[errors.Error], int] = {
    cls: 1 for cls in errors.error_classes().values()
}

GROUP_HELP = {
    "domain": "format, attach, inspect, remove domains",
    "volume": "create, list, extend, delete, prepare, snapshot, clone volumes",
    "image": "chains of volumes: inspect, prepare for a consumer, delete",
    "manager": "the manager role",
    "host": "hosts of a domain",
    "vm": "VMs started by 'run': live migration between hosts",
    "libvirt": "VMs run by libvirt: disk XML, lock driver and hook configuration",
}


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message: str) -> Any:
        self.exit(2, f"sharedlvm: {message} (see {self.prog} --help)\n")


def _cli_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except errors.InvalidArgument as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return convert


def _one_of_many(parse: Callable[[list[str]], Any]) -> Callable[[str], Any]:
    """A parser of a repeated option's list applied to one occurrence."""
    return lambda text: parse([text])


# Operations of the daemon, from the table

def _add_operation(parser: argparse.ArgumentParser, op: Operation) -> None:
    types_ = codec.hints(op.request)
    for f in dataclasses.fields(op.request):
        meta, tp = f.metadata, types_[f.name]
        help_text = meta.get("help")
        if meta.get("positional"):
            parser.add_argument(f.name, help=help_text)
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and \
            f.default_factory is dataclasses.MISSING
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text,
                                  "default": argparse.SUPPRESS}
        if tp is bool:
            if meta.get("negative"):
                group = parser.add_mutually_exclusive_group()
                group.add_argument(flag, action="store_true", **kwargs)
                group.add_argument(meta["negative"], dest=f.name, action="store_false",
                                   default=argparse.SUPPRESS, help=f"not {flag}")
            else:
                parser.add_argument(flag, action="store_true", **kwargs)
            continue
        parse = meta.get("cli_parse")
        if meta.get("repeat"):
            kwargs.update(action="append", metavar=meta.get("metavar"),
                          type=_cli_type(_one_of_many(meta["cli_parse"])))
        elif parse is not None:
            kwargs.update(type=_cli_type(parse), required=required)
        else:
            inner = [a for a in getattr(tp, "__args__", (tp,)) if a is not type(None)]
            if isinstance(inner[0], type) and issubclass(inner[0], enum.Enum):
                kwargs["choices"] = [m.value for m in inner[0]]
            kwargs["required"] = required
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _request_from_args(op: Operation, args: argparse.Namespace) -> rq.Request:
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(op.request):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.metadata.get("repeat"):
            if value and isinstance(value[0], list):
                value = [x for item in value for x in item]
            else:
                merged: dict[str, str] = {}
                for item in value:
                    merged.update(item)
                value = merged
        fields[f.name] = codec.to_wire(value)
    return operations.decode(op.name, fields)


class _Local:
    """handlers.Context for read-only operations run in the CLI's own process when no
    daemon runs on this host (``volume list`` must work without it)."""

    release_holdoff = 0.0
    max_chain = 0  # snapshots run in the daemon
    copy_settings = CopySettings()  # and so do copies

    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths

    def _no_daemon(self) -> errors.Error:
        return errors.DaemonNotRunning("the sharedlvm daemon is not running on this host")

    def service(self, name: str | None) -> Any:
        raise self._no_daemon()

    def domain(self, name: str | None) -> domain_mod.Domain:
        d = domain_mod.Domain.open(self.paths, Runner(), name)
        d.record  # noqa: B018 - refuse a domain whose record does not verify
        return d

    def services(self) -> list[Any]:
        return []

    def ask(self, request: rq.Request) -> Any:
        raise self._no_daemon()

    def reload(self) -> list[str]:
        raise self._no_daemon()

    def forget(self, name: str) -> None:
        raise self._no_daemon()

    def render_metrics(self) -> str:
        raise self._no_daemon()


# A read-only operation that this host can also answer by itself does not wait long
# for a daemon that does not answer (hung, or busy for minutes behind a wipe).
LOCAL_TIMEOUT = 30.0


def run_operation(op: Operation, request: rq.Request) -> Any:
    if request.long_running and sys.stderr.isatty():
        return _with_progress(request)
    if not op.local:
        return Client().call(request)
    try:
        return Client(timeout=LOCAL_TIMEOUT).call(request)
    except (errors.DaemonNotRunning, errors.Timeout):
        return op.handler(_Local(HostPaths.from_env()), request)


def _with_progress(request: rq.Request) -> Any:
    """A copy's request, its progress on the terminal (stderr) meanwhile: percent and
    throughput, from the daemon's status once a second."""
    if getattr(request, "request_id", "x") is None:  # how its copy is found in status
        request = request.with_request_id(f"cli-{uuid.uuid4()}")
    job = getattr(request, "request_id", None)
    target = getattr(request, "file", None) if request.op == "volume.download" else None
    done = threading.Event()

    def show() -> None:
        shown = False
        while not done.wait(1.0):
            try:
                status = Client(timeout=5).call(rq.GetStatus())
            except errors.Error:
                continue
            for copy in (c for s in status for c in s.copies):
                if copy.job == job or (target is not None and copy.target == target):
                    rate = units.format_size(int(copy.bytes_per_second))
                    sys.stderr.write(f"\r{copy.kind} {copy.percent:6.2f}%  {rate}/s  "
                                     f"{copy.seconds:.0f} s ")
                    sys.stderr.flush()
                    shown = True
        if shown:
            sys.stderr.write("\n")

    thread = threading.Thread(target=show, daemon=True)
    thread.start()
    try:
        return Client().call(request)
    finally:
        done.set()
        thread.join(timeout=2)


def _show(request: rq.Request, as_json: bool, result: Any) -> None:
    if as_json:
        _print_json(codec.to_wire(result))
        return
    printer = _PRINTERS.get(request.op)
    if printer is None:  # an operation without a table of its own: its JSON
        if result is not None and codec.to_wire(result) != {"ok": True}:
            _print_json(codec.to_wire(result))
        return
    printer(request, result)


def _show_volumes(found: list[VolumeInfo]) -> None:
    rows = [[v.uuid, v.image, v.format.value, v.alloc.value, units.format_size(v.capacity),
             units.format_size(v.size), v.state.value, v.role.value,
             ",".join(f"{k}={val}" for k, val in sorted(v.tags.items()))] for v in found]
    _table(rows, ["VOLUME", "IMAGE", "FORMAT", "ALLOC", "CAPACITY", "LV SIZE", "STATE", "ROLE",
                  "TAGS"])


def _show_image(info: ImageInfo) -> None:
    print(f"image {info.image} in domain {info.domain}: {len(info.chain)} volume(s), "
          f"leaf {info.leaf}")
    def held(v: VolumeInfo) -> str:
        if v.uuid not in info.holders:
            return "?"  # asked without the daemon
        return ",".join(f"host {h}" for h in info.holders[v.uuid]) or "-"

    rows = [[str(i), v.uuid, v.role.value, v.format.value, units.format_size(v.capacity),
             units.format_size(v.size), v.state.value, held(v),
             "" if v.image == info.image else f"image {v.image}"]
            for i, v in enumerate(info.chain)]
    _table(rows, ["#", "VOLUME", "ROLE", "FORMAT", "CAPACITY", "LV SIZE", "STATE", "HELD BY",
                  "FROM"])


def _show_domain(info: DomainInfo) -> None:
    rows = [
        ("name", info.name), ("uuid", info.domain_uuid),
        ("format version", str(info.format_version)),
        ("this host", f"host {info.host_id}" + (" (manager)" if info.is_manager else "")),
        ("manager", f"host {info.manager_host_id}" if info.manager_host_id else "none"),
        ("manager generation", str(info.manager_generation)),
        ("io timeout", f"{info.io_timeout} s (a dead host's leases free after "
                       f"{host_dead_seconds(info.io_timeout)} s)"),
        ("luns", ", ".join(info.luns)),
        ("size", units.format_size(info.size)), ("free", units.format_size(info.free)),
        ("extent size", units.format_size(info.extent_size)),
        ("volumes", str(info.volumes)),
        ("metadata", f"{units.format_size(info.metadata_free)} free of "
                     f"{units.format_size(info.metadata_size)} (seqno {info.seqno})"),
        ("created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    if len(info.shards) > 1:
        print()
        _table([[str(s.index), s.vg_name, ",".join(s.luns), str(s.volumes),
                 units.format_size(s.size), units.format_size(s.free), str(s.seqno)]
                for s in info.shards],
               ["SHARD", "VG", "LUNS", "VOLUMES", "SIZE", "FREE", "SEQNO"])


def _show_manager(request: rq.Request, s: ManagerStatus) -> None:
    who = f"host {s.manager}" if s.manager else "none"
    print(f"domain {s.domain}: manager {who}, generation {s.generation}"
          + (" (this host)" if s.this_host else ""))


def _show_hosts(request: rq.Request, hosts: list[HostInfo]) -> None:
    _table([[str(h.host_id), h.state, str(h.generation), ", ".join(h.holds)] for h in hosts],
           ["HOST", "STATE", "GENERATION", "HOLDS"])


# How each result is shown to people (--json shows the result as it travels).
def _show_vms(found: list[Any]) -> None:
    _table([[str(v.pid), v.domain, v.state, "yes" if v.watched else "no",
             ",".join(v.writes) or "-", ",".join(v.reads) or "-"] for v in found],
           ["PID", "DOMAIN", "STATE", "WATCHED", "WRITES", "ALSO READS"])


_PRINTERS: dict[str, Callable[[Any, Any], None]] = {
    "vm.list": lambda a, r: _show_vms(r),
    "volume.create": lambda a, r: _show_volumes([r]),
    "volume.extend": lambda a, r: _show_volumes([r]),
    "volume.info": lambda a, r: _show_volumes([r]),
    "volume.list": lambda a, r: _show_volumes(r),
    "volume.delete": lambda a, r: print(f"volume {r.uuid} deleted"
                                        + (" (wiped)" if a.wipe else "")
                                        + (" (discarded)" if a.discard else "")),
    "volume.prepare": lambda a, r: print(r.path),
    "volume.snapshot": lambda a, r: _show_volumes([r]),
    "volume.template": lambda a, r: _show_volumes([r]),
    "volume.merge": lambda a, r: _show_volumes([r]),
    "volume.clone": lambda a, r: _show_volumes([r]),
    "volume.upload": lambda a, r: _show_volumes([r]),
    "volume.download": lambda a, r: print(
        f"volume {r.volume} written to {r.file} ({r.format.value}, "
        f"{units.format_size(r.size)}, {r.seconds:.1f} s)"),
    "image.info": lambda a, r: _show_image(r),
    "image.prepare": lambda a, r: print(r.path),
    "image.delete": lambda a, r: print(f"image {r.image} deleted: {len(r.volumes)} "
                                       "volume(s)" + (" (wiped)" if a.wipe else "")),
    "domain.info": lambda a, r: _show_domain(r),
    "domain.remove": lambda a, r: print(f"domain {r.removed} removed"),
    "manager.status": _show_manager,
    "manager.release": lambda a, r: print("manager role released" if r.released
                                          else "this host was not manager"),
    "host.list": _show_hosts,
    "metrics": lambda a, r: print(r, end=""),
}


# Commands that run on this host only

def cmd_domain_create(args: argparse.Namespace) -> None:
    from .lease_layout import LeaseLayout
    from .leases import use_run_dir

    def format_leases(d: domain_mod.Domain) -> None:
        use_run_dir(d.paths.sanlock_run_dir)
        LeaseLayout(d).format()

    paths = HostPaths.from_env()
    d = domain_mod.create_domain(paths, Runner(), args.name, args.lun, args.host_id,
                                 io_timeout=args.io_timeout, format_leases=format_leases,
                                 leases_size=args.leases_size,
                                 format_version=args.format_version,
                                 split=args.partitions)
    _start_using(paths, d, wait=not args.no_wait, quiet=args.json, manager=True)
    _show_local_domain(domain_mod.Domain.open(paths, Runner(), d.name).info(), args.json)


def cmd_domain_attach(args: argparse.Namespace) -> None:
    paths = HostPaths.from_env()
    d = domain_mod.attach_domain(paths, Runner(), args.name, args.lun, args.host_id)
    _start_using(paths, d, wait=not args.no_wait, quiet=args.json)
    _show_local_domain(d.info(), args.json)


def _show_local_domain(info: DomainInfo, as_json: bool) -> None:
    if as_json:
        _print_json(codec.to_wire(info))
    else:
        _show_domain(info)


def _start_using(paths: HostPaths, d: domain_mod.Domain, wait: bool, quiet: bool,
                 manager: bool = False) -> None:
    """Tell the local daemon about the domain; wait until it joined the lockspace (and,
    for a new domain, took the manager role)."""
    client = Client(paths.root)
    try:
        client.reload()
    except errors.DaemonNotRunning:
        if not quiet:
            print(f"note: the sharedlvm daemon is not running on this host; start it to "
                  f"join domain {d.name}", file=sys.stderr)
        return
    if not wait:
        return
    deadline = time.monotonic() + 30 * d.record.io_timeout + 60
    while time.monotonic() < deadline:
        status = {s.domain: s for s in client.status()}.get(d.name)
        if status and status.joined and (status.manager or not manager):
            return
        time.sleep(0.2)
    raise errors.LockspaceError(f"host {d.host_id} did not join the lockspace of "
                                f"{d.name} in time; see the daemon log")


def cmd_domain_list(args: argparse.Namespace) -> None:
    names = domain_mod.attached_domains(HostPaths.from_env())
    if args.json:
        _print_json(names)
    else:
        for name in names:
            print(name)


def cmd_domain_detach(args: argparse.Namespace) -> None:
    paths = HostPaths.from_env()
    d = domain_mod.Domain.open(paths, Runner(), args.domain)
    client = Client(paths.root)
    try:
        status = {s.domain: s for s in client.status()}
    except errors.DaemonNotRunning:
        status = {}
    if d.name in status and status[d.name].manager:
        raise errors.Busy(f"host {d.host_id} is the manager of domain {d.name}; "
                          "use 'manager release' first, or 'domain remove' to destroy it")
    d.detach()
    if status:
        client.reload()  # the daemon leaves the lockspace
    print(f"domain {d.name} detached from this host")


def cmd_domain_backup(args: argparse.Namespace) -> None:
    from . import backup

    d = domain_mod.Domain.open(HostPaths.from_env(), Runner(), args.domain)
    if "backup" not in d.special_lvs():
        raise errors.Unsupported(f"domain {d.name} has format version "
                                 f"{d.record.format_version}: no metadata backups")
    if not 0 <= args.shard < len(d.shards()):
        raise errors.InvalidArgument(f"domain {d.name} has no shard {args.shard}")
    with d.special_reader("backup") as dev:
        found = backup.read(dev, args.shard)
    if found is None:
        raise errors.NotFound(f"no metadata backup of shard {args.shard} of {d.name} yet")
    if args.output == "-":
        sys.stdout.buffer.write(found.text)
    else:
        Path(args.output).write_bytes(found.text)
    print(f"{found.vg_name} at seqno {found.seqno}, backed up "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(found.time))}"
          + ("" if args.output == "-" else f": {args.output} (vgcfgrestore -f "
             f"{args.output} {found.vg_name})"), file=sys.stderr)


def cmd_volume_deactivate(args: argparse.Namespace) -> None:
    d = domain_mod.Domain.open(HostPaths.from_env(), Runner(), args.domain)
    d.deactivate_volume(check_uuid(args.volume))


def cmd_daemon(args: argparse.Namespace) -> None:
    from .daemon import DaemonConfig, run_daemon

    paths = HostPaths.from_env()
    if args.show_config:
        print(DaemonConfig.load(paths).show())
        return
    run_daemon(paths, Path(args.log_file) if args.log_file else None)


def cmd_run(args: argparse.Namespace) -> None:
    from .consumer import parse_volume_arg, run_with_leases

    volumes = [parse_volume_arg(v) for v in args.volume or []]
    image = parse_volume_arg(args.image) if args.image else None
    if image is not None and volumes:
        raise errors.InvalidArgument("give --volume or --image, not both")
    command = list(args.command)
    command = command[1:] if command[:1] == ["--"] else command
    paths = HostPaths.from_env()
    d = (domain_mod.Domain.open(paths, Runner(), args.domain) if volumes or image
         else None)
    raise SystemExit(run_with_leases(paths, d, volumes, command, wait=args.wait,
                                     image=image, incoming=args.incoming or ""))


def cmd_vm_migrate(args: argparse.Namespace) -> None:
    from .client import migrate_vm

    done = migrate_vm(Client(), args.pid, Client(args.to_root), args.to_pid, args.uri,
                      timeout=args.timeout)
    if args.json:
        _print_json(codec.to_wire(done))
    else:
        print(f"VM {done.pid} migrated: runs as {done.dest_pid} with its leases at "
              f"{', '.join(f'{v} version {n}' for v, n in sorted(done.versions.items()))}; "
              f"qemu's downtime {done.downtime_ms} ms, lease handoff "
              f"{done.handoff_ms:.0f} ms")


def cmd_libvirt_disk_xml(args: argparse.Namespace) -> None:
    from . import libvirt

    d = domain_mod.Domain.open(HostPaths.from_env(), Runner(), args.domain)
    xml = libvirt.disk_xml(d, check_uuid(args.image, "image"), args.target, args.bus,
                           args.alias or "")
    if args.json:
        _print_json(dataclasses.asdict(xml))
    else:
        print(f"<!-- in <devices>: image {xml.image}, leaf {xml.leaf} -->")
        print(xml.disk)
        print(xml.lease)


def cmd_libvirt_add_leases(args: argparse.Namespace) -> None:
    from . import libvirt

    paths = HostPaths.from_env()
    path = Path(args.file) if args.file and args.file != "-" else None
    if args.in_place and path is None:
        raise errors.InvalidArgument("--in-place needs a FILE")
    try:
        xml = path.read_text() if path else sys.stdin.read()
    except OSError as exc:
        raise errors.InvalidArgument(f"cannot read {args.file}: {exc.strerror}") from exc
    out = libvirt.add_leases(xml, lambda name: domain_mod.Domain.open(paths, Runner(), name))
    if args.in_place and path is not None:
        if out != xml:
            tmp = path.with_name(f".{path.name}.sharedlvm")
            tmp.write_text(out)
            tmp.replace(path)
    else:
        sys.stdout.write(out)


def cmd_libvirt_install(args: argparse.Namespace) -> None:
    from . import libvirt

    paths = HostPaths.from_env()
    if args.print:
        print(f"# {args.etc}/qemu-sanlock.conf\n{libvirt.SANLOCK_CONF}")
        print(f"# {args.etc}/qemu.conf (the lock manager line)\n{libvirt.QEMU_CONF_LINE}\n")
        print(f"# {args.etc}/hooks/qemu (mode 0755)\n"
              f"{libvirt.hook_script(sys.executable, str(paths.root))}")
        return
    for path in libvirt.install(Path(args.etc), str(paths.root)):
        print(f"wrote {path}")
    print("restart libvirtd for the lock manager and the hook to take effect")


def _add_local_commands(groups: dict[str, Any], top: Any) -> None:
    dom = groups["domain"]
    p = dom.add_parser("create", help="format LUNs as a new domain; this host becomes "
                       "its manager")
    p.add_argument("--name", required=True)
    p.add_argument("--lun", action="append", required=True,
                   help="block device (repeatable): each LUN is a shard of the domain")
    p.add_argument("--host-id", type=int, required=True)
    p.add_argument("--partitions", type=int, default=1, metavar="N",
                   help="cut each LUN into N GPT partitions, a shard each (a LUN larger "
                        "than one shard needs; default 1: the whole LUN)")
    p.add_argument("--format-version", type=int, default=domain_mod.FORMAT_VERSION,
                   help=argparse.SUPPRESS)  # 1: the old single-VG layout, for tests
    p.add_argument("--io-timeout", type=int, default=10, help="sanlock io_timeout, seconds")
    p.add_argument("--no-wait", action="store_true", help="do not wait for the lockspace")
    p.add_argument("--leases-size", type=_cli_type(units.parse_size),
                   help="first size of the leases LV (default 1G; it grows in 1G steps "
                        "as volumes need slots)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_domain_create)
    p = dom.add_parser("attach", help="use an existing domain on this host")
    p.add_argument("name")
    p.add_argument("--lun", action="append", required=True)
    p.add_argument("--host-id", type=int, required=True)
    p.add_argument("--no-wait", action="store_true", help="do not wait for the lockspace")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_domain_attach)
    p = dom.add_parser("list", help="domains attached on this host")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_domain_list)
    p = dom.add_parser("detach", help="forget a domain on this host (not on its manager)")
    p.add_argument("--domain", help="domain name (default: the only attached one)")
    p.set_defaults(func=cmd_domain_detach)
    p = dom.add_parser("backup", help="write the manager's backup of a shard's LVM "
                                      "metadata, for vgcfgrestore")
    p.add_argument("--domain", help="domain name (default: the only attached one)")
    p.add_argument("--shard", type=int, default=0, help="shard index (default 0)")
    p.add_argument("--output", required=True, help="file to write, or - for stdout")
    p.set_defaults(func=cmd_domain_backup)

    vol = groups["volume"]
    # No "activate" here: no activation without a lease (run, or prepare --pid).
    p = vol.add_parser("deactivate", help="deactivate on this host (a leftover mapping)")
    p.add_argument("volume")
    p.add_argument("--domain", help="domain name (default: the only attached one)")
    p.set_defaults(func=cmd_volume_deactivate)

    p = groups["vm"].add_parser(
        "migrate", help="live-migrate a VM to a destination qemu started with 'run "
        "--incoming': incoming, migrate-out, take-over, quit (resume on a failure)")
    p.add_argument("pid", type=int, help="the VM's qemu on this host")
    p.add_argument("--to-root", required=True, metavar="ROOT",
                   help="the destination host's SHAREDLVM_ROOT (its daemon's socket)")
    p.add_argument("--to-pid", type=int, required=True, metavar="PID",
                   help="the destination's qemu (run --incoming URI)")
    p.add_argument("--uri", required=True, help="the URI the destination listens on")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="cancel qemu's migration after this long (default 600)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_vm_migrate)

    lv = groups["libvirt"]
    p = lv.add_parser("disk-xml", help="the <disk> and <lease> elements of an image, for "
                      "a libvirt domain's <devices>")
    p.add_argument("image", help="image UUID")
    p.add_argument("--target", default="vda", help="the guest's device (default vda)")
    p.add_argument("--bus", default="virtio", help="virtio (default), scsi or sata")
    p.add_argument("--alias", help="the disk's user alias (default ua-sharedlvm-IMAGE)")
    p.add_argument("--domain", help="domain name (default: the only attached one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_libvirt_disk_xml)
    p = lv.add_parser("add-leases", help="a domain XML with the <lease> of each disk on a "
                      "sharedlvm image added where missing (a cloud manager's XML)")
    p.add_argument("file", nargs="?", help="the domain XML (default: stdin)")
    p.add_argument("--in-place", action="store_true", help="rewrite FILE")
    p.set_defaults(func=cmd_libvirt_add_leases)
    p = lv.add_parser("install", help="configure this host's libvirt: sanlock lock "
                      "manager (no leases of its own) and sharedlvm's qemu hook")
    p.add_argument("--etc", default="/etc/libvirt", help="libvirt's configuration "
                   "directory (default /etc/libvirt)")
    p.add_argument("--print", action="store_true", help="print the files, write nothing")
    p.set_defaults(func=cmd_libvirt_install)

    p = top.add_parser("daemon", help="run this host's daemon (foreground)")
    p.add_argument("--log-file")
    p.add_argument("--show-config", action="store_true", help="print the effective config")
    p.set_defaults(func=cmd_daemon)

    p = top.add_parser("run", help="run a command holding volume leases (like flock)")
    p.add_argument("--volume", action="append",
                   help="UUID or UUID:ro (repeatable; none: only register the command "
                        "with sanlock, for 'volume prepare --pid')")
    p.add_argument("--image", metavar="IMAGE[:ro]",
                   help="an image's whole chain: the leaf exclusive (shared with :ro), the "
                        "volumes below it shared; {0} is the leaf's path in the image "
                        "directory, where its backing files resolve")
    p.add_argument("--domain")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="if another host holds a lease, try again for up to SECONDS")
    p.add_argument("--incoming", metavar="URI",
                   help="qemu as a live migration's destination, listening on URI "
                        "(unix:PATH or tcp:HOST:PORT) once 'vm incoming PID' is asked; "
                        "its writable volumes' leases come with the migration "
                        "('vm migrate')")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS")
    p.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sharedlvm", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"sharedlvm {__version__}")
    top = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    groups: dict[str, Any] = {
        name: top.add_parser(name, help=help_text).add_subparsers(
            dest="command", required=True, metavar="COMMAND")
        for name, help_text in GROUP_HELP.items()}
    for op in operations.TABLE:
        if not op.cli:
            continue
        where = groups[op.cli[0]] if len(op.cli) == 2 else top
        p = where.add_parser(op.cli[-1], help=op.summary, description=op.summary)
        _add_operation(p, op)
        p.set_defaults(operation=op)
    _add_local_commands(groups, top)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        op: Operation | None = getattr(args, "operation", None)
        if op is not None:
            request = _request_from_args(op, args)
            _show(request, args.json, run_operation(op, request))
        else:
            args.func(args)
    except errors.Error as exc:
        # One line, whatever the message holds (a command's stderr, a peer's text).
        print(f"sharedlvm: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_CODES.get(type(exc), 1)
    except KeyboardInterrupt:
        print("sharedlvm: interrupted", file=sys.stderr)
        return 130
    return 0

