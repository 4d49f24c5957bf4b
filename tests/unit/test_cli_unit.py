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

    assert sorted(sharedlvm.__all__) == [
        "Allocation", "Client", "Deleted", "DomainInfo", "Error", "HostInfo",
        "ManagerStatus", "ServiceStatus", "VolumeFormat", "VolumeInfo", "VolumeState",
        "__version__", "errors"]
    for name in sharedlvm.__all__:
        assert hasattr(sharedlvm, name)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import sharedlvm

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"sharedlvm {sharedlvm.__version__}\n"


def _all_help(parser: object) -> list[str]:
    """The help text of the command and of every subcommand, recursively."""
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                texts += _all_help(sub)
    return texts


def test_help_is_plain_text_from_the_table() -> None:
    from sharedlvm import operations

    texts = _all_help(cli.build_parser())
    joined = "\n".join(texts)
    assert "``" not in joined and ":class:" not in joined  # no RST markup
    assert "writer" not in joined  # one word for the role: manager
    for op in operations.TABLE:
        if op.cli:
            assert op.summary in joined, op.name


def test_every_operation_has_a_command() -> None:
    from sharedlvm import operations

    parser = cli.build_parser()
    for op in operations.TABLE:
        if not op.cli:
            continue
        argv = [*op.cli, "--help"]
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 0, argv


@pytest.mark.parametrize(("argv", "message"), [
    (["volume", "create", "--size", "1G", "--format", "raw", "--alloc", "thin"],
     "raw volumes are always preallocated; thin needs qcow2"),
    (["volume", "create", "--size", "1G", "--image", "nope"], "invalid image id 'nope'"),
    (["volume", "create", "--size", "1G", "--tag", "a=" + "x" * 200], "too long"),
    (["volume", "create", "--size", "1G", "--request-id", "a b"], "invalid request id"),
    (["volume", "extend", "not-a-uuid", "--size", "+1G"], "invalid volume id"),
    (["volume", "extend", "0" * 8 + "-0000-0000-0000-" + "0" * 12, "--size=-1G"],
     "volumes can only grow"),
    (["volume", "delete", "X"], "invalid volume id 'X'"),
])
def test_bad_input_is_refused_before_anything_is_sent(
        argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Validated at the edge: no daemon runs here, yet the error is about the input."""
    monkeypatch.setenv("SHAREDLVM_ROOT", str(tmp_path))
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("sharedlvm: ")
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_every_error_class_has_an_exit_code_and_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from sharedlvm import errors, operations

    op = operations.get("metrics")
    for name, cls in errors.error_classes().items():
        assert cls in cli.EXIT_CODES, name
        exc = errors.from_wire({"kind": name, "message": f"{name} happened\nsecond line",
                                "fields": {}})

        def boom(op: object, request: object, exc: errors.Error = exc) -> None:
            raise exc

        monkeypatch.setattr(cli, "run_operation", boom)
        code = cli.main(list(op.cli))
        err = capsys.readouterr().err
        assert code == cli.EXIT_CODES[cls] and code != 0
        assert err == f"sharedlvm: {name} happened second line\n", name
