"""Build and read the column-wise IntervalBatch contract (schemas/interval_batch.avsc).

The billing step packs each account's interval facts as msgpack rows (INTERVAL_COLUMNS
order) into the outbox of the account's own state record, under the INTERVAL_ROWS
pseudo-topic; the forwarder gathers the rows of many records into one IntervalBatch per
changelog partition and step (the ledger's pattern, schemas/ledger.py).
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import polars as pl

from schemas.columnar import RowColumns, join_packed_arrays
from schemas.ledger import pack_account_rows

#: Columns (and types) of an interval-facts frame, in packed-row order.
INTERVAL_COLUMNS: dict[str, Any] = {
    "circuit_id": pl.String, "meter_id": pl.String, "account_id": pl.String, "mall_id": pl.String,
    "start_ms": pl.Int64, "end_ms": pl.Int64, "energy_wh": pl.Int64, "billed_total_wh": pl.Int64,
    "estimated": pl.Boolean, "flag": pl.String,
}  # fmt: skip
STRINGS = ("circuit_id", "meter_id", "account_id", "mall_id", "flag")
INT64S = ("start_ms", "end_ms", "energy_wh", "billed_total_wh")
#: Reasons of rejected readings that become marker rows (energy 0, start = end).
MARKER_REASONS = ("late", "spike")

#: Pseudo-topic of packed interval rows in the outbox; the forwarder publishes IntervalBatches.
INTERVAL_ROWS = "mallwatt.intervals#rows"


def pack_interval_rows(frame: pl.DataFrame) -> list[tuple[str, bytes]]:
    """(account id, msgpack rows) per run of equal account ids of a frame with
    INTERVAL_COLUMNS ordered by account."""
    return pack_account_rows(frame, INTERVAL_COLUMNS)


def unpack_interval_rows(value: bytes) -> list[tuple[Any, ...]]:
    """The rows packed by `pack_interval_rows` (tuples in INTERVAL_COLUMNS order)."""
    return list(msgpack.unpackb(value, raw=False, use_list=False))


def unpack_interval_values(values: list[bytes]) -> list[tuple[Any, ...]]:
    """The rows of many values packed by `pack_interval_rows`, in order, unpacked in one call."""
    if not values:
        return []
    return list(msgpack.unpackb(join_packed_arrays(values), raw=False, use_list=False))


def interval_row_columns(rows: list[tuple[Any, ...]]) -> RowColumns:
    """The IntervalBatch columns of packed rows (INTERVAL_COLUMNS order): the same values
    as `rows_to_interval_batch`, transposed once for all the batches cut from them."""
    n = len(rows)
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(INTERVAL_COLUMNS)
    if len(columns) != len(INTERVAL_COLUMNS):
        raise ValueError(f"interval rows have {len(columns)} columns, expected {len(INTERVAL_COLUMNS)}")
    strings: dict[str, list[Any]] = {}
    packed: dict[str, tuple[bytes, int]] = {}
    for name, values in zip(INTERVAL_COLUMNS, columns, strict=True):
        if name in STRINGS:
            strings[name] = list(values)
        elif name == "estimated":
            packed[name] = (bytes(values), 1)
        else:
            packed[name] = (struct.pack(f"<{n}q", *values), 8)
    return RowColumns("IntervalBatch", n, strings, packed)


def rows_to_frame(rows: list[tuple[Any, ...]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=INTERVAL_COLUMNS, orient="row")


def rows_to_interval_batch(rows: list[tuple[Any, ...]], batch_id: str) -> dict[str, Any]:
    """An IntervalBatch record from packed rows (INTERVAL_COLUMNS order)."""
    names = list(INTERVAL_COLUMNS)
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(names)
    record: dict[str, Any] = {"batch_id": batch_id}
    for name, values in zip(names, columns, strict=True):
        if name in STRINGS:
            record[name] = list(values)
        elif name == "estimated":
            record[name] = np.asarray(values, dtype="u1").tobytes()
        else:
            record[name] = np.asarray(values, dtype="<i8").tobytes()
    return record


def interval_batch_to_frame(record: dict[str, Any]) -> pl.DataFrame:
    """The rows of a decoded IntervalBatch as a frame with INTERVAL_COLUMNS; ValueError on
    ragged columns (a corrupt or hand-made message)."""
    n = len(record["circuit_id"])
    columns: dict[str, Any] = {}
    for name in INTERVAL_COLUMNS:
        if name in STRINGS:
            columns[name] = record[name]
        elif name == "estimated":
            columns[name] = np.frombuffer(record[name], dtype="u1").astype(bool)
        else:
            columns[name] = np.frombuffer(record[name], dtype="<i8")
        if len(columns[name]) != n:
            raise ValueError(f"IntervalBatch {record.get('batch_id')}: column {name} has {len(columns[name])} "
                             f"values, expected {n}")
    return pl.DataFrame(columns, schema=INTERVAL_COLUMNS)
