"""Real chDB: the readings rollups of migration 005 against the raw table, replays, and the
data migration from the 002/004 rollups."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from infra import warehouse as wh
from infra.warehouse_sql import MIGRATIONS_DIR
from pipelines.sink_tables import READINGS_COLUMNS, insert_arrow, readings_to_arrow

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z

# What circuit_daily must hold, computed straight from the raw reads (the 004 definition).
DAILY_FROM_RAW = """
SELECT circuit_id, toDate(ts, 'UTC') AS day, meter_id, min(ts), max(ts), min(import_kwh),
    maxMap([toUInt8(toHour(ts, 'UTC'))], [import_kwh]), max(power_w),
    maxMap(if(relay = 'OPEN' AND power_w IS NOT NULL, [toUInt8(toHour(ts, 'UTC'))], []),
           if(relay = 'OPEN' AND power_w IS NOT NULL, [assumeNotNull(power_w)], [])),
    groupBitOr(bitShiftLeft(toUInt128(1), toUInt8(intDiv(toUnixTimestamp(ts) % 86400, 900))))
FROM mallwatt.readings GROUP BY circuit_id, day, meter_id ORDER BY circuit_id, day, meter_id
"""
DAILY = """
SELECT circuit_id, day, meter_id, min(first_ts), max(last_ts), min(min_kwh), maxMap(hour_max_kwh),
    max(max_power_w), maxMap(open_max_power_w), groupBitOr(slots)
FROM mallwatt.circuit_daily GROUP BY circuit_id, day, meter_id ORDER BY circuit_id, day, meter_id
"""
C15_FROM_RAW = """
SELECT circuit_id, toStartOfFifteenMinutes(toDateTime(ts, 'UTC')) AS bucket, meter_id,
    min(import_kwh), max(import_kwh), max(power_w), min(voltage_v), uniqExact(toStartOfSecond(ts))
FROM mallwatt.readings GROUP BY circuit_id, bucket, meter_id ORDER BY circuit_id, bucket, meter_id
"""
C15 = """
SELECT circuit_id, bucket, meter_id, first_kwh, last_kwh, peak_power_w, low_voltage_v, reads
FROM mallwatt.circuit_15m ORDER BY circuit_id, bucket, meter_id
"""


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "chdb"
    yield path
    wh.release_folder(path)


def reads(seed: int, n_circuits: int = 6, polls: int = 40, step_s: int = 290) -> pl.DataFrame:
    """Jittery reads of a few circuits over ~3 hours across a UTC midnight, some relay OPEN,
    some power missing, and a meter swap on circuit C0 half-way."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[Any]] = {c: [] for c in READINGS_COLUMNS}
    start = T0 - 90 * 60_000
    for c in range(n_circuits):
        register = 100.0 * (c + 1)
        for k in range(polls):
            ts = start + k * step_s * 1000 + int(rng.integers(0, 3000))
            register = round(register + float(rng.uniform(0, 0.5)), 2)
            swapped = c == 0 and k >= polls // 2
            power = None if rng.random() < 0.1 else round(float(rng.uniform(0, 4000)), 1)
            values = {
                "mall_id": "M1", "account_id": f"A{c}", "meter_id": f"MT{c}" + ("b" if swapped else ""),
                "circuit_id": f"C{c}", "ts": ts, "import_kwh": register - (90 if swapped else 0),
                "export_kwh": None, "power_w": power, "voltage_v": round(float(rng.normal(228, 2)), 1),
                "current_a": None, "power_factor": 0.95,
                "relay": "OPEN" if rng.random() < 0.2 else "CLOSED", "flags": [],
                "batch_id": f"b{seed}-{k}", "collector_id": "COL1", "collected_at": ts + 5000,
            }  # fmt: skip
            for name in READINGS_COLUMNS:
                rows[name].append(values[name])
    frame = pl.DataFrame(rows, schema_overrides={"flags": pl.List(pl.String)})
    return frame.with_columns(
        pl.col("ts").cast(pl.Datetime("ms", "UTC")),
        pl.col("collected_at").cast(pl.Datetime("ms", "UTC")),
    )


def insert(client: Any, frame: pl.DataFrame, token: str) -> None:
    insert_arrow(client, "mallwatt.readings", readings_to_arrow([frame]), token)


def test_rollups_match_the_raw_reads_and_ignore_replays(folder: Path) -> None:
    first, second = reads(1), reads(2)
    with wh.open_owner(folder, serve=False) as owner:
        c = owner.client
        insert(c, first, "t1")
        insert(c, first.slice(30, 100), "t2")  # a replay with other batch boundaries
        insert(c, second, "t3")  # other reads of the same circuits and buckets
        insert(c, second, "t3")  # a retried block: dropped by its token
        assert c.query("SELECT count() FROM mallwatt.readings").result_rows[0][0] == 580
        daily, c15 = c.query(DAILY).result_rows, c.query(C15).result_rows
        assert daily == c.query(DAILY_FROM_RAW).result_rows
        assert c15 == c.query(C15_FROM_RAW).result_rows
        assert len(daily) >= 12 and any(r[8][0] for r in daily)  # OPEN hours with power
        # Merging the parts changes nothing either.
        for table in ("readings_15m_v2", "circuit_daily"):
            c.command(f"OPTIMIZE TABLE mallwatt.{table} FINAL")
        assert c.query(DAILY).result_rows == daily
        assert c.query(C15).result_rows == c15


def test_migration_005_carries_the_old_rollups_over(folder: Path, tmp_path: Path) -> None:
    old = tmp_path / "old_migrations"
    old.mkdir()
    for path in sorted(MIGRATIONS_DIR.glob("00[1-4]_*.sql")):
        shutil.copy(path, old / path.name)
    frame = reads(3)
    with wh.open_owner(folder, serve=False, migrate=False) as owner:
        c = owner.client
        wh.apply_migrations(c, old)
        c.insert_arrow("mallwatt.readings", readings_to_arrow([frame]))
        daily_before = c.query(DAILY).result_rows
        c15_before = c.query(
            "SELECT circuit_id, bucket, meter_id, first_kwh, last_kwh, reads FROM mallwatt.circuit_15m "
            "ORDER BY circuit_id, bucket, meter_id"
        ).result_rows
        assert wh.apply_migrations(c) == ["005"]
        c15_after = c.query(
            "SELECT circuit_id, bucket, meter_id, first_kwh, last_kwh, reads FROM mallwatt.circuit_15m "
            "ORDER BY circuit_id, bucket, meter_id"
        ).result_rows
        # Registers only grow within a meter, so min/max equal the first/last reads.
        assert c15_after == c15_before
        # New reads (and a replay) go through the new views only, into the same rollups.
        insert(c, frame, "again")
        insert(c, reads(4), "more")
        assert c.query(DAILY).result_rows == c.query(DAILY_FROM_RAW).result_rows
        assert c.query(C15).result_rows == c.query(C15_FROM_RAW).result_rows
        assert daily_before and len(c.query(DAILY).result_rows) >= len(daily_before)
