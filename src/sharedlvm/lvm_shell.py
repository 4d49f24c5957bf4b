"""One persistent ``lvm`` process per shard for the manager's metadata commands.

Measured on this machine (lvm2 2.03.16, sharedlvm's settings, bench/lvm_shell.py,
interleaved): an ``lvcreate`` or ``lvremove`` run as its own process costs 45.9 ms in
a VG of 500 LVs, the same command typed into a running ``lvm`` shell 32.2 ms (16.9 vs
7.2 ms at 50 LVs): the process start, the library and config loading are paid once.
Every command still scans the shard's PV and reads its metadata afresh
(tests/integration/test_lvm_shell.py shows a commit by another process between two
shell commands is seen by the next), so the shell keeps no state a command could
trust wrongly.

How a command's result is known: the shell runs with ``log/report_command_log = 1``
and JSON output, so every command ends with one JSON document whose last log entry
(``log_context`` "shell", ``log_object_type`` "cmd") carries its return code; print,
warning and error messages are entries of the same log (lvmdbusd drives LVM's shell
the same way, through the command log; see lvm2's daemons/lvmdbusd). The shell splits
a command line on white space itself (no quoting), so a command with an argument it
could not pass intact (white space, quotes, ``#``, backslash) is run as a process, as
is every command of a closed shell.

Safety is the runner's: the shell dies with the daemon (parent-death signal, set by
``setpriv`` and bound to the thread that forked it, so a keeper thread forks it and
lives exactly as long), a command that exceeds its timeout kills the shell (the
caller then treats the command as one that may have committed, as for a killed
``lvm``), and an idle shell exits after :data:`IDLE_SECONDS`.

A shell keeps one thing across commands: the device numbers of the paths it scanned
first. When a PV's device number changes (a partition table read again gives loop
and device-mapper partitions new minors; test_shards.py's partition test failed on
"Volume group not found" until this), the shell is replaced before the command.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import select
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .command import Result, Runner
from .errors import CommandError, CommandTimeout

log = logging.getLogger(__name__)

# An idle shell exits after this long; the next command starts another, and that
# first command costs ~20 ms more at 400 LVs (measured: 50 vs 28 ms a create). The
# manager keeps one shell per shard, ~15 MB each: with 30 s, a burst of creates spread
# over 21 idle shards paid it on each one (bench/scale.py, one requester at 10,000
# volumes: 18-20 creates/s for a p50 of 41 ms); 5 minutes keeps the shards of a busy
# domain warm for ~15 MB a shard.
IDLE_SECONDS = 300.0

# Added to the shell's lvm.conf: each command's messages and status as one JSON log.
SHELL_CONF = """\
log {
    report_command_log = 1
    command_log_selection = "all"
}
report {
    output_format = "json"
}
"""

# What the shell's own line splitting cannot carry.
_UNSAFE = re.compile(r"[\s\"'#\\]")

# LVM's command return codes (tools/errors.h): ECMD_PROCESSED is success.
_ECMD_PROCESSED = 1

# The end of a command's JSON document: its closing brace, indented by two.
_DOC_END = b"\n  }\n"


def shell_safe(args: Sequence[str]) -> bool:
    """Whether the shell would pass every argument intact."""
    return all(a and not _UNSAFE.search(a) for a in args)


class LvmShell:
    """A running ``lvm`` shell with a fixed configuration; one command at a time (the
    caller serializes, as Lvm.write does under its lock)."""

    def __init__(self, runner: Runner, system_dir: Path, config_text: str,
                 env: Mapping[str, str], idle: float = IDLE_SECONDS,
                 devices: Sequence[str] = ()) -> None:
        self.runner = runner
        # The shard's PVs: a shell keeps the device numbers it found at its first
        # scan, so a device whose number changed (a partition table read again gives
        # loop and device-mapper partitions new minors) means a new shell.
        self._devices = tuple(devices)
        self._numbers: dict[str, int | None] = {}
        self._base_dir = system_dir
        self._config_text = config_text
        self._env = dict(env)
        self._idle = idle
        self._lock = threading.Lock()  # the process and its pipes
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._err_offset = 0
        self._buf = b""
        self._last_used = time.monotonic()
        self._closed = False

    # Configuration

    def _system_dir(self) -> Path:
        """A private LVM_SYSTEM_DIR: the host's lvm.conf, then this shell's --config
        (the shard's filter, locking) and the command log settings. LVM merges repeated
        sections, later settings winning."""
        base = ""
        with contextlib.suppress(FileNotFoundError):
            base = (self._base_dir / "lvm.conf").read_text()
        text = f"{base}\n{self._config_text}\n{SHELL_CONF}"
        directory = self._base_dir / "shell" / hashlib.sha256(text.encode()).hexdigest()[:16]
        directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "lvm.conf"
        try:
            if conf.read_text() == text:
                return directory
        except FileNotFoundError:
            pass
        tmp = directory / f"lvm.conf.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(text)
        os.replace(tmp, conf)
        return directory

    # The process

    def _start(self) -> subprocess.Popen[bytes]:
        """Start the shell from a keeper thread that forks it and waits for it, so the
        parent-death signal fires only when the daemon dies."""
        env = dict(self._env, LVM_SYSTEM_DIR=str(self._system_dir()))
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - kept open with the shell
        started: dict[str, Any] = {}
        ready = threading.Event()

        def keep() -> None:
            try:
                proc = self.runner.spawn(["lvm"], env=env, stderr=stderr)
            except BaseException as exc:  # handed to the caller
                started["error"] = exc
                ready.set()
                return
            started["proc"] = proc
            ready.set()
            self._keep(proc)

        threading.Thread(target=keep, name="lvm-shell", daemon=True).start()
        ready.wait()
        if "error" in started:
            stderr.close()
            raise started["error"]
        proc: subprocess.Popen[bytes] = started["proc"]
        self._proc = proc
        self._stderr = stderr
        self._err_offset = 0
        self._buf = b""
        log.debug("lvm shell started: pid %d", proc.pid)
        return proc

    def _keep(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait for the shell; end it once idle or closed (EOF on its input)."""
        while True:
            try:
                proc.wait(timeout=1.0)
                return
            except subprocess.TimeoutExpired:
                pass
            if self._lock.acquire(blocking=False):
                try:
                    if self._proc is proc and (
                            self._closed or time.monotonic() - self._last_used > self._idle):
                        self._stop_locked()
                finally:
                    self._lock.release()

    def _stop_locked(self, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        try:
            assert proc.stdin is not None
            proc.stdin.close()  # the shell exits at the end of its input
        except OSError:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def close(self) -> None:
        """No more commands: the shell ends (now if idle, else after its command, by
        the keeper); later commands of this shell's owner run as processes."""
        self._closed = True
        if self._lock.acquire(blocking=False):
            try:
                self._stop_locked()
            finally:
                self._lock.release()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    # Commands

    def run(self, argv: Sequence[str], timeout: float) -> Result:
        """Run ``lvm ARGV`` in the shell (``argv`` without the ``lvm``); like
        Runner.run with check=True: CommandError when LVM failed, CommandTimeout (the
        shell killed) past ``timeout``, CommandError "the lvm shell ended" when it
        ended first."""
        argv = [str(a) for a in argv]
        full = ["lvm", *argv]
        if not shell_safe(argv):
            raise ValueError(f"not a shell-safe command line: {argv}")
        with self._lock:
            if self._closed:
                raise ValueError("the lvm shell is closed")
            start = time.monotonic()
            proc = self._proc
            numbers = self._device_numbers()
            if proc is not None and numbers != self._numbers:
                log.info("lvm shell %d: the devices changed (%s -> %s): a new shell",
                         proc.pid, self._numbers, numbers)
                self._stop_locked(kill=True)
                proc = None
            if proc is None or proc.poll() is not None:
                self._stop_locked(kill=True)
                proc = self._start()
            self._numbers = numbers
            line = (" ".join(argv) + "\n").encode()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
            except OSError:
                # Dead before it read the line: it ran nothing. Once more, afresh.
                self._stop_locked(kill=True)
                proc = self._start()
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(line)
                proc.stdin.flush()
            log.debug("lvm shell %d: %s", proc.pid, argv)
            try:
                doc, before = self._read_doc(proc, start + timeout)
            except TimeoutError:
                err = self._new_stderr()
                self._stop_locked(kill=True)
                raise CommandTimeout(full, timeout, "", err) from None
            except EOFError:
                err = self._new_stderr()
                self._stop_locked(kill=True)
                # Killed or crashed before it answered: the command may have committed.
                raise CommandError(full, -9, "", f"{err}\nthe lvm shell ended".strip()) \
                    from None
            finally:
                self._last_used = time.monotonic()
            rc, out, err = _outcome(doc)
            if before.strip():
                out = before + out
            stderr = self._new_stderr()
            if stderr:
                err = f"{err}\n{stderr}" if err else stderr
            elapsed = time.monotonic() - start
        log.debug("rc=%d in %.3f s (shell): %s", rc, elapsed, argv[0])
        if rc != 0:
            raise CommandError(full, rc, out, err)
        return Result(full, rc, out, err, elapsed)

    def _device_numbers(self) -> dict[str, int | None]:
        numbers: dict[str, int | None] = {}
        for path in self._devices:
            try:
                numbers[path] = os.stat(path).st_rdev
            except OSError:
                numbers[path] = None
        return numbers

    def _read_doc(self, proc: subprocess.Popen[bytes], deadline: float
                  ) -> tuple[dict[str, Any], str]:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            end = self._buf.find(_DOC_END)
            if end >= 0:
                text, self._buf = self._buf[:end + len(_DOC_END)], self._buf[end + len(_DOC_END):]
                start = text.find(b"  {\n")
                before = text[:start].decode(errors="replace") if start > 0 else ""
                return json.loads(text[max(start, 0):]), before
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError
            self._buf += chunk

    def _new_stderr(self) -> str:
        if self._stderr is None:
            return ""
        data = os.pread(self._stderr.fileno(), 1 << 20, self._err_offset)
        self._err_offset += len(data)
        # Only what says something: the shell's activation notice is LVM's own.
        lines = [ln.strip() for ln in data.decode(errors="replace").splitlines()]
        return "\n".join(ln for ln in lines if ln and "Activation disabled" not in ln)


def _outcome(doc: dict[str, Any]) -> tuple[int, str, str]:
    """(rc, output, error and warning messages) of one command's log. The output of a
    report command is its report as ``--reportformat json`` prints it; of any other,
    its print messages, one a line."""
    entries = doc.get("log") or []
    out = [e["log_message"] for e in entries if e.get("log_type") == "print"]
    if "report" in doc:
        out = [json.dumps({"report": doc["report"]}), *out]
    err = [e["log_message"] for e in entries if e.get("log_type") in ("error", "warn")]
    status = [e for e in entries
              if e.get("log_context") == "shell" and e.get("log_object_type") == "cmd"]
    if not status:
        return 1, "\n".join(out), "\n".join([*err, "lvm shell: no status for the command"])
    code = int(status[-1].get("log_ret_code", 0))
    rc = 0 if code == _ECMD_PROCESSED else (code or 1)
    return rc, "\n".join(out), "\n".join(err)
