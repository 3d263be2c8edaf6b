"""Build and read the column-wise LedgerBatch contract (schemas/ledger_batch.avsc).

The billing core produces ledger entries as a polars frame with LEDGER_COLUMNS; a
LedgerBatch carries such a frame in one message. Consumers that want one record per entry
(statements, tests) use `batch_entries`, which yields LedgerEntry-shaped dicts.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import polars as pl

from schemas.columnar import RowColumns, join_packed_arrays
from schemas.rowpack import pack_runs

#: Columns (and types) of a ledger frame; the same fields as schemas/ledger_entry.avsc.
LEDGER_COLUMNS: dict[str, Any] = {
    "entry_id": pl.String, "account_id": pl.String, "mall_id": pl.String, "kind": pl.String,
    "amount_minor": pl.Int64, "balance_after_minor": pl.Int64, "ts_ms": pl.Int64, "source_id": pl.String,
    "meter_id": pl.String, "circuit_id": pl.String, "interval_start_ms": pl.Int64, "energy_wh": pl.Int64,
    "tou_period": pl.String, "tier": pl.Int32, "rate": pl.String, "estimated": pl.Boolean,
    "debt_change_minor": pl.Int64,  # writer version 2; null: the entry does not move the debt register
}  # fmt: skip
REQUIRED_STRINGS = ("entry_id", "account_id", "mall_id", "kind", "source_id")
OPTIONAL_STRINGS = ("meter_id", "circuit_id", "tou_period", "rate")
INT64_COLUMNS = ("amount_minor", "balance_after_minor", "ts_ms")
#: Optional numbers and their bit in null_mask.
NULL_BITS: dict[str, int] = {"interval_start_ms": 1, "energy_wh": 2, "tier": 4, "debt_change_minor": 8}
NUMPY_TYPES = {"interval_start_ms": "<i8", "energy_wh": "<i8", "tier": "<i4", "debt_change_minor": "<i8"}


def frame_to_ledger_batch(frame: pl.DataFrame, batch_id: str) -> dict[str, Any]:
    """A LedgerBatch record from a frame with LEDGER_COLUMNS (extra columns are ignored)."""
    return ledger_batches(frame, [(batch_id, 0, frame.height)])[0]


def ledger_batches(frame: pl.DataFrame, slices: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """One LedgerBatch record per (batch_id, offset, length) slice of `frame`.

    Every column is converted once for the whole frame and then sliced, because the cost of
    a conversion is mostly per call, and a billing step yields one batch per state bucket."""
    columns: dict[str, Any] = {}
    for name in REQUIRED_STRINGS:
        columns[name] = frame[name].to_list()
    for name in OPTIONAL_STRINGS:
        columns[name] = frame[name].fill_null("").to_list()
    for name in INT64_COLUMNS:
        columns[name] = frame[name].cast(pl.Int64).to_numpy().astype("<i8")
    mask = np.zeros(frame.height, dtype="u1")
    for name, bit in NULL_BITS.items():
        # a frame without debt_change_minor (made before the column existed): null
        column = frame[name] if name in frame.columns else pl.repeat(None, frame.height, dtype=pl.Int64, eager=True)
        mask |= column.is_null().to_numpy().astype("u1") * np.uint8(bit)
        columns[name] = column.fill_null(0).to_numpy().astype(NUMPY_TYPES[name])
    columns["null_mask"] = mask
    columns["estimated"] = frame["estimated"].fill_null(False).cast(pl.UInt8).to_numpy().astype("u1")
    records = []
    for batch_id, start, length in slices:
        record: dict[str, Any] = {"batch_id": batch_id}
        for name, values in columns.items():
            part = values[start:start + length]
            record[name] = part.tobytes() if isinstance(part, np.ndarray) else part
        records.append(record)
    return records


def ledger_batch_to_frame(record: dict[str, Any]) -> pl.DataFrame:
    """The entries of a decoded LedgerBatch as a frame with LEDGER_COLUMNS; raises ValueError
    on ragged columns (a corrupt or hand-made message)."""
    n = len(record["entry_id"])
    columns: dict[str, Any] = {}
    for name in REQUIRED_STRINGS + OPTIONAL_STRINGS:
        columns[name] = record[name]
    for name in INT64_COLUMNS:
        columns[name] = np.frombuffer(record[name], dtype="<i8")
    mask = np.frombuffer(record["null_mask"], dtype="u1")
    for name, dtype in NUMPY_TYPES.items():
        raw = record.get(name) or b""
        if name == "debt_change_minor" and not raw and n:  # a version-1 batch: no debt column
            raw = bytes(8 * n)
            mask = mask | np.uint8(NULL_BITS[name])
        columns[name] = np.frombuffer(raw, dtype=dtype)
    estimated = np.frombuffer(record["estimated"], dtype="u1")
    for name, values in [*columns.items(), ("null_mask", mask), ("estimated", estimated)]:
        if len(values) != n:
            raise ValueError(f"LedgerBatch {record.get('batch_id')}: column {name} has {len(values)} values, "
                             f"expected {n}")
    columns["estimated"] = estimated.astype(bool)
    frame = pl.DataFrame(columns).with_columns(
        *[pl.when(pl.col(c) == "").then(None).otherwise(pl.col(c)).alias(c) for c in OPTIONAL_STRINGS],
        *[pl.when(pl.Series(mask & bit != 0)).then(None).otherwise(pl.col(c)).alias(c)
          for c, bit in NULL_BITS.items()],
    )
    return frame.select(list(LEDGER_COLUMNS)).cast(LEDGER_COLUMNS)


def batch_entries(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One LedgerEntry-shaped dict per entry of a decoded LedgerBatch, in batch order."""
    return ledger_batch_to_frame(record).to_dicts()


