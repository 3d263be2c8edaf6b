"""Cheap frame building for the core: one polars call per output column, not per operation.

The stream calls the core once per Kafka message, often with a few dozen rows, where each
polars expression costs ~0.05-0.2 ms whatever the size (lazy plan + collect) and even a public
``pl.Series(...)`` constructor ~20 us of Python-side checks. These helpers build columns from
numpy arrays and Python lists with polars' native constructors (``PySeries.new_*``, a
``PyDataFrame`` of columns, ``gather_with_series``): 1-3 us each. They are private polars API,
so they are checked once at import against the public constructors, and every helper falls back
to the public API when they are missing or disagree (``RAW`` says which is in use).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import polars as pl

SMALL = 512  # rows; below this per-element Python beats a polars call
_EMPTY: dict[int, tuple[dict[str, Any], pl.DataFrame]] = {}

# dtype -> (constructor from a numpy array, numpy dtype, constructor from a list with None)
_NEW: dict[Any, tuple[Callable[..., Any], Any, Callable[..., Any]]] = {}
_IDX: Any = None
_IDX_NP: Any = np.uint32
_PYDF: Any = None


def _raw_init() -> bool:
    global _IDX, _IDX_NP, _PYDF
    try:
        _PYDF = type(pl.DataFrame()._df)
        ps = type(pl.Series([1])._s)
        _NEW.update({
            pl.Int64: (ps.new_i64, np.int64, ps.new_opt_i64), pl.Int32: (ps.new_i32, np.int32, ps.new_opt_i32),
            pl.Boolean: (ps.new_bool, np.bool_, ps.new_opt_bool), pl.Float64: (ps.new_f64, np.float64, ps.new_opt_f64),
            pl.String: (ps.new_str, None, ps.new_str)})
        _IDX, _IDX_NP = (ps.new_u32, np.uint32) if pl.get_index_type() == pl.UInt32 else (ps.new_u64, np.uint64)
        probe = {"i": (np.array([3, -1]), pl.Int64), "j": ([None, 2], pl.Int32), "b": (np.array([True, False]), pl.Boolean),
                 "f": (np.array([0.5, np.nan]), pl.Float64), "s": (["x", None], pl.String), "o": ([1, None], pl.Int64)}
        got = pl.DataFrame._from_pydf(_PYDF([_raw(k, v, t) for k, (v, t) in probe.items()]))
        want = pl.DataFrame([pl.Series(k, v, dtype=t, nan_to_null=False) for k, (v, t) in probe.items()])
        picked = _wrap(got.get_column("s")._s.gather_with_series(_IDX("", np.array([1, 0], dtype=np.uint32), True)))
        return got.equals(want) and picked.to_list() == [None, "x"]
    except Exception:  # pragma: no cover - another polars version: public API only
        _NEW.clear()
        return False


def _raw(name: str, values: Any, dtype: Any) -> Any:
    arr_new, np_dtype, list_new = _NEW[dtype]
    if isinstance(values, np.ndarray):
        if np_dtype is None:
            values = values.tolist()
        else:
            return arr_new(name, np.ascontiguousarray(values, dtype=np_dtype), dtype != pl.Float64)
    return list_new(name, values, True)


def _wrap(ps: Any) -> pl.Series:
    return pl.Series._from_pyseries(ps)


def series(name: str, values: Any, dtype: Any) -> pl.Series:
    """A column of ``dtype`` from a Series, numpy array or list (None = null)."""
    if isinstance(values, pl.Series):
        s = values if values.dtype == dtype else values.cast(dtype)
        return s if s.name == name else s.alias(name)
    if RAW and dtype in _NEW:
        try:
            return _wrap(_raw(name, values, dtype))
        except (TypeError, ValueError, OverflowError):
            pass
    return pl.Series(name, values, dtype=dtype)


#: Python values converted per call at most in `chunked`: a conversion holds the interpreter
#: lock for its whole length, and a config reload builds contexts in a thread beside the
#: event loop (350,000 accounts in one call held billing for about 100 ms per column).
CHUNK = 16_384


def chunked(name: str, values: Sequence[Any], dtype: Any) -> pl.Series:
    """pl.Series from Python values, converted in slices so another thread runs in between."""
    if len(values) <= CHUNK:
        return pl.Series(name, values, dtype=dtype)
    return pl.concat([pl.Series(name, values[i:i + CHUNK], dtype=dtype) for i in range(0, len(values), CHUNK)],
                     rechunk=True)


def as_list(column: pl.Series) -> list[Any]:
    """column.to_list() in slices of CHUNK values (see `chunked`)."""
    if column.len() <= CHUNK:
        return column.to_list()
    out: list[Any] = []
    for start in range(0, column.len(), CHUNK):
        out += column.slice(start, CHUNK).to_list()
    return out


def chunked_dict(keys: Sequence[Any], values: Sequence[Any]) -> dict[Any, Any]:
    """dict(zip(keys, values)) built in slices of CHUNK: one dict(zip()) of 350,000 pairs is a
    single C call that held the interpreter lock (and so billing) for 80-230 ms during a reload.
    Raises ValueError when the lengths differ, as zip(strict=True) does."""
    if len(keys) != len(values):
        raise ValueError(f"chunked_dict: {len(keys)} keys but {len(values)} values")
    out: dict[Any, Any] = {}
    for start in range(0, len(keys), CHUNK):
        out.update(zip(keys[start:start + CHUNK], values[start:start + CHUNK], strict=True))
    return out


def chunked_frame(columns: dict[str, Sequence[Any]], schema: dict[str, Any]) -> pl.DataFrame:
    """A frame of `chunked` columns."""
    return pl.DataFrame([chunked(name, columns[name], dtype) for name, dtype in schema.items()])


def frame(schema: dict[str, Any], cols: dict[str, Any]) -> pl.DataFrame:
    """A frame with exactly ``schema``'s columns, in order, from ``cols`` (name -> values)."""
    columns = [series(k, cols[k], dt) for k, dt in schema.items()]
    if RAW:
        return pl.DataFrame._from_pydf(_PYDF([c._s for c in columns]))
    return pl.DataFrame(columns)


