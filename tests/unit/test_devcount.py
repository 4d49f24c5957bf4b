"""The double-writer detector itself: it must see two writers when there are two.

Run on a plain file without any lease, so nothing stops two writers: if the detector
could not catch them here, its silence in the vm tests would prove nothing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from sharedlvm_testbed import devcount


def _counter_file(tmp_path: Path) -> Path:
    path = tmp_path / "volume.img"
    path.write_bytes(b"\0" * devcount.BLOCK * 4)
    return path


def _state(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, text = line.partition(" ")
        if key == "TWO":
            key, _, text = line.partition(" WRITERS ")
            key = "TWO WRITERS"
        out[key] = text
    return out


def test_one_writer_counts_and_the_next_one_continues(tmp_path: Path) -> None:
    dev = _counter_file(tmp_path)
    assert devcount.run(str(dev), 1, tmp_path / "a", 0.0, iterations=50) == 0
    assert _state(tmp_path / "a") == {"start": "0", "count": "50", "stopped": ""}
    assert devcount.run(str(dev), 2, tmp_path / "b", 0.0, iterations=10) == 0
    assert _state(tmp_path / "b")["start"] == "50"
    record = devcount.Device(str(dev)).read()
    assert record is not None and record.count == 60 and record.host_id == 2


def test_two_writers_at_once_are_caught(tmp_path: Path) -> None:
    dev = _counter_file(tmp_path)
    argv = [sys.executable, "-m", "sharedlvm_testbed.devcount", str(dev), "--interval", "0.0005",
            "--iterations", "20000"]
    procs = [subprocess.Popen([*argv, "--host-id", str(i), "--state", str(tmp_path / f"s{i}")],
                              stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    # The first to see the other stops; the other would run on alone: stop it too.
    deadline = time.monotonic() + 120
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    caught = [(rc, err) for rc, err in results if rc == devcount.EXIT_TWO_WRITERS]
    assert caught, f"two unleased writers were not detected: {results}"
    assert "TWO WRITERS" in caught[0][1]
    states = [_state(tmp_path / f"s{i}") for i in (1, 2)]
    assert any("TWO WRITERS" in s for s in states)


def test_a_corrupt_record_is_reported_not_overwritten(tmp_path: Path) -> None:
    dev = _counter_file(tmp_path)
    good = devcount.Record(7, 1, 100, 5).pack()
    dev.write_bytes(good[:20] + b"\xff" + good[21:])
    before = dev.read_bytes()
    assert devcount.run(str(dev), 2, tmp_path / "s", 0.0, iterations=5) == \
        devcount.EXIT_CORRUPT
    assert dev.read_bytes() == before
    assert "CORRUPT" in (tmp_path / "s").read_text()
