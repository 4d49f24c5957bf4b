"""The command agent that runs inside each guest, and its wire format.

This file is copied as-is into the guest's initramfs and run there by the machine's
own ``/usr/bin/python3`` (shared read-only over 9p), so it uses the standard library
only and no relative imports. The host side imports :func:`encode_frame` and
:class:`FrameBuffer` from here, so both ends share one definition of the protocol.

Protocol, over one virtio-serial port named :data:`PORT_NAME`: each message is a
4-byte big-endian length followed by that many bytes of UTF-8 JSON (an object).
Requests carry ``id`` and ``op``; the reply carries the same ``id``.

- ``{"op": "ping"}`` -> ``{"ok": true, "uptime": seconds since guest boot}``
- ``{"op": "run", "argv": [...], "timeout": s, "input": base64|null, "env": {}}``
  -> ``{"rc": int, "out": str, "err": str, "timed_out": bool}``. argv is executed
  directly (no shell). stdout/stderr go to temporary files rather than pipes, so a
  daemon that forks (``sanlock daemon``, ``wdmd``) and keeps them open does not make
  the call wait for the daemon's exit.
- ``{"op": "spawn", "argv": [...], "env": {}, "log": path}`` -> ``{"pid": int}``:
  starts a long-lived process (a daemon, a consumer) in a session of its own, with
  stdin from /dev/null and stdout+stderr appended to ``log``, and does not wait for it.
  It is double-forked, so busybox init (pid 1) reaps it when it exits. An argv that
  cannot be executed shows as its exit with 127 and a line in ``log``.
- ``{"op": "poweroff"}`` -> ``{"ok": true}``, then a clean busybox poweroff.

Requests are served one at a time. When the host end is not connected, a read on the
port returns end of file at once; the agent then waits and reads again.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

PORT_NAME = "org.sharedlvm.agent"
_HEADER = struct.Struct(">I")
# Large enough for any command output the bed produces; a larger length means the
# stream is out of sync, and failing beats allocating gigabytes.
MAX_FRAME = 64 * 1024 * 1024

# The guest's environment for commands: init runs with a minimal one.
GUEST_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "PYTHONPATH": "/project",
}
BUSYBOX = "/bb/busybox"


class ProtocolError(Exception):
    """The byte stream does not hold a valid frame."""


def encode_frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


class FrameBuffer:
    """Incremental decoder: feed bytes as they arrive, get whole messages back."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        self._data += chunk
        messages: list[dict[str, Any]] = []
        while len(self._data) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._data)
            if length > MAX_FRAME:
                raise ProtocolError(f"frame length {length} exceeds {MAX_FRAME}")
            if len(self._data) < _HEADER.size + length:
                break
            body = bytes(self._data[_HEADER.size:_HEADER.size + length])
            del self._data[:_HEADER.size + length]
            try:
                message = json.loads(body)
            except ValueError as exc:
                raise ProtocolError(f"invalid JSON frame: {exc}") from exc
            if not isinstance(message, dict):
                raise ProtocolError("frame is not a JSON object")
            messages.append(message)
        return messages

    def clear(self) -> None:
        self._data.clear()


# ---- guest side -----------------------------------------------------------------

def _log(text: str) -> None:
    print(f"vmbed-agent: {text}", file=sys.stderr, flush=True)


def find_port(name: str, timeout: float = 60.0) -> str:
    """The /dev node of the virtio-serial port with this name.

    Without udev there is no /dev/virtio-ports/<name> symlink; the name is in sysfs.
    """
    deadline = time.monotonic() + timeout
    while True:
        base = "/sys/class/virtio-ports"
        for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            try:
                with open(f"{base}/{entry}/name") as f:
                    if f.read().strip() == name and os.path.exists(f"/dev/{entry}"):
                        return f"/dev/{entry}"
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise SystemExit(f"virtio port {name} not found")
        time.sleep(0.1)


def run_command(request: dict[str, Any]) -> dict[str, Any]:
    argv = [str(arg) for arg in request["argv"]]
    timeout = float(request.get("timeout", 60))
    env = dict(GUEST_ENV)
    env.update(request.get("env") or {})
    data = base64.b64decode(request["input"]) if request.get("input") is not None else None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                stdout=out, stderr=err, env=env, cwd="/",
            )
        except OSError as exc:
            return {"rc": 127, "out": "", "err": f"{argv[0]}: {exc.strerror}",
                    "timed_out": False}
        timed_out = False
        try:
            proc.communicate(input=data, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        out.seek(0)
        err.seek(0)
        return {"rc": proc.returncode, "out": out.read().decode(errors="replace"),
                "err": err.read().decode(errors="replace"), "timed_out": timed_out}


def spawn_command(request: dict[str, Any]) -> dict[str, Any]:
    """Double fork, so the process is re-parented to init (which reaps it) and a
    consumer that exits never lingers as the agent's zombie."""
    argv = [str(arg) for arg in request["argv"]]
    env = dict(GUEST_ENV)
    env.update(request.get("env") or {})
    log_path = str(request["log"])
    os.makedirs(os.path.dirname(log_path) or "/", exist_ok=True)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the guest
        try:
            os.close(read_end)
            os.setsid()
            pid = os.fork()
            if pid > 0:
                os.write(write_end, str(pid).encode())
                os._exit(0)
            null = os.open(os.devnull, os.O_RDONLY)
            log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.closerange(3, 65536)
            os.chdir("/")
            os.execvpe(argv[0], argv, env)
        except BaseException as exc:
            os.write(2, f"spawn {argv[0]}: {exc}\n".encode())
        os._exit(127)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(child, 0)
    if not text:
        return {"error": f"spawn {argv[0]}: fork failed"}
    return {"pid": int(text)}


def handle(request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "ping":
        with open("/proc/uptime") as f:
            reply: dict[str, Any] = {"ok": True, "uptime": float(f.read().split()[0])}
    elif op == "run":
        reply = run_command(request)
    elif op == "spawn":
        reply = spawn_command(request)
    elif op == "poweroff":
        reply = {"ok": True}
    else:
        reply = {"error": f"unknown op {op!r}"}
    reply["id"] = request.get("id")
    return reply


def _write_all(fd: int, data: bytes) -> None:
    # virtio_console takes at most 32 KiB per write(): loop over partial writes.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def serve(path: str) -> None:
    fd = os.open(path, os.O_RDWR)
    frames = FrameBuffer()
    _log(f"serving on {path}")
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            # Host end not connected: drop any half message and poll again.
            frames.clear()
            time.sleep(0.2)
            continue
        try:
            requests = frames.feed(chunk)
        except ProtocolError as exc:
            _log(f"protocol error, resetting: {exc}")
            frames.clear()
            continue
        for request in requests:
            try:
                reply = handle(request)
            except Exception as exc:  # the agent must survive any one bad request
                reply = {"id": request.get("id"), "error": f"{type(exc).__name__}: {exc}"}
            _write_all(fd, encode_frame(reply))
            if request.get("op") == "poweroff":
                os.sync()
                subprocess.run([BUSYBOX, "poweroff"], check=False)


def main() -> None:
    serve(find_port(PORT_NAME))


if __name__ == "__main__":
    main()
