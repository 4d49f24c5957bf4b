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
