"""The manager's seqno check around each metadata command (manager.Manager
before_write/after_write): a reading of the metadata area that disagrees is confirmed
with LVM before it fences, and one that LVM confirms fences.

The fakes here are a shard, a lease and a domain that hold a value each: the reads of
the metadata area (lvm_mda.read_head) and of LVM (Manager._lvm_seqno) are replaced by
what the test says they return."""

from __future__ import annotations

from typing import Any

import pytest

from sharedlvm import errors, lvm_mda, manager
from sharedlvm.journal import DomainRecord


class _Lease:
    def __init__(self) -> None:
        self.released = False

    def held_version(self) -> int:
        return 7

    def lockspace_problem(self) -> None:
        return None

    def release(self) -> None:
        self.released = True


class _Domain:
    name = "dom1"
    host_id = 1

    def __init__(self) -> None:
        self.readers = 0

    def read_record(self) -> DomainRecord:
        return DomainRecord(domain_uuid="u", vg_name="dom1", manager_host_id=1, created=0.0,
                            io_timeout=10, manager_generation=3)

    def become_reader(self) -> None:
        self.readers += 1


class _Shard:
    index = 0
    vg_name = "dom1"
    luns = ("/dev/fake",)


def _manager(monkeypatch: pytest.MonkeyPatch, mda: list[int | None],
             lvm: list[int]) -> tuple[manager.Manager, _Domain]:
    """A manager at seqno 10 for the shard; each metadata-area read and each LVM read
    returns the next value of ``mda`` / ``lvm``."""
    domain = _Domain()
    m = manager.Manager(domain, _Lease())  # type: ignore[arg-type]
    m.token, m.generation, m.seqnos = 7, 3, {"dom1": 10}

    def head(pv: str) -> Any:
        value = mda.pop(0)
        return None if value is None else lvm_mda.MdaHead("dom1", value)

    monkeypatch.setattr(lvm_mda, "read_head", head)
    monkeypatch.setattr(manager.Manager, "_lvm_seqno", staticmethod(lambda s: lvm.pop(0)))
    return m, domain


def test_stale_metadata_area_reading_confirmed_by_lvm_does_not_fence(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The area read says 9 (stale: a read that raced LVM's write), LVM says 10.
    m, domain = _manager(monkeypatch, mda=[9], lvm=[10])
    m.before_write(_Shard())  # type: ignore[arg-type]
    assert m.active and domain.readers == 0
    # After the commit: the area says 13 (a torn/odd read), LVM says 11: one commit.
    m2, domain2 = _manager(monkeypatch, mda=[13], lvm=[11])
    m2.after_write(_Shard())  # type: ignore[arg-type]
    assert m2.active and m2.seqnos["dom1"] == 11 and domain2.readers == 0


def test_moved_seqno_confirmed_by_lvm_fences(monkeypatch: pytest.MonkeyPatch) -> None:
    m, domain = _manager(monkeypatch, mda=[11], lvm=[11])  # someone else committed
    with pytest.raises(errors.Fenced, match="seqno 11, this manager's last commit left 10"):
        m.before_write(_Shard())  # type: ignore[arg-type]
    assert not m.active and domain.readers == 1
    m, domain = _manager(monkeypatch, mda=[12], lvm=[12])  # two commits across one
    with pytest.raises(errors.Fenced, match="from seqno 10 to 12"):
        m.after_write(_Shard())  # type: ignore[arg-type]
    assert not m.active and domain.readers == 1


def test_unreadable_metadata_area_asks_lvm(monkeypatch: pytest.MonkeyPatch) -> None:
    m, _ = _manager(monkeypatch, mda=[None], lvm=[10])
    m.before_write(_Shard())  # type: ignore[arg-type]
    assert m.active


def test_a_passed_fencing_check_stands_for_checks_within_check_reuse_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[float] = []
    clock = [100.0]

    class Lease(_Lease):
        version = 7

        def held_version(self) -> int:
            asked.append(clock[0])
            return self.version

    lease = Lease()
    m = manager.Manager(_Domain(), lease)  # type: ignore[arg-type]
    m.token, m.generation = 7, 3
    monkeypatch.setattr(manager, "_boottime", lambda: clock[0])
    m.check()
    clock[0] += manager.CHECK_REUSE / 2
    m.check()  # stands on the first
    assert len(asked) == 1
    clock[0] += 2 * manager.CHECK_REUSE  # a host that slept or was suspended: asked again
    m.check()
    assert len(asked) == 2
    # A lost lease is seen by the first check after the window, and then every check
    # fails: a fence clears the last check.
    lease.version = 8
    clock[0] += 2 * manager.CHECK_REUSE
    with pytest.raises(errors.Fenced):
        m.check()
    with pytest.raises(errors.Fenced):
        m.check()
    # A new term (another token) never stands on the old term's check.
    m.token, m.generation = 8, 3
    m._checked = (7, clock[0])
    m.check()
    assert len(asked) == 4
