"""leases: sanlock's errnos become the project's errors (the one place that knows them)."""

from __future__ import annotations

import errno

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
