"""The ``sharedlvm-sim`` command: a local playground of simulated hosts.

``up`` makes file-backed LUNs and simulated hosts (``--backend loop``: host roots on
this kernel; ``--backend vm``: qemu guests), ``exec`` runs a command as one host,
``kill`` and ``start`` take a host's power away and back, ``down`` removes everything
``up`` made. Like ``sharedlvm``, every failure is one line on stderr,
``sharedlvm-sim: <message>``, exit code 1 (2 for a command line that does not parse).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sharedlvm import errors, units
from sharedlvm.command import Runner

from . import sim
from .state import BACKENDS, LOOP_BACKEND, VM_BACKEND
from .vmbed.vmsim import LUN_DEVICE, vm_sim_up

PROG = "sharedlvm-sim"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{PROG}: {message} (see {self.prog} --help)\n")


def _size_arg(text: str) -> int:
    try:
        return units.parse_size(text)
    except errors.InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _directory(args: argparse.Namespace) -> Path:
    return Path(args.dir).absolute()


def cmd_up(args: argparse.Namespace) -> None:
    if args.backend == VM_BACKEND:
        _up_vm(args)
        return
    bed = sim.sim_up(Runner(), _directory(args), args.hosts, args.size,
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
    print(f"tear down: {PROG} down --dir {bed.dir}")


def _up_vm(args: argparse.Namespace) -> None:
    if args.luns != 1:
        raise errors.InvalidArgument("the vm backend has one LUN")
    directory = _directory(args)
    bed, booted = vm_sim_up(Runner(), directory, args.hosts, args.size,
                            sector_size=args.sector_size)
    print(f"simulation in {directory}: {bed.hosts} qemu guests booted in {booted:.1f} s, "
          "each running wdmd, sanlock (with the watchdog) and the sharedlvm daemon")
    print(f"  LUN {LUN_DEVICE} in every guest ({units.format_size(args.size)}, "
          f"{args.sector_size} B sectors) backed by {bed.lun_file}")
    print(f"hosts (run commands in them with '{PROG} exec'):")
    for i in range(1, bed.hosts + 1):
        verb = (f"domain create --name demo --lun {LUN_DEVICE} --host-id {i}" if i == 1
                else f"domain attach demo --lun {LUN_DEVICE} --host-id {i}")
        print(f"  host {i}: {PROG} exec --dir {directory} --host {i} -- sharedlvm {verb}")
    print(f"tear down: {PROG} down --dir {directory}")


def cmd_down(args: argparse.Namespace) -> None:
    sim.sim_down(Runner(), _directory(args))
    print(f"simulation in {args.dir} removed")


def cmd_exec(args: argparse.Namespace) -> None:
    """Run ``-- COMMAND ARGS`` as one host; ``sharedlvm ARGS`` runs this checkout's
    sharedlvm (``python -m sharedlvm``, in a guest its ``python3``). Any other command
    runs as given. Exits with the command's status."""
    directory = _directory(args)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise errors.InvalidArgument("no command given after --")
    if (vm := sim.vm_sim(directory)) is not None:
        with vm:
            result = vm.run(args.host, command, timeout=args.timeout, check=False)
        sys.stdout.write(result.out)
        sys.stderr.write(result.err)
        raise SystemExit(result.rc)
    argv, env = sim.loop_host_command(directory, args.host, command)
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)


def cmd_kill(args: argparse.Namespace) -> None:
    sim.sim_kill(Runner(), _directory(args), args.host)
    print(f"host {args.host} killed (power loss)")


def cmd_start(args: argparse.Namespace) -> None:
    sim.sim_start(Runner(), _directory(args), args.host)
    print(f"host {args.host} started")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A local playground of simulated sharedlvm "
                     "hosts (the test bed, not the product).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command_name", required=True)
    p = commands.add_parser("up", help="make file-backed LUNs and simulated hosts")
    p.add_argument("--hosts", type=int, default=3)
    p.add_argument("--dir", required=True)
    p.add_argument("--size", type=_size_arg, default=20 * units.GiB)
    p.add_argument("--sector-size", type=int, default=512, choices=(512, 4096))
    p.add_argument("--luns", type=int, default=1)
    p.add_argument("--backend", choices=BACKENDS, default=LOOP_BACKEND,
                   help="loop: hosts share this kernel (fast); vm: each host is a qemu "
                        "guest with device-mapper and a watchdog (real fencing)")
    p.set_defaults(func=cmd_up)
    p = commands.add_parser("down", help="remove everything 'up' made")
    p.add_argument("--dir", required=True)
    p.set_defaults(func=cmd_down)
    p = commands.add_parser("exec", help="run a command as one simulated host")
    p.add_argument("--dir", required=True)
    p.add_argument("--host", type=int, required=True, help="host number, 1..N")
    p.add_argument("--timeout", type=float, default=300, help="vm backend: seconds")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS")
    p.set_defaults(func=cmd_exec)
    p = commands.add_parser("kill", help="power loss of one simulated host")
    p.add_argument("--dir", required=True)
    p.add_argument("--host", type=int, required=True)
    p.set_defaults(func=cmd_kill)
    p = commands.add_parser("start", help="start a killed simulated host again")
    p.add_argument("--dir", required=True)
    p.add_argument("--host", type=int, required=True)
    p.set_defaults(func=cmd_start)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except errors.Error as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0
