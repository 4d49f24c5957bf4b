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

Polling is adaptive (daemon.py): outboxes of hosts that asked recently are read every
``mailbox_poll`` (5 ms); every live host is swept every ``mailbox_sweep`` (2 s)
reading one logical sector of its outbox, the header with the sequence number. Idle,
that is 250 hosts x 512 B / 2 s = 62.5 KiB/s on a 512 B-sector LUN (8x that on a
4 KiB-sector LUN, whose smallest read is 4 KiB); the first request of an idle host
waits up to one sweep.

Requests carry a request id; the manager's journal records completed ids
(journal.RequestLog), so a request re-sent after a timeout or a manager failover is
answered, not executed twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from . import errors, ondisk
from .domain import Domain

log = logging.getLogger(__name__)

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

    def call(self, op: str, args: dict[str, Any], seq: int, timeout: float,
             poll: float = 0.005) -> Any:
        """Send one request and wait for the manager's reply."""
        request = {"op": op, "args": args, "request_id": args.get("request_id"),
                   "host_id": self.domain.host_id, "time": time.time()}
        self.send(seq, request)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.reply_for(seq)
            if answer is not None:
                return answer
            time.sleep(poll)
        raise errors.Error(f"no answer from the manager of domain {self.domain.name} "
                           f"in {timeout:g} s (request {args.get('request_id')}); "
                           "repeat it with the same --request-id")

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
