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
    log.put(journal.RequestRecord("r1", "create", "pending", {"volume": "v"}))
    assert log.find("r1").state == "pending"  # type: ignore[union-attr]
    assert [r.request_id for r in log.pending()] == ["r1"]
    log.put(journal.RequestRecord("r1", "create", "done", {"volume": "v"}, {"uuid": "v"}))
    found = log.find("r1")
    assert found is not None and found.state == "done" and found.result == {"uuid": "v"}
    assert log.pending() == []


def test_request_log_bucket_eviction_keeps_pending(dev: ondisk.BlockFile,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "REQUEST_BUCKETS", 1)  # every id in one bucket
    log = journal.RequestLog(dev)
    log.put(journal.RequestRecord("keep", "create", "pending"))
    for i in range(30):
        log.put(journal.RequestRecord(f"r{i}", "create", "done"))
    assert log.find("keep") is not None  # never evicted while pending
    assert log.find("r29") is not None  # the newest finished ones are kept
    assert log.find("r0") is None  # the oldest finished were reused
    for i in range(journal.BUCKET_SLOTS - 1):
        log.put(journal.RequestRecord(f"p{i}", "create", "pending"))
    with pytest.raises(errors.CorruptRecord, match="full of pending"):
        log.put(journal.RequestRecord("one-too-many", "create", "pending"))
