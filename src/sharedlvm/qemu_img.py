"""qemu-img, subcommand by subcommand. The only module that knows its flags."""

from __future__ import annotations

import json
from typing import Any

from .command import Runner
from .errors import CommandError, ImageError
from .units import MiB, round_up


def metadata_overhead(capacity: int) -> int:
    """Room for qcow2 metadata at 64 KiB clusters, never less than ``qemu-img measure``
    says a fully allocated image needs beyond its capacity.

    An L2 table entry maps one 64 KiB cluster with 8 bytes (capacity / 8192 bytes of
    L2 tables), a 16-bit refcount counts each cluster (capacity / 32768 bytes of
    refcount blocks), plus the header, L1 and refcount tables and slack: 2 MiB.
    Rounded up to MiB. (Without the refcounts, a preallocated 1 TiB volume was 31 MiB
    short of what a full guest writes: tests/unit/test_copies_unit.py compares with
    qemu-img up to 64 TiB.)
    """
    return round_up(capacity // 8192 + capacity // 32768 + 2 * MiB, MiB)


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
    """Set the image's virtual size, opened alone: an overlay's backing file is its
    parent's bare UUID, which would resolve next to the device, not in an image
    directory (and the volumes below are not this caller's to open). The header's
    backing file name is kept."""
    _run(runner, ["qemu-img", "resize", "-q", json_name(alone(path, fmt)), str(size)])


def info(runner: Runner, path: str, fmt: str | None = None) -> dict[str, Any]:
    argv = ["qemu-img", "info", "--output", "json"]
    if fmt:
        argv += ["-f", fmt]
    data: dict[str, Any] = json.loads(_run(runner, [*argv, path]))
    return data


# A merge's commit copies a snapshot's data into its parent: as long as the data.
LONG_TIMEOUT = 24 * 3600.0


def alone(path: str, fmt: str, backing: dict[str, Any] | None = None) -> dict[str, Any]:
    """An image on a block device opened by itself: with ``backing`` (another node of
    this kind) as its only backing file, or none at all. A merge reads and writes two
    volumes of a chain, never the volumes below them, whose leases it does not hold."""
    node: dict[str, Any] = {"driver": fmt, "file": {"driver": "host_device",
                                                    "filename": path}}
    if fmt == "qcow2":
        node["backing"] = backing
    return node


def json_name(node: dict[str, Any]) -> str:
    return "json:" + json.dumps(node, separators=(",", ":"))


def commit(runner: Runner, top: dict[str, Any]) -> None:
    """Write the overlay ``top``'s data into its backing file (``-d``: the overlay is
    left as it was, so a commit cut short and run again reads the same data either way:
    every cluster it wrote into the base is still covered by the overlay's own)."""
    _run(runner, ["qemu-img", "commit", "-q", "-t", "none", "-d", json_name(top)],
         timeout=LONG_TIMEOUT)


def rebase_unsafe(runner: Runner, path: str, backing: str, backing_format: str) -> None:
    """Name another backing file in ``path``'s header without reading any data (the
    new backing reads the same as the old one did through it)."""
    _run(runner, ["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", backing, "-F",
                  backing_format, path])


def corruption(runner: Runner, path: str) -> str | None:
    """What ``qemu-img check`` finds wrong with a qcow2 image (leaked clusters are
    harmless and not counted), or None."""
    result = runner.run(["qemu-img", "check", "--output", "json", "-f", "qcow2", path],
                        check=False, timeout=LONG_TIMEOUT)
    try:
        data = json.loads(result.out)
        bad = int(data.get("corruptions", 0)) + int(data.get("check-errors", 0))
    except (ValueError, TypeError, AttributeError):
        return result.err.strip().splitlines()[-1] if result.err.strip() else \
            f"qemu-img check failed (exit {result.rc})"
    return f"qemu-img check found {bad} errors" if bad else None


def end_offset(runner: Runner, node: dict[str, Any]) -> int:
    """Bytes a qcow2 image uses on its device (``qemu-img check``'s end offset, read
    past the page cache: another host may have written the image since this one last
    read it)."""
    end, _ = _check_end(runner, node)
    if end is None:
        raise ImageError("qemu-img check gave no end offset")
    return end


def clean_end_offset(runner: Runner, node: dict[str, Any]) -> int | None:
    """The end offset of an image ``qemu-img check`` finds nothing wrong with
    (leaked clusters aside, which lie below the end offset), else None: the only
    figure an LV may be reduced to."""
    end, clean = _check_end(runner, node)
    return end if clean else None


def _check_end(runner: Runner, node: dict[str, Any]) -> tuple[int | None, bool]:
    result = runner.run(["qemu-img", "check", "--output", "json", "-T", "none",
                         json_name(node)], check=False, timeout=LONG_TIMEOUT)
    try:
        data = json.loads(result.out)
        end = int(data["image-end-offset"])
        bad = int(data.get("corruptions", 0)) + int(data.get("check-errors", 0))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, False
    return end, result.rc in (0, 3) and bad == 0  # 3: leaks only


def measure(runner: Runner, path: str, fmt: str, target_format: str) -> dict[str, int]:
    """What a copy of ``path`` into ``target_format`` needs: ``required`` (its data
    and metadata) and ``fully-allocated`` bytes."""
    data = json.loads(_run(runner, ["qemu-img", "measure", "--output", "json", "-f", fmt,
                                    "-O", target_format, path]))
    return {"required": int(data["required"]),
            "fully-allocated": int(data["fully-allocated"])}


def in_use(node: dict[str, Any]) -> dict[str, Any]:
    """An alone() image (its backing too) opened read-only with ``force-share``: read
    past the locks of a running qemu that has it open (measured on qemu 7.2: without
    it, qemu-img is refused "Failed to get shared 'write' lock")."""
    shared = dict(node, **{"read-only": True, "force-share": True})
    if shared.get("backing"):
        shared["backing"] = in_use(shared["backing"])
    return shared


def convert_argv(source: str, source_format: str, target: str, target_format: str, *,
                 existing: bool, target_is_zero: bool, out_of_order: bool, rate: int = 0,
                 target_cache: str = "none") -> list[str]:
    """The argv of a copy with progress on stdout (``-p``). Sources and device targets
    bypass the page cache (``-T none``/``-t none``): a copy of a large disk must not
    evict the host's cache, nor leave dirty pages a later reader on another host would
    not see. ``existing``: the target is a device or a formatted image (``-n``);
    ``target_is_zero``: it reads as zeroes already, so zero ranges are not written
    (only for a header qemu-img wrote just now, never for an LV of unknown content);
    ``out_of_order``: writes may land in any order (``-W``, raw targets only: a qcow2
    target would be fragmented); ``rate``: bytes/s, 0 for no limit."""
    argv = ["qemu-img", "convert", "-p", "-T", "none", "-t", target_cache,
            "-f", source_format, "-O", target_format]
    if existing:
        argv.append("-n")
    elif target_format == "qcow2":
        argv += ["-o", "compat=1.1"]
    if target_is_zero:
        argv.append("--target-is-zero")
    if out_of_order:
        argv.append("-W")
    if rate > 0:
        argv += ["-r", str(rate)]
    return [*argv, source, target]


def _run(runner: Runner, argv: list[str], timeout: float | None = None) -> str:
    try:
        if timeout is None:
            return runner.run(argv).out
        return runner.run(argv, timeout=timeout).out
    except CommandError as exc:
        raise ImageError(f"qemu-img {argv[1]} failed: {exc.last_line()}") from exc
