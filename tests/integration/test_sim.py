"""`sharedlvm sim up/down`: the playground makes LUNs and host roots and removes
exactly what it made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``sharedlvm ARGS``, or ``sharedlvm-sim ARGS`` for ``sim ...``."""
    argv = ["-m", "sharedlvm_testbed", *args[1:]] if args[0] == "sim" else \
        ["-m", "sharedlvm", *args]
    return subprocess.run([sys.executable, *argv], capture_output=True,
                          text=True, env=dict(os.environ, **(env or {})), timeout=120)


def _loops_of(path: Path) -> list[str]:
    out = subprocess.run(["losetup", "--associated", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return [line.split(":")[0] for line in out.splitlines() if line]


@pytest.mark.parametrize("sector", ["512", "4096"])
def test_sim_up_down(tmp_path: Path, sector: str) -> None:
    d = tmp_path / "play"
    d.mkdir()
    (d / "mine.txt").write_text("not made by sim")
    up = _cli("sim", "up", "--hosts", "3", "--dir", str(d), "--size", "8G",
              "--sector-size", sector)
    assert up.returncode == 0, up.stderr
    try:
        loops = _loops_of(d / "lun0.img")
        assert len(loops) == 1
        dev = os.path.basename(loops[0])
        assert Path(f"/sys/block/{dev}/queue/logical_block_size").read_text().strip() == sector
        assert os.stat(d / "lun0.img").st_blocks == 0  # sparse
        for i in (1, 2, 3):
            assert f"SHAREDLVM_ROOT={d}/host{i}" in up.stdout
        # The printed commands work as printed.
        env1 = {"SHAREDLVM_ROOT": str(d / "host1")}
        env2 = {"SHAREDLVM_ROOT": str(d / "host2")}
        assert _cli("domain", "create", "--name", "demo", "--lun", loops[0], "--host-id", "1",
                    "--io-timeout", "1", env=env1).returncode == 0
        assert _cli("domain", "attach", "demo", "--lun", loops[0], "--host-id", "2",
                    env=env2).returncode == 0
        vol = _cli("volume", "create", "--size", "1G", "--json", env=env1)
        assert vol.returncode == 0
        again = _cli("sim", "up", "--hosts", "1", "--dir", str(d))
        assert again.returncode == 1 and "already runs" in again.stderr
    finally:
        down = _cli("sim", "down", "--dir", str(d))
    assert down.returncode == 0, down.stderr
    assert sorted(p.name for p in d.iterdir()) == ["mine.txt"]
    out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "BACK-FILE"],
                         capture_output=True, text=True).stdout
    assert str(d) not in out


def test_sim_bad_input(tmp_path: Path) -> None:
    for args, message in ((["--hosts", "0"], "invalid host count"),
                          (["--size", "1G"], "at least 4G"),
                          (["--sector-size", "1024"], "invalid choice")):
        proc = _cli("sim", "up", "--dir", str(tmp_path / "x"), *args)
        assert proc.returncode != 0 and message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "sim.json").exists()
    proc = _cli("sim", "down", "--dir", str(tmp_path / "nothing"))
    assert proc.returncode == 1 and "no simulation" in proc.stderr
