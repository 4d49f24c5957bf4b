"""``python3 -m sharedlvm_testbed.devcount DEVICE --host-id N --state FILE``: a
double-writer detector, in the spirit of sanlock's ``devcount`` test tool (its idea,
our code).

Run it as a consumer under ``sharedlvm run --volume V -- python3 -m
sharedlvm_testbed.devcount {0} ...`` on several hosts at once. Each instance keeps
incrementing one counter record in the first 4 KiB of DEVICE, with direct synchronous
I/O, and before each increment checks that the record is still exactly the one it
wrote last. If another writer touched the device while this one held it, the check
fails: the instance writes ``TWO WRITERS ...`` to its state file and stderr and exits
with status 3. The leases are right if that never happens, however hosts are killed
and restarted.

The state file (rewritten atomically) says what this instance did, one word per line:
``start COUNT`` (the value it found), ``count COUNT`` (the last value it wrote), and
at the end ``stopped`` or ``TWO WRITERS ...``. SIGTERM stops it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import random
import signal
import struct
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"SLDEVCNT"
BLOCK = 4096
# magic, count, host id, pid, session, crc32 of everything before it
_FORMAT = struct.Struct(">8sQIIQ")
_CRC = struct.Struct(">I")
EXIT_TWO_WRITERS = 3
EXIT_CORRUPT = 4


@dataclass(frozen=True)
class Record:
    count: int
    host_id: int
    pid: int
    session: int

    def pack(self) -> bytes:
        head = _FORMAT.pack(MAGIC, self.count, self.host_id, self.pid, self.session)
        return (head + _CRC.pack(zlib.crc32(head))).ljust(BLOCK, b"\0")

    @classmethod
    def unpack(cls, data: bytes) -> Record | None:
        """None for a device never written by devcount (no magic)."""
        head = data[:_FORMAT.size]
        magic, count, host_id, pid, session = _FORMAT.unpack(head)
        if magic != MAGIC:
            return None
        (crc,) = _CRC.unpack_from(data, _FORMAT.size)
        if crc != zlib.crc32(head):
            raise ValueError("counter record has a bad checksum (torn write?)")
        return cls(count, host_id, pid, session)

    def __str__(self) -> str:
        return f"count {self.count} by host {self.host_id} pid {self.pid}"


class Device:
    """The first block of DEVICE, read and written with O_DIRECT|O_DSYNC.

    Files on tmpfs refuse O_DIRECT; there (unit tests only) plain O_DSYNC is used.
    """

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd = os.open(path, os.O_RDWR | os.O_DSYNC)
        self.buf = mmap.mmap(-1, BLOCK)  # page aligned, as O_DIRECT needs

    def read(self) -> Record | None:
        self.buf.seek(0)
        if os.preadv(self.fd, [self.buf], 0) != BLOCK:
            raise OSError(errno.EIO, "short read of the counter block")
        return Record.unpack(bytes(self.buf))

    def write(self, record: Record) -> None:
        self.buf.seek(0)
        self.buf.write(record.pack())
        if os.pwritev(self.fd, [self.buf], 0) != BLOCK:
            raise OSError(errno.EIO, "short write of the counter block")


class State:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []

    def set(self, key: str, text: str) -> None:
        self.lines = [line for line in self.lines if not line.startswith(key + " ")]
        self.lines.append(f"{key} {text}".rstrip())
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("\n".join(self.lines) + "\n")
        os.replace(tmp, self.path)


def run(device: str, host_id: int, state_path: Path, interval: float,
        iterations: int | None = None) -> int:
    stopping = False

    def stop(signo: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    dev = Device(device)
    state = State(state_path)
    session = random.getrandbits(63)
    try:
        found = dev.read()
        state.set("start", str(found.count if found else 0))
        mine: Record | None = None
        done = 0
        while not stopping and (iterations is None or done < iterations):
            current = dev.read()
            if mine is not None and current != mine:
                text = f"host {host_id} wrote {mine}, then found {current}"
                state.set("TWO WRITERS", text)
                print(f"devcount: TWO WRITERS {text}", file=sys.stderr)
                return EXIT_TWO_WRITERS
            mine = Record((current.count if current else 0) + 1, host_id, os.getpid(),
                          session)
            dev.write(mine)
            state.set("count", str(mine.count))
            done += 1
            time.sleep(interval)
    except ValueError as exc:  # a record with a bad checksum
        state.set("CORRUPT", str(exc))
        print(f"devcount: {exc}", file=sys.stderr)
        return EXIT_CORRUPT
    state.set("stopped", "")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m sharedlvm_testbed.devcount",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("device")
    parser.add_argument("--host-id", type=int, required=True)
    parser.add_argument("--state", type=Path, required=True, help="state file to keep")
    parser.add_argument("--interval", type=float, default=0.05,
                        help="seconds between increments (default 0.05)")
    parser.add_argument("--iterations", type=int, help="stop after this many")
    args = parser.parse_args(argv)
    return run(args.device, args.host_id, args.state, args.interval, args.iterations)


if __name__ == "__main__":
    sys.exit(main())
