"""msgpack rows of a frame, per run of equal account ids, encoded column-wise with numpy.

Why: the billing step packs every touched account's ledger and interval rows into the outbox
of its state record. Converting each column to Python objects and packing row by row made
27 objects per account and one packer call per account; here each column is encoded once
for the whole frame, arrow joins the encodings row by row, and the values are cut per
account from one buffer.

The bytes are exactly `msgpack.Packer(use_bin_type=True).pack(rows)` of each account's rows
(lists of the column values, as `pack_account_rows` in schemas.ledger builds them), for the
column types the ledger and interval rows have (strings, integers, booleans, nulls);
`pack_runs` returns None for any other type, and the caller packs row by row.
tests/unit/schemas/test_rowpack.py compares both on random and edge values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

#: Rows per pass: bounds the buffers of one pass (an arrow binary array holds < 2 GB).
CHUNK_ROWS = 65_536

_INTS = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32)


def pack_runs(frame: pl.DataFrame, columns: list[str], key: str = "account_id") -> list[tuple[str, bytes]] | None:
    """(key value, msgpack array of its rows) per run of equal `key` values of `frame`, each
    row an array of `columns` in order; None when a column's type is not encoded here."""
    series = [frame[name] for name in columns]
    if not all(s.dtype in _INTS or s.dtype == pl.String or s.dtype == pl.Boolean or s.dtype == pl.Null
               for s in series):
        return None
    runs = frame[key].rle().struct.unnest()
    keys = runs["value"].to_list()
    lengths = runs["len"].to_numpy().astype(np.int64)
    ends = np.cumsum(lengths)
    out: list[tuple[str, bytes]] = []
    first_run = row = 0
    while first_run < len(keys):  # whole runs per chunk, at least one
        last_run = max(first_run + 1, int(np.searchsorted(ends, row + CHUNK_ROWS, side="right")))
        rows = int(ends[last_run - 1]) - row
        raw, starts = _pack_chunk([s.slice(row, rows) for s in series], lengths[first_run:last_run])
        bounds = starts.tolist() + [len(raw)]
        out += [(k, raw[a:b]) for k, a, b in zip(keys[first_run:last_run], bounds[:-1], bounds[1:], strict=True)]
        first_run, row = last_run, row + rows
    return out


def _pack_chunk(series: list[pl.Series], run_lengths: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The packed runs of these rows as one buffer, and where each run begins in it.

    Each value's encoding (a string: its header, then its bytes) is a binary column; arrow
    joins the columns row by row after each row's array header, and after its run's header
    at a run's first row."""
    n = int(run_lengths.sum())
    rows = np.arange(n, dtype=np.int64)
    run_starts = np.cumsum(run_lengths) - run_lengths
    run_hdr, run_len = _array_headers(run_lengths)
    length = np.zeros(n, dtype=np.int64)
    length[run_starts] = run_len
    at = np.zeros(n, dtype=np.int64)
    at[run_starts] = np.arange(run_lengths.size) * 5 + 5 - run_len
    row_hdr, row_len = _array_headers(np.array([len(series)], dtype=np.int64))
    pieces: list[Any] = [_binary(run_hdr, at, length), pa.scalar(row_hdr[0, 5 - int(row_len[0]):].tobytes(), pa.binary())]
    for s in series:
        if s.dtype == pl.String:
            hdr, hdr_len = _string_headers(s)
            pieces.append(_binary(hdr, rows * 5 + 5 - hdr_len, hdr_len))
            pieces.append(s.fill_null("").to_arrow().cast(pa.binary()))
        elif s.dtype == pl.Boolean or s.dtype == pl.Null:
            codes = np.full(n, 0xC0, dtype=np.uint8)  # nil
            if s.dtype == pl.Boolean:
                codes[:] = np.where(s.fill_null(False).to_numpy(), 0xC3, 0xC2)
                if s.null_count():
                    codes[s.is_null().to_numpy()] = 0xC0
            pieces.append(_binary(codes, rows, np.ones(n, dtype=np.int64)))
        else:
            enc, enc_len = _ints(s)
            pieces.append(_binary(enc, rows * 9 + 9 - enc_len, enc_len))
    joined = pc.binary_join_element_wise(*pieces, b"")
    _, offsets_buffer, data = joined.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32, count=n + 1, offset=joined.offset * 4).astype(np.int64)
    raw = data.to_pybytes() if data is not None else b""
    return raw[offsets[0]:offsets[n]], offsets[run_starts] - offsets[0]


