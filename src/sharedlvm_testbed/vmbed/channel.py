"""Host end of the agent's control channel: a unix socket that qemu bridges to the
guest's virtio-serial port (see :mod:`sharedlvm_testbed.vmbed.agent` for the
protocol)."""

from __future__ import annotations

import itertools
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .agent import FrameBuffer, ProtocolError, encode_frame
from .errors import GuestAgentError


class AgentChannel:
    """One connection to one guest's agent; requests are serialized by a lock.

    Replies carry the request id; a reply to an older request (a ping the guest
    answered late, a command whose wait timed out on this side) is dropped.
    """

    def __init__(self, socket_path: Path, name: str) -> None:
        self.socket_path = socket_path
        self.name = name
        self._sock: socket.socket | None = None
        self._frames = FrameBuffer()
        # A fresh connection (another process adopting the guest) starts at a random
        # id, so a late reply meant for an earlier connection is never taken as ours.
        self._ids = itertools.count(random.randrange(1, 1 << 30))
        self._lock = threading.Lock()

    def connect(self) -> None:
        """Connect (again, after a power off and restart) with an empty buffer."""
        self.close()
        self._frames.clear()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            raise GuestAgentError(f"{self.name}: cannot connect to "
                                  f"{self.socket_path}: {exc}") from exc
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and wait up to timeout seconds for its reply."""
        with self._lock:
            request_id = next(self._ids)
            self._send({**message, "id": request_id})
            reply = self._receive(request_id, time.monotonic() + timeout)
        if "error" in reply:
            raise GuestAgentError(f"{self.name}: agent error: {reply['error']}")
        return reply

    def ping(self, timeout: float) -> dict[str, Any] | None:
        """One ping; None if no answer in time (the agent may not be up yet)."""
        with self._lock:
            request_id = next(self._ids)
            self._send({"op": "ping", "id": request_id})
            try:
                return self._receive(request_id, time.monotonic() + timeout)
            except TimeoutError:
                return None

    def _send(self, message: dict[str, Any]) -> None:
        if self._sock is None:
            raise GuestAgentError(f"{self.name}: not connected")
        try:
            self._sock.sendall(encode_frame(message))
        except OSError as exc:
            raise GuestAgentError(f"{self.name}: control channel closed: {exc}") from exc

    def _receive(self, request_id: int, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no reply to request {request_id}")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise GuestAgentError(f"{self.name}: control channel: {exc}") from exc
            if not chunk:
                raise GuestAgentError(f"{self.name}: control channel closed by qemu")
            try:
                replies = self._frames.feed(chunk)
            except ProtocolError as exc:
                raise GuestAgentError(f"{self.name}: {exc}") from exc
            for reply in replies:
                if reply.get("id") == request_id:
                    return reply
