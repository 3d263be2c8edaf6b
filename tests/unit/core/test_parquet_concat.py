"""`parquet_concat.append` joins Parquet files by bytes: readers see the rows of all, in order."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core import parquet_concat as pc


def _frame(n: int, seed: int) -> pl.DataFrame:
    return pl.DataFrame({
        "entry_id": [f"A{seed}:{i}" for i in range(n)],
        "amount_minor": [(i * 7919 + seed) % 10_000 - 5_000 for i in range(n)],
        "kwh": [i / 3 for i in range(n)],
        "note": [None if i % 5 else f"n{i}" for i in range(n)],
        "flags": [[i % 2 == 0, True] for i in range(n)],
        "ok": [i % 3 == 0 for i in range(n)],
    })


def _write(path: Path, frames: list[pl.DataFrame], **kw: object) -> None:
    schema = frames[0].to_arrow().schema
    with pq.ParquetWriter(path, schema, **kw) as w:  # type: ignore[arg-type]
        for f in frames:
            w.write_table(f.to_arrow().cast(schema))


@pytest.mark.parametrize("kw", [
    {"use_dictionary": False, "write_statistics": ["amount_minor"]},
    {"use_dictionary": True, "write_page_index": True, "compression": "zstd"},
])
def test_appended_files_read_as_one(tmp_path: Path, kw: dict[str, object]) -> None:
    parts = [[_frame(1000, 1), _frame(10, 2)], [_frame(1, 3).clear()], [_frame(2500, 4)], [_frame(3, 5), _frame(700, 6)]]
    paths = []
    for i, frames in enumerate(parts):
        paths.append(tmp_path / f"{i}.parquet")
        _write(paths[-1], frames, **kw)
    raw = paths[0].read_bytes()
    meta, start = pc.footer(paths[0])
    w = pc._Writer()
    w.value(pc.STRUCT, meta)
    assert bytes(w.out) == raw[start:-8]  # the footer codec round-trips exactly
    added = pc.append(paths[0], paths[1:])
    expected = pl.concat([f for frames in parts for f in frames])
    assert added == expected.height - 1010
    assert pl.read_parquet(paths[0]).equals(expected)
    f = pq.ParquetFile(paths[0])
    assert f.metadata.num_rows == expected.height
    assert f.read().equals(expected.to_arrow().cast(f.schema_arrow))
    # row groups one by one (each through its own offsets) and a filtered read (statistics)
    got = pl.concat([pl.from_arrow(f.read_row_group(i)) for i in range(f.num_row_groups)])  # type: ignore[list-item]
    assert got.equals(expected)
    filtered = pq.read_table(paths[0], filters=[("amount_minor", ">", 4_000)])
    assert filtered.num_rows == expected.filter(pl.col("amount_minor") > 4_000).height


def test_another_schema_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    _write(a, [_frame(10, 1)])
    pq.write_table(pa.table({"entry_id": ["x"]}), b)
    before = a.read_bytes()
    with pytest.raises(pc.SchemaMismatch):
        pc.append(a, [b])
    assert a.read_bytes() == before


def test_not_parquet_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"not a parquet file at all")
    with pytest.raises(ValueError, match="not a Parquet file"):
        pc.footer(bad)
