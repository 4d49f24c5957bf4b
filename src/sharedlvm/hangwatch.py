"""A hung daemon must not keep the manager role (or volume leases) forever.

sanlock renews a host's lockspace by itself: a daemon that hangs (SIGSTOP, a
deadlock, a thread stuck on a lock) while its host's sanlock renews keeps every lease
it holds, and the domain has a manager that serves no one. Nothing inside the hung
process can notice, so a small watcher process does: the daemon sends it a beat
every ``timeout / 4`` seconds while its own loops make progress, and the watcher
SIGKILLs the daemon when no beat came for ``timeout`` seconds. sanlock then frees the
dead process's leases at once and another host takes the role within its next poll.

The watcher is forked before the daemon starts any thread, dies with the daemon
(parent-death signal) and does nothing but wait on a pipe. Under systemd the daemon
also sends ``WATCHDOG=1`` with each beat when ``WatchdogSec`` is set, so systemd is a
second watcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import time

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class HangWatch:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._write_fd = -1
        self.pid: int | None = None

    def start(self) -> None:
        """Fork the watcher. Call before any thread starts (fork copies one thread)."""
        daemon_pid = os.getpid()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the watcher
            os.close(write_fd)
            _watch(daemon_pid, read_fd, self.timeout)  # never returns
        os.close(read_fd)
        self._write_fd = write_fd
        self.pid = pid

    def beat(self) -> None:
        if self._write_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._write_fd, b".")
        _notify_watchdog()

    def stop(self) -> None:
        """A clean exit: the watcher sees the pipe close and exits too."""
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        if self.pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = None


def _watch(daemon_pid: int, read_fd: int, timeout: float) -> None:
    """The watcher's whole life: no threads, no Python objects shared with the daemon."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != daemon_pid:  # the daemon died before the prctl
            os._exit(0)
        last = time.monotonic()
        while True:
            ready, _, _ = select.select([read_fd], [], [], 1.0)
            if ready:
                if not os.read(read_fd, 4096):
                    os._exit(0)  # the daemon closed the pipe or died
                last = time.monotonic()
            elif time.monotonic() - last > timeout:
                # The log of a hung daemon will not say it: the watcher does.
                os.write(2, (f"sharedlvm hang watch: daemon {daemon_pid} made no progress "
                             f"for {timeout:g} s: killing it so that its leases "
                             "go\n").encode())
                os.kill(daemon_pid, signal.SIGKILL)
                os._exit(0)
    finally:
        os._exit(1)


def _notify_watchdog() -> None:
    """systemd's WatchdogSec: one datagram, when systemd asked for it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not os.environ.get("WATCHDOG_USEC"):
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, \
            contextlib.suppress(OSError):
        sock.sendto(b"WATCHDOG=1", address)
