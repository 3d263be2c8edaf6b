"""Column-wise validation of roster tables (areas, gateways, merchants, meters).

The same rules as the pydantic models in pipelines/portfolio.py (identifier pattern,
ranges, enums, defaults), applied to whole columns with polars: pydantic row by row takes
seconds at 350,000 merchants. A problem is one row: (line, column, message), rendered by
the loader as ``merchants.csv: line 1234: area: unknown area 'F9' in mall M03``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from pipelines.portfolio import Area, BusinessType, Gateway, Merchant, Meter, Purpose

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"  # pipelines.portfolio.Identifier
ID_MAX = 64
TRUE = ("true", "1", "yes", "y", "t")
FALSE = ("false", "0", "no", "n", "f")
PROBLEM_SCHEMA = {"line": pl.Int64, "column": pl.String, "message": pl.String}


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # id | text | int | float | bool | enum | ints (a ';'-separated list of whole numbers)
    required: bool = False
    default: Any = None
    lo: float | None = None  # inclusive bounds
    hi: float | None = None
    gt: float | None = None  # exclusive lower bound
    choices: tuple[str, ...] = ()


def _default(model: Any, field: str) -> Any:
    return model.model_fields[field].default


MALL = Column("mall", "id", required=True)
SPECS: dict[str, list[Column]] = {
    "areas": [MALL, Column("id", "id", True), Column("name", "text", default=_default(Area, "name")),
              Column("floor", "int", default=_default(Area, "floor"))],
    "gateways": [MALL, Column("id", "id", True), Column("host", "text", default=_default(Gateway, "host")),
                 Column("port", "int", True, lo=1, hi=65535),
                 Column("timeout_s", "float", default=_default(Gateway, "timeout_s"), gt=0)],
    "merchants": [
        MALL, Column("id", "id", True), Column("name", "text", True),
        Column("business_type", "enum", default=_default(Merchant, "business_type").value,
               choices=tuple(b.value for b in BusinessType)),
        Column("area", "id", True), Column("level", "id", default=_default(Merchant, "level")),
        Column("leased_area_m2", "float", True, gt=0), Column("tariff", "id"),
        Column("price_multiplier", "float", default=_default(Merchant, "price_multiplier"), gt=0),
        Column("protected", "bool", default=False), Column("alert_levels", "ints"),
        Column("opening_balance_minor", "int", default=0), Column("opening_debt_minor", "int", default=0), Column("vacant", "bool", default=False)],
    "meters": [
        MALL, Column("id", "id", True), Column("model", "id", True), Column("gateway", "id", True),
        Column("unit_id", "int", True, lo=1, hi=247), Column("account", "id"), Column("circuit", "id", True),
        Column("purpose", "enum", default=Purpose.OTHER.value, choices=tuple(p.value for p in Purpose)),
        Column("max_kw", "float", default=_default(Meter, "max_kw"), gt=0),
        Column("poll_interval_s", "float", default=_default(Meter, "poll_interval_s"), gt=0)],
}
DTYPES = {"id": pl.String, "text": pl.String, "int": pl.Int64, "float": pl.Float64, "bool": pl.Boolean,
          "enum": pl.String, "ints": pl.List(pl.Int64)}


def empty_table(table: str) -> pl.DataFrame:
    return pl.DataFrame(schema={c.name: DTYPES[c.kind] for c in SPECS[table]})


def problems(frame: pl.DataFrame, mask: pl.Expr, column: str, message: pl.Expr) -> pl.DataFrame:
    """The rows of `frame` (which carries `_line`) where `mask` holds, as problems."""
    return frame.filter(mask).select(pl.col("_line").alias("line"), pl.lit(column).alias("column"),
                                     message.alias("message"))


def no_problems() -> pl.DataFrame:
    return pl.DataFrame(schema=PROBLEM_SCHEMA)


def _quoted(col: str) -> pl.Expr:
    return pl.format("'{}'", pl.col(col))


def check_columns(table: str, raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, list[str]]:
    """Typed columns with defaults filled, the per-row problems, and file-level problems
    (unknown or missing columns). `raw` has String columns plus `_line`."""
    specs = SPECS[table]
    known = {c.name for c in specs}
    file_level = [f"column {c!r} is not a known column (known: {', '.join(sorted(known))})"
                  for c in raw.columns if c != "_line" and c not in known]
    file_level += [f"missing column {c.name!r}" for c in specs if c.required and c.name not in raw.columns]
    if file_level:
        return empty_table(table), no_problems(), file_level
    # blank cells are missing values; identifiers and numbers lose surrounding spaces
    text = raw.with_columns(
        [pl.col(c.name).str.strip_chars().replace("", None).alias(c.name)
         for c in specs if c.name in raw.columns and c.kind != "text"]
        + [pl.lit(None, pl.String).alias(c.name) for c in specs if c.name not in raw.columns])
    found: list[pl.DataFrame] = []
    typed: list[pl.Expr] = []
    for c in specs:
        col = pl.col(c.name)
        if c.required:
            found.append(problems(text, col.is_null(), c.name, pl.lit("missing value")))
        typed_col, bad = _typed(c)
        if bad is not None:
            found.append(problems(text, col.is_not_null() & bad, c.name, bad_message(c)))
        typed.append(typed_col.fill_null(pl.lit(c.default, DTYPES[c.kind])) if c.default is not None
                     else typed_col)
    out = text.select(*typed, "_line")
    found += _range_problems(specs, out)
    return out, pl.concat(found) if found else no_problems(), []


def _typed(c: Column) -> tuple[pl.Expr, pl.Expr | None]:
    """The column converted to its type, and a mask of present values that do not convert."""
    col = pl.col(c.name)
    if c.kind == "text":
        return col, None
    if c.kind == "id":
        return col, ~col.str.contains(ID_PATTERN) | (col.str.len_chars() > ID_MAX)
    if c.kind == "enum":
        return col, ~col.is_in(list(c.choices))
    if c.kind == "int":
        conv = col.cast(pl.Int64, strict=False)
        return conv.alias(c.name), conv.is_null()
    if c.kind == "float":
        conv = col.cast(pl.Float64, strict=False)
        return conv.alias(c.name), conv.is_null() | ~conv.is_finite()
    if c.kind == "bool":
        low = col.str.to_lowercase()
        conv = pl.when(low.is_in(TRUE)).then(True).when(low.is_in(FALSE)).then(False).otherwise(None)
        return conv.alias(c.name), conv.is_null()
    parts = col.str.split(";").list.eval(pl.element().str.strip_chars().cast(pl.Int64, strict=False))
    return parts.alias(c.name), parts.list.eval(pl.element().is_null()).list.any()


def bad_message(c: Column) -> pl.Expr:
    what = {"id": "is not an identifier (a letter or digit, then letters, digits or _ . : -; at most 64)",
            "enum": f"is not one of {', '.join(c.choices)}", "int": "is not a whole number",
            "float": "is not a finite number", "bool": "is not true or false",
            "ints": "is not a list of whole numbers separated by ';'"}[c.kind]
    return pl.format("{} " + what, _quoted(c.name))


def _range_problems(specs: list[Column], out: pl.DataFrame) -> list[pl.DataFrame]:
    found = []
    for c in specs:
        col = pl.col(c.name)
        if c.gt is not None:
            found.append(problems(out, col <= c.gt, c.name, pl.format(f"{{}} must be greater than {c.gt:g}", col)))
        if c.lo is not None and c.hi is not None:
            found.append(problems(out, (col < c.lo) | (col > c.hi), c.name,
                                  pl.format(f"{{}} must be between {c.lo:g} and {c.hi:g}", col)))
    return found
