"""The storage mailbox: requests from any host to the manager, over the LUN only.

The ``mailbox`` LV has one 8 KiB slot per host id (1..2000: 16,000 KiB)::

    (host_id - 1) * 8 KiB          outbox: written only by that host (its request)
    (host_id - 1) * 8 KiB + 4 KiB  inbox:  written only by the manager (the reply)

Each box is one checksummed 4 KiB record (ondisk.py): whole sectors on 512 B and
4 KiB LUNs, O_DIRECT, so no two hosts ever write the same sector and no host reads a
cached copy. A host has at most one request in flight; its sequence number grows by
one per request. The manager reads the outboxes of live hosts (sanlock's host list),
executes each new request and writes the reply with the same sequence number. A torn
or corrupt record fails its checksum and is ignored with a log line, never executed.

Polling is adaptive (:class:`MailboxServer`): outboxes of hosts that asked recently are read every
``mailbox_poll`` (5 ms); every live host is swept every ``mailbox_sweep`` (2 s)
reading one logical sector of its outbox, the header with the sequence number. Idle,
that is 250 hosts x 512 B / 2 s = 62.5 KiB/s on a 512 B-sector LUN (8x that on a
4 KiB-sector LUN, whose smallest read is 4 KiB); the first request of an idle host
waits up to one sweep. The sweep's reads are bounded (``mailbox_idle_kib``, 512 KiB/s):
with more live hosts than fit in it every 2 s (2,048 on 512 B sectors, 256 on 4 KiB)
the sweep slows down instead, so 2,000 live hosts on 4 KiB sectors are swept every
16 s, a cost in first-request latency that grows with the hosts, never in I/O.

A request is ``{"op": NAME, "fields": {...}, "request_id": ID, "host_id": N}`` (the
request type's name and its serialized fields, requests.py), a reply ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error": {"kind", "message", "fields"}}``.
Requests carry a request id; the manager's journal records completed ids
(journal.RequestLog), so a request re-sent after a timeout or a manager failover is
answered, not executed twice.

:class:`MailboxClient` is the asking side (sequence numbers, one request in flight
per host), :class:`MailboxServer` the manager's side (the hot set, the sweep, the
answered sequence numbers).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import errors, ondisk
from .domain import Domain
from .failpoints import failpoint

log = logging.getLogger(__name__)

# The version of a request's payload: a manager refuses (answers with an error)
# a version it does not know, instead of misreading it during a rolling upgrade.
MAILBOX_VERSION = 2

OUT_MAGIC = b"SLVMOUT1"
IN_MAGIC = b"SLVMIN01"
SLOT_SIZE = 2 * ondisk.BLOCK_SIZE
MAX_HOSTS = 2000


@dataclass(frozen=True)
class Message:
    host_id: int
    seq: int
    payload: dict[str, Any]


def outbox_offset(host_id: int) -> int:
    return (host_id - 1) * SLOT_SIZE


def inbox_offset(host_id: int) -> int:
    return outbox_offset(host_id) + ondisk.BLOCK_SIZE


class Mailbox:
    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self.bytes_read = 0  # for metrics and the benchmark

    def _path(self) -> str:
        return self.domain.special_path("mailbox")

    def _read(self, offset: int, size: int) -> bytes:
        with ondisk.BlockFile(self._path()) as dev:
            data = dev.read(offset, size)
        self.bytes_read += size
        return data

    def _write(self, offset: int, block: bytes) -> None:
        with ondisk.BlockFile(self._path(), writable=True) as dev:
            dev.write(offset, block)

    def _decode(self, block: bytes, magic: bytes, host_id: int, what: str) -> Message | None:
        try:
            rec = ondisk.decode(block, magic)
        except errors.CorruptRecord as exc:
            log.warning("ignoring the %s of host %d: %s", what, host_id, exc)
            return None
        return Message(host_id, rec.seq, rec.payload) if rec else None

    # The requesting host

    def last_sent(self) -> int:
        """The highest sequence this host used: its outbox or, if the outbox was lost,
        the manager's last reply, so a new request is never taken for an old one."""
        host = self.domain.host_id
        sent = self._decode(self._read(outbox_offset(host), ondisk.BLOCK_SIZE), OUT_MAGIC,
                            host, "outbox")
        replied = self._decode(self._read(inbox_offset(host), ondisk.BLOCK_SIZE), IN_MAGIC,
                               host, "inbox")
        return max(sent.seq if sent else 0, replied.seq if replied else 0)

    def send(self, seq: int, request: dict[str, Any]) -> None:
        host = self.domain.host_id
        self._write(outbox_offset(host), ondisk.encode(OUT_MAGIC, seq, request))

    def reply_for(self, seq: int) -> dict[str, Any] | None:
        host = self.domain.host_id
        msg = self._decode(self._read(inbox_offset(host), ondisk.BLOCK_SIZE), IN_MAGIC,
                           host, "inbox")
        return msg.payload if msg and msg.seq == seq else None

    # The manager

    def peek_seqs(self, host_ids: list[int], sector_size: int) -> dict[int, int]:
        """The sequence numbers in the outboxes of ``host_ids``, from one logical
        sector each (the record header): the cheap check of an idle sweep. The number
        is only a hint; a request is executed after its whole record verified."""
        found: dict[int, int] = {}
        with ondisk.BlockFile(self._path()) as dev:
            for host in host_ids:
                if not 1 <= host <= MAX_HOSTS:
                    continue
                head = dev.read_sector(outbox_offset(host), sector_size)
                self.bytes_read += sector_size
                seq = ondisk.peek_seq(head, OUT_MAGIC)
                if seq is not None:
                    found[host] = seq
        return found

    def read_outboxes(self, host_ids: list[int]) -> list[Message]:
        """The requests in the outboxes of ``host_ids``, one read per contiguous run of
        host ids (only outbox blocks are read)."""
        found: list[Message] = []
        for host in sorted(h for h in host_ids if 1 <= h <= MAX_HOSTS):
            block = self._read(outbox_offset(host), ondisk.BLOCK_SIZE)
            msg = self._decode(block, OUT_MAGIC, host, "outbox")
            if msg:
                found.append(msg)
        return found

    def answered(self, host_id: int) -> int:
        msg = self._decode(self._read(inbox_offset(host_id), ondisk.BLOCK_SIZE), IN_MAGIC,
                           host_id, "inbox")
        return msg.seq if msg else 0

    def reply(self, host_id: int, seq: int, answer: dict[str, Any]) -> None:
        self._write(inbox_offset(host_id), ondisk.encode(IN_MAGIC, seq, answer))


