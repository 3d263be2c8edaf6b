"""The analytics catalog: named queries in sql/queries/ with typed, documented parameters.

Every file starts with a header the code reads (docs/warehouse.md lists the catalog):

    -- Purpose: what it answers
    -- Param: tz String = Asia/Shanghai | description      (no "=": required)
    -- Column: kwh Float64 | description
    -- Source: circuit_daily (rollup), dim_accounts
    -- Watermark: mallwatt.readings                          (topics the result depends on)

`run_catalog()` binds the parameters (defaults filled in, unknown or missing ones are
errors) and returns the rows together with the "complete up to" watermark of the topics
the query reads: a result about times after that may still change as late data arrives.

    mallwatt query NAME --param k=v --format table|csv|json|parquet [--out FILE]
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from infra.warehouse_sql import QUERIES_DIR, list_named_queries, named_query_text

FORMATS = ("table", "csv", "json", "parquet")
_PARAM = re.compile(r"^(?P<name>\w+)\s+(?P<type>[^=|]+?)\s*(?:=\s*(?P<default>[^|]*?))?\s*(?:\|\s*(?P<doc>.*))?$")
_COLUMN = re.compile(r"^(?P<name>\w+)\s+(?P<type>[^|]+?)\s*(?:\|\s*(?P<doc>.*))?$")


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: str | None  # None: required
    doc: str = ""


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    doc: str = ""


@dataclass(frozen=True)
class QuerySpec:
    name: str
    purpose: str
    params: tuple[Param, ...]
    columns: tuple[Column, ...]
    sources: tuple[str, ...]
    watermark_topics: tuple[str, ...]
    sql: str
    # False: a named query without the catalog header (e.g. another module's helper
    # query); it runs with the parameters given, unchecked, and is not listed.
    documented: bool = True

    def bind(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """Parameters for the query: defaults filled in; unknown or missing ones raise."""
        given = dict(given or {})
        if not self.documented:
            return given
        known = {p.name for p in self.params}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {unknown}; known: {sorted(known)}")
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in given:
                value = given[p.name]
            elif p.default is not None:
                value = p.default
            else:
                raise ValueError(f"{self.name}: missing parameter {p.name} ({p.type}): {p.doc}")
            out[p.name] = convert(p.type, value) if isinstance(value, str) else value
        return out


def convert(type_: str, text: str) -> Any:
    """A parameter given as text (command line, header default) as the Python value the
    client binds for `type_`: the client quotes strings, so numbers and arrays must not
    stay strings."""
    try:
        if type_.startswith("Array("):
            text = text.strip()
            if text.startswith("["):
                value = ast.literal_eval(text)
                if not isinstance(value, list):
                    raise ValueError(text)
                return value
            return [part.strip() for part in text.split(",") if part.strip()]
        if re.fullmatch(r"U?Int\d+", type_):
            return int(text)
        if re.fullmatch(r"Float\d+", type_):
            return float(text)
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"{text!r} is not a valid {type_}") from exc
    return text


def parse_header(name: str, text: str) -> QuerySpec:
    purpose: list[str] = []
    params: list[Param] = []
    columns: list[Column] = []
    sources: list[str] = []
    topics: list[str] = []
    last: str | None = None
    for raw in text.splitlines():
        if not raw.startswith("--"):
            break
        line = raw[2:].strip()
        tag, _, rest = line.partition(":")
        rest = rest.strip()
        if tag == "Purpose":
            purpose.append(rest)
            last = "purpose"
        elif tag == "Param":
            m = _PARAM.match(rest)
            if not m:
                raise ValueError(f"{name}: bad Param line {line!r}")
            default = m.group("default")
            params.append(Param(m.group("name"), m.group("type").strip(),
                                None if default is None else default.strip(), m.group("doc") or ""))  # fmt: skip
            last = None
        elif tag == "Column":
            m = _COLUMN.match(rest)
            if not m:
                raise ValueError(f"{name}: bad Column line {line!r}")
            columns.append(Column(m.group("name"), m.group("type").strip(), m.group("doc") or ""))
            last = None
        elif tag == "Source":
            sources += [s.strip() for s in rest.split(",") if s.strip()]
            last = None
        elif tag == "Watermark":
            topics += [s.strip() for s in rest.split(",") if s.strip()]
            last = None
        elif last == "purpose" and line:
            purpose.append(line)
    if not purpose:
        first = text.splitlines()[0].lstrip("- ").strip() if text.strip() else ""
        return QuerySpec(name, first, (), (), (), (), named_query_text(name), documented=False)
    if not columns:
        raise ValueError(f"{name}: a catalog query header needs Column lines")
    return QuerySpec(name, " ".join(purpose), tuple(params), tuple(columns), tuple(sources),
                     tuple(topics), named_query_text(name))  # fmt: skip


def query_spec(name: str, directory: Path = QUERIES_DIR) -> QuerySpec:
    named_query_text(name, directory)  # validates the name and that the file exists
    return parse_header(name, (directory / f"{name}.sql").read_text())


def catalog(directory: Path = QUERIES_DIR) -> list[QuerySpec]:
    """The documented queries of sql/queries/ (files without the header are left out)."""
    specs = [query_spec(n, directory) for n in list_named_queries(directory)]
    return [s for s in specs if s.documented]


# --- watermark ------------------------------------------------------------------------


def completeness(path: str | None = None, **kwargs: Any) -> dict[str, dt.datetime]:
    """Per topic, the event time up to which every partition has been ingested."""
    from infra.warehouse import query_arrow

    table = query_arrow(query_spec("completeness").sql, {"topic_like": "%"}, path=path, **kwargs)
    return dict(zip(table["topic"].to_pylist(), table["complete_up_to"].to_pylist(), strict=True))


def watermark_for(spec: QuerySpec, marks: dict[str, dt.datetime]) -> dict[str, dt.datetime | None]:
    """The watermark of each topic the query reads (topics may carry a test prefix)."""
    out: dict[str, dt.datetime | None] = {}
    for topic in spec.watermark_topics:
        found = [ts for name, ts in marks.items() if name == topic or name.endswith("." + topic)]
        out[topic] = min(found) if found else None
    return out


@dataclass
class CatalogResult:
    name: str
    params: dict[str, Any]
    table: pa.Table
    complete_up_to: dict[str, dt.datetime | None] = field(default_factory=dict)

    @property
    def frame(self) -> pl.DataFrame:
        frame = pl.from_arrow(self.table)
        assert isinstance(frame, pl.DataFrame)
        return frame

    def meta(self) -> dict[str, Any]:
        return {
            "query": self.name,
            "params": {k: _jsonable(v) for k, v in self.params.items()},
            "complete_up_to": {k: _jsonable(v) for k, v in self.complete_up_to.items()},
        }


def run_catalog(
    name: str, params: dict[str, Any] | None = None, *, path: str | None = None, **kwargs: Any
) -> CatalogResult:
    """Run a catalog query with defaults filled in, plus the watermark of its topics."""
    from infra.warehouse import query_arrow

    spec = query_spec(name)
    bound = spec.bind(params)
    table = query_arrow(spec.sql, bound, path=path, **kwargs)
    marks = completeness(path=path, **kwargs) if spec.watermark_topics else {}
    return CatalogResult(name, bound, table, watermark_for(spec, marks))


# --- output ---------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, float) and value != value:  # NaN
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def _watermark_line(result: CatalogResult) -> str:
    if not result.complete_up_to:
        return "complete up to: (the query reads no watermarked topic)"
    parts = [
        f"{topic} {ts.isoformat() if ts else 'never ingested'}"
        for topic, ts in result.complete_up_to.items()
    ]
    return "complete up to: " + ", ".join(parts)


def write_result(result: CatalogResult, fmt: str, out: TextIO | None = None,
                 out_path: str | None = None) -> None:  # fmt: skip
    """Write `result` as table, csv, json or parquet to `out_path` or `out` (stdout)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    out = out or sys.stdout
    if fmt == "parquet":
        if not out_path:
            raise ValueError("--format parquet needs --out FILE")
        meta = {b"mallwatt": json.dumps(result.meta()).encode()}
        table = result.table.replace_schema_metadata({**(result.table.schema.metadata or {}), **meta})
        pq.write_table(table, out_path)
        return
    if fmt == "json":
        rows = [{k: _jsonable(v) for k, v in row.items()} for row in result.table.to_pylist()]
        text = json.dumps({**result.meta(), "columns": result.table.column_names, "rows": rows},
                          indent=1) + "\n"  # fmt: skip
    elif fmt == "csv":
        # The watermark rides as a comment line so the file stays one self-describing unit.
        text = f"# {_watermark_line(result)}\n" + result.frame.write_csv()
    else:
        with pl.Config(tbl_rows=200, tbl_cols=40, fmt_str_lengths=60):
            text = f"{result.frame}\n{_watermark_line(result)}\n"
    if out_path:
        Path(out_path).write_text(text)
    else:
        out.write(text)


