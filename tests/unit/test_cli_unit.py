from __future__ import annotations

from pathlib import Path

import pytest

from sharedlvm import cli


def test_no_domain_attached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SHAREDLVM_ROOT", str(tmp_path))
    assert cli.main(["volume", "list"]) == 1
    assert capsys.readouterr().err == "sharedlvm: no domain is attached on this host\n"


def test_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["volume", "create", "--size", "zero"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sharedlvm: argument --size: invalid size 'zero'")
    assert err.count("\n") == 1


def test_public_api() -> None:
    import sharedlvm
    assert sorted(sharedlvm.__all__) == ["Domain", "DomainInfo", "Error", "HostPaths",
                                         "VolumeInfo", "create_domain"]


def test_rpc_rebuilds_daemon_errors() -> None:
    from sharedlvm import errors, rpc

    err = rpc.rebuild_error("NotManager", "host 2 is not the manager of domain d")
    assert isinstance(err, errors.NotManager) and str(err) == \
        "host 2 is not the manager of domain d"
    assert type(rpc.rebuild_error("CommandError", "x")) is errors.Error
    assert type(rpc.rebuild_error("NoSuchThing", "x")) is errors.Error
    # every project error answered by the daemon comes back as a one-line message
    for name in dir(errors):
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.Error):
            assert str(rpc.rebuild_error(name, "msg")) == "msg"


@pytest.mark.parametrize(("args", "message"), [
    (["sim", "up", "--backend", "vm", "--hosts", "20"], "invalid host count 20: must be 1..16"),
    (["sim", "up", "--backend", "vm", "--size", "1G"], "a simulated LUN needs at least 4G"),
    (["sim", "up", "--backend", "vm", "--luns", "2"], "the vm backend has one LUN"),
    (["sim", "exec", "--host", "1", "--", "true"], "no simulation in"),
    (["sim", "kill", "--host", "1"], "no simulation in"),
    (["sim", "start", "--host", "1"], "no simulation in"),
])
def test_sim_bad_input_changes_nothing(args: list[str], message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "sim"
    assert cli.main([*args[:2], "--dir", str(directory), *args[2:]]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not directory.exists()  # nothing made: no LUN file, no guest booted


def test_sim_exec_on_a_loop_bed_refuses_a_host_it_does_not_have(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sim.json").write_text('{"backend": "loop", "luns": [], "hosts": ["/x"]}')
    assert cli.main(["sim", "exec", "--dir", str(tmp_path), "--host", "2", "--", "true"]) == 1
    assert "invalid host 2: this simulation has hosts 1..1" in capsys.readouterr().err
