"""Cheap frame building for the core: one polars call per output column, not per operation.

The stream calls the core once per Kafka message, often with a few dozen rows, where each
polars expression costs ~0.05-0.2 ms whatever the size (lazy plan + collect). These helpers
build frames from numpy arrays and Python lists column by column, and below ``SMALL`` rows
gather strings in plain Python; above it they use polars gathers. Both give the same frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

SMALL = 512  # rows; below this per-element Python beats a polars call
_EMPTY: dict[int, tuple[dict[str, Any], pl.DataFrame]] = {}


def empty(schema: dict[str, Any]) -> pl.DataFrame:
    """An empty frame of ``schema`` (built once per schema object, then cloned)."""
    hit = _EMPTY.get(id(schema))
    if hit is None or hit[0] is not schema:
        hit = _EMPTY[id(schema)] = (schema, pl.DataFrame(schema=schema))
    return hit[1].clone()


def series(name: str, values: Any, dtype: Any) -> pl.Series:
    """A column of ``dtype`` from a Series, numpy array or list."""
    if isinstance(values, pl.Series):
        s = values if values.dtype == dtype else values.cast(dtype)
        return s if s.name == name else s.alias(name)
    return pl.Series(name, values, dtype=dtype)


def frame(schema: dict[str, Any], cols: dict[str, Any]) -> pl.DataFrame:
    """A frame with exactly ``schema``'s columns, in order, from ``cols`` (name -> values)."""
    return pl.DataFrame([series(k, cols[k], dt) for k, dt in schema.items()])


def frame_from_rows(schema: dict[str, Any], rows: Sequence[dict[str, Any]]) -> pl.DataFrame:
    """`pl.DataFrame(rows, schema=schema)` for dict rows (missing keys are null), column-wise."""
    if not rows:
        return empty(schema)
    return frame(schema, {k: [r.get(k) for r in rows] for k in schema})


def take(s: pl.Series, idx: np.ndarray, values: list[Any] | None = None) -> pl.Series:
    """``s[idx]``; ``values`` (``s.to_list()``, if the caller has it) avoids a polars gather."""
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
    return s[idx].to_list()


def repeat(name: str, value: Any, n: int, dtype: Any) -> pl.Series:
    """A constant column."""
    if n <= SMALL:
        return pl.Series(name, [value] * n, dtype=dtype)
    return pl.Series(name, [value], dtype=dtype)[np.zeros(n, dtype=np.int64)]
