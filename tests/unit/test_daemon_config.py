from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sharedlvm import errors
from sharedlvm.daemon import DaemonConfig
from sharedlvm.paths import HostPaths


def _write(tmp_path: Path, text: str) -> HostPaths:
    paths = HostPaths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    (paths.config_dir / "daemon.toml").write_text(text)
    return paths


def test_defaults_without_file(tmp_path: Path) -> None:
    assert DaemonConfig.load(HostPaths(tmp_path)) == DaemonConfig()


def test_file_overrides(tmp_path: Path) -> None:
    config = DaemonConfig.load(_write(tmp_path, "[daemon]\nmailbox_poll = 1\n"))
    assert config.mailbox_poll == 1.0 and config.manager_poll == DaemonConfig().manager_poll


@pytest.mark.parametrize("text, message", [
    ("[daemon]\nbogus = 1\n", "unknown setting(s) bogus"),
    ("[daemon]\nmailbox_poll = -1\n", "must be a positive number"),
    ("[daemon]\nmailbox_poll = 'fast'\n", "must be a positive number"),
    ("[daemon\n", "daemon.toml"),
    ("[daemon]\nhttp_insecure = 1\n", "http_insecure must be true or false"),
    ("[daemon]\nhttp_insecure = 'yes'\n", "http_insecure must be true or false"),
    ("[daemon]\nmailbox_poll = true\n", "must be a positive number"),
    ('[daemon]\nhttp_listen = "0.0.0.0:8750"\n', "set http_cert and http_key (TLS), or "
     "http_insecure = true"),
])
def test_bad_file(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message.replace("(", r"\(").replace(
            ")", r"\)")):
        DaemonConfig.load(_write(tmp_path, text))


def test_sample_config_is_the_defaults() -> None:
    sample = Path(__file__).parents[2] / "contrib" / "daemon.toml"
    data = tomllib.loads(sample.read_text())["daemon"]
    assert DaemonConfig(**data) == DaemonConfig()
    assert DaemonConfig().show().startswith("[daemon]\n")


def test_http_insecure_is_a_bool_setting(tmp_path: Path) -> None:
    assert DaemonConfig().http_insecure is False
    config = DaemonConfig.load(_write(tmp_path, '[daemon]\nhttp_listen = "0.0.0.0:8750"\n'
                                                 "http_insecure = true\n"))
    assert config.http_insecure is True and config.http_listen == "0.0.0.0:8750"
    shown = config.show()
    assert "\nhttp_insecure = true" in shown and "\nhttp_listen = \"0.0.0.0:8750\"" in shown
    # What --show-config prints is a daemon.toml that loads to the same values.
    assert DaemonConfig(**tomllib.loads(shown)["daemon"]) == config
    assert "\nhttp_insecure = false" in DaemonConfig().show()


def test_plain_http_on_loopback_or_tls_needs_no_setting(tmp_path: Path) -> None:
    for i, text in enumerate([
            'http_listen = "127.0.0.1:8750"', 'http_listen = "[::1]:8750"',
            'http_listen = "0.0.0.0:8750"\nhttp_cert = "c.pem"\nhttp_key = "k.pem"']):
        config = DaemonConfig.load(_write(tmp_path / str(i), f"[daemon]\n{text}\n"))
        assert config.http_insecure is False and config.http_listen


def test_the_daemon_needs_aiohttp_only_for_http() -> None:
    """Hosts without aiohttp (the qemu-guest bed runs the system Python) run the daemon."""
    import subprocess
    import sys

    code = "import sys, sharedlvm.daemon, sharedlvm.cli; print('aiohttp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
