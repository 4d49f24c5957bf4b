#!/usr/bin/env python3
"""Torture: a seeded random mix of operations and faults on 4 simulated hosts, with a
ledger of what was acknowledged and invariants checked during and after the run.

What it injects and what it checks is described in ``bench/torturelib.py``. It prints
a table: operations tried / acknowledged / failed cleanly (by error class), faults
injected by kind, the worst time without a manager against its bound, and every
invariant violation; the exit code is 0 only when there is none.

Run as root (loop devices, LVM, sanlock)::

    .venv/bin/python bench/torture.py --seed 1 --minutes 30 [--hosts 4] [--report FILE]

The same seed makes the same sequence of decisions (what each worker asks, which
fault comes next, with which parameters); what they land on depends on timing. Host
crashes cost sanlock's host-dead time (68 s at io_timeout 1): they are on by default
for runs of 5 minutes or more, at most one per ``--crash-interval`` seconds.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from torturelib import Config, run_torture  # first: it puts tests/ (the test bed) on the path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--minutes", type=float, required=True,
                        help="minutes of operations and faults (set-up and checks apart)")
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--shards", type=int, default=2,
                        help="LUNs of the domain, a shard each (default 2)")
    parser.add_argument("--report", type=Path, help="also write the table to this file")
    crash = parser.add_mutually_exclusive_group()
    crash.add_argument("--crashes", dest="crashes", action="store_true", default=None,
                       help="inject host crashes (default: when --minutes >= 5)")
    crash.add_argument("--no-crashes", dest="crashes", action="store_false")
    parser.add_argument("--crash-interval", type=float, default=300.0,
                        help="at most one host crash per this many seconds (default 300)")
    parser.add_argument("--prepare-writers", action="store_true",
                        help="also run devcount on the device paths of volumes prepared "
                             "exclusively (a VM using a prepared volume)")
    parser.add_argument("--no-vms", dest="vms", action="store_false",
                        help="without the VM actor (a qemu written, snapshotted, merged "
                             "and migrated live: bench/torturevm.py)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a new one in /tmp)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)

    def interrupted(signo: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    cfg = Config(seed=args.seed, minutes=args.minutes, hosts=args.hosts, crashes=args.crashes,
                 shards=args.shards, crash_interval=args.crash_interval,
                 prepare_writers=args.prepare_writers, vms=args.vms,
                 workdir=args.dir, verbose=not args.quiet)
    result = run_torture(cfg)
    print(result.table)
    if args.report:
        args.report.write_text(result.table + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
