"""The column-wise LedgerBatch contract: lossless for every LedgerEntry field, nulls included."""

from __future__ import annotations

import polars as pl
import pytest

from schemas import codec
from schemas.ledger import (
    LEDGER_COLUMNS,
    batch_entries,
    frame_to_ledger_batch,
    ledger_batch_to_frame,
    ledger_batches,
)

ENTRIES = [
    {"entry_id": "A:topup:p1", "account_id": "A", "mall_id": "M01", "kind": "topup", "amount_minor": 5000,
     "balance_after_minor": 5000, "ts_ms": 1_784_044_800_000, "source_id": "p1", "meter_id": None,
     "circuit_id": None, "interval_start_ms": None, "energy_wh": None, "tou_period": None, "tier": None,
     "rate": None, "estimated": False, "debt_change_minor": None},
    {"entry_id": "A:c1:1784045700000", "account_id": "A", "mall_id": "M01", "kind": "charge", "amount_minor": -136,
     "balance_after_minor": 4864, "ts_ms": 1_784_045_700_000, "source_id": "c1@1784045700000", "meter_id": "m1",
     "circuit_id": "c1", "interval_start_ms": 1_784_044_800_000, "energy_wh": 1000, "tou_period": "peak",
     "tier": 1, "rate": "1.36", "estimated": True, "debt_change_minor": None},
    {"entry_id": "B:std:2026-07-15", "account_id": "B", "mall_id": "M01", "kind": "standing_charge",
     "amount_minor": -2**40, "balance_after_minor": -(2**40) + 7, "ts_ms": 1_784_131_200_000, "source_id": "std",
     "meter_id": "m2", "circuit_id": None, "interval_start_ms": None, "energy_wh": 0, "tou_period": None,
     "tier": None, "rate": "0", "estimated": False, "debt_change_minor": None},
    {"entry_id": "B:opening_debt", "account_id": "B", "mall_id": "M01", "kind": "debt_opening",
     "amount_minor": 0, "balance_after_minor": -(2**40) + 7, "ts_ms": 1_784_131_200_001, "source_id": "config",
     "meter_id": None, "circuit_id": None, "interval_start_ms": None, "energy_wh": None, "tou_period": None,
     "tier": None, "rate": None, "estimated": False, "debt_change_minor": 153_900},
    {"entry_id": "B:debtpct:p9", "account_id": "B", "mall_id": "M01", "kind": "debt_recovery",
     "amount_minor": -500, "balance_after_minor": -(2**40) + 6, "ts_ms": 1_784_131_200_002, "source_id": "p9",
     "meter_id": None, "circuit_id": None, "interval_start_ms": None, "energy_wh": None, "tou_period": None,
     "tier": None, "rate": None, "estimated": False, "debt_change_minor": -500},
]  # fmt: skip


def test_round_trip_keeps_every_field_and_null() -> None:
    frame = pl.DataFrame(ENTRIES, schema=LEDGER_COLUMNS)
    wire = codec.encode("LedgerBatch", frame_to_ledger_batch(frame, "p1.b2@mallwatt.readings:3:17"))
    record = codec.decode("LedgerBatch", wire)
    assert record["batch_id"] == "p1.b2@mallwatt.readings:3:17"
    assert ledger_batch_to_frame(record).equals(frame)
    assert batch_entries(record) == ENTRIES
    # every entry is a valid LedgerEntry too (the per-entry contract stays the reference)
    for entry in batch_entries(record):
        assert codec.decode("LedgerEntry", codec.encode("LedgerEntry", entry)) == entry


def test_slices_are_separate_batches_in_order() -> None:
    frame = pl.DataFrame(ENTRIES, schema=LEDGER_COLUMNS)
    first, second = ledger_batches(frame, [("x", 0, 2), ("y", 2, 3)])
    assert [e["entry_id"] for e in batch_entries(first)] == [e["entry_id"] for e in ENTRIES[:2]]
    assert batch_entries(second) == ENTRIES[2:]


def test_ragged_batch_is_refused_with_its_column() -> None:
    record = frame_to_ledger_batch(pl.DataFrame(ENTRIES, schema=LEDGER_COLUMNS), "b")
    record["ts_ms"] = record["ts_ms"][:8]
    with pytest.raises(ValueError, match="LedgerBatch b: column ts_ms has 1 values, expected 5"):
        ledger_batch_to_frame(codec.decode("LedgerBatch", codec.encode("LedgerBatch", record)))


def _v1(name: str, record: dict) -> bytes:
    """A message as a version-1 writer (before debt_change_minor) produced it."""
    import io
    import json

    import fastavro

    old = fastavro.parse_schema(json.loads((codec.HISTORY_DIR / f"{name}.v1.avsc").read_text()))
    buf = io.BytesIO()
    buf.write(b"\x01")
    fastavro.schemaless_writer(buf, old, record)
    return buf.getvalue()


def test_version_1_messages_still_read_with_null_debt() -> None:
    assert codec.WRITER_VERSION == 3
    frame = pl.DataFrame(ENTRIES[:3], schema=LEDGER_COLUMNS)
    record = frame_to_ledger_batch(frame, "old")
    del record["debt_change_minor"]
    decoded = codec.decode("LedgerBatch", _v1("ledger_batch", record))
    assert batch_entries(decoded) == ENTRIES[:3]
    entry = {k: v for k, v in ENTRIES[1].items() if k != "debt_change_minor"}
    assert codec.decode("LedgerEntry", _v1("ledger_entry", entry)) == ENTRIES[1]
    with pytest.raises(codec.DecodeError, match="version 1"):
        codec.decode("IntervalBatch", b"\x01" + b"\x00")
    with pytest.raises(codec.DecodeError, match="unknown writer schema version 4"):
        codec.decode("LedgerBatch", b"\x04" + _v1("ledger_batch", record)[1:])


def test_outbox_rows_packed_before_the_debt_column_read_as_null() -> None:
    import msgpack

    from schemas.ledger import unpack_ledger_rows

    old_row = tuple(ENTRIES[0][c] for c in list(LEDGER_COLUMNS)[:-1])
    rows = unpack_ledger_rows(msgpack.packb([old_row], use_bin_type=True))
    assert rows == [(*old_row, None)]


def test_forwarder_splits_a_batch_above_the_output_limit_and_keeps_the_order() -> None:
    from pipelines.forwarder import bounded_messages

    rows = [f"entry-{i:04d}-" + "x" * (i % 50) for i in range(1000)]

    def encode(part: list[str], start: int) -> bytes:
        return (f"{start}:" + "|".join(part)).encode()

    messages = bounded_messages(rows, 400, encode, limit=5_000)
    assert all(len(m) <= 5_000 for m in messages) and len(messages) > 3
    back = [r for m in messages for r in m.decode().split(":", 1)[1].split("|")]
    assert back == rows
