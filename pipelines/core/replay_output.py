"""Replay outputs written call by call, so memory does not grow with the replayed period.

One file per output (ledger, alerts, commands, rejected_readings, rejected_payments,
intervals): Parquet through one pyarrow ParquetWriter each (a row group per write), or JSON
Lines appended. A table that received no rows is still written, empty, with its schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.engine import ALERT_SCHEMA, COMMAND_SCHEMA, LEDGER_SCHEMA, PAYMENT_REJECT_SCHEMA
from pipelines.core.interval import INTERVAL_SCHEMA, REJECT_SCHEMA

SCHEMAS: dict[str, dict[str, Any]] = {
    "ledger": LEDGER_SCHEMA, "alerts": ALERT_SCHEMA, "commands": COMMAND_SCHEMA,
    "rejected_readings": REJECT_SCHEMA, "rejected_payments": PAYMENT_REJECT_SCHEMA,
    "intervals": {**INTERVAL_SCHEMA, "account_id": pl.String}}


class OutputWriter:
    """`writer(name, frame)` appends; `close()` finishes every file and returns the row counts."""

    def __init__(self, out: Path, fmt: str = "parquet") -> None:
        self.out, self.fmt = out, fmt
        out.mkdir(parents=True, exist_ok=True)
        self._parquet: dict[str, pq.ParquetWriter] = {}
        self._arrow: dict[str, pa.Schema] = {}
        self._jsonl: dict[str, IO[bytes]] = {}
        self.rows: dict[str, int] = dict.fromkeys(SCHEMAS, 0)

    def __call__(self, name: str, frame: pl.DataFrame) -> None:
        schema = SCHEMAS[name]
        frame = frame.select(list(schema)).cast(schema)
        self.rows[name] += frame.height
        if self.fmt == "parquet":
            table = frame.to_arrow()
            if name not in self._parquet:
                self._arrow[name] = table.schema
                self._parquet[name] = pq.ParquetWriter(self.out / f"{name}.parquet", table.schema)
            self._parquet[name].write_table(table.cast(self._arrow[name]))
        else:
            if name not in self._jsonl:
                self._jsonl[name] = (self.out / f"{name}.jsonl").open("wb")
            frame.write_ndjson(self._jsonl[name])

    def write_whole(self, name: str, frame: pl.DataFrame) -> None:
        """A small final table (balances) in one go."""
        self.rows[name] = frame.height
        if self.fmt == "parquet":
            frame.write_parquet(self.out / f"{name}.parquet")
        else:
            frame.write_ndjson(self.out / f"{name}.jsonl")

    def close(self) -> dict[str, int]:
        for name, schema in SCHEMAS.items():  # empty outputs still get a file with their columns
            if name not in self._parquet and name not in self._jsonl:
                self(name, pl.DataFrame(schema=schema))
        for writer in self._parquet.values():
            writer.close()
        for handle in self._jsonl.values():
            handle.close()
        return self.rows
