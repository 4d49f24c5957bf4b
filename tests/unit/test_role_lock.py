"""manager.RoleLock: operations share the role, taking and giving it up wait for them."""

from __future__ import annotations

import threading
import time

from sharedlvm.manager import RoleLock


def test_shared_holders_run_together_and_exclusive_waits_for_them() -> None:
    lock = RoleLock()
    inside = threading.Barrier(3, timeout=5)
    order: list[str] = []

    def op() -> None:
        with lock.shared():
            inside.wait()  # both operations inside at once
            time.sleep(0.1)
            order.append("op")

    threads = [threading.Thread(target=op) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    with lock.exclusive():
        order.append("exclusive")
    for t in threads:
        t.join()
    assert order == ["op", "op", "exclusive"]


def test_a_waiting_exclusive_goes_before_new_shared_holders() -> None:
    lock = RoleLock()
    order: list[str] = []
    first = threading.Event()

    def holder() -> None:
        with lock.shared():
            first.set()
            time.sleep(0.2)

    def taker() -> None:
        with lock.exclusive():
            order.append("exclusive")

    def late() -> None:
        with lock.shared():
            order.append("late")

    h = threading.Thread(target=holder)
    h.start()
    first.wait()
    t = threading.Thread(target=taker)
    t.start()
    time.sleep(0.05)
    la = threading.Thread(target=late)
    la.start()
    for th in (h, t, la):
        th.join(5)
    assert order == ["exclusive", "late"]


def test_held_shared_is_per_thread_and_exclusive_is_reentrant() -> None:
    lock = RoleLock()
    seen: list[bool] = []
    with lock.shared():
        assert lock.held_shared()
        other = threading.Thread(target=lambda: seen.append(lock.held_shared()))
        other.start()
        other.join()
    assert seen == [False] and not lock.held_shared()
    with lock.exclusive(), lock.exclusive(), lock.shared():  # the recovery path
        pass
    with lock.shared():  # free again
        pass
