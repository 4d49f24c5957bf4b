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
