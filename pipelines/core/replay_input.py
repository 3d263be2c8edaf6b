"""Readings and payments files for `mallwatt replay`, checked at the edge.

A bad file is an `InputError` naming the file, the line (JSON Lines) or row (Parquet) and the
field: not JSON, NaN/Infinity, a missing column, a timestamp given as a string, a non-integer
amount. The fast path reads the whole file with polars and checks the columns; only when that
fails is the file scanned line by line to name the first bad line (so good files pay nothing).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl


class InputError(ValueError):
    """A replay input that cannot be used; the message names file, line and field."""


Check = Callable[[Any], str | None]  # value -> problem (None: fine)


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) and v else f"expected a non-empty string, got {v!r}"


def _optional_string(v: Any) -> str | None:
    return None if v is None or isinstance(v, str) else f"expected a string or null, got {v!r}"


def _integer(what: str) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            kind = "a string" if isinstance(v, str) else type(v).__name__
            return f"expected {what} as an integer, got {kind} {v!r}"
        if not -(2**63) <= v < 2**63:
            return f"{v} does not fit in int64"
        return None
    return check


def _finite_number(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return f"expected a number, got {type(v).__name__} {v!r}"
    return None if math.isfinite(v) else f"expected a finite number, got {v!r}"


READING_FIELDS: dict[str, Check] = {
    "circuit_id": _string, "meter_id": _string, "ts_ms": _integer("epoch milliseconds (UTC)"),
    "import_kwh": _finite_number}
PAYMENT_FIELDS: dict[str, Check] = {
    "payment_id": _string, "account_id": _string, "ts_ms": _integer("epoch milliseconds (UTC)"),
    "amount_minor": _integer("integer minor units (fen)")}
PAYMENT_OPTIONAL: dict[str, Check] = {"kind": _optional_string, "reverses_payment_id": _optional_string}
INTEGER_COLUMNS = ("ts_ms", "amount_minor")
NUMBER_COLUMNS = ("import_kwh",)


def read_readings(path: str) -> pl.DataFrame:
    return read_checked(path, READING_FIELDS, {})


def read_payments(path: str) -> pl.DataFrame:
    return read_checked(path, PAYMENT_FIELDS, PAYMENT_OPTIONAL)


def read_checked(path: str, required: dict[str, Check], optional: dict[str, Check]) -> pl.DataFrame:
    """The file as a frame whose required columns are present, non-null and of the right type."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    parquet = p.suffix == ".parquet"
    try:
        df = pl.read_parquet(p) if parquet else pl.read_ndjson(p, infer_schema_length=None)
    except Exception as exc:  # polars raises several types on malformed input
        if parquet:
            raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
        _scan_lines(p, required, optional)
        raise InputError(f"{path}: cannot read as JSON Lines ({exc})") from None
    problem = _frame_problem(df, required)
    if problem is None:
        return df
    if not parquet:
        _scan_lines(p, required, optional)  # raises naming the first bad line
    raise InputError(f"{path}: {problem}")


def _frame_problem(df: pl.DataFrame, required: dict[str, Check]) -> str | None:
    """The first problem of a frame (column level; rows are 1-based), or None."""
    if df.height == 0:
        return None
    for name in required:
        if name not in df.columns:
            return f"missing column {name!r} (have {df.columns})"
        col = df[name]
        bad = col.is_null()
        if name in INTEGER_COLUMNS and not col.dtype.is_integer():
            return f"column {name!r}: expected integers, got {col.dtype}"
        if name in NUMBER_COLUMNS:
            if not col.dtype.is_numeric():
                return f"column {name!r}: expected numbers, got {col.dtype}"
            bad = bad | ~col.cast(pl.Float64).is_finite().fill_null(False)
        if not (name in INTEGER_COLUMNS or name in NUMBER_COLUMNS) and col.dtype != pl.String:
            return f"column {name!r}: expected strings, got {col.dtype}"
        if bad.any():
            row = int(bad.arg_max() or 0)
            return f"row {row + 1}: {name}: expected a value, got {col[row]!r}"
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number here (JSON has no NaN or Infinity)")


def _scan_lines(path: Path, required: dict[str, Check], optional: dict[str, Check]) -> None:
    """Raise InputError for the first bad line of a JSON Lines file (return if none is bad)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line, parse_constant=_reject_constant)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
            except ValueError as exc:
                raise InputError(f"{where}: {exc}") from None
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
            for name, check in required.items():
                if name not in record:
                    raise InputError(f"{where}: missing field {name!r}")
                problem = check(record[name])
                if problem:
                    raise InputError(f"{where}: {name}: {problem}")
            for name, check in optional.items():
                problem = check(record.get(name))
                if problem:
                    raise InputError(f"{where}: {name}: {problem}")
