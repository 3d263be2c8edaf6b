from __future__ import annotations

import polars as pl
import pytest

from pipelines.sink import _Buffer
from pipelines.sink_tables import READINGS_COLUMNS, TOPIC_TABLES
from schemas import codec
from schemas.ledger import entries_to_batch
from schemas.readings import frame_to_batch

NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def reading_batch(n: int = 3, flags: list[tuple[int, str]] | None = None) -> bytes:
    frame = pl.DataFrame(
        {
            "circuit_id": [f"c{i}" for i in range(n)],
            "meter_id": [f"m{i}" for i in range(n)],
            "account_id": [f"a{i}" for i in range(n)],
            "ts_ms": [NOW + i for i in range(n)],
            "import_kwh": [10.0 + i for i in range(n)],
            "power_w": [None] + [100.0] * (n - 1),
            "relay": pl.Series([0, 1, 2][:n], dtype=pl.UInt8),
        }
    )
    record = frame_to_batch(
        frame, batch_id="b1", collector_id="col", mall_id="M1", shard=0, seq=1,
        collected_at_ms=NOW + 10, flags=flags or [],
    )  # fmt: skip
    return codec.encode("ReadingBatch", record)


def test_readings_decode_to_table_columns() -> None:
    spec = TOPIC_TABLES["mallwatt.readings"]
    frame, rows, max_ts = spec.decode(reading_batch(flags=[(1, "slow_response")]))
    assert rows == 3 and max_ts == NOW + 2
    assert frame.columns == READINGS_COLUMNS
    assert frame["relay"].to_list() == ["CLOSED", "OPEN", "UNKNOWN"]
    assert frame["flags"].to_list() == [[], ["slow_response"], []]
    assert frame["power_w"].to_list() == [None, 100.0, 100.0]
    table = spec.to_arrow([frame, frame])
    assert table.num_rows == 6
    assert "view" not in str(table.schema)  # ClickHouse's Arrow reader needs plain strings


def test_flag_index_outside_batch_is_rejected() -> None:
    with pytest.raises(ValueError):
        TOPIC_TABLES["mallwatt.readings"].decode(reading_batch(flags=[(7, "slow_response")]))


@pytest.mark.parametrize("topic", sorted(TOPIC_TABLES))
def test_garbage_raises_decode_error(topic: str) -> None:
    with pytest.raises((codec.DecodeError, ValueError)):
        TOPIC_TABLES[topic].decode(b"\x01\xff\xfe\x00garbage")
    with pytest.raises(codec.DecodeError):
        TOPIC_TABLES[topic].decode(None)


def test_ledger_rows_keep_optional_fields() -> None:
    spec = TOPIC_TABLES["mallwatt.ledger"]
    value = codec.encode(
        "LedgerBatch",
        entries_to_batch([{"entry_id": "e1", "account_id": "a", "mall_id": "M1", "kind": "charge",
                           "amount_minor": -5, "balance_after_minor": 95, "ts_ms": NOW, "source_id": "i",
                           "energy_wh": 250, "rate": "0.85"}], "b1"),
    )  # fmt: skip
    rows, n, ts = spec.decode(value)
    table = spec.to_arrow([rows])
    assert (n, ts) == (1, NOW)
    assert table.column("energy_wh").to_pylist() == [250]
    assert table.column("meter_id").to_pylist() == [None]


def test_buffer_token_depends_on_offset_ranges_only() -> None:
    a, b = _Buffer(TOPIC_TABLES["mallwatt.ledger"]), _Buffer(TOPIC_TABLES["mallwatt.ledger"])
    for buf in (a, b):
        buf.add(0, 5, None, 0, None)
        buf.add(0, 9, None, 0, NOW)
        buf.add(1, 2, None, 0, None)
    assert a.token() == b.token()
    b.add(1, 3, None, 0, None)
    assert a.token() != b.token()
    assert a.ranges[0] == [5, 9, NOW]
