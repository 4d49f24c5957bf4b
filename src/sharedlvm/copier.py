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
import json
import os
import re
import shutil
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
        self.fd = -1
        self.held: list[VolumeInfo] = []
        self.directory: Path | None = None

    def run(self) -> None:
        os.setpgid(0, 0)
        leases.use_run_dir(self.paths.sanlock_run_dir)
        self.fd = leases.register()
        leases.killpath(self.fd, [KILL, "-KILL", "--", f"-{os.getpid()}"])
        source, source_format = self._open_source()
        target_format = self.job["target_format"]
        measured = qemu_img.measure(self.runner, source, source_format, target_format)
        _say("measured", required=measured["required"],
             fully_allocated=measured["fully-allocated"])
        answer = _read()
        if answer is None:
            raise errors.Error("the copy was cancelled before it started")
        if "target" in answer:
            target = self._open_target(str(answer["target"]), target_format)
            raw_device = target_format == VolumeFormat.RAW.value
            argv = qemu_img.convert_argv(
                source, source_format, target, target_format, existing=True,
                target_is_zero=not raw_device, out_of_order=raw_device,
                rate=int(self.job.get("rate", 0)))
        else:
            target = str(answer["file"])
            argv = qemu_img.convert_argv(source, source_format, target, target_format,
                                         existing=False, target_is_zero=False,
                                         out_of_order=False, rate=int(self.job.get("rate", 0)),
                                         target_cache="writeback")
        self._convert(argv)
        _say("copied")
        # The lease is kept until the daemon says the volume is published (EOF).
        while _read() is not None:
            pass

    def _open_source(self) -> tuple[str, str]:
        if "file" in self.job["source"]:
            return str(self.job["source"]["file"]), str(self.job["source"]["format"])
        assert self.domain is not None
        volumes = [volume_mod.get_volume(self.domain, v)
                   for v in self.job["source"]["volumes"]]
        layout = LeaseLayout(self.domain)
        for info in sorted(volumes, key=lambda v: v.uuid):  # one order for every taker
            layout.acquire_volume(info, shared=True, fd=self.fd)
            self.held.append(info)
        self.directory = copy_dir(self.domain, self.job["id"])
        self.directory.mkdir(parents=True, exist_ok=True)
        for info in volumes:
            device = volume_mod.volume_path(self.domain, info.uuid, read_only=True)
            (self.directory / info.uuid).symlink_to(device)
        return str(self.directory / volumes[-1].uuid), volumes[-1].format.value

    def _open_target(self, volume: str, fmt: str) -> str:
        assert self.domain is not None
        info = volume_mod.get_volume(self.domain, volume)
        if info.state != VolumeState.CREATING:  # a published volume is never copied over
            raise errors.Busy(f"volume {volume} is {info.state}: not a copy's target")
        LeaseLayout(self.domain).acquire_volume(info, shared=False, fd=self.fd)
        self.held.append(info)
        path = volume_mod.volume_path(self.domain, volume, creating=True)
        if fmt == VolumeFormat.QCOW2.value:
            # A new qcow2 header on the device: it reads as zeroes, so qemu-img skips
            # every zero range of the source (--target-is-zero).
            qemu_img.create(self.runner, path, "qcow2", info.capacity)
        return path

    def _convert(self, argv: list[str]) -> None:
        with tempfile.TemporaryFile() as err:
            proc = self.runner.spawn(argv, stderr=err)
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
            last = -1.0
            buf = b""
            while True:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                *done, buf = re.split(rb"[\r\n]", buf)
                for piece in done:
                    m = _PERCENT.search(piece)
                    if m and float(m.group(1)) != last:
                        last = float(m.group(1))
                        _say("progress", percent=last)
            rc = proc.wait()
            if rc != 0:
                err.seek(0)
                lines = err.read()[-2000:].decode(errors="replace").strip().splitlines()
                raise errors.ImageError(f"qemu-img convert failed (exit {rc}): "
                                        f"{lines[-1] if lines else 'no message'}")

    def close(self) -> None:
        """Give the leases back (qemu-img has exited), then deactivate what no other
        process of this host holds, and remove the links."""
        if self.domain is None:
            return
        layout = LeaseLayout(self.domain)
        for info in self.held:
            with contextlib.suppress(errors.Error):
                layout.release_volume(info, fd=self.fd)
        deactivate_unused(self.domain, self.held)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def main() -> NoReturn:
    copier: Copier | None = None
    code = 0
    try:
        job = _read()
        if job is None or "job" not in job:
            raise errors.InvalidArgument("copier: no job given")
        copier = Copier(job["job"])
        copier.run()
    except errors.Error as exc:
        _say("error", error=exc.to_wire())
        code = 1
    except Exception as exc:  # a bug: said, not hidden
        _say("error", error=errors.Error(f"copier: {exc!r}").to_wire())
        code = 1
    finally:
        if copier is not None:
            copier.close()
    sys.stdout.flush()
    time.sleep(0)
    os._exit(code)


if __name__ == "__main__":
    main()
