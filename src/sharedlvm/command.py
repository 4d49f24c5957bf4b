"""The one way sharedlvm runs external commands.

argv lists only (never a shell), failure by default, a timeout on every call, the argv
logged at debug level. A :class:`Runner` is passed to the code that needs it, so tests
can record or replace it (see :class:`RecordingRunner`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

from .errors import CommandError, CommandTimeout

log = logging.getLogger(__name__)

# No external command sharedlvm runs should take this long; LVM on a VG with
# thousands of LVs takes well under a second. A stuck SAN path is the usual reason to
# hit it, and then failing beats hanging the caller forever.
DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Result:
    argv: list[str]
    rc: int
    out: str
    err: str
    seconds: float


# Children die with the process that runs them: an `lvm` left running by a manager
# daemon that was killed could commit after another host became manager (sanlock
# frees a dead process's lease at once). util-linux's setpriv sets the parent-death
# signal and execs the command, so no Python runs between fork and exec (a
# preexec_fn is unsafe in a threaded daemon). The parent is the thread that forked,
# which waits for the child, so the signal comes only when the process dies.
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--")


class Runner:
    """Runs argv lists with an optional extra environment.

    ``die_with_parent``: the command is killed when this process dies (the default;
    off only for commands meant to outlive it, such as a daemon that forks)."""

    def __init__(self, env: Mapping[str, str] | None = None,
                 die_with_parent: bool = True) -> None:
        self.env = dict(env or {})
        self.die_with_parent = die_with_parent

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Result:
        argv = [str(a) for a in argv]
        full_env = self._full_env(env)
        log.debug("run %s", argv)
        start = time.monotonic()
        try:
            proc = subprocess.run(
                [*DIE_WITH_PARENT, *argv] if self.die_with_parent else argv,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=full_env,
                stdin=None if input is not None else subprocess.DEVNULL,
                close_fds=True,
            )
        except subprocess.TimeoutExpired as exc:
            out = _text(exc.stdout)
            err = _text(exc.stderr)
            raise CommandTimeout(argv, timeout, out, err) from exc
        except FileNotFoundError as exc:
            raise CommandError(argv, 127, "", f"{argv[0]}: command not found") from exc
        if self.die_with_parent and proc.returncode == 127 and "setpriv:" in proc.stderr:
            raise CommandError(argv, 127, "", f"{argv[0]}: command not found")
        elapsed = time.monotonic() - start
        log.debug("rc=%d in %.3f s: %s", proc.returncode, elapsed, argv[0])
        if check and proc.returncode != 0:
            raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
        return Result(argv, proc.returncode, proc.stdout, proc.stderr, elapsed)


    def _full_env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        full = dict(os.environ)
        full.update(self.env)
        full.update(env or {})
        return full

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              stderr: IO[bytes] | int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
        """Start a long-running child with pipes to its stdin and stdout (binary),
        for a command that serves several requests (lvm_shell.py). It dies with this
        process when ``die_with_parent``; the thread that calls this must be the one
        that waits for the child, since the parent-death signal follows that thread."""
        argv = [str(a) for a in argv]
        full_env = self._full_env(env)
        log.debug("spawn %s", argv)
        try:
            return subprocess.Popen(
                [*DIE_WITH_PARENT, *argv] if self.die_with_parent else argv,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                env=full_env, close_fds=True)
        except FileNotFoundError as exc:
            raise CommandError(argv, 127, "", f"{argv[0]}: command not found") from exc


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data


@dataclass
class RecordingRunner(Runner):
    """A runner that records every argv and delegates to a real runner.

    Used by tests that assert on exact command lines (for example that a non-manager
    host passes ``locking_type=4``) while still running the real command.
    """

    inner: Runner = field(default_factory=Runner)
    calls: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.inner.env, self.inner.die_with_parent)

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Result:
        self.calls.append([str(a) for a in argv])
        return self.inner.run(argv, check=check, timeout=timeout, input=input, env=env)
