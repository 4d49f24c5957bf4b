"""Errors keep their class and fields across the wire; requests are validated once,
at construction, and survive the wire unchanged."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sharedlvm import codec, errors, operations
from sharedlvm import requests as rq
from sharedlvm.model import Allocation, VolumeFormat, VolumeInfo, VolumeState

VOL = "0" * 8 + "-1111-2222-3333-" + "4" * 12


def _over_the_wire(exc: errors.Error) -> errors.Error:
    return errors.from_wire(json.loads(json.dumps(exc.to_wire())))


@pytest.mark.parametrize("exc", [
    errors.NoSpace("dom1", 100 * 1024**4, 3 * 1024**3),
    errors.VolumeHeld(VOL, [2, 3], "shared"),
    errors.VolumeInUse(VOL, [2]),
    errors.NotManager(2, "dom1", 1),
    errors.VolumeNotFound(VOL, "dom1"),
    errors.CommandError(["lvm", "lvs"], 5, "", "WARNING: x\n  Volume group foo not found\n"),
    errors.CommandTimeout(["lvm", "lvs"], 120, "", ""),
    errors.InvalidArgument("size must be larger than 0"),
])
def test_errors_keep_class_fields_and_message(exc: errors.Error) -> None:
    back = _over_the_wire(exc)
    assert type(back) is type(exc)
    assert str(back) == str(exc) and "\n" not in str(back)
    assert back.fields() == json.loads(json.dumps(exc.fields()))


def test_no_space_fields() -> None:
    back = _over_the_wire(errors.NoSpace("dom1", 5 * 1024**4, 1024**3))
    assert isinstance(back, errors.NoSpace)
    assert (back.domain, back.requested, back.free) == ("dom1", 5 * 1024**4, 1024**3)
    assert str(back) == "not enough free space in domain dom1: need 5.0 TiB, free 1.0 GiB"


def test_unknown_or_malformed_errors_become_plain_errors() -> None:
    assert type(errors.from_wire({"kind": "FromTheFuture", "message": "m"})) is errors.Error
    assert type(errors.from_wire("garbage")) is errors.Error
    # a command error without its fields cannot format itself: message only
    back = errors.from_wire({"kind": "CommandError", "message": "m", "fields": {}})
    assert type(back) is errors.Error and str(back) == "m"


def test_every_error_class_has_an_http_status() -> None:
    from sharedlvm.http_api import STATUS, status_for

    for name, cls in errors.error_classes().items():
        assert cls in STATUS, name
    assert status_for(errors.NoSpace("d", 1, 0)) == 507
    assert status_for(errors.VolumeHeld(VOL, [2], "exclusive")) == 409
    assert status_for(errors.DomainNotFound("x")) == 404


def test_errors_live_in_errors_py() -> None:
    """No error class of the product is defined outside errors.py."""
    import importlib
    import pkgutil

    import sharedlvm

    for module_info in pkgutil.iter_modules(sharedlvm.__path__):
        if module_info.name == "__main__":
            continue
        module = importlib.import_module(f"sharedlvm.{module_info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseException):
                assert value.__module__ in ("sharedlvm.errors", "builtins") or \
                    not value.__module__.startswith("sharedlvm"), (module_info.name, value)


# Requests

@pytest.mark.parametrize("make", [
    lambda: rq.VmMigrateOut(4321, "ftp://x"),
    lambda: rq.VmMigrateOut(4321, "unix:/a,b"),
    lambda: rq.VmMigrateOut(4321, "tcp:h:1", timeout=0),
    lambda: rq.VmMigrateOut(1, "tcp:h:1"),
    lambda: rq.VmTakeOver(4321, {}),
    lambda: rq.VmTakeOver(4321, {VOL: 0}),
    lambda: rq.VmTakeOver(4321, {VOL: True}),
    lambda: rq.VmTakeOver(4321, {"not-a-uuid": 3}),
    lambda: rq.VmResume(4321, {VOL: "3"}),
])
def test_bad_migration_requests_are_refused(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.InvalidArgument):
        make()


def test_every_request_round_trips() -> None:
    samples: list[rq.Request] = [
        rq.CreateVolume(size=10 * 1024**3, format=VolumeFormat.QCOW2, tags={"vm": "web 1"},
                        request_id="r-1", domain="dom1"),
        rq.ExtendVolume(VOL, "+2G", request_id="r-2"),
        rq.ExtendVolume(VOL, allocation="+1G"),
        rq.DeleteVolume(VOL, wipe=True),
        rq.PrepareVolume(VOL, pid=1234, shared=True),
        rq.TeardownVolume(VOL),
        rq.ListVolumes(image=VOL, tags={"vm": "x"}),
        rq.GetVolume(VOL), rq.GetDomain("dom1"), rq.RemoveDomain(force=True),
        rq.ExtendDomain(["/dev/sdb", "/dev/sdc"]),
        rq.GetManager(), rq.ReleaseManager(), rq.ListHosts(), rq.GetStatus(), rq.Reload(),
        rq.GetMetrics(),
        rq.SnapshotVolume(VOL, tags={"k": "v"}, request_id="r-3"), rq.TemplateVolume(VOL),
        rq.CloneVolume(VOL, linked=True, image=VOL), rq.GetImage(VOL),
        rq.PrepareImage(VOL, pid=99, shared=True), rq.TeardownImage(VOL),
        rq.CloneVolume(VOL, format=VolumeFormat.RAW, request_id="r-4"),
        rq.UploadVolume("/tmp/cirros.img", file_format=VolumeFormat.QCOW2, tags={"a": "b"}),
        rq.DownloadVolume(VOL, "/tmp/out.qcow2", format=VolumeFormat.QCOW2),
        rq.ReserveVolume(size=2**30, format=VolumeFormat.QCOW2, lv_size=2**28,
                         request_id="r-5:reserve"),
        rq.PublishVolume(VOL, host_id=7, request_id="r-5:publish"),
        rq.MergeVolume(VOL, request_id="r-6"),
        rq.DeleteImage(VOL, wipe=True, request_id="r-7"),
        rq.VmIncoming(4321), rq.VmMigrateOut(4321, "unix:/run/m.sock", timeout=60),
        rq.VmTakeOver(4321, {VOL: 7}), rq.VmResume(4321, {VOL: 7}), rq.VmQuit(4321),
        rq.VmSnapshot(4321, VOL, {"k": "v"}, "r-8"), rq.ListVms(),
        rq.LiveSnapshotVolume(VOL, 3, request_id="r-9"),
        rq.VmMerge(4321, VOL, "r-10"), rq.LiveMergeVolume(VOL, 3),
        rq.LibvirtPrepare(VOL, VOL, "dom1", volume=VOL, lease=f"ls:{VOL}:/dev/sdb:1048576",
                          incoming=True),
        rq.LibvirtStarted(VOL, VOL, pid=4321), rq.LibvirtRelease(VOL, VOL),
    ]
    assert {type(s) for s in samples} == {op.request for op in operations.TABLE}
    for sample in samples:
        wire = json.loads(json.dumps(codec.to_wire(sample)))
        assert operations.decode(sample.op, wire) == sample


def test_create_resolves_its_allocation() -> None:
    assert rq.CreateVolume(size=1).alloc == Allocation.PREALLOCATED
    assert rq.CreateVolume(size=1, format=VolumeFormat.QCOW2).alloc == Allocation.THIN


@pytest.mark.parametrize(("fields", "message"), [
    ({"size": 0}, "invalid size 0: must be 1.."),
    ({"size": 2**80}, "invalid size 1208925819614629174706176"),
    ({"size": True}, "size must be an integer"),
    ({"size": "ten"}, "invalid size 'ten'"),
    ({"size": "10G", "format": "vmdk"}, "invalid format 'vmdk': use raw, qcow2"),
    ({"size": 1, "tags": ["vm=web"]}, "tags must be an object"),
    ({"size": 1, "tags": {"bad key": "v"}}, "invalid tag key 'bad key'"),
    ({"size": 1, "image": "../x"}, "invalid image id"),
    ({"size": 1, "resumed": True}, "unknown field(s) resumed"),
    ({}, "size is required"),
])
def test_bad_create_fields(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=None) as info:
        operations.decode("volume.create", fields)
    assert message in str(info.value)


def test_http_sizes_as_text() -> None:
    req = operations.decode("volume.create", {"size": "10G", "tags": [["vm", "a"]]})
    assert isinstance(req, rq.CreateVolume)
    assert req.size == 10 * 1024**3 and req.tags == {"vm": "a"}


def test_unknown_operation() -> None:
    with pytest.raises(errors.InvalidArgument, match="unknown request 'volume.explode'"):
        operations.decode("volume.explode", {})


def test_results_round_trip() -> None:
    info = VolumeInfo(uuid=VOL, domain="d", image=VOL, parent=None, format=VolumeFormat.RAW,
                      alloc=Allocation.PREALLOCATED, capacity=1, size=1,
                      state=VolumeState.READY, generation=3, tags={"a": "b"}, lease=4)
    wire = json.loads(json.dumps(codec.to_wire(info)))
    assert wire["parent"] is None and wire["format"] == "raw"
    assert codec.from_wire(VolumeInfo, wire) == info


def test_operations_table_is_consistent() -> None:
    names = [op.name for op in operations.TABLE]
    assert len(names) == len(set(names))
    for op in operations.TABLE:
        assert callable(op.handler)
        assert not op.forward or op.manager_only, op.name  # only manager work travels
        assert not op.idempotent or "request_id" in codec.hints(op.request), op.name
        assert not (op.local and op.manager_only), op.name


@pytest.mark.parametrize("data", [
    {"kind": "VolumeHeld", "message": "m", "fields": {"args": 5, "volume": "v"}},
    {"kind": "VolumeHeld", "message": "m", "fields": {"fields": 1, "to_wire": 1}},
    {"kind": "CommandError", "message": "m", "fields": {"argv": [], "rc": 1, "out": "",
                                                        "err": ""}},
    {"kind": "CommandTimeout", "message": "m", "fields": {"argv": ["x"], "timeout": "x",
                                                          "out": "", "err": ""}},
    {"kind": "NoSpace", "message": "m", "fields": {"domain": "d", "requested": "a lot"}},
    {"kind": "NotManager", "message": 7, "fields": []},
    {"kind": ["x"], "message": "m"},
])
def test_from_wire_never_trusts_its_input(data: dict[str, Any]) -> None:
    """The wire form comes from the LUN (mailbox, journal), which any host can write:
    whatever it holds, rebuilding gives an error whose methods and message work."""
    exc = errors.from_wire(data)
    assert isinstance(exc, errors.Error)
    assert "\n" not in str(exc) and callable(exc.to_wire) and callable(exc.fields)
    json.dumps(exc.to_wire())


def test_from_wire_keeps_the_class_family_without_fields() -> None:
    exc = errors.from_wire({"kind": "VolumeNotFound", "message": "volume v is gone"})
    assert type(exc) is errors.NotFound and str(exc) == "volume v is gone"  # still a 404
    back = errors.from_wire(errors.VolumeInUse("v", [2]).to_wire())
    assert isinstance(back, errors.VolumeInUse) and back.hosts == [2]
