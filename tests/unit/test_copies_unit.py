"""Unit tier of copies.py and qemu_img's convert flags: sizes, derived request ids,
what a request id stands for. The copies themselves are tested with real qemu-img,
LVM and sanlock in tests/integration/test_copies.py."""

from __future__ import annotations

import re

from sharedlvm import copies, qemu_img
from sharedlvm import requests as rq
from sharedlvm.model import Allocation, VolumeFormat
from sharedlvm.volume import request_digest

MiB = 1024**2
GiB = 1024**3
VOL = "8c0a3f3e-5b52-4f4e-9d4b-0a4b7f0c1d2e"
ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def test_derived_ids_are_valid_request_ids() -> None:
    assert copies.derived_id("web-1-disk-0", "reserve") == "web-1-disk-0:reserve"
    long = "x" * 128
    a, b = copies.derived_id(long, "reserve"), copies.derived_id(long, "publish")
    assert ID.match(a) and ID.match(b) and a != b
    assert copies.derived_id(long, "reserve") == a  # the same on every try
    assert copies.derived_id("y" * 128, "reserve") != a


def test_job_directory_is_never_the_request_id() -> None:
    for rid in ("..", ".", "a/b", "x" * 128):
        name = copies._job_dir(rid)
        assert re.fullmatch(r"[0-9a-f]{24}", name), name


def test_target_lv_sizes() -> None:
    cap = 20 * GiB
    full = cap + qemu_img.metadata_overhead(cap)
    assert copies.target_lv_size(VolumeFormat.RAW, Allocation.PREALLOCATED, cap, 5) == cap
    assert copies.target_lv_size(VolumeFormat.QCOW2, Allocation.PREALLOCATED, cap,
                                 100 * MiB) == full
    thin = copies.target_lv_size(VolumeFormat.QCOW2, Allocation.THIN, cap, 300 * MiB)
    assert thin == 1536 * MiB  # 300 MiB + 1 GiB of room, up to the 256 MiB grain
    # A little more data measured on a retry asks for the same size.
    assert copies.target_lv_size(VolumeFormat.QCOW2, Allocation.THIN, cap, 301 * MiB) == thin
    # Never more than preallocated, never less than the data.
    assert copies.target_lv_size(VolumeFormat.QCOW2, Allocation.THIN, cap, cap) == full
    small = copies.target_lv_size(VolumeFormat.QCOW2, Allocation.THIN, 64 * MiB, 60 * MiB)
    assert 60 * MiB <= small <= 64 * MiB + qemu_img.metadata_overhead(64 * MiB)


def test_publish_id_stands_for_the_volume_not_the_host() -> None:
    one = rq.PublishVolume(VOL, host_id=1, request_id="c:publish")
    two = rq.PublishVolume(VOL, host_id=2, request_id="c:publish")
    assert request_digest(one) == request_digest(two)
    other = rq.PublishVolume(VOL.replace("8c", "9c"), host_id=1, request_id="c:publish")
    assert request_digest(one) != request_digest(other)


def test_convert_flags() -> None:
    raw = qemu_img.convert_argv("/s", "qcow2", "/dev/t", "raw", existing=True,
                                target_is_zero=False, out_of_order=True, rate=4 * MiB)
    assert raw[:8] == ["qemu-img", "convert", "-p", "-T", "none", "-t", "none", "-f"]
    assert {"-n", "-W"} <= set(raw) and "--target-is-zero" not in raw
    assert raw[raw.index("-r") + 1] == str(4 * MiB) and raw[-2:] == ["/s", "/dev/t"]
    new = qemu_img.convert_argv("/s", "raw", "/dev/t", "qcow2", existing=False,
                                target_is_zero=False, out_of_order=False)
    assert "-n" not in new and "-W" not in new and "-r" not in new
    assert new[new.index("-o") + 1] == "compat=1.1"
    file = qemu_img.convert_argv("/s", "raw", "/tmp/f", "raw", existing=False,
                                 target_is_zero=False, out_of_order=False,
                                 target_cache="writeback")
    assert file[file.index("-t") + 1] == "writeback"


def test_metadata_room_covers_what_qemu_img_measures() -> None:
    """A preallocated qcow2 LV (capacity + metadata_overhead) holds a fully written
    image: compared with the real qemu-img at sizes up to 64 TiB."""
    import json
    import subprocess

    for capacity in (MiB, 1 * GiB, 100 * GiB, 1024 * GiB, 8 * 1024 * GiB, 64 * 1024 * GiB):
        out = subprocess.run(["qemu-img", "measure", "--output", "json", "--size",
                              str(capacity), "-O", "qcow2", "-o", "compat=1.1"],
                             check=True, capture_output=True, text=True).stdout
        full = json.loads(out)["fully-allocated"]
        assert capacity + qemu_img.metadata_overhead(capacity) >= full, capacity
