"""The idle sweep's read bound (mailbox.PollSettings.idle_budget): the manager's
sweep slows down instead of reading more than the budget, and only then."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from sharedlvm import mailbox
from sharedlvm.mailbox import MailboxServer, PollSettings

KiB = 1024


@pytest.mark.parametrize("hosts, sector, interval", [
    (250, 512, 2.0),  # vdsm's host cap: well inside the budget
    (2000, 512, 2.0),  # 1,024,000 B per 2 s: 500 KiB/s, inside
    (256, 4096, 2.0),  # exactly the budget
    (2000, 4096, 2000 * 4096 / (512 * KiB)),  # 15.6 s
])
def test_sweep_interval(hosts: int, sector: int, interval: float) -> None:
    assert PollSettings().sweep_interval(hosts, sector) == pytest.approx(interval)
    assert hosts * sector / PollSettings().sweep_interval(hosts, sector) <= 512 * KiB


def test_no_budget_keeps_the_sweep() -> None:
    assert PollSettings(idle_budget=0).sweep_interval(2000, 4096) == 2.0


class _Box:
    """Just what MailboxServer.serve reads when nobody asks: headers, no requests."""

    def __init__(self) -> None:
        self.domain = SimpleNamespace(host_id=1)
        self.bytes_read = 0

    def peek_seqs(self, host_ids: list[int], sector_size: int) -> dict[int, int]:
        self.bytes_read += len(host_ids) * sector_size
        return {}

    def read_outboxes(self, host_ids: list[int]) -> list[Any]:
        assert host_ids == [], "nothing to read when nobody asked"
        return []


def test_box_stub_counts_what_a_sweep_reads() -> None:
    box = _Box()
    assert box.peek_seqs([1, 2, 3], 4096) == {} and box.bytes_read == 3 * 4096


@pytest.mark.parametrize("sector", [512, 4096])
def test_idle_reads_stay_within_the_budget(sector: int, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    clock = [1000.0]
    monkeypatch.setattr(mailbox.time, "monotonic", lambda: clock[0])  # type: ignore[attr-defined]
    box = _Box()
    server = MailboxServer(box, PollSettings(), lambda: set(range(1, 2001)),  # type: ignore[arg-type]
                           lambda: sector, lambda msg: None)
    server.answered = {h: 0 for h in range(1, 2001)}
    sweeps: list[tuple[float, int]] = []  # (time, bytes read before it)
    for _ in range(60 * 200):  # 60 s of rounds every 5 ms
        before, read = server.last_sweep, box.bytes_read
        server.serve()
        if server.last_sweep != before:
            sweeps.append((clock[0], read))
        clock[0] += 0.005
    # 512 B: a sweep every 2 s (30 in 60 s); 4 KiB: every 15.6 s (4).
    assert len(sweeps) == (30 if sector == 512 else 4)
    (t0, b0), (t1, b1) = sweeps[0], sweeps[-1]
    assert (b1 - b0) / (t1 - t0) <= 512 * KiB * 1.01
