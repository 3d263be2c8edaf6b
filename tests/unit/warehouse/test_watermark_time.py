"""The ingest watermark ignores event times far ahead of their message's broker time."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import polars as pl
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE

from pipelines.sink import Sink
from pipelines.sink_tables import TOPIC_TABLES, watermark_event_ms
from schemas import codec
from schemas.ledger import entries_to_batch
from schemas.readings import frame_to_batch

NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z
Y2100 = int(datetime(2100, 1, 1, tzinfo=UTC).timestamp() * 1000)
SKEW = 300_000


def readings(ts: list[int]) -> bytes:
    n = len(ts)
    frame = pl.DataFrame({"circuit_id": [f"c{i}" for i in range(n)], "meter_id": [f"m{i}" for i in range(n)],
                          "account_id": ["a"] * n, "ts_ms": ts, "import_kwh": [1.0] * n})
    return codec.encode("ReadingBatch", frame_to_batch(frame, batch_id="b", collector_id="col", mall_id="M1",
                                                       shard=0, seq=1, collected_at_ms=NOW))


def ledger(ts: list[int]) -> bytes:
    entries = [{"entry_id": f"e{i}", "account_id": "a", "mall_id": "M1", "kind": "charge", "amount_minor": -1,
                "balance_after_minor": 0, "ts_ms": t, "source_id": "s"} for i, t in enumerate(ts)]
    return codec.encode("LedgerBatch", entries_to_batch(entries, "b"))


def bounded(topic: str, value: bytes, broker_ms: int | None) -> int | None:
    spec = TOPIC_TABLES[topic]
    chunk, _, event_ms = spec.decode(value)
    return watermark_event_ms(spec, chunk, event_ms, broker_ms, SKEW)


def test_future_rows_do_not_count() -> None:
    assert bounded("mallwatt.readings", readings([NOW, NOW + 60_000, Y2100]), NOW + 60_000) == NOW + 60_000
    assert bounded("mallwatt.readings", readings([Y2100]), NOW) is None
    assert bounded("mallwatt.readings", readings([NOW, NOW + SKEW]), NOW) == NOW + SKEW  # within the skew
    assert bounded("mallwatt.ledger", ledger([NOW, Y2100]), NOW) == NOW
    assert bounded("mallwatt.readings", readings([NOW, Y2100]), None) == Y2100  # no broker time: as decoded


def test_relay_commands_use_their_issue_time() -> None:
    cmd = {"command_id": "x", "action": "TRIP", "reason": "credit", "mall_id": "M1", "gateway_id": "g",
           "meter_id": "m", "account_id": "a", "issued_at_ms": Y2100, "cause_ts_ms": NOW, "requested_by": "t"}
    assert bounded("mallwatt.relay-commands", codec.encode("RelayCommand", cmd), NOW) is None
    assert bounded("mallwatt.relay-commands", codec.encode("RelayCommand", {**cmd, "issued_at_ms": NOW}),
                   NOW) == NOW


class FakeMessage:
    def __init__(self, value: bytes, offset: int, stamp: tuple[int, int]) -> None:
        self._value, self._offset, self._stamp = value, offset, stamp

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "mallwatt.readings"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return self._stamp


def test_sink_buffer_watermark_ignores_the_future_reading() -> None:
    sink = Sink(object(), "127.0.0.1:1", topics=["mallwatt.readings"], stop_event=threading.Event(),
                close_every=0)
    try:
        msgs: list[Any] = [FakeMessage(readings([NOW]), 0, (TIMESTAMP_CREATE_TIME, NOW + 1000)),
                           FakeMessage(readings([NOW + 900_000, Y2100]), 1, (TIMESTAMP_CREATE_TIME, NOW + 900_500))]
        for m in msgs:
            buf = sink._handle(m)
        assert buf is not None and buf.ranges[0] == [0, 1, NOW + 900_000]  # not 2100
        buf = sink._handle(FakeMessage(readings([Y2100]), 2, (TIMESTAMP_NOT_AVAILABLE, 0)))
        assert buf is not None and buf.ranges[0][2] == Y2100  # no broker time: nothing to judge against
    finally:
        sink.consumer.close()


def test_a_reading_from_the_year_3000_is_not_stored_and_the_rest_of_its_batch_is() -> None:
    """One such row made every insert of its batch fail for ever (the day rollups hold 32-bit
    epoch seconds): the sink stopped storing readings of that partition."""
    import polars as pl

    from pipelines.sink_tables import decode_readings
    from schemas import codec, readings

    ts = [1_784_080_800_000, 32_503_680_000_000, 1_784_081_700_000]  # 2026, 3000, 2026
    frame = pl.DataFrame({"circuit_id": ["c1"] * 3, "meter_id": ["m1"] * 3, "account_id": ["a1"] * 3,
                          "ts_ms": ts, "import_kwh": [1.0, 2.0, 3.0]})
    batch = readings.frame_to_batch(frame, batch_id="b1", collector_id="c", mall_id="M01", shard=0, seq=1,
                                    collected_at_ms=ts[0])
    stored, n, max_ts = decode_readings(codec.encode("ReadingBatch", batch))
    assert n == 2 and stored["import_kwh"].to_list() == [1.0, 3.0] and max_ts == ts[2]
