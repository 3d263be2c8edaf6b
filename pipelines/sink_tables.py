"""How each Kafka topic becomes rows of a warehouse table (pure, no I/O).

Each `TopicTable` decodes one message into rows plus the largest event time in it (for
the ingest watermark) and turns buffered rows into one Arrow table for `insert_arrow`.
Readings stay column-wise end to end: a ReadingBatch is a polars frame, never a list of
per-reading dicts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa

from pipelines.core.timeguard import LATEST_MS
from schemas import codec
from schemas.intervals import interval_batch_to_frame
from schemas.ledger import batch_entries
from schemas.readings import RELAY_NAMES, batch_to_frame, reading_flags

log = logging.getLogger("mallwatt.sink")

DB = "mallwatt"
TS = pa.timestamp("ms", tz="UTC")
STR = pa.string()

READINGS_TOPIC = "mallwatt.readings"
LEDGER_TOPIC = "mallwatt.ledger"
INTERVALS_TOPIC = "mallwatt.intervals"
ALERTS_TOPIC = "mallwatt.alerts"
RELAY_COMMANDS_TOPIC = "mallwatt.relay-commands"
RELAY_OUTCOMES_TOPIC = "mallwatt.relay-outcomes"
COLLECTOR_EVENTS_TOPIC = "mallwatt.collector-events"
DEADLETTER_TOPIC = "mallwatt.deadletter"
AUDIT_TOPIC = "mallwatt.audit"

Decoded = tuple[Any, int, int]  # (rows: frame or list of dicts, row count, max event ts ms)


@dataclass(frozen=True)
class TopicTable:
    topic: str
    table: str  # fully qualified
    schema_name: str
    decode: Callable[[bytes | None], Decoded]
    to_arrow: Callable[[list[Any]], pa.Table]
    ts_field: str = "ts"  # the row field holding the event time (ms, or a Datetime column)


def watermark_event_ms(spec: TopicTable, chunk: Any, event_ms: int | None, broker_ms: int | None,
                       max_future_skew_ms: int) -> int | None:
    """The newest event time of a decoded message that may advance the ingest watermark:
    rows stamped more than the skew ahead of their message's broker time are ignored (a
    reading from the year 3000 must not close every period up to then). None: no row counts.
    Without a broker time the decoder's newest event time stands."""
    if event_ms is None or broker_ms is None or event_ms <= broker_ms + max_future_skew_ms:
        return event_ms
    limit = broker_ms + max_future_skew_ms
    if isinstance(chunk, pl.DataFrame):
        ts = chunk.get_column(spec.ts_field)
        if ts.dtype != pl.Int64:
            ts = ts.dt.epoch("ms")
        best = ts.filter(ts <= limit).max()
        return None if best is None else int(best)  # type: ignore[arg-type]
    times = [int(r[spec.ts_field]) for r in chunk or [] if r.get(spec.ts_field) is not None]
    return max((t for t in times if t <= limit), default=None)


# --- readings -------------------------------------------------------------------------

READINGS_COLUMNS = [
    "mall_id", "account_id", "meter_id", "circuit_id", "ts", "import_kwh", "export_kwh",
    "power_w", "voltage_v", "current_a", "power_factor", "relay", "flags", "batch_id",
    "collector_id", "collected_at",
]  # fmt: skip


def decode_readings(value: bytes | None) -> Decoded:
    record = codec.decode("ReadingBatch", value)
    frame = batch_to_frame(record)
    n = frame.height
    flags = reading_flags(record)
    if flags and (min(flags) < 0 or max(flags) >= n):
        raise ValueError(f"ReadingBatch {record['batch_id']}: flag index outside 0..{n - 1}")
    # A reading the stream refuses as absurd (year 3000) is not stored either: the warehouse's
    # rollups cannot hold it, and one such row made every insert of its batch fail for ever.
    # The worker dead-letters its message with the reason, so it is not lost silently.
    plausible = (pl.col("ts_ms") > 0) & (pl.col("ts_ms") < LATEST_MS)
    if frame.height and not frame.select(plausible.all()).item():
        keep = frame.select(plausible).to_series()
        log.warning("ReadingBatch %s: %s reading(s) with an absurd timestamp not stored", record["batch_id"],
                    frame.height - int(keep.sum()))
        frame = frame.filter(keep)
        flags = {new: flags[old] for new, old in enumerate(keep.arg_true().to_list()) if old in flags}
        n = frame.height
    frame = frame.with_columns(
        pl.lit(record["mall_id"]).alias("mall_id"),
        pl.col("ts_ms").cast(pl.Datetime("ms", "UTC")).alias("ts"),
        pl.col("relay").replace_strict(RELAY_NAMES, default="UNKNOWN", return_dtype=pl.String),
        pl.Series("flags", [flags.get(i, []) for i in range(n)], dtype=pl.List(pl.String)),
        pl.lit(record["batch_id"]).alias("batch_id"),
        pl.lit(record["collector_id"]).alias("collector_id"),
        pl.lit(record["collected_at_ms"]).cast(pl.Datetime("ms", "UTC")).alias("collected_at"),
    ).select(READINGS_COLUMNS)
    max_ts = int(record["collected_at_ms"]) if n == 0 else int(frame["ts"].dt.epoch("ms").max())
    return frame, n, max_ts