def empty(schema: dict[str, Any]) -> pl.DataFrame:
    """An empty frame of ``schema`` (built once per schema object, then cloned)."""
    hit = _EMPTY.get(id(schema))
    if hit is None or hit[0] is not schema:
        hit = _EMPTY[id(schema)] = (schema, pl.DataFrame(schema=schema))
    return hit[1].clone()


def frame_from_rows(schema: dict[str, Any], rows: Sequence[dict[str, Any]]) -> pl.DataFrame:
    """`pl.DataFrame(rows, schema=schema)` for dict rows (missing keys are null), column-wise."""
    if not rows:
        return empty(schema)
    return frame(schema, {k: [r.get(k) for r in rows] for k in schema})


def take(s: pl.Series, idx: np.ndarray, values: list[Any] | None = None) -> pl.Series:
    """``s[idx]``; ``values`` (``s.to_list()``, if the caller has it) helps without the raw API."""
    if RAW:
        return _wrap(s._s.gather_with_series(_IDX("", np.ascontiguousarray(idx, dtype=_IDX_NP), True)))
    if values is None and idx.size <= SMALL and s.len() <= SMALL:
        values = s.to_list()
    if values is not None and idx.size <= SMALL:
        return pl.Series(s.name, [values[i] for i in idx.tolist()], dtype=s.dtype)
    return s[idx]


def take_list(s: pl.Series, idx: np.ndarray) -> list[Any]:
    """``s[idx].to_list()``."""
    if s.len() <= SMALL:
        v = s.to_list()
        return [v[i] for i in idx.tolist()]
    return take(s, idx).to_list()


def repeat(name: str, value: Any, n: int, dtype: Any) -> pl.Series:
    """A constant column."""
    if n <= SMALL:
        return series(name, [value] * n, dtype)
    if RAW:
        return _wrap(series(name, [value], dtype)._s.new_from_index(0, n))
    return take(series(name, [value], dtype), np.zeros(n, dtype=np.int64))


def hstack(df: pl.DataFrame, extra: list[pl.Series]) -> pl.DataFrame:
    """``df.hstack(extra)``."""
    if RAW:
        return pl.DataFrame._from_pydf(_PYDF([*(c._s for c in df.get_columns()), *(c._s for c in extra)]))
    return df.hstack(extra)


def vconcat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """`pl.concat` of same-schema frames; `vstack` is ~20x cheaper per call on small frames."""
    if len(frames) > 16 and sum(f.height for f in frames) > SMALL:
        return pl.concat(frames)
    out = frames[0]
    for f in frames[1:]:
        out = out.vstack(f)
    return out


def distinct(x: np.ndarray, n: int) -> np.ndarray:
    """``np.unique(x)`` for integer codes in ``[0, n)`` (ranks): a count per code when ``x`` is
    not much smaller than ``n`` (one pass, ~20x cheaper than sorting or hashing 500k codes)."""
    if x.size * 8 < n:
        return np.unique(x)
    return np.flatnonzero(np.bincount(x, minlength=n))


def codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(x, return_inverse=True)`` for few distinct values: a hash unique plus a binary
    search, instead of sorting all of ``x``."""
    uniq = np.unique(x)
    return uniq, np.searchsorted(uniq, x)


def ranks(s: pl.Series, rank: dict[str, int]) -> np.ndarray:
    """``rank[v]`` of each value of a String column, -1 for a value not in ``rank`` (or null).
    Its cost follows the column, not ``rank``: the column is coded by its own distinct values
    (a Categorical cast: its codes are local to the column) and only those are looked up, so a
    few thousand ids against a 350,000-entry map cost ~3 ms where a cast to an Enum of every
    key (a hash map of all of them, built per call) costs ~120 ms."""
    cat = s.cast(pl.Categorical)
    phys = cat.to_physical()
    uniq = cat.unique()
    ucode = uniq.to_physical()
    nulls = phys.null_count() > 0
    top = int(ucode.max() or 0) + 1  # type: ignore[arg-type]
    table = np.full(top + 1, -1, dtype=np.int64)  # table[top]: null rows
    keep = ucode.is_not_null()
    table[ucode.filter(keep).to_numpy().astype(np.int64)] = [
        rank.get(v, -1) for v in uniq.filter(keep).cast(pl.String).to_list()]
    codes = (phys.fill_null(top) if nulls else phys).to_numpy().astype(np.int64)
    return table[codes]


RAW = _raw_init()
