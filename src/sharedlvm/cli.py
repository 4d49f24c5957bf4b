"""The ``sharedlvm`` command.

Every failure is one line on stderr, ``sharedlvm: <message>``, and exit code 1
(2 for a command line argparse cannot parse). ``--json`` output is for programs; the
tables are for people.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from . import domain as domain_mod
from . import errors, leases, rpc, sim, tags, units
from . import volume as volume_mod
from .command import Runner
from .leases import host_dead_seconds
from .paths import HostPaths


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def _size_arg(text: str) -> int:
    try:
        return units.parse_size(text)
    except errors.InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message: str) -> Any:
        self.exit(2, f"sharedlvm: {message} (see {self.prog} --help)\n")


def _open(args: argparse.Namespace) -> domain_mod.Domain:
    return domain_mod.Domain.open(HostPaths.from_env(), Runner(), args.domain)


# domain

def cmd_domain_create(args: argparse.Namespace) -> None:
    paths = HostPaths.from_env()
    d = domain_mod.create_domain(paths, Runner(), args.name, args.lun, args.host_id,
                                 io_timeout=args.io_timeout, format_leases=_format_leases,
                                 leases_size=args.leases_size)
    _start_using(paths, d, wait=not args.no_wait, quiet=args.json, manager=True)
    _show_domain(domain_mod.Domain.open(paths, Runner(), d.name).info(), args.json)


def _format_leases(d: domain_mod.Domain) -> None:
    from .lease_layout import LeaseLayout

    leases.use_run_dir(d.paths.sanlock_run_dir)
    LeaseLayout(d).format()


def cmd_domain_attach(args: argparse.Namespace) -> None:
    paths = HostPaths.from_env()
    d = domain_mod.attach_domain(paths, Runner(), args.name, args.lun, args.host_id)
    _start_using(paths, d, wait=not args.no_wait, quiet=args.json)
    _show_domain(d.info(), args.json)


def _start_using(paths: HostPaths, d: domain_mod.Domain, wait: bool, quiet: bool,
                 manager: bool = False) -> None:
    """Tell the local daemon about the domain; wait until it joined the lockspace (and,
    for a new domain, took the manager role)."""
    try:
        rpc.call(paths.run_dir, "reload")
    except rpc.DaemonNotRunning:
        if not quiet:
            print(f"note: the sharedlvm daemon is not running on this host; start it to "
                  f"join domain {d.name}", file=sys.stderr)
        return
    if not wait:
        return
    deadline = time.monotonic() + 30 * d.record.io_timeout + 60
    while time.monotonic() < deadline:
        status = {s["domain"]: s for s in rpc.call(paths.run_dir, "status")}.get(d.name, {})
        if status.get("joined") and (status.get("manager") or not manager):
            return
        time.sleep(0.2)
    raise errors.LockspaceError(f"host {d.host_id} did not join the lockspace of "
                                f"{d.name} in time; see the daemon log")


def cmd_domain_info(args: argparse.Namespace) -> None:
    d = _open(args)
    info = d.info()
    try:  # the live view, when this host's daemon runs
        status = rpc.call(d.paths.run_dir, "manager.status", {"domain": d.name}, timeout=10)
        info = replace(info, manager_host_id=status["manager"] or 0,
                       is_manager=bool(status["this_host"]))
    except errors.Error:
        pass
    _show_domain(info, args.json)


def cmd_domain_list(args: argparse.Namespace) -> None:
    names = domain_mod.attached_domains(HostPaths.from_env())
    if args.json:
        _print_json(names)
    else:
        for name in names:
            print(name)


def _daemon(op: str, args: dict[str, Any]) -> Any:
    return rpc.call(HostPaths.from_env().run_dir, op, args)


def cmd_domain_remove(args: argparse.Namespace) -> None:
    d = _open(args)
    _daemon("domain.remove", {"domain": d.name, "force": args.force})
    print(f"domain {d.name} removed")


def cmd_domain_detach(args: argparse.Namespace) -> None:
    d = _open(args)
    paths = HostPaths.from_env()
    try:
        status = {s["domain"]: s for s in rpc.call(paths.run_dir, "status")}
    except rpc.DaemonNotRunning:
        status = {}
    if status.get(d.name, {}).get("manager"):
        raise errors.Busy(f"host {d.host_id} is the manager of domain {d.name}; "
                          "use 'manager release' first, or 'domain remove' to destroy it")
    d.detach()
    if status:
        rpc.call(paths.run_dir, "reload")  # the daemon leaves the lockspace
    print(f"domain {d.name} detached from this host")


def _show_domain(info: domain_mod.DomainInfo, as_json: bool) -> None:
    if as_json:
        _print_json(asdict(info))
        return
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


# volume

def _tag_args(values: Sequence[str] | None) -> list[tuple[str, str]]:
    return [tags.parse_user_tag(t) for t in values or []]


def cmd_volume_create(args: argparse.Namespace) -> None:
    user_tags = _tag_args(args.tag)
    for key, value in user_tags:
        tags.make_user_tag(key, value)  # validate here: one clear line, nothing sent
    result = _daemon("volume.create", {
        "domain": args.domain, "size": args.size, "format": args.format, "alloc": args.alloc,
        "image": args.image, "tags": user_tags, "request_id": args.request_id})
    _show_volumes([volume_mod.VolumeInfo.from_dict(result)], args.json, single=True)


def cmd_volume_list(args: argparse.Namespace) -> None:
    found = volume_mod.list_volumes(_open(args), image=args.image, user_tags=_tag_args(args.tag))
    _show_volumes(found, args.json)


def cmd_volume_info(args: argparse.Namespace) -> None:
    _show_volumes([volume_mod.get_volume(_open(args), args.volume)], args.json, single=True)


def cmd_volume_extend(args: argparse.Namespace) -> None:
    units.parse_resize(args.size, 0)  # validate before sending anything
    result = _daemon("volume.extend", {"domain": args.domain, "volume": args.volume,
                                       "size": args.size, "request_id": args.request_id})
    _show_volumes([volume_mod.VolumeInfo.from_dict(result)], args.json, single=True)


def cmd_volume_delete(args: argparse.Namespace) -> None:
    volume_mod.check_uuid(args.volume)
    result = _daemon("volume.delete", {"domain": args.domain, "volume": args.volume,
                                       "wipe": args.wipe, "request_id": args.request_id})
    if args.json:
        _print_json(result)
    else:
        print(f"volume {args.volume} deleted" + (" (wiped)" if args.wipe else ""))


def cmd_volume_path(args: argparse.Namespace) -> None:
    print(volume_mod.volume_path(_open(args), args.volume))


def cmd_volume_prepare(args: argparse.Namespace) -> None:
    volume_mod.check_uuid(args.volume)
    result = _daemon("volume.prepare", {"domain": args.domain, "volume": args.volume,
                                        "shared": args.shared})
    print(result["path"])


def cmd_volume_teardown(args: argparse.Namespace) -> None:
    volume_mod.check_uuid(args.volume)
    _daemon("volume.teardown", {"domain": args.domain, "volume": args.volume})


def cmd_volume_deactivate(args: argparse.Namespace) -> None:
    d = _open(args)
    volume_mod.check_uuid(args.volume)
    d.activator.deactivate(d.vg_name, args.volume)


def _show_volumes(found: list[volume_mod.VolumeInfo], as_json: bool,
                  single: bool = False) -> None:
    if as_json:
        data = [v.as_dict() for v in found]
        _print_json(data[0] if single else data)
        return
    rows = [[v.uuid, v.image, v.format, v.alloc, units.format_size(v.capacity),
             units.format_size(v.size), v.state,
             ",".join(f"{k}={val}" for k, val in sorted(v.user_tags.items()))] for v in found]
    _table(rows, ["VOLUME", "IMAGE", "FORMAT", "ALLOC", "CAPACITY", "LV SIZE", "STATE", "TAGS"])


# daemon, manager, hosts, consumers

def cmd_daemon(args: argparse.Namespace) -> None:
    from .daemon import DaemonConfig, run_daemon

    paths = HostPaths.from_env()
    if args.show_config:
        print(DaemonConfig.load(paths).show())
        return
    run_daemon(paths, Path(args.log_file) if args.log_file else None)


def cmd_manager_status(args: argparse.Namespace) -> None:
    result = _daemon("manager.status", {"domain": args.domain})
    if args.json:
        _print_json(result)
        return
    who = f"host {result['manager']}" if result["manager"] else "none"
    print(f"domain {result['domain']}: manager {who}, generation {result['generation']}"
          + (" (this host)" if result["this_host"] else ""))


def cmd_manager_release(args: argparse.Namespace) -> None:
    result = _daemon("manager.release", {"domain": args.domain})
    print("manager role released" if result["released"] else "this host was not manager")


def cmd_metrics(args: argparse.Namespace) -> None:
    print(_daemon("metrics", {}), end="")


def cmd_host_list(args: argparse.Namespace) -> None:
    hosts = _daemon("host.list", {"domain": args.domain})
    if args.json:
        _print_json(hosts)
        return
    rows = [[str(h["host_id"]), h["state"], str(h["generation"]), ", ".join(h["holds"])]
            for h in hosts]
    _table(rows, ["HOST", "STATE", "GENERATION", "HOLDS"])


def _command_after_dashes(args: argparse.Namespace) -> list[str]:
    """The ``-- COMMAND ARGS`` of ``run`` and ``sim exec``, without the ``--``."""
    command = list(args.command)
    return command[1:] if command[:1] == ["--"] else command


def cmd_run(args: argparse.Namespace) -> None:
    from .consumer import exec_with_leases, parse_volume_arg

    volumes = [parse_volume_arg(v) for v in args.volume]
    command = _command_after_dashes(args)
    exec_with_leases(_open(args), volumes, command, wait=args.wait)


# sim

def cmd_sim_up(args: argparse.Namespace) -> None:
    if args.backend == "vm":
        _sim_up_vm(args)
        return
    bed = sim.sim_up(Runner(), Path(args.dir).absolute(), args.hosts, args.size,
                     sector_size=args.sector_size, luns=args.luns)
    print(f"simulation in {bed.dir}")
    for lun in bed.luns:
        print(f"  LUN {lun.device} ({units.format_size(args.size)}, "
              f"{lun.sector_size} B sectors) backed by {lun.file}")
    luns = " ".join(f"--lun {lun.device}" for lun in bed.luns)
    print("hosts (address each with SHAREDLVM_ROOT):")
    for i, host in enumerate(bed.hosts, start=1):
        verb = (f"domain create --name demo {luns} --host-id {i}" if i == 1 else
                f"domain attach demo {luns} --host-id {i}")
        print(f"  host {i}: SHAREDLVM_ROOT={host} sharedlvm {verb}")
    print(f"tear down: sharedlvm sim down --dir {bed.dir}")


def _sim_up_vm(args: argparse.Namespace) -> None:
    from .vmbed.vmsim import LUN_DEVICE, vm_sim_up

    if args.luns != 1:
        raise errors.InvalidArgument("the vm backend has one LUN")
    directory = Path(args.dir).absolute()
    bed, booted = vm_sim_up(Runner(), directory, args.hosts, args.size,
                            sector_size=args.sector_size)
    print(f"simulation in {directory}: {bed.hosts} qemu guests booted in {booted:.1f} s, "
          "each running wdmd, sanlock (with the watchdog) and the sharedlvm daemon")
    print(f"  LUN {LUN_DEVICE} in every guest ({units.format_size(args.size)}, "
          f"{args.sector_size} B sectors) backed by {bed.lun_file}")
    print("hosts (run commands in them with 'sim exec'):")
    for i in range(1, bed.hosts + 1):
        verb = (f"domain create --name demo --lun {LUN_DEVICE} --host-id {i}" if i == 1
                else f"domain attach demo --lun {LUN_DEVICE} --host-id {i}")
        print(f"  host {i}: sharedlvm sim exec --dir {directory} --host {i} -- "
              f"sharedlvm {verb}")
    print(f"tear down: sharedlvm sim down --dir {directory}")


def cmd_sim_down(args: argparse.Namespace) -> None:
    sim.sim_down(Runner(), Path(args.dir).absolute())
    print(f"simulation in {args.dir} removed")


def cmd_sim_exec(args: argparse.Namespace) -> None:
    directory = Path(args.dir).absolute()
    command = _command_after_dashes(args)
    if not command:
        raise errors.InvalidArgument("no command given after --")
    if (vm := sim.vm_sim(directory)) is not None:
        result = vm.run(args.host, command, timeout=args.timeout, check=False)
        sys.stdout.write(result.out)
        sys.stderr.write(result.err)
        raise SystemExit(result.rc)
    argv, env = sim.loop_host_command(directory, args.host, command)
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)


def cmd_sim_kill(args: argparse.Namespace) -> None:
    sim.sim_kill(Runner(), Path(args.dir).absolute(), args.host)
    print(f"host {args.host} killed (power loss)")


def cmd_sim_start(args: argparse.Namespace) -> None:
    sim.sim_start(Runner(), Path(args.dir).absolute(), args.host)
    print(f"host {args.host} started")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sharedlvm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    top = parser.add_subparsers(dest="group", required=True)

    def common(p: argparse.ArgumentParser, domain: bool = True) -> None:
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if domain:
            p.add_argument("--domain", help="domain name (default: the only attached one)")

    dom = top.add_parser("domain", help="format, attach, inspect domains").add_subparsers(
        dest="command", required=True)
    p = dom.add_parser("create", help="format LUNs as a new domain; this host is the writer")
    p.add_argument("--name", required=True)
    p.add_argument("--lun", action="append", required=True, help="block device (repeatable)")
    p.add_argument("--host-id", type=int, required=True)
    p.add_argument("--io-timeout", type=int, default=10, help="sanlock io_timeout, seconds")
    p.add_argument("--no-wait", action="store_true", help="do not wait for the lockspace")
    p.add_argument("--leases-size", type=_size_arg, help="first size of the leases LV "
                   "(default 1G; it grows in 1G steps as volumes need slots)")
    common(p, domain=False)
    p.set_defaults(func=cmd_domain_create)
    p = dom.add_parser("attach", help="use an existing domain on this host")
    p.add_argument("name")
    p.add_argument("--lun", action="append", required=True)
    p.add_argument("--host-id", type=int, required=True)
    p.add_argument("--no-wait", action="store_true", help="do not wait for the lockspace")
    common(p, domain=False)
    p.set_defaults(func=cmd_domain_attach)
    p = dom.add_parser("info", help="show a domain")
    common(p)
    p.set_defaults(func=cmd_domain_info)
    p = dom.add_parser("list", help="domains attached on this host")
    common(p, domain=False)
    p.set_defaults(func=cmd_domain_list)
    p = dom.add_parser("remove", help="destroy a domain (writer only)")
    p.add_argument("--force", action="store_true", help="even if volumes exist")
    common(p)
    p.set_defaults(func=cmd_domain_remove)
    p = dom.add_parser("detach", help="forget a domain on this host (readers)")
    common(p)
    p.set_defaults(func=cmd_domain_detach)

    vol = top.add_parser("volume", help="create, list, extend, delete volumes").add_subparsers(
        dest="command", required=True)
    p = vol.add_parser("create", help="create a volume (writer only)")
    p.add_argument("--size", type=_size_arg, required=True, help="capacity, e.g. 10G")
    p.add_argument("--format", default="raw", choices=volume_mod.FORMATS)
    p.add_argument("--alloc", choices=volume_mod.ALLOCATIONS)
    p.add_argument("--image", help="image UUID (default: a new image)")
    p.add_argument("--tag", action="append", help="user tag key=value (repeatable)")
    p.add_argument("--request-id", help="makes the request idempotent")
    common(p)
    p.set_defaults(func=cmd_volume_create)
    p = vol.add_parser("list", help="list volumes")
    p.add_argument("--image")
    p.add_argument("--tag", action="append", help="only volumes with tag key=value")
    common(p)
    p.set_defaults(func=cmd_volume_list)
    p = vol.add_parser("info", help="show one volume")
    p.add_argument("volume")
    common(p)
    p.set_defaults(func=cmd_volume_info)
    p = vol.add_parser("extend", help="grow a volume (writer only)")
    p.add_argument("volume")
    p.add_argument("--size", required=True, help="+2G (grow by) or 12G (grow to)")
    p.add_argument("--request-id")
    common(p)
    p.set_defaults(func=cmd_volume_extend)
    p = vol.add_parser("delete", help="delete a volume (writer only)")
    p.add_argument("volume")
    p.add_argument("--wipe", action="store_true", help="zero the data before removing")
    p.add_argument("--request-id")
    common(p)
    p.set_defaults(func=cmd_volume_delete)
    p = vol.add_parser("path", help="activate on this host and print the device path")
    p.add_argument("volume")
    common(p)
    p.set_defaults(func=cmd_volume_path)
    p = vol.add_parser("deactivate", help="deactivate on this host")
    p.add_argument("volume")
    common(p)
    p.set_defaults(func=cmd_volume_deactivate)

    p = vol.add_parser("prepare", help="hold the volume's lease in the daemon, activate, "
                       "print the device")
    p.add_argument("volume")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--exclusive", dest="shared", action="store_false", default=False)
    mode.add_argument("--shared", dest="shared", action="store_true")
    common(p)
    p.set_defaults(func=cmd_volume_prepare)
    p = vol.add_parser("teardown", help="deactivate and release a prepared volume")
    p.add_argument("volume")
    common(p)
    p.set_defaults(func=cmd_volume_teardown)

    p = top.add_parser("daemon", help="run this host's daemon (foreground)")
    p.add_argument("--log-file")
    p.add_argument("--show-config", action="store_true", help="print the effective config")
    p.set_defaults(func=cmd_daemon)

    mgr = top.add_parser("manager", help="the manager role").add_subparsers(
        dest="command", required=True)
    p = mgr.add_parser("status", help="which host is manager, at which generation")
    common(p)
    p.set_defaults(func=cmd_manager_status)
    p = mgr.add_parser("release", help="make this host give the role up")
    common(p)
    p.set_defaults(func=cmd_manager_release)

    p = top.add_parser("metrics", help="the daemon's metrics, Prometheus text format")
    p.set_defaults(func=cmd_metrics)

    hosts = top.add_parser("host", help="hosts of a domain").add_subparsers(
        dest="command", required=True)
    p = hosts.add_parser("list", help="host ids, their sanlock state and what they hold")
    common(p)
    p.set_defaults(func=cmd_host_list)

    p = top.add_parser("run", help="run a command holding volume leases (like flock)")
    p.add_argument("--volume", action="append", required=True, help="UUID or UUID:ro")
    p.add_argument("--domain")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="if another host holds a lease, try again for up to SECONDS")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS")
    p.set_defaults(func=cmd_run)

    sims = top.add_parser("sim", help="local playground of simulated hosts").add_subparsers(
        dest="command", required=True)
    p = sims.add_parser("up", help="make file-backed LUNs and host roots")
    p.add_argument("--hosts", type=int, default=3)
    p.add_argument("--dir", required=True)
    p.add_argument("--size", type=_size_arg, default=20 * units.GiB)
    p.add_argument("--sector-size", type=int, default=512, choices=(512, 4096))
    p.add_argument("--luns", type=int, default=1)
    p.add_argument("--backend", choices=("loop", "vm"), default="loop",
                   help="loop: hosts share this kernel (fast); vm: each host is a qemu "
                        "guest with device-mapper and a watchdog (real fencing)")
    p.set_defaults(func=cmd_sim_up)
    p = sims.add_parser("down", help="remove everything 'sim up' made")
    p.add_argument("--dir", required=True)
    p.set_defaults(func=cmd_sim_down)
    p = sims.add_parser("exec", help="run a command as one simulated host")
    p.add_argument("--dir", required=True)
    p.add_argument("--host", type=int, required=True, help="host number, 1..N")
    p.add_argument("--timeout", type=float, default=300, help="vm backend: seconds")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS")
    p.set_defaults(func=cmd_sim_exec)
    p = sims.add_parser("kill", help="power loss of one simulated host")
    p.add_argument("--dir", required=True)
    p.add_argument("--host", type=int, required=True)
    p.set_defaults(func=cmd_sim_kill)
    p = sims.add_parser("start", help="start a killed simulated host again")
    p.add_argument("--dir", required=True)
    p.add_argument("--host", type=int, required=True)
    p.set_defaults(func=cmd_sim_start)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except errors.Error as exc:
        print(f"sharedlvm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sharedlvm: interrupted", file=sys.stderr)
        return 130
    return 0