def readings_to_arrow(frames: list[pl.DataFrame]) -> pa.Table:
    # Oldest compat level: plain large_string instead of string_view, which ClickHouse's
    # Arrow reader does not take.
    return pl.concat(frames, how="vertical").to_arrow(compat_level=pl.CompatLevel.oldest())


# --- interval facts ---------------------------------------------------------------------

INTERVAL_FACT_COLUMNS = [
    "mall_id", "circuit_id", "end_ts", "start_ts", "account_id", "meter_id", "energy_wh",
    "billed_total_wh", "estimated", "flag",
]  # fmt: skip


def decode_intervals(value: bytes | None) -> Decoded:
    """An IntervalBatch as a frame of interval_energy rows (column-wise, no dict per row)."""
    frame = interval_batch_to_frame(codec.decode("IntervalBatch", value))
    n = frame.height
    max_ts = int(frame["end_ms"].max()) if n else 0  # type: ignore[arg-type]
    frame = frame.with_columns(
        pl.col("end_ms").cast(pl.Datetime("ms", "UTC")).alias("end_ts"),
        pl.col("start_ms").cast(pl.Datetime("ms", "UTC")).alias("start_ts"),
    ).select(INTERVAL_FACT_COLUMNS)
    return frame, n, max_ts


# --- inserting ------------------------------------------------------------------------

# Every sink insert runs with these (measured, docs/warehouse.md "Benchmark"):
#   optimize_on_insert = 0        no collapsing pass over each new part of the Replacing /
#                                 Aggregating tables; merges and FINAL do it anyway (the
#                                 rollups are duplicate-insensitive, reads use FINAL)
#   parallel_view_processing = 1  the materialized views of one block run side by side
INSERT_SETTINGS = {"optimize_on_insert": 0, "parallel_view_processing": 1}


def _chdb_handle(client: Any) -> Any:
    """The embedded engine handle behind a clickhouse-connect chDB client, else None."""
    handle = getattr(getattr(client, "_backend", None), "_handle", None)
    if handle is None or not hasattr(handle, "conn") or not hasattr(handle, "lock"):
        return None
    return handle


def insert_arrow(client: Any, table: str, data: pa.Table, token: str | None = None) -> None:
    """Insert an Arrow table with the sink's settings and an optional dedup token.

    Embedded chDB: `INSERT ... SELECT * FROM Python(data)` reads the Arrow buffers in
    place (measured 2.4M rows/s into a Null table, against ~0.55M for clickhouse-connect's
    `insert_arrow`, which writes an Arrow IPC temp file and parses it back). A server gets
    the ordinary `insert_arrow`.
    """
    settings: dict[str, Any] = dict(INSERT_SETTINGS)
    if token is not None:
        settings["insert_deduplication_token"] = token
    handle = _chdb_handle(client)
    if handle is None:
        client.insert_arrow(table, data, settings=settings)
        return
    if any(pa.types.is_binary(f.type) for f in data.schema):
        # chDB's Python() reads pa.binary() as hex text; large_binary arrives as raw bytes.
        data = data.cast(
            pa.schema(
                f.with_type(pa.large_binary()) if pa.types.is_binary(f.type) else f
                for f in data.schema
            )
        )
    cols = ", ".join(f"`{name}`" for name in data.column_names)
    clause = ", ".join(
        f"{k} = '{v}'" if isinstance(v, str) else f"{k} = {v}" for k, v in settings.items()
    )
    # chDB resolves Python(name) against the calling frame's local variables.
    __mallwatt_rows = data  # noqa: F841
    sql = f"INSERT INTO {table} ({cols}) SETTINGS {clause} SELECT * FROM Python(__mallwatt_rows)"
    with handle.lock:
        if handle.conn is None:
            raise RuntimeError("the warehouse client has been closed")
        handle.conn.query(sql, "TabSeparated")


# --- row-wise topics ------------------------------------------------------------------


def _row_decoder(
    schema_name: str, convert: Callable[[dict[str, Any]], dict[str, Any]], ts_field: str
) -> Callable[[bytes | None], Decoded]:
    def decode(value: bytes | None) -> Decoded:
        record = codec.decode(schema_name, value)
        return [convert(record)], 1, int(record[ts_field])

    return decode


