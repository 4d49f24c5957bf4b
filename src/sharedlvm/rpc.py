"""The local control socket between the CLI and the host's daemon.

One request per connection: a JSON object on one line, ``{"op": NAME, "args": {...}}``,
answered by one line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
MESSAGE, "kind": ERROR CLASS}``. The socket is created mode 0600 in the root-only run
dir: only root talks to the daemon. The daemon maps its errors to this answer at one
place (:func:`answer_error`); the client raises the same error class again, so the CLI
prints exactly what the daemon said.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from . import errors

MAX_MESSAGE = 1024 * 1024
# A metadata operation takes well under a second; a qcow2 create with wipe of a large
# volume can take minutes. The CLI waits this long before giving up on an answer.
CLIENT_TIMEOUT = 600.0


def socket_path(run_dir: Path) -> Path:
    return run_dir / "daemon.sock"


class DaemonNotRunning(errors.Error):
    pass


def rebuild_error(kind: str, message: str) -> errors.Error:
    """The daemon's error as the same class, carrying the daemon's message (classes
    with structured fields, like CommandError, come back as their message only)."""
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.Error)) or \
            issubclass(cls, errors.CommandError):
        return errors.Error(message)
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc


def answer_error(exc: errors.Error) -> dict[str, Any]:
    return {"ok": False, "error": str(exc), "kind": type(exc).__name__}


def call(run_dir: Path, op: str, args: dict[str, Any] | None = None,
         timeout: float = CLIENT_TIMEOUT) -> Any:
    """Send one request to the daemon of this host and return its result."""
    path = socket_path(run_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(
                f"the sharedlvm daemon is not running on this host (no {path})") from None
        sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        reply = _read_line(sock)
    except TimeoutError:
        raise errors.Error(f"no answer from the sharedlvm daemon in {timeout:g} s") from None
    finally:
        sock.close()
    try:
        data = json.loads(reply)
    except ValueError as exc:
        raise errors.Error(f"bad answer from the sharedlvm daemon: {exc}") from None
    if data.get("ok"):
        return data.get("result")
    raise rebuild_error(str(data.get("kind")), str(data.get("error")))


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
        if size > MAX_MESSAGE:
            raise errors.InvalidArgument("message too large")
    return b"".join(chunks)


def read_request(sock: socket.socket) -> tuple[str, dict[str, Any]]:
    """Parse a request; malformed ones raise InvalidArgument (answered, not executed)."""
    raw = _read_line(sock)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise errors.InvalidArgument(f"malformed request: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("op"), str) or \
            not isinstance(data.get("args", {}), dict):
        raise errors.InvalidArgument("malformed request: expected {\"op\": str, \"args\": {}}")
    return data["op"], data.get("args", {})


def send_answer(sock: socket.socket, answer: dict[str, Any]) -> None:
    sock.sendall(json.dumps(answer).encode() + b"\n")
