"""Plain HTTP sends the bearer token in clear text: without TLS the HTTP API listens
only on loopback unless http_insecure allows more (issue 9 item 12). HttpApi's
constructor checks it and does not bind, so no root or network is needed here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sharedlvm import errors
from sharedlvm.http_api import HttpApi, is_loopback

TOKEN = "0123456789abcdef0123"


def _api(listen: str, insecure: bool = False, cert: Path | None = None,
         key: Path | None = None) -> HttpApi:
    def dispatch(request: Any) -> Any:
        raise AssertionError("nothing is served here")

    api = HttpApi(dispatch, lambda: "", listen, TOKEN, cert, key, insecure=insecure)
    api.loop.close()
    return api


@pytest.mark.parametrize("listen", ["0.0.0.0:8750", "[::]:8750", ":8750", "10.1.2.3:8750",
                                    "host3.example.com:8750", "[::ffff:10.0.0.1]:8750"])
def test_plain_http_elsewhere_than_loopback_is_refused(listen: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        _api(listen)
    message = str(info.value)
    assert "\n" not in message and listen in message
    assert "http_insecure = true" in message and "http_cert" in message


@pytest.mark.parametrize("listen", ["0.0.0.0:8750", "[::]:8750", "10.1.2.3:8750"])
def test_http_insecure_allows_it(listen: str) -> None:
    api = _api(listen, insecure=True)
    assert api.ssl is None and api.port == 8750


@pytest.mark.parametrize("listen, host", [
    ("127.0.0.1:8750", "127.0.0.1"), ("127.3.2.1:8750", "127.3.2.1"),
    ("[::1]:8750", "::1"), ("localhost:8750", "localhost"),
    ("[::ffff:127.0.0.1]:8750", "::ffff:127.0.0.1"),
])
def test_loopback_is_fine_without_tls(listen: str, host: str) -> None:
    api = _api(listen)
    assert (api.host, api.port, api.ssl) == (host, 8750, None)


def test_tls_is_fine_anywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    loaded: list[tuple[Path, Path]] = []
    monkeypatch.setattr("ssl.SSLContext.load_cert_chain",
                        lambda self, cert, key: loaded.append((cert, key)))
    api = _api("0.0.0.0:8750", cert=tmp_path / "c.pem", key=tmp_path / "k.pem")
    assert api.ssl is not None and loaded == [(tmp_path / "c.pem", tmp_path / "k.pem")]
    # One of the two is not TLS.
    with pytest.raises(errors.InvalidArgument, match="not a loopback address"):
        _api("0.0.0.0:8750", cert=tmp_path / "c.pem")


def test_listen_must_have_a_port() -> None:
    with pytest.raises(errors.InvalidArgument, match="use ADDRESS:PORT"):
        _api("127.0.0.1")


def test_is_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.255.0.9", "::1", "localhost",
                                 "LOCALHOST", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["", "0.0.0.0", "::", "10.0.0.1", "128.0.0.1",
                                     "localhost.example.com", "::ffff:10.0.0.1"]))
