from __future__ import annotations

from pathlib import Path

import pytest

from sharedlvm import errors, journal, ondisk


@pytest.fixture
def dev(tmp_path: Path) -> ondisk.BlockFile:
    path = tmp_path / "journal"
    with open(path, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    return ondisk.BlockFile(str(path), writable=True)


def test_encode_decode() -> None:
    block = ondisk.encode(b"TESTMAG1", 7, {"a": 1})
    assert len(block) == ondisk.BLOCK_SIZE
    rec = ondisk.decode(block, b"TESTMAG1")
    assert rec is not None and rec.seq == 7 and rec.payload == {"a": 1}
    assert ondisk.decode(block, b"OTHERMAG") is None
    assert ondisk.decode(b"\0" * ondisk.BLOCK_SIZE, b"TESTMAG1") is None


@pytest.mark.parametrize("offset", [8, 20, 60, 100])
def test_any_flipped_byte_is_detected(offset: int) -> None:
    block = bytearray(ondisk.encode(b"TESTMAG1", 7, {"a": "x" * 100}))
    block[offset] ^= 0x01
    with pytest.raises(errors.CorruptRecord):
        ondisk.decode(bytes(block), b"TESTMAG1")


def test_payload_too_large() -> None:
    with pytest.raises(errors.InvalidArgument):
        ondisk.encode(b"TESTMAG1", 1, {"a": "x" * ondisk.BLOCK_SIZE})


def test_unaligned_io_refused(dev: ondisk.BlockFile) -> None:
    with pytest.raises(ValueError):
        dev.write(100, b"x" * 4096)


def test_domain_record_copies(dev: ondisk.BlockFile) -> None:
    rec = journal.DomainRecord("u", "vg", 1, 0.0)
    journal.write_domain_record(dev, rec)
    rec.manager_generation = 5
    journal.write_domain_record(dev, rec)
    assert journal.read_domain_record(dev).manager_generation == 5
    # copy B torn: A still answers
    dev.write(journal.DOMAIN_COPIES[1], b"SLVMDOM1" + b"\xff" * 4088)
    assert journal.read_domain_record(dev).manager_generation == 5
    # both bad: corrupt, not "no domain"
    dev.write(journal.DOMAIN_COPIES[0], b"SLVMDOM1" + b"\xff" * 4088)
    with pytest.raises(errors.CorruptRecord):
        journal.read_domain_record(dev)


def test_no_domain_record(dev: ondisk.BlockFile) -> None:
    with pytest.raises(errors.DomainNotFound):
        journal.read_domain_record(dev)


def test_request_log(dev: ondisk.BlockFile) -> None:
    log = journal.RequestLog(dev)
    assert log.find("r1") is None
    log.put(journal.RequestRecord("r1", "create", "pending", "d1", {"volume": "v"}))
    assert log.find("r1").state == "pending"  # type: ignore[union-attr]
    assert [r.request_id for r in log.pending()] == ["r1"]
    log.put(journal.RequestRecord("r1", "create", "done", "d1", result={"uuid": "v"}))
    found = log.find("r1")
    assert found is not None and found.state == "done" and found.result == {"uuid": "v"}
    assert found.digest == "d1" and found.args == {}  # the answer, not the intent again
    assert log.pending() == []


def _slots_of(dev: ondisk.BlockFile, request_id: str) -> list[tuple[int, int, str]]:
    """(offset, seq, state) of every record of request_id in its bucket."""
    base = journal._bucket_offset(request_id)
    found = []
    for i in range(journal.BUCKET_SLOTS):
        rec = ondisk.decode(dev.read(base + i * ondisk.BLOCK_SIZE, ondisk.BLOCK_SIZE),
                            journal.REQUEST_MAGIC)
        if rec and rec.payload["id"] == request_id:
            found.append((base + i * ondisk.BLOCK_SIZE, rec.seq, rec.payload["state"]))
    return found


def test_a_torn_done_leaves_pending_not_nothing(dev: ondisk.BlockFile) -> None:
    """pending -> done is written to another slot: tearing it leaves the pending
    record, so the request rolls forward again instead of looking never asked."""
    log = journal.RequestLog(dev)
    log.put(journal.RequestRecord("r1", "create", "pending", "d", {"volume": "v"}))
    log.put(journal.RequestRecord("r1", "create", "done", "d", result={"uuid": "v"}))
    records = sorted(_slots_of(dev, "r1"), key=lambda r: r[1])
    assert [state for _, _, state in records] == ["pending", "done"]
    assert records[0][0] != records[1][0]
    dev.write(records[1][0], b"SLVMREQ1" + b"\xff" * 4088)  # the done write, torn
    found = log.find("r1")
    assert found is not None and found.state == "pending" and found.args == {"volume": "v"}


def test_request_ids_are_remembered_for_the_retention(dev: ondisk.BlockFile,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "REQUEST_BUCKETS", 1)  # every id in one bucket
    now = [1000.0]
    log = journal.RequestLog(dev, clock=lambda: now[0])
    log.put(journal.RequestRecord("keep", "create", "pending", time=now[0]))
    for i in range(journal.BUCKET_SLOTS - 1):
        log.put(journal.RequestRecord(f"r{i}", "create", "done", time=now[0]))
    # the bucket is full of answers that may still be asked for again: refused, and
    # refused as a transient error, not by forgetting an id
    with pytest.raises(errors.Busy, match="retry later"):
        log.put(journal.RequestRecord("new", "create", "pending", time=now[0]))
    assert all(log.find(f"r{i}") is not None for i in range(journal.BUCKET_SLOTS - 1))
    now[0] += journal.RETENTION + 1  # past the retention: the oldest answer makes room
    log.put(journal.RequestRecord("new", "create", "pending", time=now[0]))
    assert log.find("new") is not None and log.find("keep") is not None  # pending kept
    assert sum(log.find(f"r{i}") is None for i in range(journal.BUCKET_SLOTS - 1)) == 1
    # a pending record is never evicted, however old
    for i in range(10):
        now[0] += journal.RETENTION + 1
        log.put(journal.RequestRecord(f"later{i}", "create", "done", time=now[0]))
    assert log.find("keep") is not None and log.find("keep").state == "pending"  # type: ignore[union-attr]


def test_an_oversized_record_is_refused_before_anything_is_written(
        dev: ondisk.BlockFile) -> None:
    log = journal.RequestLog(dev)
    with pytest.raises(errors.InvalidArgument, match="record too large"):
        log.put(journal.RequestRecord("big", "create", "pending", "d", {"x": "y" * 5000}))
    assert log.find("big") is None


def test_a_started_request_can_always_record_its_answer(
        dev: ondisk.BlockFile, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the fault harness: a bucket full of young records refused the done
    record of a pending request, and every new manager failed to finish it."""
    monkeypatch.setattr(journal, "REQUEST_BUCKETS", 1)
    log = journal.RequestLog(dev, clock=lambda: 1000.0)
    for i in range(journal.BUCKET_SLOTS - 1):
        log.put(journal.RequestRecord(f"r{i}", "create", "done", time=1000.0))
    log.put(journal.RequestRecord("last", "delete", "pending", args={"volume": "v"},
                                  time=1000.0))
    with pytest.raises(errors.Busy):  # a new request: refused, nothing forgotten
        log.put(journal.RequestRecord("new", "create", "pending", time=1000.0))
    log.put(journal.RequestRecord("last", "delete", "done", result={"uuid": "v"},
                                  time=1000.0))
    found = log.find("last")
    assert found is not None and found.state == "done"
    assert all(log.find(f"r{i}") is not None for i in range(journal.BUCKET_SLOTS - 1))
