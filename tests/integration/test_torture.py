"""A short seeded run of the torture harness (bench/torture.py, issue 9): 4 simulated
hosts, a random mix of every operation from every host, random faults (daemons
SIGKILLed and SIGSTOPped, lvm and qemu-img children of the manager killed,
failpoints, torn mailbox and journal records; no host crash, whose 68 s host-dead
time a CI run cannot afford), and zero invariant violations: never two writers,
every acknowledged operation on disk exactly once, nothing half-done after recovery,
no orphan LV, no shared lease slot, vgck clean, a manager within the bound after
every fault. The long runs are ``bench/torture.py --minutes 30``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from torturelib import Config, run_torture

pytestmark = pytest.mark.integration

SEED = 20261123
MINUTES = 0.7  # of operations and faults; with set-up and the final checks ~70 s
# Faults closer than the long runs' 5-12 s: each fault's settle and check take seconds
# of the minute too, and at 5-12 s a minute sometimes held only 3 faults.
FAULT_GAP = (2.0, 5.0)


def test_torture_short_seeded_run(tmp_path: Path) -> None:
    start = time.monotonic()
    result = run_torture(Config(seed=SEED, minutes=MINUTES, crashes=False, fault_gap=FAULT_GAP,
                                workdir=tmp_path / "torture", verbose=False))
    print(result.table)
    assert not result.harness_errors, result.harness_errors[0]
    assert result.ok, result.table
    assert result.acked >= 50, result.table
    assert result.faults >= 4, result.table
    print(f"wall time {time.monotonic() - start:.0f} s")
