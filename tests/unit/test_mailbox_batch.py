"""A host's concurrent requests through the mailbox (mailbox.MailboxClient): one message
in flight; those asked meanwhile go out together as one batch, each answered with its
own answer; answers the manager could not fit in its reply are asked again by their
request ids; a batch that gets no answer fails every request in it, and nothing else.
The boxes are in memory here (the manager a thread); the real boxes and manager:
tests/integration/test_mailbox.py and the thin-growth tests of test_vms.py."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest

from sharedlvm import errors
from sharedlvm.mailbox import BATCH, MAX_BATCH, MailboxClient, batch_reply


class Boxes:
    """One host's outbox and inbox, and a manager that answers each request with its
    own request id after ``delay`` s (a batch: every item, in one reply)."""

    def __init__(self, delay: float = 0.05, big: int = 0) -> None:
        self.domain = SimpleNamespace(host_id=2, name="dom1")
        self.outbox: tuple[int, dict[str, Any]] | None = None
        self.inbox: tuple[int, dict[str, Any]] | None = None
        self.sent: list[dict[str, Any]] = []
        self.delay, self.big = delay, big
        self.silent = False
        self.executed: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.manager, daemon=True)
        self.thread.start()

    def last_sent(self) -> int:
        return max(self.outbox[0] if self.outbox else 0, self.inbox[0] if self.inbox else 0)

    def send(self, seq: int, request: dict[str, Any]) -> None:
        with self.lock:
            self.outbox = (seq, request)
            self.sent.append(request)

    def reply_for(self, seq: int) -> dict[str, Any] | None:
        with self.lock:
            return self.inbox[1] if self.inbox and self.inbox[0] == seq else None

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        rid = request["request_id"]
        if rid not in self.executed:
            self.executed.append(rid)
        return {"ok": True, "result": {"id": rid, "pad": "x" * self.big}}

    def manager(self) -> None:
        answered = 0
        while not self.stop.is_set():
            with self.lock:
                box = self.outbox
            if box is not None and box[0] > answered and not self.silent:
                time.sleep(self.delay)
                seq, request = box
                if request["op"] == BATCH:
                    reply = batch_reply([self.answer(i) for i in request["fields"]["items"]])
                else:
                    reply = self.answer(request)
                with self.lock:
                    self.inbox = (seq, reply)
                answered = seq
            time.sleep(0.001)


@pytest.fixture
def boxes() -> Any:
    made: list[Boxes] = []

    def make(**kwargs: Any) -> Boxes:
        made.append(Boxes(**kwargs))
        return made[-1]

    yield make
    for b in made:
        b.stop.set()


def ask(client: MailboxClient, n: int, timeout: float = 10.0) -> list[Any]:
    def one(i: int) -> Any:
        try:
            return client.call("volume.extend", {"volume": f"v{i}"}, f"r{i}", timeout)
        except errors.Error as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_requests_asked_while_one_is_in_flight_go_out_as_one_batch(boxes: Any) -> None:
    b = boxes(delay=0.2)
    client = MailboxClient(b, poll=0.001)  # type: ignore[arg-type]
    answers = ask(client, 6)
    assert [a["result"]["id"] for a in answers] == [f"r{i}" for i in range(6)]
    # the first alone, the five that waited for it together (fewer messages than asks)
    assert len(b.sent) < 6 and client.batches >= 1
    batch = next(r for r in b.sent if r["op"] == BATCH)
    assert len(batch["fields"]["items"]) > 1
    assert {i["request_id"] for r in b.sent for i in r["fields"].get("items", [r])} == \
        {f"r{i}" for i in range(6)}


def test_a_batch_holds_at_most_max_batch(boxes: Any) -> None:
    b = boxes(delay=0.3)
    client = MailboxClient(b, poll=0.001)  # type: ignore[arg-type]
    answers = ask(client, 2 * MAX_BATCH + 3)
    assert all(isinstance(a, dict) and a["ok"] for a in answers)
    assert all(len(r["fields"].get("items", [r])) <= MAX_BATCH for r in b.sent)


def test_answers_that_do_not_fit_are_asked_again_by_their_ids(boxes: Any) -> None:
    b = boxes(delay=0.2, big=1500)  # two answers fill a reply
    client = MailboxClient(b, poll=0.001)  # type: ignore[arg-type]
    answers = ask(client, 5)
    assert [a["result"]["id"] for a in answers] == [f"r{i}" for i in range(5)]
    asked = [i["request_id"] for r in b.sent for i in r["fields"].get("items", [r])]
    assert len(asked) > 5  # some asked again
    assert sorted(b.executed) == [f"r{i}" for i in range(5)]  # each executed once here


def test_a_batch_with_no_answer_fails_each_of_its_requests(boxes: Any) -> None:
    b = boxes(delay=0.05)
    b.silent = True
    client = MailboxClient(b, poll=0.001)  # type: ignore[arg-type]
    answers = ask(client, 4, timeout=0.5)
    assert all(isinstance(a, errors.Timeout) for a in answers), answers
    b.silent = False  # the client is usable again
    assert client.call("volume.extend", {}, "later", 5)["result"]["id"] == "later"


def test_batch_reply_keeps_what_fits_in_order() -> None:
    small = {"ok": True, "result": {"id": "a"}}
    big = {"ok": True, "result": {"pad": "x" * 2500}}
    assert batch_reply([small, small])["result"]["items"] == [small, small]
    items = batch_reply([small, big, big, small])["result"]["items"]
    assert items[:2] == [small, big] and items[2:] == [{"again": True}] * 2
