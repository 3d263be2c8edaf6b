"""Replay outputs written call by call, so memory does not grow with the replayed period.

One file per output (ledger, alerts, commands, rejected_readings, rejected_payments,
intervals): Parquet through one pyarrow ParquetWriter each (a row group per write), or JSON
Lines appended. A parallel replay's parent appends its jobs' files after its own rows
(`append_parts`). A table that received no rows is still written, empty, with its schema.

Parquet is encoded and written on a background thread (pyarrow releases the GIL), so the next
core call runs meanwhile; the queue holds at most `QUEUE` frames, so memory stays bounded, and a
write error is raised by the next write or by `close`. Columns are not dictionary-encoded: most
output columns are unique per row (entry ids), where the dictionary attempt costs a third of the
write for nothing; nor do those columns get min/max statistics (`NO_STATISTICS`).
"""

from __future__ import annotations

import queue
import shutil
import threading
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
QUEUE = 4  # frames waiting for the Parquet thread at most
# columns written without min/max statistics: unique texts (ids, messages) nobody filters a
# range of, whose statistics cost a third of writing the ledger
NO_STATISTICS = frozenset({"entry_id", "source_id", "rate", "alert_id", "message", "details", "command_id",
                           "cause_id", "reason"})


def _conform(frame: pl.DataFrame, schema: dict[str, Any]) -> pl.DataFrame:
    """``frame`` with exactly ``schema``'s columns, order and types; as it is when it already has
    them (the core's outputs do: a select and cast would still cost ~10 ms per call)."""
    if frame.columns != list(schema):
        frame = frame.select(list(schema))
    wrong = {k: t for k, t in schema.items() if frame.schema[k] != t}
    return frame.cast(wrong) if wrong else frame


class OutputWriter:
    """`writer(name, frame)` appends; `close()` finishes every file and returns the row counts."""

    def __init__(self, out: Path, fmt: str = "parquet") -> None:
        self.out, self.fmt = out, fmt
        out.mkdir(parents=True, exist_ok=True)
        self._parquet: dict[str, pq.ParquetWriter] = {}
        self._arrow: dict[str, pa.Schema] = {}
        self._jsonl: dict[str, IO[bytes]] = {}
        self._parts: list[Path] = []  # other processes' output directories to append (append_parts)
        self.rows: dict[str, int] = dict.fromkeys(SCHEMAS, 0)
        self._queue: queue.Queue[tuple[str, pl.DataFrame] | None] = queue.Queue(QUEUE)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._started: set[str] = set()  # outputs written to (or queued for) at least once

    def __call__(self, name: str, frame: pl.DataFrame) -> None:
        frame = _conform(frame, SCHEMAS[name])
        self.rows[name] += frame.height
        self._started.add(name)
        if self.fmt == "jsonl":
            if name not in self._jsonl:
                self._jsonl[name] = (self.out / f"{name}.jsonl").open("wb")
            frame.write_ndjson(self._jsonl[name])
            return
        self._raise()
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="replay-parquet", daemon=True)
            self._thread.start()
        self._queue.put((name, frame))

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._error = exc

    def _write(self, name: str, frame: pl.DataFrame) -> None:
        table = frame.to_arrow()
        if name not in self._parquet:
            self._arrow[name] = table.schema
            self._parquet[name] = pq.ParquetWriter(
                self.out / f"{name}.parquet", table.schema, use_dictionary=False,
                write_statistics=[c for c in table.schema.names if c not in NO_STATISTICS])
        self._parquet[name].write_table(table.cast(self._arrow[name]))

    def append_parts(self, dirs: list[Path], rows: dict[str, int]) -> None:
        """After this process's own rows, each output's rows from other processes' files of the
        same outputs (a parallel replay's jobs, `replay_parallel`, in the order given): JSON Lines
        copied now, Parquet row groups appended by `close` (`parquet_concat`: bytes copied, not
        re-encoded). ``rows``: their row counts."""
        self._parts = list(dirs)
        if self.fmt == "jsonl":
            for name in SCHEMAS:
                if name not in self._jsonl:
                    self._jsonl[name] = (self.out / f"{name}.jsonl").open("wb")
                for d in dirs:
                    with (d / f"{name}.jsonl").open("rb") as source:
                        shutil.copyfileobj(source, self._jsonl[name], 1 << 20)
        for name, count in rows.items():
            if name in SCHEMAS:
                self.rows[name] += count

    def _append_parquet(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from pipelines.core.parquet_concat import SchemaMismatch, append

        def one(name: str) -> None:
            target, sources = self.out / f"{name}.parquet", [d / f"{name}.parquet" for d in self._parts]
            try:
                append(target, sources)
            except SchemaMismatch:  # another writer's types (not seen from this code): decode and re-encode
                _rewrite(target, sources)

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(one, SCHEMAS))

    def _join(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write_whole(self, name: str, frame: pl.DataFrame) -> None:
        """A small final table (balances) in one go."""
        self.rows[name] = frame.height
        if self.fmt == "parquet":
            frame.write_parquet(self.out / f"{name}.parquet")
        else:
            frame.write_ndjson(self.out / f"{name}.jsonl")

    def close(self) -> dict[str, int]:
        for name, schema in SCHEMAS.items():  # empty outputs still get a file with their columns
            if name not in self._started:
                self(name, pl.DataFrame(schema=schema))
        self._join()
        for writer in self._parquet.values():
            writer.close()
        for handle in self._jsonl.values():
            handle.close()
        self._raise()
        if self._parts and self.fmt == "parquet":
            self._append_parquet()
        return self.rows


def _rewrite(target: Path, sources: list[Path]) -> None:
    """``target`` with ``sources``' rows after its own, decoded and encoded again (cast to the
    target's schema), a row group at a time."""
    first = pq.ParquetFile(target)
    schema = first.schema_arrow
    tmp = target.with_suffix(".merging")
    with pq.ParquetWriter(tmp, schema, use_dictionary=False,
                          write_statistics=[c for c in schema.names if c not in NO_STATISTICS]) as writer:
        for path in [target, *sources]:
            f = pq.ParquetFile(path)
            for i in range(f.num_row_groups):
                writer.write_table(f.read_row_group(i).cast(schema))
    tmp.replace(target)