def _arrow_builder(schema: pa.Schema) -> Callable[[list[Any]], pa.Table]:
    def build(chunks: list[Any]) -> pa.Table:
        rows = [row for chunk in chunks for row in chunk]
        return pa.Table.from_pylist(rows, schema=schema)

    return build


def _ledger_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "entry_id": r["entry_id"], "account_id": r["account_id"], "mall_id": r["mall_id"],
        "kind": r["kind"], "amount_minor": r["amount_minor"],
        "balance_after_minor": r["balance_after_minor"], "ts": r["ts_ms"],
        "source_id": r["source_id"], "meter_id": r.get("meter_id"),
        "circuit_id": r.get("circuit_id"), "interval_start": r.get("interval_start_ms"),
        "energy_wh": r.get("energy_wh"), "tou_period": r.get("tou_period"),
        "tier": r.get("tier"), "rate": r.get("rate"), "estimated": bool(r.get("estimated")),
        "debt_change_minor": r.get("debt_change_minor"),
    }  # fmt: skip


def decode_ledger(value: bytes | None) -> Decoded:
    """A LedgerBatch (many entries per message) as ledger rows."""
    entries = batch_entries(codec.decode("LedgerBatch", value))
    return [_ledger_row(e) for e in entries], len(entries), max((e["ts_ms"] for e in entries), default=0)


LEDGER_SCHEMA = pa.schema([
    ("entry_id", STR), ("account_id", STR), ("mall_id", STR), ("kind", STR),
    ("amount_minor", pa.int64()), ("balance_after_minor", pa.int64()), ("ts", TS),
    ("source_id", STR), ("meter_id", STR), ("circuit_id", STR), ("interval_start", TS),
    ("energy_wh", pa.int64()), ("tou_period", STR), ("tier", pa.int32()), ("rate", STR),
    ("estimated", pa.bool_()), ("debt_change_minor", pa.int64()),
])  # fmt: skip


def _alert_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "alert_id": r["alert_id"], "kind": r["kind"], "severity": r["severity"],
        "mall_id": r["mall_id"], "account_id": r.get("account_id"),
        "meter_id": r.get("meter_id"), "ts": r["ts_ms"], "message": r["message"],
        "details": list((r.get("details") or {}).items()),
    }  # fmt: skip


ALERT_SCHEMA = pa.schema([
    ("alert_id", STR), ("kind", STR), ("severity", STR), ("mall_id", STR),
    ("account_id", STR), ("meter_id", STR), ("ts", TS), ("message", STR),
    ("details", pa.map_(STR, STR)),
])  # fmt: skip


def _relay_command_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "command_id": r["command_id"], "action": r["action"], "reason": r["reason"],
        "mall_id": r["mall_id"], "gateway_id": r["gateway_id"], "meter_id": r["meter_id"],
        "account_id": r.get("account_id"), "issued_at": r["issued_at_ms"],
        "cause_ts": r.get("cause_ts_ms"), "requested_by": r.get("requested_by") or "pipeline",
    }  # fmt: skip


RELAY_COMMAND_SCHEMA = pa.schema([
    ("command_id", STR), ("action", STR), ("reason", STR), ("mall_id", STR),
    ("gateway_id", STR), ("meter_id", STR), ("account_id", STR), ("issued_at", TS),
    ("cause_ts", TS), ("requested_by", STR),
])  # fmt: skip


def _relay_outcome_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "command_id": r["command_id"], "action": r["action"], "status": r["status"],
        "mall_id": r["mall_id"], "gateway_id": r["gateway_id"], "meter_id": r["meter_id"],
        "relay_after": r["relay_after"], "attempts": r["attempts"], "ts": r["ts_ms"],
        "detail": r.get("detail") or "",
    }  # fmt: skip


RELAY_OUTCOME_SCHEMA = pa.schema([
    ("command_id", STR), ("action", STR), ("status", STR), ("mall_id", STR),
    ("gateway_id", STR), ("meter_id", STR), ("relay_after", STR), ("attempts", pa.int32()),
    ("ts", TS), ("detail", STR),
])  # fmt: skip


def _collector_event_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "event_id": r["event_id"], "collector_id": r["collector_id"], "mall_id": r["mall_id"],
        "gateway_id": r.get("gateway_id"), "meter_id": r.get("meter_id"), "kind": r["kind"],
        "ts": r["ts_ms"], "detail": r.get("detail") or "",
    }  # fmt: skip


COLLECTOR_EVENT_SCHEMA = pa.schema([
    ("event_id", STR), ("collector_id", STR), ("mall_id", STR), ("gateway_id", STR),
    ("meter_id", STR), ("kind", STR), ("ts", TS), ("detail", STR),
])  # fmt: skip


