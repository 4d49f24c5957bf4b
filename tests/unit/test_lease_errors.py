"""leases: sanlock's errnos become the project's errors (the one place that knows them)."""

from __future__ import annotations

import errno

import pytest

from sharedlvm import errors, leases


class FakeSanlockError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)
        self.errno = code


def test_a_held_or_busy_lease_is_a_refusal_to_retry() -> None:
    for code in (-243, -244, errno.EAGAIN, errno.EBUSY):
        exc = leases._map(FakeSanlockError(code, "x"), "cannot acquire lease V")
        assert type(exc) is errors.LeaseHeld, code
        assert str(exc).startswith("cannot acquire lease V: ") and f"({code})" not in str(exc)


def test_unknown_codes_stay_lease_errors_with_their_number() -> None:
    exc = leases._map(FakeSanlockError(-9999, "odd"), "cannot acquire lease V")
    assert type(exc) is errors.LeaseError and "sanlock error -9999" in str(exc)
    assert leases._errno(FakeSanlockError(errno.EEXIST, "x")) == errno.EEXIST


class _FakeSanlock:
    """sanlock's acquire failing with ``code`` ``fails`` times, then succeeding."""

    SanlockException = FakeSanlockError

    def __init__(self, code: int, fails: int) -> None:
        self.code, self.fails, self.calls = code, fails, 0

    def acquire(self, *args: object, **kwargs: object) -> None:
        self.calls += 1
        if self.calls <= self.fails:
            raise FakeSanlockError(self.code, "x")


def _acquire(monkeypatch: pytest.MonkeyPatch, code: int, fails: int,
             shared: bool) -> _FakeSanlock:
    fake = _FakeSanlock(code, fails)
    monkeypatch.setattr(leases, "sanlock", fake)
    monkeypatch.setattr(leases, "SHARED_RETRY_PAUSE", 0.06)
    leases.acquire("ls", "vol", [leases.Disk("/dev/x", 0)], shared=shared, pid=1234)
    return fake


def test_a_shared_acquire_contended_by_other_shared_acquirers_is_tried_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SANLK_ACQUIRE_SHRETRY: another host held the lease for a moment while taking a
    shared lease (several hosts at once, past sanlock's own retries): the flake of
    test_template_shared_by_linked_clones_on_two_hosts, 'held by host 2 (exclusive)'."""
    assert _acquire(monkeypatch, leases.SHRETRY, 3, shared=True).calls == 4
    with pytest.raises(errors.LeaseHeld, match="briefly held"):
        _acquire(monkeypatch, leases.SHRETRY, leases.SHARED_RETRIES + 1, shared=True)
    # never an exclusive acquire, never another refusal
    with pytest.raises(errors.LeaseHeld):
        _acquire(monkeypatch, leases.SHRETRY, 1, shared=False)
    with pytest.raises(errors.LeaseHeld):
        _acquire(monkeypatch, -243, 1, shared=True)
