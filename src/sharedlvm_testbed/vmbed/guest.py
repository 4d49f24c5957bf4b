"""One simulated host as a qemu guest: boot, run commands inside, lose power, stop.

qemu is started through the project's :class:`~sharedlvm.command.Runner` with
``-daemonize -pidfile``: the Runner call returns once qemu is initialized, and the
guest is then known by its pid alone. Every kill is by that pid, after checking that
the pid still belongs to this guest's qemu (its command line names our pid file), so
neither a reused pid nor another engineer's qemu is ever signalled.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NamedTuple

from sharedlvm.command import Runner
from sharedlvm.errors import CommandError, CommandTimeout

from .channel import AgentChannel
from .errors import (
    GuestAgentError,
    GuestBootError,
    GuestCommandError,
    HostUnsupported,
    VmBedError,
)
from .image import GuestImage
from .qemu import DEFAULT_MEMORY_MIB, QemuConfig, qemu_argv

log = logging.getLogger(__name__)

# Under TCG one guest answers in ~7 s and two booting together in ~8-12 s on 2 cores
# (TESTBED-NOTES); a loaded machine can be several times slower.
DEFAULT_BOOT_TIMEOUT = 180.0
# An LVM command in a guest takes ~0.4 s under TCG; a minute means something hangs.
DEFAULT_COMMAND_TIMEOUT = 60.0
# Slack on top of a command's own timeout for the agent round trip under TCG.
_CHANNEL_SLACK = 30.0
# A ping sent before the agent opened its port is dropped (measured: only the ping
# sent after the agent started was answered), so ping often during boot.
_PING_INTERVAL = 0.5


class GuestResult(NamedTuple):
    """What a command run in a guest returned; unpacks as (rc, out, err)."""

    rc: int
    out: str
    err: str


class Guest:
    """A qemu guest sharing the LUN file with the other guests of a bed.

    work_dir (created) holds the console log, the control socket and the pid file.
    share_dir is mounted read-write at /project in the guest and is on the agent's
    PYTHONPATH (pass the directory holding the ``sharedlvm`` and ``sharedlvm_testbed``
    packages, :func:`.vmsim.package_share_dir`, to run project code in the guest); by
    default it is ``work_dir/share``.
    """

    def __init__(self, name: str, image: GuestImage, lun_path: Path, work_dir: Path, *,
                 runner: Runner | None = None, share_dir: Path | None = None,
                 memory_mib: int = DEFAULT_MEMORY_MIB, udev: bool = False,
                 boot_timeout: float = DEFAULT_BOOT_TIMEOUT, sector_size: int = 512) -> None:
        self.name = name
        self.work_dir = work_dir
        self.runner = runner or Runner()
        self.boot_timeout = boot_timeout
        self.config = QemuConfig(
            name=name, image=image, lun_path=lun_path,
            share_dir=share_dir or work_dir / "share",
            console_path=work_dir / "console.log",
            control_socket=work_dir / "agent.sock",
            pid_file=work_dir / "qemu.pid",
            memory_mib=memory_mib, udev=udev, sector_size=sector_size,
        )
        self.pid: int | None = None
        self.boot_seconds: float | None = None
        self._channel = AgentChannel(self.config.control_socket, name)

    # ---- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Boot and wait until the agent answers; on failure nothing is left running."""
        if self.pid is not None:
            raise VmBedError(f"{self.name}: already started (qemu pid {self.pid})")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config.share_dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.config.console_path, self.config.control_socket,
                      self.config.pid_file):
            stale.unlink(missing_ok=True)
        started = time.monotonic()
        try:
            self.runner.run(qemu_argv(self.config), timeout=60)
        except CommandError as exc:
            # qemu itself refused (no binary, bad accelerator, no memory): this
            # machine cannot run guests. A guest that starts and then fails to boot
            # is a GuestBootError instead.
            raise HostUnsupported(f"{self.name}: qemu did not start: "
                                  f"{exc.last_line()}") from exc
        try:
            self.pid = int(self.config.pid_file.read_text().strip())
            self._wait_for_agent(started + self.boot_timeout)
        except BaseException:
            self.power_off()
            raise
        self.boot_seconds = time.monotonic() - started
        log.info("%s booted in %.1f s (qemu pid %d)", self.name, self.boot_seconds, self.pid)

    def _wait_for_agent(self, deadline: float) -> None:
        self._channel.connect()
        while time.monotonic() < deadline:
            if not self.is_running():
                raise GuestBootError(f"{self.name}: qemu exited during boot\n"
                                     f"{self.console_tail()}")
            if self._channel.ping(_PING_INTERVAL) is not None:
                return
        raise GuestBootError(f"{self.name}: agent not answering after "
                             f"{self.boot_timeout:g} s\n{self.console_tail()}")

    def adopt(self, pid: int) -> None:
        """Take over a guest booted by another process (``sim up``) from its qemu pid.

        Refuses a pid that is not this guest's qemu (its command line must name our
        pid file), so a stale state file never makes us signal a stranger.
        """
        if self.pid is not None:
            raise VmBedError(f"{self.name}: already has qemu pid {self.pid}")
        self.pid = pid
        if not self._owns_pid():
            self.pid = None
            raise VmBedError(f"{self.name}: qemu pid {pid} is not running "
                             f"(or is not this guest's qemu)")
        self._channel.connect()

    def disconnect(self) -> None:
        """Close the control connection, leaving the guest running: qemu serves one
        connection at a time, so another process can adopt the guest after this."""
        self._channel.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Clean shutdown through the agent; power off if it does not end in time."""
        if self.pid is None:
            return
        if self.is_running():
            try:
                self._channel.request({"op": "poweroff"}, timeout=10)
            except (GuestAgentError, TimeoutError) as exc:
                log.warning("%s: clean shutdown failed, powering off: %s", self.name, exc)
            if not self._wait_exit(timeout):
                log.warning("%s: did not power off in %g s, killing", self.name, timeout)
        self.power_off()

    def power_off(self) -> None:
        """Pull the plug: SIGKILL this guest's qemu (by pid) and wait until it is gone."""
        self._channel.close()
        if self.pid is None:
            return
        if self._owns_pid():
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            if not self._wait_exit(30.0):
                raise GuestBootError(f"{self.name}: qemu pid {self.pid} survived SIGKILL")
        self.pid = None

    def is_running(self) -> bool:
        """True while this guest's qemu process exists (a zombie counts as gone)."""
        return self.pid is not None and self._owns_pid()

    def _owns_pid(self) -> bool:
        assert self.pid is not None
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        # The daemonized qemu is not our child; if nobody reaps it, a dead one stays
        # a zombie (empty cmdline) until its new parent does.
        return state != "Z" and str(self.config.pid_file).encode() in cmdline

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.pid is not None and self._owns_pid():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def console_tail(self, lines: int = 30) -> str:
        """The last lines of the guest's serial console, for error messages."""
        try:
            text = self.config.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no console log at {self.config.console_path})"
        return "\n".join(text.splitlines()[-lines:])

    @contextmanager
    def running(self) -> Iterator[Guest]:
        """``with guest.running():`` boots, and always stops (or kills) on exit."""
        try:
            self.start()
            yield self
        finally:
            self.stop()

    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- commands ---------------------------------------------------------------

    def wait_ok(self, argv: Sequence[str], timeout: float, *,
                env: Mapping[str, str] | None = None, interval: float = 0.5) -> None:
        """Run argv every ``interval`` s until it exits 0; VmBedError after timeout s."""
        deadline = time.monotonic() + timeout
        while True:
            rc, out, err = self.run(argv, check=False, env=env)
            if rc == 0:
                return
            if time.monotonic() > deadline:
                raise VmBedError(f"{self.name}: {' '.join(argv)} still failing after "
                                 f"{timeout:g} s: rc={rc} {out.strip()} {err.strip()}")
            time.sleep(interval)

    def spawn(self, argv: Sequence[str], *, log_file: str,
              env: Mapping[str, str] | None = None) -> int:
        """Start a long-lived process in the guest (detached, output appended to the
        guest file ``log_file``) and return its pid in the guest; does not wait."""
        argv = [str(arg) for arg in argv]
        request = {"op": "spawn", "argv": argv, "env": dict(env or {}), "log": log_file}
        try:
            reply = self._channel.request(request, timeout=_CHANNEL_SLACK)
        except TimeoutError as exc:
            raise GuestAgentError(f"{self.name}: no reply to spawn {argv[0]}") from exc
        log.debug("%s: spawned %s as pid %s", self.name, argv, reply["pid"])
        return int(reply["pid"])

    def run(self, argv: Sequence[str], *, timeout: float = DEFAULT_COMMAND_TIMEOUT,
            check: bool = True, input: bytes | None = None,
            env: Mapping[str, str] | None = None) -> GuestResult:
        """Run argv (a list, never a shell string) inside the guest.

        Like :meth:`Runner.run`: a non-zero exit raises :class:`GuestCommandError`
        unless check is False, and a command still running after timeout seconds is
        killed in the guest and raises :class:`CommandTimeout`.
        """
        argv = [str(arg) for arg in argv]
        request = {
            "op": "run", "argv": argv, "timeout": timeout, "env": dict(env or {}),
            "input": base64.b64encode(input).decode() if input is not None else None,
        }
        log.debug("%s: run %s", self.name, argv)
        try:
            reply = self._channel.request(request, timeout=timeout + _CHANNEL_SLACK)
        except TimeoutError as exc:
            raise GuestAgentError(f"{self.name}: no reply to {argv[0]} after "
                                  f"{timeout + _CHANNEL_SLACK:g} s") from exc
        result = GuestResult(int(reply["rc"]), str(reply["out"]), str(reply["err"]))
        if reply.get("timed_out"):
            raise CommandTimeout(argv, timeout, result.out, result.err)
        if check and result.rc != 0:
            raise GuestCommandError(self.name, argv, result.rc, result.out, result.err)
        return result