def entries_to_batch(entries: list[dict[str, Any]], batch_id: str) -> dict[str, Any]:
    """A LedgerBatch record from LedgerEntry-shaped dicts (missing optional fields are null)."""
    defaults = {"estimated": False}
    rows = [{name: entry.get(name, defaults.get(name)) for name in LEDGER_COLUMNS} for entry in entries]
    return frame_to_ledger_batch(pl.DataFrame(rows, schema=LEDGER_COLUMNS), batch_id)


#: The outbox carries an account's ledger entries as msgpack rows under this pseudo-topic; the
#: forwarder gathers the rows of many state records into one LedgerBatch on LEDGER_TOPIC.
LEDGER_ROWS = "mallwatt.ledger#rows"


def pack_ledger_rows(frame: pl.DataFrame) -> list[tuple[str, bytes]]:
    """(account id, msgpack rows) per run of equal account ids of a ledger frame ordered by
    account: rows in LEDGER_COLUMNS order."""
    return pack_account_rows(frame, LEDGER_COLUMNS)


def pack_account_rows(frame: pl.DataFrame, columns: dict[str, Any]) -> list[tuple[str, bytes]]:
    """(account id, msgpack rows in `columns` order) per run of equal account ids of a frame
    ordered by account. Columns are converted once for the whole frame, because this runs
    for every account a billing step touches (ledger rows, interval facts)."""
    if not frame.height:
        return []
    packed = pack_runs(frame, list(columns))  # column-wise: the same bytes
    if packed is not None:
        return packed
    rows = list(zip(*[frame[name].to_list() for name in columns], strict=True))
    runs = frame["account_id"].rle().struct.unnest()
    out: list[tuple[str, bytes]] = []
    start = 0
    # one Packer for the call: packb makes one (and allocates its 256 kB buffer) per account
    pack = msgpack.Packer(use_bin_type=True).pack  # autoreset: each call returns its own bytes
    for account, length in zip(runs["value"].to_list(), runs["len"].to_list(), strict=True):
        out.append((account, pack(rows[start:start + length])))
        start += length
    return out


