"""The sink against the real broker and real chDB, on private prefixed topics."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from infra import warehouse as wh
from pipelines.sink import run_sink
from pipelines.sink_tables import TOPIC_TABLES
from schemas import codec
from schemas.ledger import entries_to_batch
from schemas.readings import frame_to_batch

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@pytest.fixture
def prefix(kafka_bootstrap: str) -> Iterator[str]:
    """Private copies of the sink's topics (2 partitions each), deleted afterwards."""
    prefix = f"test-sink-{uuid.uuid4().hex[:8]}."
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    names = [prefix + t for t in TOPIC_TABLES]
    for future in admin.create_topics([NewTopic(n, 2, 1) for n in names]).values():
        future.result(timeout=30)
    yield prefix
    for future in admin.delete_topics(names).values():
        with contextlib.suppress(Exception):  # best effort: a leftover topic only costs disk
            future.result(timeout=30)


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "chdb"
    wh.release_folder(tmp_path / "chdb")


def produce(bootstrap: str, messages: list[tuple[str, int, bytes | None]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for topic, partition, value in messages:
        producer.produce(topic, value=value, partition=partition, key=b"k")
    assert producer.flush(30) == 0


def reading_batch(batch_id: str, ts0: int, kwh0: float) -> bytes:
    frame = pl.DataFrame(
        {
            "circuit_id": ["C1", "C2", "C1", "C2"],
            "meter_id": ["M1", "M2", "M1", "M2"],
            "account_id": ["A1", "A2", "A1", "A2"],
            "ts_ms": [ts0, ts0, ts0 + 60_000, ts0 + 60_000],
            "import_kwh": [kwh0, kwh0 * 2, kwh0 + 0.25, kwh0 * 2 + 1.0],
            "power_w": [1_000.0, 2_000.0, 1_500.0, None],
            "relay": pl.Series([0, 0, 0, 1], dtype=pl.UInt8),
        }
    )
    record = frame_to_batch(
        frame, batch_id=batch_id, collector_id="COL1", mall_id="MALL1", shard=0, seq=1,
        collected_at_ms=ts0 + 61_000, flags=[(3, "slow_response")],
    )  # fmt: skip
    return codec.encode("ReadingBatch", record)


def ledger(entry_id: str, amount: int, balance: int, ts: int) -> bytes:
    return codec.encode(
        "LedgerBatch",
        entries_to_batch([{"entry_id": entry_id, "account_id": "A1", "mall_id": "MALL1", "kind": "charge",
                           "amount_minor": amount, "balance_after_minor": balance, "ts_ms": ts,
                           "source_id": f"interval-{entry_id}", "energy_wh": 250, "rate": "0.85"}], entry_id),
    )  # fmt: skip


class RunningSink:
    def __init__(
        self, bootstrap: str, folder: Path, prefix: str, group: str, close_every: float = 300.0
    ) -> None:
        self.stop = threading.Event()
        self.result: dict[str, Any] = {}

        def target() -> None:
            try:
                self.result["stats"] = run_sink(
                    self.stop, bootstrap, chdb_path=folder, topic_prefix=prefix,
                    group_id=group, max_delay=0.2, close_every=close_every,
                )  # fmt: skip
            except BaseException as exc:  # surfaced by close()
                self.result["error"] = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def close(self) -> Any:
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()
        if "error" in self.result:
            raise self.result["error"]
        return self.result["stats"]


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.3)


def scalar(folder: Path, sql: str) -> Any:
    try:
        return wh.query(sql, path=folder, wait=0)[1][0][0]
    except (wh.WarehouseError, DatabaseError):
        return None  # the sink has not opened (or not yet migrated) the warehouse


def committed_to_end(bootstrap: str, group: str, topics: list[str]) -> bool:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        parts = [TopicPartition(t, p) for t in topics for p in (0, 1)]
        committed = consumer.committed(parts, timeout=10)
        for tp in committed:
            _, high = consumer.get_watermark_offsets(tp, timeout=10)
            if high > 0 and tp.offset != high:
                return False
        return True
    finally:
        consumer.close()


def test_sink_writes_dedups_on_replay_and_serves_queries(
    kafka_bootstrap: str, prefix: str, folder: Path
) -> None:
    readings, ledger_topic = prefix + "mallwatt.readings", prefix + "mallwatt.ledger"
    intervals = prefix + "mallwatt.intervals"
    c1 = [("C1", T0 + k * 60_000, T0 + (k + 1) * 60_000, 250, 250 * (k + 1)) for k in range(3)]
    c2 = [("C2", T0, T0 + 60_000, 1000, 1000), ("C2", T0 + 60_000, T0 + 120_000, 0, 1000),
          ("C2", T0 + 120_000, T0 + 180_000, 1000, 2000)]
    produce(
        kafka_bootstrap,
        [
            (intervals, 0, fact_batch("f1", c1, account="A1", mall="MALL1")),
            (intervals, 1, fact_batch("f2", c2, account="A2", mall="MALL1")),
            (intervals, 1, fact_batch("f1-again", c1[:2], account="A1", mall="MALL1")),  # re-published
            (readings, 0, reading_batch("COL1/0/1", T0, 100.0)),
            (readings, 1, reading_batch("COL1/0/2", T0 + 120_000, 100.5)),
            (ledger_topic, 0, ledger("E1", -21, 979, T0 + 60_000)),
            (ledger_topic, 0, ledger("E2", -22, 957, T0 + 120_000)),
            (ledger_topic, 1, ledger("E1", -21, 979, T0 + 60_000)),  # upstream duplicate
        ],
    )
    topics = [readings, ledger_topic, intervals]

    first = RunningSink(kafka_bootstrap, folder, prefix, group=f"{prefix}g1")
    try:
        wait_until(lambda: committed_to_end(kafka_bootstrap, f"{prefix}g1", topics))
        # A second process reads through the sink's endpoint while it holds the folder.
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(f"""
                from infra import warehouse as wh
                print(wh.query("SELECT count() FROM mallwatt.readings", path={str(folder)!r})[1])
            """)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[(8,)]"
    finally:
        stats = first.close()
    assert stats.rows == {"mallwatt.readings": 8, "mallwatt.ledger": 2, "mallwatt.interval_energy": 8}

    def snapshot() -> dict[str, Any]:
        q = lambda sql: wh.query(sql, path=folder)[1]  # noqa: E731
        return {
            "readings": q("SELECT count() FROM mallwatt.readings FINAL")[0][0],
            "ledger_raw": q("SELECT count() FROM mallwatt.ledger")[0][0],
            "hourly": q("SELECT sum(amount_minor), sum(energy_wh), sum(entries) FROM mallwatt.ledger_hourly"),
            "c15": q("SELECT circuit_id, first_kwh, last_kwh, reads FROM mallwatt.circuit_15m ORDER BY circuit_id"),
            "top": wh.run_named_query(
                "top_consumers",
                {"start": "2026-01-01 00:00:00", "end": "2026-01-02 00:00:00", "mall_id": "", "limit": 10},
                path=folder,
            ).rows(),
        }  # fmt: skip

    before = snapshot()
    assert before["readings"] == 8 and before["ledger_raw"] == 2
    assert before["hourly"] == [(-43, 500, 2)]
    assert before["c15"] == [("C1", 100.0, 100.75, 4), ("C2", 200.0, 202.0, 4)]
    assert before["top"] == [("MALL1", "A2", 2.0, 1, 2000.0), ("MALL1", "A1", 0.75, 1, 1500.0)]
    _, rows = wh.query(
        "SELECT relay, flags, power_w FROM mallwatt.readings WHERE circuit_id = 'C2' "
        "ORDER BY ts LIMIT 2",
        path=folder,
    )
    assert rows == [("CLOSED", [], 2000.0), ("OPEN", ["slow_response"], None)]
    _, marks = wh.query(
        "SELECT topic, partition, max(max_offset), max(max_event_ts) FROM mallwatt.ingest_watermark "
        "GROUP BY topic, partition ORDER BY topic, partition",
        path=folder,
    )
    assert [m[:3] for m in marks] == [
        (intervals, 0, 0), (intervals, 1, 1), (ledger_topic, 0, 1), (ledger_topic, 1, 0), (readings, 0, 0),
        (readings, 1, 0),
    ]  # fmt: skip

    # Replay the whole range with a fresh group: nothing may change.
    second = RunningSink(kafka_bootstrap, folder, prefix, group=f"{prefix}g2")
    try:
        wait_until(lambda: committed_to_end(kafka_bootstrap, f"{prefix}g2", topics))
    finally:
        second.close()
    assert snapshot() == before


def test_undecodable_message_goes_to_dead_letter_and_sink_continues(
    kafka_bootstrap: str, prefix: str, folder: Path
) -> None:
    readings = prefix + "mallwatt.readings"
    deadletter = prefix + "mallwatt.deadletter"
    produce(
        kafka_bootstrap,
        [
            (readings, 0, b"\x01not avro at all"),
            (readings, 0, None),
            (readings, 0, reading_batch("COL1/0/9", T0, 5.0)),
            (deadletter, 1, b"\x09broken dead letter"),
        ],
    )
    sink = RunningSink(kafka_bootstrap, folder, prefix, group=f"{prefix}g")
    try:
        wait_until(lambda: (scalar(folder, "SELECT count() FROM mallwatt.dead_letters") or 0) >= 3)
        wait_until(lambda: scalar(folder, "SELECT count() FROM mallwatt.readings") == 4)
    finally:
        stats = sink.close()
    assert stats.dead_letters == 3
    _, rows = wh.query(
        "SELECT source_topic, source_partition, source_offset, stage, reason "
        "FROM mallwatt.dead_letters FINAL ORDER BY source_topic, source_offset",
        path=folder,
    )
    assert [r[:4] for r in rows] == [
        (deadletter, 1, 0, "sink"),  # stored directly: never loop on the dead-letter topic
        (readings, 0, 0, "sink"),
        (readings, 0, 1, "sink"),
    ]
    assert all(r[4] for r in rows)
    # The dead letters really went through Kafka, decodable with their reason.
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"{prefix}check",
                         "auto.offset.reset": "earliest"})  # fmt: skip
    consumer.assign([TopicPartition(deadletter, p, 0) for p in (0, 1)])
    found = []
    deadline = time.monotonic() + 20
    while len(found) < 2 and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            with contextlib.suppress(codec.DecodeError):  # the broken one we produced
                found.append(codec.decode("DeadLetter", msg.value()))
    consumer.close()
    assert sorted(d["source_offset"] for d in found) == [0, 1]
    assert all(d["source_topic"] == readings and "DecodeError" in d["reason"] for d in found)


