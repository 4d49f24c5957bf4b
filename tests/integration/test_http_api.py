"""The daemon's HTTP API: token auth, JSON errors, every operation, OpenAPI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bed import Cluster

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token-for-tests-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def api(cluster: Cluster) -> Iterator[tuple[str, Cluster]]:
    """Host 2's daemon restarted with the HTTP API on a loopback port."""
    h2 = cluster.hosts[1]
    port = _free_port()
    token = h2.paths.config_dir / "http-token"
    token.write_text(TOKEN + "\n")
    os.chmod(token, 0o600)
    config = h2.paths.config_dir / "daemon.toml"
    config.write_text(f'[daemon]\nhttp_listen = "127.0.0.1:{port}"\n')
    h2.restart_daemon()
    try:
        yield f"http://127.0.0.1:{port}", cluster
    finally:
        config.unlink()
        h2.restart_daemon()


def call(base: str, method: str, path: str, body: Any = None, token: str = TOKEN,
         raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                        else None)
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            text = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        status = exc.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def fetch(base: str, path: str) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(base + path,
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return resp.status, resp.read(), dict(resp.headers)


def test_http_api(api: tuple[str, Cluster], tmp_path: Path) -> None:
    base, cluster = api
    d = f"/v1/domains/{cluster.name}"
    before = cluster.disk_state()
    # wrong or missing token: 401, nothing done
    for token in ("wrong", ""):
        status, body = call(base, "POST", f"{d}/volumes", {"size": "1G"}, token=token)
        assert status == 401 and body == {"error": "missing or wrong bearer token"}
    # malformed JSON and bad values: 400 with a message, nothing done
    status, body = call(base, "POST", f"{d}/volumes", raw=b"{not json")
    assert status == 400 and body["error"].startswith("malformed JSON")
    status, body = call(base, "POST", f"{d}/volumes", {"size": "ten"})
    assert status == 400 and "invalid size" in body["error"]
    status, body = call(base, "POST", f"{d}/volumes", {"size": 1024**3, "format": "vmdk"})
    assert status == 400 and "invalid format" in body["error"]
    status, body = call(base, "GET", f"{d}/volumes/not-a-uuid")
    assert status == 400
    status, body = call(base, "GET", "/v1/domains/nosuch/volumes")
    assert status == 404
    assert cluster.disk_state() == before
    # create on host 2 (not manager): forwarded through the mailbox
    status, vol = call(base, "POST", f"{d}/volumes",
                       {"size": "1G", "tags": {"vm": "web"}, "request_id": "http-1"})
    assert status == 201 and vol["capacity"] == 1024**3 and vol["tags"] == {"vm": "web"}
    status, again = call(base, "POST", f"{d}/volumes",
                         {"size": "1G", "tags": {"vm": "web"}, "request_id": "http-1"})
    assert status == 201 and again == vol
    status, body = call(base, "POST", f"{d}/volumes", {"size": "1G", "request_id": "http-1"})
    assert status == 400 and "already used for another request" in body["error"]
    status, listed = call(base, "GET", f"{d}/volumes?tag=vm=web")
    assert status == 200 and [v["uuid"] for v in listed] == [vol["uuid"]]
    status, grown = call(base, "POST", f"{d}/volumes/{vol['uuid']}/extend", {"size": "+1G"})
    assert status == 200 and grown["capacity"] == 2 * 1024**3
    with cluster.hosts[1].registered() as pid:
        status, prepared = call(base, "POST", f"{d}/volumes/{vol['uuid']}/prepare",
                                {"pid": pid})
        assert status == 200 and prepared["path"].startswith("/dev/")
        status, body = call(base, "DELETE", f"{d}/volumes/{vol['uuid']}")
        assert status == 409 and "tear it down first" in body["error"]
        assert call(base, "POST", f"{d}/volumes/{vol['uuid']}/teardown")[0] == 200
    status, manager = call(base, "GET", f"{d}/manager")
    assert status == 200 and manager["manager"] == 1 and not manager["this_host"]
    status, hosts = call(base, "GET", f"{d}/hosts")
    assert status == 200 and [h["host_id"] for h in hosts] == [1, 2, 3]
    status, body = call(base, "DELETE", f"{d}/volumes/{vol['uuid']}?wipe=0")
    assert status == 200 and body == {"uuid": vol["uuid"], "deleted": True}

    # An image as the body: uploaded, then downloaded back, the same image
    # (qemu-img compare); bad uploads refused with nothing changed and nothing left
    # in the host's spool directory.
    image = tmp_path / "cloud.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x7e 1M 2M", str(image)],
                   check=True, capture_output=True)
    spool = cluster.hosts[1].paths.state_dir / "spool"
    before = cluster.disk_state()
    up = f"{d}/volumes/upload"
    for path, raw, why in ((f"{up}?file_format=qcow2", b"not an image" * 100, "not an image"),
                           (f"{up}?file=/etc/passwd", image.read_bytes(), "HTTP body"),
                           (f"{up}?colour=red", image.read_bytes(), "unknown query"),
                           (up, image.read_bytes(), "never probed"),
                           (f"{up}?file_format=raw", b"", "Content-Length")):
        status, body = call(base, "POST", path, raw=raw)
        assert status == 400 and why in body["error"], (path, body)
    assert cluster.disk_state() == before and list(spool.iterdir()) == []
    status, vol = call(base, "POST", f"{up}?file_format=qcow2&request_id=http-up",
                       raw=image.read_bytes())
    assert status == 201 and vol["format"] == "qcow2" and vol["capacity"] == 64 * 1024**2
    status, data, headers = fetch(base, f"{d}/volumes/{vol['uuid']}/content")
    assert status == 200 and headers["X-Sharedlvm-Format"] == "qcow2"
    (tmp_path / "back.qcow2").write_bytes(data)
    subprocess.run(["qemu-img", "compare", str(image), str(tmp_path / "back.qcow2")],
                   check=True, capture_output=True)
    assert list(spool.iterdir()) == []

    status, metrics = call(base, "GET", "/metrics")
    assert status == 200 and "sharedlvm_requests_total" in metrics
    status, spec = call(base, "GET", "/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    assert "/v1/domains/{domain}/volumes" in spec["paths"]
    assert "requestBody" in spec["paths"]["/v1/domains/{domain}/volumes/upload"]["post"]


def test_http_token_file_must_be_root_only(cluster: Cluster, tmp_path: Path) -> None:
    from sharedlvm import errors
    from sharedlvm.http_api import read_token

    token = tmp_path / "token"
    token.write_text(TOKEN)
    os.chmod(token, 0o644)
    with pytest.raises(errors.InvalidArgument, match="readable by root only"):
        read_token(token)
    os.chmod(token, 0o600)
    assert read_token(token) == TOKEN


def test_http_errors_keep_their_class_and_the_path_names_the_object(
        api: tuple[str, Cluster]) -> None:
    base, cluster = api
    d = f"/v1/domains/{cluster.name}"
    v1 = cluster.first.cli_json("volume", "create", "--size", "128M")["uuid"]
    v2 = cluster.first.cli_json("volume", "create", "--size", "128M")["uuid"]
    before = cluster.disk_state()
    # a replayed failure is the same error again: NoSpace is 507 both times
    for _ in range(2):
        status, body = call(base, "POST", f"{d}/volumes",
                            {"size": "100T", "request_id": "http-too-big"})
        assert status == 507 and body["kind"] == "NoSpace"
        assert body["fields"]["requested"] >= 100 * 1024**4
    # the path names the volume; a query or body key cannot override it
    status, body = call(base, "DELETE", f"{d}/volumes/{v1}?volume={v2}")
    assert status == 400 and "given by the path" in body["error"]
    status, body = call(base, "POST", f"{d}/volumes/{v1}/extend",
                        {"size": "+1G", "volume": v2})
    assert status == 400 and "given by the path" in body["error"]
    status, body = call(base, "GET", f"{d}/volumes?resumed=1")
    assert status == 400 and "unknown query parameter(s) resumed" in body["error"]
    status, body = call(base, "POST", f"{d}/volumes", {"size": "1G", "tags": ["vm=web"]})
    assert status == 400 and "tags must be an object" in body["error"]
    # a non-ASCII token is a wrong token, not a server error
    request = urllib.request.Request(base + f"{d}/volumes", method="GET",
                                     headers={"Authorization": "Bearer t\u00f6ken"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 401
    assert cluster.disk_state() == before
