"""rpc: a request is capped at 1 MiB; an answer may be as large as the domain's list."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from sharedlvm import errors, rpc


def _serve_once(server: socket.socket, payload: bytes) -> None:
    conn, _ = server.accept()
    with conn:
        conn.recv(65536)
        conn.sendall(payload)


def test_a_large_answer_is_read_whole(tmp_path: Path) -> None:
    path = rpc.socket_path(tmp_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    volumes = [{"uuid": f"{i:036d}", "tags": {"k": "v" * 200}} for i in range(12_000)]
    answer = json.dumps({"ok": True, "result": volumes}).encode() + b"\n"
    assert len(answer) > 2 * rpc.MAX_MESSAGE  # a list of ~10,000 volumes
    t = threading.Thread(target=_serve_once, args=(server, answer))
    t.start()
    try:
        assert rpc.call(tmp_path, "volume.list", timeout=30) == volumes
    finally:
        t.join()
        server.close()


def test_a_request_over_the_limit_is_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        t = threading.Thread(target=lambda: a.sendall(b"x" * (rpc.MAX_MESSAGE + 70000)))
        t.start()
        with pytest.raises(errors.InvalidArgument, match="request too large"):
            rpc.read_request(b)
        t.join()