def query_main(argv: list[str] | None = None) -> int:
    """`mallwatt query`: run a catalog query and print or save the result."""
    from clickhouse_connect.driver.exceptions import DatabaseError

    from infra.warehouse_endpoint import WarehouseError

    parser = argparse.ArgumentParser(
        prog="mallwatt query",
        description="Run a named analytics query from sql/queries/ (--list shows the catalog).")
    parser.add_argument("name", nargs="?", help="query name, e.g. consumption_daily")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="bind a parameter (see --describe NAME); defaults fill the rest")
    parser.add_argument("--format", choices=FORMATS, default="table")
    parser.add_argument("--out", help="write to FILE instead of stdout (required for parquet)")
    parser.add_argument("--list", action="store_true", help="list the catalog")
    parser.add_argument("--describe", action="store_true", help="show the query's parameters and columns")
    parser.add_argument("--path", help="chDB folder (default MALLWATT_CHDB_PATH or var/chdb)")
    args = parser.parse_args(argv)  # fmt: skip
    try:
        if args.list or not args.name:
            for spec in catalog():
                short = spec.purpose.split(". ")[0].split(": ")[0]
                print(f"{spec.name:<26} {short}")
            return 0
        if args.describe:
            print(describe(query_spec(args.name)))
            return 0
        params = {}
        for item in args.param:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--param {item!r}: expected NAME=VALUE")
            params[key] = value
        result = run_catalog(args.name, params, path=args.path)
        write_result(result, args.format, out_path=args.out)
    except (WarehouseError, DatabaseError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def describe(spec: QuerySpec) -> str:
    lines = [f"{spec.name}: {spec.purpose}", "parameters:"]
    for p in spec.params:
        default = "required" if p.default is None else f"default {p.default!r}"
        lines.append(f"  {p.name} {p.type} ({default}): {p.doc}")
    lines.append("columns:")
    lines += [f"  {c.name} {c.type}: {c.doc}" for c in spec.columns]
    lines.append(f"sources: {', '.join(spec.sources)}")
    lines.append(f"complete-up-to topics: {', '.join(spec.watermark_topics) or '-'}")
    return "\n".join(lines)


def markdown_table(specs: list[QuerySpec] | None = None) -> str:
    """The catalog as a markdown table (docs/warehouse.md)."""
    rows = ["| query | purpose | parameters (default) | reads |", "|---|---|---|---|"]
    for spec in specs or catalog():
        params = ", ".join(
            f"`{p.name}`" + ("" if p.default is None else f" ({p.default or 'empty'})")
            for p in spec.params
        )
        short = spec.purpose.split(". ")[0].rstrip(".")
        rows.append(f"| `{spec.name}` | {short} | {params} | {', '.join(spec.sources)} |")
    return "\n".join(rows)


# --- rebuilding the analytics rollups -----------------------------------------------------

BACKFILL = (
    "TRUNCATE TABLE IF EXISTS mallwatt.circuit_daily",
    """INSERT INTO mallwatt.circuit_daily
SELECT mall_id, circuit_id, toDate(ts, 'UTC') AS day, account_id, meter_id, collector_id,
    min(ts), max(ts), min(import_kwh), maxMap([toUInt8(toHour(ts, 'UTC'))], [import_kwh]),
    max(power_w),
    maxMap(if(relay = 'OPEN' AND power_w IS NOT NULL, [toUInt8(toHour(ts, 'UTC'))], []),
           if(relay = 'OPEN' AND power_w IS NOT NULL, [assumeNotNull(power_w)], [])),
    groupBitOr(bitShiftLeft(toUInt128(1), toUInt8(intDiv(toUnixTimestamp(ts) % 86400, 900))))
FROM mallwatt.readings
GROUP BY mall_id, circuit_id, day, account_id, meter_id, collector_id""",
    "TRUNCATE TABLE IF EXISTS mallwatt.billed_daily",
    """INSERT INTO mallwatt.billed_daily
SELECT mall_id, circuit_id, toDate(end_ts - toIntervalMillisecond(1), 'UTC') AS day, account_id, meter_id,
    min(billed_total_wh - energy_wh) / 1000,
    maxMap([toUInt8(toHour(end_ts - toIntervalMillisecond(1), 'UTC'))], [billed_total_wh / 1000])
FROM mallwatt.interval_energy
WHERE start_ts < end_ts
GROUP BY mall_id, circuit_id, day, account_id, meter_id""",
    "TRUNCATE TABLE IF EXISTS mallwatt.ledger_tou_hourly",
    """INSERT INTO mallwatt.ledger_tou_hourly
SELECT mall_id, account_id, toStartOfHour(toDateTime(ifNull(interval_start, ts), 'UTC')) AS hour,
    ifNull(tou_period, '') AS period, sum(ifNull(energy_wh, 0)), sum(amount_minor), count()
FROM mallwatt.ledger FINAL
WHERE kind = 'charge'
GROUP BY mall_id, account_id, hour, period""",
)


def backfill_rollups(client: Any) -> None:
    """Rebuild circuit_daily and ledger_tou_hourly from the raw tables.

    For a warehouse that held data before migration 004: run once with the sink stopped
    (rows inserted meanwhile would be counted twice in ledger_tou_hourly).
    """
    for statement in BACKFILL:
        client.command(statement)
    # Hourly energies of closed days are derived from the daily rollups: rebuild them too.
    for rollup in (REGISTERS, BILLED):
        client.command(f"TRUNCATE TABLE IF EXISTS {rollup.hours}")
        client.command(f"TRUNCATE TABLE IF EXISTS {rollup.closed}")
        close_days(client, rollup=rollup)


# --- closing days: the hourly energy rollup ---------------------------------------------

READINGS_TOPIC = "mallwatt.readings"
INTERVALS_TOPIC = "mallwatt.intervals"
# Days closed again on every run, for reads that arrive after their day was closed.
RECOMPUTE_DAYS = 2
# Days per INSERT: bounds the per-circuit arrays of one statement (24 numbers a day).
CLOSE_CHUNK_DAYS = 7


@dataclass(frozen=True)
class HourRollup:
    """The tables of one closed-days rollup: its hourly rows, their closed mark, the view that
    derives them and the daily rollup it derives them from, and the topic whose watermark
    says a day is finished."""

    hours: str
    closed: str
    live: str
    daily: str
    topic: str


#: Billed energy from the interval facts (migration 007): what the catalog reads.
BILLED = HourRollup("mallwatt.billed_hour_kwh", "mallwatt.billed_hour_kwh_closed", "mallwatt.billed_hour_kwh_live",
                    "mallwatt.billed_daily", INTERVALS_TOPIC)
#: Register differences of the raw readings (migration 006); no catalog query reads it since 007.
REGISTERS = HourRollup("mallwatt.circuit_hour_kwh", "mallwatt.circuit_hour_kwh_closed",
                       "mallwatt.circuit_hour_kwh_live", "mallwatt.circuit_daily", READINGS_TOPIC)


def _close_insert(r: HourRollup) -> str:
    return f"""INSERT INTO {r.hours}
    (mall_id, circuit_id, day, account_id, meter_id, kwh, last_kwh)
SELECT mall_id, circuit_id, day, account_id, meter_id, kwh, last_kwh
FROM {r.live}(from_day = {{from_day:Date}}, to_day = {{to_day:Date}}, mall_id = '', open_only = 0)"""


def readings_complete_until(client: Any, topic: str = READINGS_TOPIC) -> dt.datetime | None:
    """A topic's ingest watermark: newest event time written, smallest over partitions."""
    rows = client.query(
        "SELECT min(m), count() FROM (SELECT partition, max(max_event_ts) AS m "
        "FROM mallwatt.ingest_watermark WHERE topic = {t:String} GROUP BY partition)",
        parameters={"t": topic},
    ).result_rows
    return rows[0][0] if rows and rows[0][1] else None


def closed_through(client: Any, rollup: HourRollup = BILLED) -> dt.date | None:
    """The last UTC day whose hourly energies are in the rollup's table (None: no day yet)."""
    rows = client.query(f"SELECT max(through), count() FROM {rollup.closed}").result_rows
    return rows[0][0] if rows and rows[0][1] else None


def close_days(
    client: Any,
    through: dt.date | None = None,
    *,
    from_day: dt.date | None = None,
    topic: str | None = None,
    recompute_days: int = RECOMPUTE_DAYS,
    rollup: HourRollup = BILLED,
) -> tuple[dt.date, dt.date] | None:
    """Write the rollup's hourly rows (billed_hour_kwh by default) for UTC days up to
    `through`; returns the days written.

    `through` defaults to the last UTC day the watermark of `topic` (default: the rollup's,
    mallwatt.intervals for billed energy) has passed completely.
    Starts after the last closed day (minus `recompute_days`, for late facts), at the first
    day of the daily rollup when nothing is closed yet, or at `from_day` if that is earlier
    (facts that arrived for an older day). Rows first, then the closed mark, so a query
    never takes a day from the table before its rows are there; a recomputed day replaces
    its rows (ReplacingMergeTree on closed_at). Duplicate-free by construction: every row
    is derived from the daily rollup, whatever ran before.
    """
    if through is None:
        until = readings_complete_until(client, topic or rollup.topic)
        if until is None:
            return None
        through = until.date() - dt.timedelta(days=1)
    done = closed_through(client, rollup)
    if done is not None:
        start = done + dt.timedelta(days=1 - recompute_days)
    else:
        first = client.query(f"SELECT min(day), count() FROM {rollup.daily}").result_rows[0]
        if not first[1]:
            return None
        start = first[0]
    if from_day is not None:
        start = min(start, from_day)
    if start > through:
        return None
    day = start
    while day <= through:
        end = min(day + dt.timedelta(days=CLOSE_CHUNK_DAYS - 1), through)
        client.command(_close_insert(rollup), parameters={"from_day": day, "to_day": end})
        day = end + dt.timedelta(days=1)
    if done is None or through > done:
        client.command(
            f"INSERT INTO {rollup.closed} (through) VALUES ({{d:Date}})",
            parameters={"d": through},
        )
    return start, through
