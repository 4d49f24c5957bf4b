"""``sharedlvm-sim``: bad input is one line, exit 1 (2 for usage), and makes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sharedlvm_testbed import cli, sim


@pytest.mark.parametrize(("args", "message"), [
    (["up", "--backend", "vm", "--hosts", "20"], "invalid host count 20: must be 1..16"),
    (["up", "--backend", "vm", "--size", "1G"], "a simulated LUN needs at least 4G"),
    (["up", "--backend", "vm", "--luns", "2"], "the vm backend has one LUN"),
    (["up", "--hosts", "0"], "invalid host count 0: must be 1..64"),
    (["exec", "--host", "1", "--", "true"], "no simulation in"),
    (["kill", "--host", "1"], "no simulation in"),
    (["start", "--host", "1"], "no simulation in"),
    (["down"], "no simulation in"),
])
def test_sim_bad_input_changes_nothing(args: list[str], message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "sim"
    assert cli.main([args[0], "--dir", str(directory), *args[1:]]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sharedlvm-sim: ")
    assert message in err and err.count("\n") == 1
    assert not directory.exists()  # nothing made: no LUN file, no guest booted


def test_sim_exec_on_a_loop_bed_refuses_a_host_it_does_not_have(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sim.json").write_text('{"backend": "loop", "luns": [], "hosts": ["/x"]}')
    assert cli.main(["exec", "--dir", str(tmp_path), "--host", "2", "--", "true"]) == 1
    assert "invalid host 2: this simulation has hosts 1..1" in capsys.readouterr().err


def test_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["up", "--dir", "/nowhere", "--sector-size", "1024"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sharedlvm-sim: argument --sector-size: invalid choice")
    assert err.count("\n") == 1


def test_exec_runs_this_checkouts_sharedlvm_as_the_host(tmp_path: Path) -> None:
    (tmp_path / "sim.json").write_text(
        f'{{"backend": "loop", "luns": [], "hosts": ["{tmp_path / "host1"}"]}}')
    argv, env = sim.loop_host_command(tmp_path, 1, ["sharedlvm", "volume", "list"])
    assert argv == [sys.executable, "-m", "sharedlvm", "volume", "list"]
    assert env["SHAREDLVM_ROOT"] == str(tmp_path / "host1")
    argv, _ = sim.loop_host_command(tmp_path, 1, ["lsblk", "-n"])
    assert argv == ["lsblk", "-n"]  # any other command runs as given


def test_python_m_sharedlvm_testbed_is_the_same_command(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "sharedlvm_testbed", "down", "--dir",
                           str(tmp_path / "nothing")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("sharedlvm-sim: no simulation in")