def unpack_ledger_rows(value: bytes) -> list[tuple[Any, ...]]:
    """The rows packed by `pack_ledger_rows` (tuples in LEDGER_COLUMNS order). Rows packed
    before a column was added (a changelog record written by an older worker) are shorter:
    the missing trailing columns are null."""
    return _padded(msgpack.unpackb(value, raw=False, use_list=False))  # tuples as they come


def unpack_ledger_values(values: list[bytes]) -> list[tuple[Any, ...]]:
    """The rows of many values packed by `pack_ledger_rows`, in order, as `unpack_ledger_rows`
    gives them (older, shorter rows padded with nulls), unpacked in one call."""
    if not values:
        return []
    return _padded(msgpack.unpackb(join_packed_arrays(values), raw=False, use_list=False))


def _padded(rows: Any) -> list[tuple[Any, ...]]:
    """Unpacked rows, those of an older worker (shorter) padded with nulls to the full width."""
    if all(len(row) == _WIDTH for row in rows):
        return list(rows)
    return [row if len(row) == _WIDTH else (*row, *([None] * (_WIDTH - len(row)))) for row in rows]


_WIDTH = len(LEDGER_COLUMNS)


def ledger_row_columns(rows: list[tuple[Any, ...]]) -> RowColumns:
    """The LedgerBatch columns of ledger rows (LEDGER_COLUMNS order, as `unpack_ledger_rows`
    gives them), without a frame: the same values `ledger_batches` makes of
    `rows_to_frame(rows)`, so the messages are byte for byte the same."""
    n = len(rows)
    columns = list(zip(*rows, strict=True)) if rows else [()] * _WIDTH
    if len(columns) != _WIDTH:
        raise ValueError(f"ledger rows have {len(columns)} columns, expected {_WIDTH}")
    named = dict(zip(LEDGER_COLUMNS, columns, strict=True))
    strings: dict[str, list[Any]] = {}
    packed: dict[str, tuple[bytes, int]] = {}
    for name in REQUIRED_STRINGS:
        strings[name] = list(named[name])
    for name in OPTIONAL_STRINGS:
        values = named[name]
        strings[name] = ["" if v is None else v for v in values] if None in values else list(values)
    for name in INT64_COLUMNS:
        packed[name] = (struct.pack(f"<{n}q", *named[name]), 8)
    mask = np.zeros(n, dtype="u1")
    for name, bit in NULL_BITS.items():
        values = named[name]
        code = "i" if name == "tier" else "q"
        nulls = values.count(None)
        if nulls == n:  # every row null (debt_change_minor of most entries): zeros
            mask |= np.uint8(bit)
            data = bytes(n * struct.calcsize(code))
        elif nulls:
            mask[[i for i, v in enumerate(values) if v is None]] |= np.uint8(bit)
            data = struct.pack(f"<{n}{code}", *[0 if v is None else v for v in values])
        else:
            data = struct.pack(f"<{n}{code}", *values)
        packed[name] = (data, struct.calcsize(code))
    packed["null_mask"] = (mask.tobytes(), 1)
    estimated = named["estimated"]
    packed["estimated"] = (bytes([False if v is None else v for v in estimated] if None in estimated
                                 else estimated), 1)
    return RowColumns("LedgerBatch", n, strings, packed)


def rows_to_frame(rows: list[tuple[Any, ...]]) -> pl.DataFrame:
    """Ledger rows (LEDGER_COLUMNS order) as a ledger frame."""
    return pl.DataFrame(rows, schema=LEDGER_COLUMNS, orient="row")


def row_entries(value: bytes) -> list[dict[str, Any]]:
    """LedgerEntry-shaped dicts of packed rows (tests, tools)."""
    names = list(LEDGER_COLUMNS)
    return [dict(zip(names, row, strict=True)) for row in unpack_ledger_rows(value)]
