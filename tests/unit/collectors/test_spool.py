"""The durable spool and its drainer (fake producer; the real broker is in integration)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from collectors.spool import ID_HEADER, Drainer, Spool, SpoolError, SpoolRecord


def rec(i: int, spool: Spool, partition: int = 0, stream: str = "s") -> SpoolRecord:
    seq = spool.next_seq(stream)
    return SpoolRecord("t", partition, b"k", f"value-{i}".encode() * (i % 5 + 1),
                       f"c/{stream}/{seq}", stream, seq)


def fill(spool: Spool, n: int, **kw) -> list[int]:
    out = [spool.append(rec(i, spool, **kw)) for i in range(n)]
    spool.flush()
    return out


def test_append_read_ack_and_segments_are_deleted(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=200) as sp:
        positions = fill(sp, 30)
        assert positions == list(range(30))
        assert len(sp.segment_files()) > 3
        got = list(sp)
        assert [r.position for r in got] == positions
        assert [r.seq for r in got] == list(range(30))
        assert got[7].value == b"value-7" * 3
        first_files = sp.segment_files()
        sp.ack(20)
        assert sp.depth == 10
        left = sp.segment_files()
        assert first_files[0] not in left and left[-1] == first_files[-1]
        assert [r.position for r in sp] == list(range(20, 30))
        with pytest.raises(ValueError):
            sp.ack(10)


def test_unflushed_records_are_not_readable(tmp_path: Path) -> None:
    with Spool(tmp_path) as sp:
        sp.append(rec(0, sp))
        assert sp.read(0) == []
        sp.flush()
        assert len(sp.read(0)) == 1


def test_restart_resumes_from_acked_position_and_keeps_seq(tmp_path: Path) -> None:
    sp = Spool(tmp_path, segment_bytes=300)
    fill(sp, 12)
    before = {r.position: r for r in sp}
    sp.ack(5)
    sp.close()
    sp = Spool(tmp_path, segment_bytes=300)
    assert (sp.acked, sp.end) == (5, 12)
    assert {r.position: r for r in sp} == {p: r for p, r in before.items() if p >= 5}
    assert sp.next_seq("s") == 12  # counters survive; no seq handed out twice
    sp.close()


def test_seq_recovered_from_records_when_state_is_stale(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    fill(sp, 3)
    sp.ack(1)  # state.json says seq 2 ... then more records, then a crash (no close)
    fill(sp, 4)
    sp._writer.close()
    sp._lock_fh.close()
    # state.json is older than the last records: the spooled records know better
    assert json.loads((tmp_path / "state.json").read_text())["seqs"]["s"] == 2
    sp = Spool(tmp_path)
    assert sp.next_seq("s") == 7
    sp.close()


def test_torn_final_record_is_cut_off(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    fill(sp, 5)
    seg = sp.segment_files()[-1]
    sp._writer.close()
    sp._lock_fh.close()
    size = seg.stat().st_size
    with open(seg, "r+b") as fh:
        fh.truncate(size - 3)  # the last record lost its tail in the crash
    sp = Spool(tmp_path)
    assert sp.torn_bytes > 0
    assert (sp.acked, sp.end) == (0, 4)
    assert [r.value for r in sp][-1] == b"value-3" * 4
    # appends continue cleanly after the cut
    fill(sp, 1)
    assert [r.position for r in sp] == [0, 1, 2, 3, 4]
    sp.close()
    with Spool(tmp_path) as again:
        assert again.end == 5 and again.torn_bytes == 0


def test_corrupt_middle_segment_is_an_error(tmp_path: Path) -> None:
    sp = Spool(tmp_path, segment_bytes=100)
    fill(sp, 10)
    first = sp.segment_files()[0]
    sp.close()
    data = bytearray(first.read_bytes())
    data[10] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(SpoolError):
        Spool(tmp_path)


def test_one_process_per_spool(tmp_path: Path) -> None:
    with Spool(tmp_path), pytest.raises(SpoolError):
        Spool(tmp_path)


# --- drainer --------------------------------------------------------------------------


class FakeMsg:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def offset(self) -> int:
        return self._offset


class FakeErr:
    def __str__(self) -> str:
        return "Local: Message timed out"

    def fatal(self) -> bool:
        return False


class FakeProducer:
    """A broker log per partition; `down` fails deliveries, `lose_ack` keeps the write."""

    def __init__(self, log: dict[int, list[tuple[bytes, str]]]) -> None:
        self.log = log
        self.pending: list = []
        self.down = False
        self.lose_ack = False
        self.produced: list[tuple[int, bytes]] = []
        self.attempts: list[tuple[str, bytes]] = []

    def produce(self, topic, value, key, partition, headers, on_delivery) -> None:
        self.produced.append((partition, value))
        self.attempts.append((dict(headers)[ID_HEADER].decode(), value))
        self.pending.append((partition, value, dict(headers)[ID_HEADER].decode(), on_delivery))

    def poll(self, timeout: float) -> int:
        pending, self.pending = self.pending, []
        for partition, value, ident, cb in pending:
            if self.down and not self.lose_ack:
                cb(FakeErr(), None)
                continue
            part = self.log.setdefault(partition, [])
            part.append((value, ident))
            cb(FakeErr(), None) if self.lose_ack else cb(None, FakeMsg(len(part) - 1))
        return len(pending)

    def flush(self, timeout: float) -> int:
        self.poll(0)
        return 0


def finder(log: dict[int, list[tuple[bytes, str]]]):
    def find(topic: str, partition: int, start: int | None, idents: set[str]) -> set[str]:
        part = log.get(partition, [])
        return {i for _, i in part[(start + 1 if start is not None else 0):] if i in idents}
    return find


async def pump_until(dr: Drainer, cond, seconds: float = 3.0) -> None:
    for _ in range(int(seconds / 0.01)):
        dr.tick()
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_drainer_delivers_in_order_and_acks(tmp_path: Path) -> None:
    async def body() -> None:
        log: dict[int, list] = {}
        sp = Spool(tmp_path)
        for i in range(20):
            sp.append(rec(i, sp, partition=i % 3, stream=f"s{i % 3}"))
        sp.flush()
        prod = FakeProducer(log)
        dr = Drainer(sp, lambda: prod, find_written=finder(log), save_every_s=0)
        await pump_until(dr, lambda: dr.acked == 20)
        for p in range(3):
            seqs = [int(i.rsplit("/", 1)[1]) for _, i in log[p]]
            assert seqs == sorted(seqs) == list(range(len(seqs)))
        assert sp.acked == 20 and dr.depth == 0
        assert json.loads((tmp_path / "state.json").read_text())["acked"] == 20
        sp.close()
    asyncio.run(body())


def test_outage_resends_same_bytes_and_found_writes_are_not_duplicated(tmp_path: Path) -> None:
    async def body() -> None:
        log: dict[int, list] = {}
        sp = Spool(tmp_path)
        prod = FakeProducer(log)
        dr = Drainer(sp, lambda: prod, find_written=finder(log), retry_min_s=0.01,
                     retry_max_s=0.02, save_every_s=0)
        fill(sp, 3)
        await pump_until(dr, lambda: dr.acked == 3)
        prod.down = True
        fill(sp, 4)
        await pump_until(dr, lambda: dr.failures >= 2)
        assert dr.acked == 3 and not dr.healthy
        # the broker comes back but the confirmation of the next write is lost
        prod.down, prod.lose_ack = False, True
        await pump_until(dr, lambda: dr.failures >= 3)
        prod.lose_ack = False
        await pump_until(dr, lambda: dr.acked == 7)
        assert dr.found_written == 1 and dr.healthy
        # every seq exactly once, in order
        assert [i for _, i in log[0]] == [f"c/s/{n}" for n in range(7)]
        # every attempt of a record carried the bytes of its first attempt
        attempts: dict[str, set[bytes]] = {}
        for ident, value in prod.attempts:
            attempts.setdefault(ident, set()).add(value)
        assert all(len(v) == 1 for v in attempts.values())
        assert len(prod.attempts) > 7  # there were re-sends
        sp.close()
    asyncio.run(body())


def test_restart_skips_records_a_crashed_run_already_sent(tmp_path: Path) -> None:
    async def body() -> None:
        log: dict[int, list] = {}
        sp = Spool(tmp_path)
        prod = FakeProducer(log)
        dr = Drainer(sp, lambda: prod, find_written=finder(log), save_every_s=0)
        fill(sp, 2)
        await pump_until(dr, lambda: dr.acked == 2)  # saved
        dr.save_every_s = 3600
        fill(sp, 3)
        await pump_until(dr, lambda: dr.acked == 5)  # delivered, but not saved: crash
        assert json.loads((tmp_path / "state.json").read_text())["acked"] == 2
        sp._writer.close()
        sp._lock_fh.close()
        sp = Spool(tmp_path)
        prod2 = FakeProducer(log)
        dr = Drainer(sp, lambda: prod2, find_written=finder(log), save_every_s=0)
        fill(sp, 1)
        await pump_until(dr, lambda: dr.acked == 6)
        assert prod2.produced == [(0, b"value-0")]  # only the new record went out
        assert [i for _, i in log[0]] == [f"c/s/{n}" for n in range(6)]
        sp.close()
    asyncio.run(body())
