"""The local control socket between clients (CLI, client library) and the host's daemon.

One request per connection: a JSON object on one line, ``{"op": NAME, "fields":
{...}}`` (the request type's name and its serialized fields, requests.py), answered by
one line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"kind",
"message", "fields"}}`` (errors.Error.to_wire). The socket is created mode 0600 in
the root-only run dir: only root talks to the daemon. The client raises the daemon's
error as the same class with the same fields (errors.from_wire), so the CLI prints
exactly what the daemon said.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from . import errors

MAX_MESSAGE = 1024 * 1024  # a request: the daemon reads no more from a client
# An answer: the daemon's own, sized by what the domain holds (a volume list is about
# 300 bytes of JSON per volume: 3 MB at 10,000 volumes; found by bench/scale.py, when
# answers had the request's limit and a list of 10,000 volumes failed).
MAX_ANSWER = 256 * 1024 * 1024
# A metadata operation takes well under a second; a qcow2 create with wipe of a large
# volume can take minutes. A client waits this long before giving up on an answer.
CLIENT_TIMEOUT = 600.0


def socket_path(run_dir: Path) -> Path:
    return run_dir / "daemon.sock"


def call(run_dir: Path, op: str, fields: dict[str, Any] | None = None,
         timeout: float | None = CLIENT_TIMEOUT) -> Any:
    """Send one request to the daemon of this host and return its result (JSON)."""
    path = socket_path(run_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise errors.DaemonNotRunning(
                f"the sharedlvm daemon is not running on this host (no {path})") from None
        sock.sendall(json.dumps({"op": op, "fields": fields or {}}).encode() + b"\n")
        reply = _read_line(sock, MAX_ANSWER, "answer from the sharedlvm daemon")
    except TimeoutError:
        raise errors.Timeout(f"no answer from the sharedlvm daemon in {timeout:g} s") from None
    finally:
        sock.close()
    try:
        data = json.loads(reply)
    except ValueError as exc:
        raise errors.Error(f"bad answer from the sharedlvm daemon: {exc}") from None
    if not isinstance(data, dict):
        raise errors.Error("bad answer from the sharedlvm daemon: not an object")
    if data.get("ok"):
        return data.get("result")
    raise errors.from_wire(data.get("error"))


def _read_line(sock: socket.socket, limit: int, what: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(1024 * 1024)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
        if size > limit:
            if limit == MAX_MESSAGE:
                raise errors.InvalidArgument(f"{what} too large (over {limit} bytes)")
            raise errors.Error(f"{what} too large (over {limit} bytes)")
    return b"".join(chunks)


def read_request(sock: socket.socket) -> tuple[Any, Any]:
    """(op, fields) of one request, as sent; malformed JSON raises InvalidArgument
    (answered, not executed). The fields are checked by operations.decode."""
    raw = _read_line(sock, MAX_MESSAGE, "request")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise errors.InvalidArgument(f"malformed request: {exc}") from None
    if not isinstance(data, dict):
        raise errors.InvalidArgument('malformed request: expected {"op": str, "fields": {}}')
    return data.get("op"), data.get("fields", {})


def send_answer(sock: socket.socket, answer: dict[str, Any]) -> None:
    sock.sendall(json.dumps(answer).encode() + b"\n")