def dead_letter_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "source_topic": r["source_topic"], "source_partition": r["source_partition"],
        "source_offset": r["source_offset"], "stage": r["stage"], "reason": r["reason"],
        "key": r.get("key"), "value": r.get("value"), "ts": r["ts_ms"],
    }  # fmt: skip


DEAD_LETTER_SCHEMA = pa.schema([
    ("source_topic", STR), ("source_partition", pa.int32()), ("source_offset", pa.int64()),
    ("stage", STR), ("reason", STR), ("key", pa.binary()), ("value", pa.binary()), ("ts", TS),
])  # fmt: skip


def audit_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"event_id": r["event_id"], "ts": r["ts_ms"], "principal": r["principal"], "action": r["action"],
            "target": r["target"], "result": r["result"], "component": r["component"], "detail": r.get("detail") or ""}


AUDIT_SCHEMA = pa.schema([
    ("event_id", STR), ("ts", TS), ("principal", STR), ("action", STR), ("target", STR), ("result", STR),
    ("component", STR), ("detail", STR),
])  # fmt: skip


TOPIC_TABLES: dict[str, TopicTable] = {
    t.topic: t
    for t in (
        TopicTable(READINGS_TOPIC, f"{DB}.readings", "ReadingBatch", decode_readings, readings_to_arrow),
        TopicTable(LEDGER_TOPIC, f"{DB}.ledger", "LedgerBatch", decode_ledger, _arrow_builder(LEDGER_SCHEMA)),
        TopicTable(INTERVALS_TOPIC, f"{DB}.interval_energy", "IntervalBatch", decode_intervals,
                   readings_to_arrow, ts_field="end_ts"),
        TopicTable(ALERTS_TOPIC, f"{DB}.alerts", "Alert",
                   _row_decoder("Alert", _alert_row, "ts_ms"), _arrow_builder(ALERT_SCHEMA)),
        TopicTable(RELAY_COMMANDS_TOPIC, f"{DB}.relay_commands", "RelayCommand",
                   _row_decoder("RelayCommand", _relay_command_row, "issued_at_ms"),
                   _arrow_builder(RELAY_COMMAND_SCHEMA), ts_field="issued_at"),
        TopicTable(RELAY_OUTCOMES_TOPIC, f"{DB}.relay_outcomes", "RelayOutcome",
                   _row_decoder("RelayOutcome", _relay_outcome_row, "ts_ms"),
                   _arrow_builder(RELAY_OUTCOME_SCHEMA)),
        TopicTable(COLLECTOR_EVENTS_TOPIC, f"{DB}.collector_events", "CollectorEvent",
                   _row_decoder("CollectorEvent", _collector_event_row, "ts_ms"),
                   _arrow_builder(COLLECTOR_EVENT_SCHEMA)),
        TopicTable(DEADLETTER_TOPIC, f"{DB}.dead_letters", "DeadLetter",
                   _row_decoder("DeadLetter", dead_letter_row, "ts_ms"),
                   _arrow_builder(DEAD_LETTER_SCHEMA)),
        TopicTable(AUDIT_TOPIC, f"{DB}.audit_events", "AuditEvent",
                   _row_decoder("AuditEvent", audit_row, "ts_ms"), _arrow_builder(AUDIT_SCHEMA)),
    )
}  # fmt: skip


# Ledger rows already stored, so a replay never reaches the summing ledger_hourly view.
LEDGER_EXISTING = (
    f"SELECT DISTINCT entry_id FROM {DB}.ledger "
    "WHERE account_id IN {accounts:Array(String)} "
    "AND ts BETWEEN fromUnixTimestamp64Milli({lo:Int64}, 'UTC') "
    "AND fromUnixTimestamp64Milli({hi:Int64}, 'UTC') "
    "AND entry_id IN {ids:Array(String)}"
)


def drop_known_ledger_rows(table: pa.Table, client: Any) -> pa.Table:
    """The ledger rows whose entry_id is neither repeated in `table` nor already stored."""
    if table.num_rows == 0:
        return table
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    frame = frame.unique(subset=["entry_id"], keep="first", maintain_order=True)
    ts_ms = frame["ts"].dt.epoch("ms")
    existing = client.query(
        LEDGER_EXISTING,
        parameters={
            "accounts": frame["account_id"].unique().to_list(),
            "lo": int(ts_ms.min()),
            "hi": int(ts_ms.max()),
            "ids": frame["entry_id"].to_list(),
        },
    ).result_rows
    if existing:
        frame = frame.filter(~pl.col("entry_id").is_in([row[0] for row in existing]))
    return frame.to_arrow(compat_level=pl.CompatLevel.oldest()).cast(LEDGER_SCHEMA)
