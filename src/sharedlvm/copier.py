"""The copier: the process that holds a copy's leases while qemu-img copies.

A full clone, an upload or a download runs on the host that asked for it (copy
bandwidth grows with the hosts), never on the manager. The daemon of that host starts
this module as a child (``python -m sharedlvm.copier``) and drives it through a line
protocol, JSON one object per line (copies.py is the other side):

    daemon -> copier   {"job": ...}                 what to copy
    copier -> daemon   {"event": "measured", "required": N, "fully_allocated": M}
    daemon -> copier   {"target": UUID}             the volume reserved for the copy
                       (or {"file": PATH} for a download; EOF aborts)
    copier -> daemon   {"event": "progress", "percent": P}   while qemu-img copies
    copier -> daemon   {"event": "copied"}
    daemon -> copier   EOF, once the manager has published the target
    copier -> daemon   {"event": "error", "error": {...}}    instead, at any step

Like a ``run`` consumer (consumer.py), the copier becomes the leader of its own
process group, registers with this host's sanlock daemon, makes sanlock kill that
group if the host loses its lockspace, and acquires the leases itself: the source
chain's shared, the target's exclusive. ``qemu-img`` runs as its child in the same
group, so every process that writes the target is one the lease belongs to, and the
lease is given back only after qemu-img has exited. The copier keeps the target's
lease until the manager has published the volume: between the last write and
``ready`` no other host can hold it, and a manager taking over meanwhile does not
roll the target back (it removes only ``creating`` volumes nobody holds).

The source chain is opened through a private directory of links
(``$SHAREDLVM_ROOT/run/sharedlvm/<domain>/copies/<job>/<volume>``), so two copies of
the same template, or a copy beside a running consumer of the same image, never
remove each other's links.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from . import errors, leases, qemu_img
from . import volume as volume_mod
from .command import Runner
from .consumer import KILL, deactivate_unused
from .domain import Domain
from .lease_layout import LeaseLayout
from .model import VolumeFormat, VolumeInfo, VolumeState
from .paths import HostPaths

_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _say(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _read() -> dict[str, Any] | None:
    line = sys.stdin.readline()
    if not line:
        return None
    data = json.loads(line)
    if not isinstance(data, dict):
        raise errors.InvalidArgument("copier: expected a JSON object")
    return data


def copy_dir(domain: Domain, job: str) -> Path:
    return domain.paths.run_dir / domain.name / "copies" / job


class Copier:
    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.paths = HostPaths(Path(job["root"]))
        self.runner = Runner()
        self.domain = (Domain.open(self.paths, self.runner, job["domain"])
                       if job.get("domain") else None)
        self.layout = LeaseLayout(self.domain) if self.domain is not None else None
        self.fd = -1
        self.held: list[VolumeInfo] = []  # leases of the copier itself
        self.sources: list[VolumeInfo] = []
        self.target: VolumeInfo | None = None
        self.directory: Path | None = None

    def run(self) -> None:
        os.setpgid(0, 0)
        leases.use_run_dir(self.paths.sanlock_run_dir)
        self.fd = leases.register()
        os.set_inheritable(self.fd, False)  # never the writer's: its own connection
        leases.killpath(self.fd, [KILL, "-KILL", "--", f"-{os.getpid()}"])
        source, source_format = self._open_source()
        target_format = self.job["target_format"]
        measured = qemu_img.measure(self.runner, source, source_format, target_format)
        _say("measured", required=measured["required"],
             fully_allocated=measured["fully-allocated"])
        answer = _read()
        if answer is None:
            raise errors.Error("the copy was cancelled before it started")
        writer = _Writer()
        rate = int(self.job.get("rate", 0))
        try:
            self._lease_source_to(writer.pid)
            if "target" in answer:
                target = self._open_target(str(answer["target"]), writer.pid)
                raw_device = target_format == VolumeFormat.RAW.value
                # A raw LV is written whole (-n; its old content is unknown, so zero
                # ranges are written too); a qcow2 target is formatted by the same
                # qemu-img, which knows a new header reads as zeroes.
                argv = qemu_img.convert_argv(
                    source, source_format, target, target_format, existing=raw_device,
                    target_is_zero=False, out_of_order=raw_device, rate=rate)
            else:
                target = str(answer["file"])
                argv = qemu_img.convert_argv(source, source_format, target, target_format,
                                             existing=False, target_is_zero=False,
                                             out_of_order=False, rate=rate,
                                             target_cache="writeback")
            writer.run(argv)
        finally:
            writer.close()
        if self.target is not None:
            # The writer has exited, and with it its lease: the copier holds the target
            # until the manager has published it.
            self._hold_target(self.target)
            if target_format == VolumeFormat.RAW.value:
                _zero_tail(target, int(self.job["capacity"]))
        _say("copied")
        while _read() is not None:  # until the daemon says it is published (EOF)
            pass

    def _open_source(self) -> tuple[str, str]:
        if "file" in self.job["source"]:
            return str(self.job["source"]["file"]), str(self.job["source"]["format"])
        assert self.domain is not None
        volumes = [volume_mod.get_volume(self.domain, v)
                   for v in self.job["source"]["volumes"]]
        assert self.layout is not None
        for info in sorted(volumes, key=lambda v: v.uuid):  # one order for every taker
            self.layout.acquire_volume(info, shared=True, fd=self.fd)
            self.held.append(info)
        self.sources = volumes
        self.directory = copy_dir(self.domain, self.job["id"])
        self.directory.mkdir(parents=True, exist_ok=True)
        for info in volumes:
            device = volume_mod.volume_path(self.domain, info.uuid, read_only=True)
            (self.directory / info.uuid).symlink_to(device)
        return str(self.directory / volumes[-1].uuid), volumes[-1].format.value

    def _lease_source_to(self, pid: int) -> None:
        """The writer reads the source under shared leases of its own."""
        if self.layout is None:
            return
        for info in sorted(self.sources, key=lambda v: v.uuid):
            self.layout.acquire_volume(info, shared=True, pid=pid)

    def _open_target(self, volume: str, pid: int) -> str:
        """The target's exclusive lease for the writer ``pid``, then its device."""
        assert self.domain is not None and self.layout is not None
        info = volume_mod.get_volume(self.domain, volume)
        self.layout.acquire_volume(info, shared=False, pid=pid)
        self.target = info
        # Read again under the lease: a published volume is never copied over.
        now = volume_mod.get_volume(self.domain, volume)
        if now.state != VolumeState.CREATING:
            raise errors.Busy(f"volume {volume} is {now.state}: not a copy's target")
        return volume_mod.volume_path(self.domain, volume, creating=True, info=now)

    def _hold_target(self, info: VolumeInfo) -> None:
        """sanlock frees a dead process's leases as soon as it sees the process's
        connection close (a few milliseconds): asked again every 10 ms."""
        assert self.layout is not None
        deadline = time.monotonic() + 10
        while True:
            try:
                self.layout.acquire_volume(info, shared=False, fd=self.fd)
                break
            except errors.LeaseHeld:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.held.append(info)

    def close(self) -> None:
        """Give the leases back (qemu-img has exited), then deactivate what no other
        process of this host holds, and remove the links."""
        if self.domain is None or self.layout is None:
            return
        for info in self.held:
            with contextlib.suppress(errors.Error):
                self.layout.release_volume(info, fd=self.fd)
        deactivate_unused(self.domain, self.sources + ([self.target] if self.target else []))
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def _zero_tail(path: str, start: int) -> None:
    """Zeroes from ``start`` (the copied disk's size) to the end of a raw target: its LV
    is whole extents, and what lies past the copy is a deleted volume's old data,
    which the new volume's user must never read. Written by the copier, which holds
    the target's lease again."""
    fd = os.open(path, os.O_WRONLY)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        zeros = bytes(1 << 20)
        offset = start
        while offset < end:
            offset += os.pwrite(fd, zeros[:min(len(zeros), end - offset)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


class _Writer:
    """The process that writes: forked, registered with sanlock itself (with the same
    killpath), given its leases on its behalf, then exec'd as ``qemu-img convert``,
    which keeps the sanlock connection. The leases belong to the writing process, so
    sanlock cannot count a copy as gone while its qemu-img still lives (a write stuck
    in the kernel ends in the watchdog's reset, never in a lease given back)."""

    def __init__(self) -> None:
        ready_r, ready_w = os.pipe()
        self._go_r, self._go_w = os.pipe()
        self._out_r, out_w = os.pipe()
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self.pid = os.fork()
        if self.pid == 0:  # the copier has no threads: fork is safe
            try:
                os.close(ready_r)
                os.close(self._go_w)
                os.close(self._out_r)
                _die_with_parent()
                fd = leases.register()
                leases.killpath(fd, [KILL, "-KILL", "--", f"-{os.getpgid(0)}"])
                os.write(ready_w, b"r")
                data = b""
                while chunk := os.read(self._go_r, 65536):
                    data += chunk
                if not data:
                    os._exit(1)
                argv = json.loads(data)
                os.dup2(out_w, 1)
                os.dup2(self._err.fileno(), 2)
                os.set_inheritable(fd, True)
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        os.close(ready_w)
        os.close(self._go_r)
        os.close(out_w)
        ok = os.read(ready_r, 1) == b"r"
        os.close(ready_r)
        if not ok:
            self.close()
            raise errors.LeaseError("the copy's writer could not register with sanlock")

    def run(self, argv: list[str]) -> None:
        os.write(self._go_w, json.dumps(argv).encode())
        os.close(self._go_w)
        self._go_w = -1
        last = -1.0
        buf = b""
        while chunk := os.read(self._out_r, 4096):
            buf += chunk
            *done, buf = re.split(rb"[\r\n]", buf)
            for piece in done:
                m = _PERCENT.search(piece)
                if m and float(m.group(1)) != last:
                    last = float(m.group(1))
                    _say("progress", percent=last)
        status = self._wait()
        if status != 0:
            self._err.seek(0)
            lines = self._err.read()[-2000:].decode(errors="replace").strip().splitlines()
            raise errors.ImageError(f"qemu-img convert failed (status {status}): "
                                    f"{lines[-1] if lines else 'no message'}")

    def _wait(self) -> int:
        if self.pid <= 0:
            return 0
        _, status = os.waitpid(self.pid, 0)
        self.pid = -1
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        """Never returns while the writer lives: it is killed and waited for."""
        if self._go_w >= 0:
            os.close(self._go_w)  # EOF: a writer not started yet exits
            self._go_w = -1
        if self.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._wait()
        with contextlib.suppress(OSError):
            os.close(self._out_r)
        self._err.close()


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: SIGKILL when the copier dies (not inherited across fork)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() == 1:
        os._exit(1)


def main() -> NoReturn:
    copier: Copier | None = None
    error: errors.Error | None = None
    code = 0
    try:
        job = _read()
        if job is None or "job" not in job:
            raise errors.InvalidArgument("copier: no job given")
        copier = Copier(job["job"])
        copier.run()
    except errors.Error as exc:
        error = exc
    except Exception as exc:  # a bug: said, not hidden
        error = errors.Error(f"copier: {exc!r}")
    if copier is not None:  # leases back and devices down before the daemon hears
        copier.close()
    if error is not None:
        _say("error", error=error.to_wire())
        code = 1
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