def _binary(buffer: np.ndarray, start: np.ndarray, length: np.ndarray) -> pa.Array:
    """A binary array of the byte ranges [start, start + length) of `buffer` (raveled)."""
    ends = np.cumsum(length)
    index = np.repeat(start - (ends - length), length) + np.arange(int(ends[-1]) if ends.size else 0, dtype=np.int64)
    data = buffer.ravel()[index]
    offsets = np.zeros(length.size + 1, dtype=np.int32)
    offsets[1:] = ends
    return pa.Array.from_buffers(pa.binary(), length.size, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _array_headers(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per count, 5 bytes ending with its msgpack array header, and the header's length."""
    hdr = np.zeros((counts.size, 5), dtype=np.uint8)
    hdr[:, 1:] = counts.astype(">u4").view(np.uint8).reshape(-1, 4)
    length = np.where(counts < 16, 1, np.where(counts < 1 << 16, 3, 5))
    fix = counts < 16
    hdr[fix, 4] = 0x90 | counts[fix]
    hdr[length == 3, 2] = 0xDC
    hdr[length == 5, 0] = 0xDD
    return hdr, length.astype(np.int64)


def _string_headers(s: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """Per value, 5 bytes ending with its msgpack str header (nil for a null), and the
    header's length."""
    size = s.str.len_bytes().fill_null(0).to_numpy().astype(np.int64)
    hdr = np.zeros((size.size, 5), dtype=np.uint8)
    hdr[:, 1:] = size.astype(">u4").view(np.uint8).reshape(-1, 4)
    length = np.where(size < 32, 1, np.where(size < 1 << 8, 2, np.where(size < 1 << 16, 3, 5)))
    fix = size < 32
    hdr[fix, 4] = 0xA0 | size[fix]
    hdr[length == 2, 3] = 0xD9
    hdr[length == 3, 2] = 0xDA
    hdr[length == 5, 0] = 0xDB
    if s.null_count():
        nulls = s.is_null().to_numpy()
        hdr[nulls, 4] = 0xC0
        length[nulls] = 1
    return hdr, length.astype(np.int64)


def _ints(s: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """9 bytes per value ending with its msgpack encoding (as msgpack's C packer picks the
    smallest form: fixint, then uint 8/16/32/64 upwards or int 8/16/32/64 downwards; nil for a
    null), and the encoding's length."""
    v = s.cast(pl.Int64).fill_null(0).to_numpy()
    enc = np.zeros((v.size, 9), dtype=np.uint8)
    enc[:, 1:] = v.astype(">i8").view(np.uint8).reshape(-1, 8)
    payload = np.select(
        [(v >= -32) & (v < 128), (v >= 0) & (v < 1 << 8), (v >= 0) & (v < 1 << 16), (v >= 0) & (v < 1 << 32), v >= 0,
         v >= -(1 << 7), v >= -(1 << 15), v >= -(1 << 31)],
        [0, 1, 2, 4, 8, 1, 2, 4], 8)
    tag = np.select(
        [(v >= -32) & (v < 128), (v >= 0) & (v < 1 << 8), (v >= 0) & (v < 1 << 16), (v >= 0) & (v < 1 << 32), v >= 0,
         v >= -(1 << 7), v >= -(1 << 15), v >= -(1 << 31)],
        [-1, 0xCC, 0xCD, 0xCE, 0xCF, 0xD0, 0xD1, 0xD2], 0xD3)
    rows = np.flatnonzero(tag >= 0)
    enc[rows, 8 - payload[rows]] = tag[rows]
    length = np.where(tag >= 0, payload + 1, 1).astype(np.int64)
    if s.null_count():
        nulls = s.is_null().to_numpy()
        enc[nulls, 8] = 0xC0
        length[nulls] = 1
    return enc, length