def new_request_id() -> str:
    return f"mbx-{uuid.uuid4()}"


class MailboxClient:
    """A host that is not manager asks through its outbox and waits in its inbox."""

    def __init__(self, mailbox: Mailbox, poll: float = 0.005) -> None:
        self.mailbox = mailbox
        self.poll = poll
        self._lock = threading.Lock()  # one request in flight per host
        self._next_seq: int | None = None

    def call(self, op: str, fields: dict[str, Any], request_id: str,
             timeout: float) -> dict[str, Any]:
        """Send one request and return the manager's answer (ok/result or error)."""
        domain = self.mailbox.domain
        request = {"v": MAILBOX_VERSION, "op": op, "fields": fields,
                   "request_id": request_id, "host_id": domain.host_id, "time": time.time()}
        with self._lock:
            # Past whatever the boxes hold now, not only past this process's last
            # request: a record written over the outbox (a torn write, a restart with
            # an old state) must not make the manager take new requests for answered.
            seq = max(self._next_seq or 0, self.mailbox.last_sent() + 1)
            self._next_seq = seq + 1
            self.mailbox.send(seq, request)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                answer = self.mailbox.reply_for(seq)
                if answer is not None:
                    return answer
                time.sleep(self.poll)
        raise errors.Timeout(f"no answer from the manager of domain {domain.name} in "
                             f"{timeout:g} s (request {request_id}); repeat it with the "
                             "same --request-id")


# The manager's answer to one request: the reply to write, or None when this host is
# not manager any more (the next manager answers it).
Answer = Callable[[Message], "dict[str, Any] | None"]


@dataclass(frozen=True)
class PollSettings:
    poll: float = 0.005  # hot hosts' outboxes, seconds
    sweep: float = 2.0  # every live host's outbox header, seconds
    hot: float = 30.0  # a host is hot this long after its last request, seconds
    idle_budget: int = 512 * 1024  # what a sweep may read, bytes/s (0: no bound)

    def sweep_interval(self, hosts: int, sector_size: int) -> float:
        """Seconds between sweeps of ``hosts`` live hosts: ``sweep``, or longer where
        one sector per host every ``sweep`` would read more than ``idle_budget``."""
        if self.idle_budget <= 0:
            return self.sweep
        return max(self.sweep, hosts * sector_size / self.idle_budget)


class MailboxServer:
    """The manager's side: reads the outboxes of live hosts, answers new requests.

    Hosts that asked in the last ``hot`` seconds are read every round (the daemon
    calls :meth:`serve` every ``poll``); every live host is swept every ``sweep``
    seconds with one sector read of its outbox header."""

    def __init__(self, mailbox: Mailbox, settings: PollSettings,
                 live_hosts: Callable[[], set[int]], sector_size: Callable[[], int],
                 answer: Answer) -> None:
        self.mailbox = mailbox
        self.settings = settings
        self.live_hosts = live_hosts
        self.sector_size = sector_size
        self.answer = answer
        self.served = 0
        self.reset()

    def reset(self) -> None:
        """Forget what was answered (a new manager term reads it from the inboxes)."""
        self.answered: dict[int, int] = {}  # host id -> last seq answered
        self.hot: dict[int, float] = {}  # host id -> time of its last request
        self.last_sweep = 0.0

    def _answered(self, host: int) -> int:
        if host not in self.answered:
            self.answered[host] = self.mailbox.answered(host)
        return self.answered[host]

    def serve(self) -> None:
        """One round: execute new requests of hot hosts (and of all live hosts when a
        sweep is due) and reply."""
        now = time.monotonic()
        # Its own outbox too: a request this host sent before it took the role waits
        # there for an answer.
        live = self.live_hosts() | {self.mailbox.domain.host_id}
        to_read = {h for h, t in self.hot.items() if now - t < self.settings.hot} & live
        sector = self.sector_size()
        if now - self.last_sweep >= self.settings.sweep_interval(len(live), sector):
            self.last_sweep = now
            for host, seq in self.mailbox.peek_seqs(sorted(live), sector).items():
                if seq > self._answered(host):
                    to_read.add(host)
        for msg in self.mailbox.read_outboxes(sorted(to_read)):
            if msg.seq <= self._answered(msg.host_id):
                continue
            answer = self.answer(msg)
            if answer is None:
                return  # not manager any more: the next manager answers it
            self.hot[msg.host_id] = time.monotonic()
            failpoint("mailbox-before-reply")
            try:
                self.mailbox.reply(msg.host_id, msg.seq, answer)
            except errors.InvalidArgument as exc:  # a reply larger than a box
                self.mailbox.reply(msg.host_id, msg.seq, {"ok": False, "error": errors.Error(
                    f"the answer does not fit in the mailbox: {exc}").to_wire()})
            self.answered[msg.host_id] = msg.seq
            self.served += 1
