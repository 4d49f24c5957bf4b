"""qemu-img, subcommand by subcommand. The only module that knows its flags."""

from __future__ import annotations

import json
from typing import Any

from .command import Runner
from .errors import CommandError, ImageError
from .units import MiB, round_up


def metadata_overhead(capacity: int) -> int:
    """Room for qcow2 metadata (header, L1/L2 tables, refcounts) at 64 KiB clusters.

    An L2 table entry maps one 64 KiB cluster with 8 bytes: capacity / 8192 bytes
    of L2 for a fully allocated image, plus refcounts and slack. Rounded up to MiB.
    """
    return round_up(capacity // 8192 + 2 * MiB, MiB)


def create(runner: Runner, path: str, fmt: str, size: int,
           backing: str | None = None, backing_format: str | None = None) -> None:
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if fmt == "qcow2":
        argv += ["-o", "compat=1.1"]
    if backing:
        # -u: the backing file is not opened (its name is a bare volume UUID that
        # resolves only in an image directory); the size is given.
        argv += ["-u", "-b", backing, "-F", backing_format or "raw"]
    argv += [path, str(size)]
    _run(runner, argv)


def resize(runner: Runner, path: str, fmt: str, size: int) -> None:
    _run(runner, ["qemu-img", "resize", "-q", "-f", fmt, path, str(size)])


def info(runner: Runner, path: str, fmt: str | None = None) -> dict[str, Any]:
    argv = ["qemu-img", "info", "--output", "json"]
    if fmt:
        argv += ["-f", fmt]
    data: dict[str, Any] = json.loads(_run(runner, [*argv, path]))
    return data


def _run(runner: Runner, argv: list[str]) -> str:
    try:
        return runner.run(argv).out
    except CommandError as exc:
        raise ImageError(f"qemu-img {argv[1]} failed: {exc.last_line()}") from exc
