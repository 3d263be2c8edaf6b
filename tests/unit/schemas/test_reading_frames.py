"""One frame for a step's ReadingBatch messages equals their frames one by one, concatenated."""

from __future__ import annotations

import random

import numpy as np
import polars as pl
import pytest

from pipelines import batching
from schemas import codec
from schemas.readings import batch_to_frame, batches_to_frame, checked_batch, frame_to_batch


def _record(seed: int, n: int) -> dict:
    rnd = random.Random(seed)

    def maybe(v: float) -> float | None:
        return None if rnd.random() < 0.2 else v

    frame = pl.DataFrame({
        "circuit_id": [f"C{seed}-{i}" for i in range(n)], "meter_id": [f"M{seed}-{i}" for i in range(n)],
        "account_id": [f"A{seed}-{i % 3}" for i in range(n)], "ts_ms": [1_000 * i + seed for i in range(n)],
        "import_kwh": [rnd.random() * 100 for _ in range(n)], "export_kwh": [maybe(0.5) for _ in range(n)],
        "power_w": [maybe(rnd.random() * 3000) for _ in range(n)], "voltage_v": [maybe(230.0) for _ in range(n)],
        "current_a": [maybe(2.0) for _ in range(n)], "power_factor": [maybe(0.9) for _ in range(n)],
        "relay": [rnd.choice([0, 1, 2]) for _ in range(n)]},
        schema_overrides={"ts_ms": pl.Int64, "relay": pl.UInt8})
    record = frame_to_batch(frame, batch_id=f"b{seed}", collector_id="c", mall_id="M", shard=seed % 4, seq=seed,
                            collected_at_ms=0)
    return codec.decode("ReadingBatch", codec.encode("ReadingBatch", record))  # as the worker sees it


def test_one_frame_of_many_batches_equals_the_frames_concatenated() -> None:
    records = [_record(seed, n) for seed, n in enumerate([3, 0, 17, 1, 40])]
    one = batches_to_frame([checked_batch(r) for r in records])
    assert one.equals(pl.concat([batch_to_frame(r) for r in records], how="vertical_relaxed"))
    assert one["power_w"].null_count() > 0 and not one["power_w"].is_nan().any()
    assert batches_to_frame([records[2]]).equals(batch_to_frame(records[2]))


def test_messages_frame_of_checked_batches_equals_that_of_frames() -> None:
    records = [_record(seed, n) for seed, n in enumerate([5, 2, 9])]
    stamps = [1_000, None, 3_000]
    by_record = batching.messages_frame([(i % 2, 10 + i, checked_batch(r), t)
                                         for i, (r, t) in enumerate(zip(records, stamps, strict=True))])
    by_frame = batching.messages_frame([(i % 2, 10 + i, batch_to_frame(r), t)
                                        for i, (r, t) in enumerate(zip(records, stamps, strict=True))])
    assert by_record.equals(by_frame)
    assert by_record["offset"].to_list() == [10] * 5 + [11] * 2 + [12] * 9


@pytest.mark.parametrize("column", ["meter_id", "ts_ms", "power_w", "relay"])
def test_a_ragged_batch_is_refused_naming_its_column(column: str) -> None:
    record = _record(7, 4)
    value = record[column]
    record[column] = value[:-1] if isinstance(value, list) else value[:-np.dtype(
        {"ts_ms": "<i8", "relay": "u1"}.get(column, "<f8")).itemsize]
    with pytest.raises(ValueError, match=f"ReadingBatch b7: column {column} has 3 values, expected 4"):
        checked_batch(record)
    with pytest.raises(ValueError, match=column):
        batch_to_frame(record)


def test_a_torn_wire_column_is_refused() -> None:
    record = _record(8, 4)
    record["ts_ms"] = record["ts_ms"][:-3]
    with pytest.raises(ValueError, match="column ts_ms has 3.625 values, expected 4"):
        checked_batch(record)