def fact_batch(batch_id: str, rows: list[tuple[str, int, int, int, int]], account: str = "A1",
               mall: str = "M1") -> bytes:
    """An IntervalBatch of (circuit, start ms, end ms, Wh, billed total Wh) facts."""
    from schemas.intervals import rows_to_interval_batch

    packed = [(c, f"M-{c}", account, mall, start, end, energy, total, False, "")
              for c, start, end, energy, total in rows]
    return codec.encode("IntervalBatch", rows_to_interval_batch(packed, batch_id))


def test_sink_closes_finished_days_and_folds_late_facts_in(
    kafka_bootstrap: str, prefix: str, folder: Path
) -> None:
    intervals = prefix + "mallwatt.intervals"
    day, hour = 86_400_000, 3_600_000
    # Day 1 (2026-01-01): billed intervals of C1 and C2; then facts of day 2 on both
    # partitions: the intervals watermark has passed day 1, so the sink's timer closes it.
    produce(
        kafka_bootstrap,
        [
            (intervals, 0, fact_batch("p0@1", [("C1", T0 + hour, T0 + 5 * hour, 3250, 3250),
                                               ("C2", T0 + hour, T0 + 5 * hour, 7000, 7000)])),
            (intervals, 0, fact_batch("p0@2", [("C3", T0 + day, T0 + day + hour, 10, 10)])),
            (intervals, 1, fact_batch("p1@1", [("C4", T0 + day, T0 + day + 2 * hour, 10, 10)])),
        ],
    )
    sink = RunningSink(kafka_bootstrap, folder, prefix, group=f"{prefix}g", close_every=0.5)
    energy = (
        "SELECT circuit_id, round(arraySum(kwh), 3) FROM mallwatt.billed_hour_kwh FINAL "
        "WHERE day = '2026-01-01' ORDER BY circuit_id"
    )
    try:
        wait_until(
            lambda: (
                scalar(folder, "SELECT toString(max(through)) FROM mallwatt.billed_hour_kwh_closed")
                == "2026-01-01"
            )
        )
        assert wh.query(energy, path=folder)[1] == [("C1", 3.25), ("C2", 7.0)]
        # Late facts of day 1 (hour 20): the next run recomputes day 1 with them.
        produce(kafka_bootstrap, [(intervals, 1, fact_batch("p1@0", [
            ("C1", T0 + 5 * hour, T0 + 20 * hour, 2000, 5250), ("C2", T0 + 5 * hour, T0 + 20 * hour, 4000, 11000)]))])
        wait_until(lambda: wh.query(energy, path=folder)[1] == [("C1", 5.25), ("C2", 11.0)])
    finally:
        sink.close()
