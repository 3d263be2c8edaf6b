"""Real chDB: the readings rollups (circuit_daily, the circuit_15m view, the closed days'
hourly energies of migration 006) against the raw table, replays, and migration 006 on a
warehouse that already holds data."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from infra import warehouse as wh
from infra.warehouse_catalog import REGISTERS
from infra.warehouse_catalog import close_days as close_any
from infra.warehouse_catalog import closed_through as closed_any
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
    return readings_frame(rows)


def readings_frame(rows: dict[str, list[Any]]) -> pl.DataFrame:
    """Rows by warehouse readings column as a frame with the warehouse's timestamp types."""
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
        for table in ("readings", "circuit_daily"):
            c.command(f"OPTIMIZE TABLE mallwatt.{table} FINAL")
        assert c.query(DAILY).result_rows == daily
        assert c.query(C15).result_rows == c15


def test_migration_006_drops_the_15_minute_rollup_and_keeps_circuit_15m(
    folder: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old_migrations"
    old.mkdir()
    for path in sorted(MIGRATIONS_DIR.glob("00[1-5]_*.sql")):
        shutil.copy(path, old / path.name)
    frame = reads(3)
    with wh.open_owner(folder, serve=False, migrate=False) as owner:
        c = owner.client
        wh.apply_migrations(c, old)
        insert(c, frame, "before")
        c15_before = c.query(C15).result_rows
        # the migrations after 005, in order (006 is the one under test; later ones follow it)
        later = sorted(p.name[:3] for p in MIGRATIONS_DIR.glob("*.sql") if p.name[:3] > "005")
        assert later[0] == "006" and wh.apply_migrations(c) == later
        tables = {
            r[0]
            for r in c.query(
                "SELECT name FROM system.tables WHERE database = 'mallwatt'"
            ).result_rows
        }
        assert "readings_15m_v2" not in tables and "readings_15m_v2_mv" not in tables
        assert {"circuit_15m", "circuit_hour_kwh", "circuit_hour_energy"} <= tables
        # The view over the raw reads gives what the rollup held (registers only grow).
        assert c.query(C15).result_rows == c15_before
        insert(c, frame, "again")  # a replay
        insert(c, reads(4), "more")
        assert c.query(DAILY).result_rows == c.query(DAILY_FROM_RAW).result_rows
        assert c.query(C15).result_rows == c.query(C15_FROM_RAW).result_rows


# --- the closed days' hourly energies (circuit_hour_kwh) --------------------------------

D0 = dt.date(2026, 1, 1)


def day_reads(seed: int, days: int = 6) -> pl.DataFrame:
    """Three circuits read every ~20 minutes (jitter) for `days` UTC days: C1 has a 30-hour
    gap on day 2, C2's meter is swapped on day 3 (new registers from 5.0), C3 is reset to 0
    on day 4; every few reads carry no power."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[Any]] = {c: [] for c in READINGS_COLUMNS}
    for c in (1, 2, 3):
        register = 1000.0 * c
        for k in range(days * 72):
            ts = T0 + k * 1_200_000 + int(rng.integers(0, 5000))
            hour = k // 3
            register = round(register + float(rng.uniform(0, 2.0)), 2)
            if c == 1 and 40 <= hour < 70:
                continue
            meter = f"MT{c}"
            value = register
            if c == 2 and hour >= 72:
                meter, value = "MT2b", round(register - 2000.0 + 5.0, 2)
            if c == 3 and hour >= 96:
                value = round(register - 3200.0, 2)  # restarts lower (registers stay >= 0)
            values = {
                "mall_id": "M1", "account_id": f"A{c}", "meter_id": meter, "circuit_id": f"C{c}",
                "ts": ts, "import_kwh": value, "export_kwh": None,
                "power_w": None if k % 7 == 0 else 500.0, "voltage_v": 230.0, "current_a": None,
                "power_factor": 0.95, "relay": "CLOSED", "flags": [], "batch_id": f"d{seed}-{k}",
                "collector_id": "COL1", "collected_at": ts + 5000,
            }  # fmt: skip
            for name in READINGS_COLUMNS:
                rows[name].append(values[name])
    return readings_frame(rows)


def hour_energy_from_raw(frame: pl.DataFrame) -> dict[tuple[str, str, dt.date, int], float]:
    """Energy per circuit, meter, UTC day and hour straight from the reads: the largest
    register of each hour minus that of the previous hour with reads (negative: 0); the
    first hour counts from the smallest read of its day."""
    hours = (
        frame.with_columns(pl.col("ts").dt.truncate("1h").alias("hour"))
        .group_by("circuit_id", "meter_id", "hour")
        .agg(pl.col("import_kwh").max().alias("reg"), pl.col("import_kwh").min().alias("low"))
        .sort("circuit_id", "meter_id", "hour")
        .with_columns(pl.col("hour").dt.date().alias("day"))
    )
    first_day_min = hours.group_by("circuit_id", "meter_id").agg(
        pl.col("low").filter(pl.col("day") == pl.col("day").min()).min().alias("base")
    )
    hours = hours.join(first_day_min, on=["circuit_id", "meter_id"]).with_columns(
        (
            pl.col("reg")
            - pl.col("reg").shift(1).over("circuit_id", "meter_id").fill_null(pl.col("base"))
        )
        .clip(lower_bound=0.0)
        .alias("kwh")
    )
    return {
        (r["circuit_id"], r["meter_id"], r["day"], r["hour"].hour): r["kwh"]
        for r in hours.to_dicts()
    }


def table_hours(rows: list[tuple[Any, ...]]) -> dict[tuple[str, str, dt.date, int], float]:
    """(circuit_id, meter_id, day, kwh array) rows -> energy by hour (hours with energy)."""
    out = {}
    for circuit, meter, day, kwh in rows:
        assert len(kwh) == 24
        for hour, value in enumerate(kwh):
            if value:
                out[(circuit, meter, day, hour)] = value
    return out


def assert_same_energy(got: dict[Any, float], expected: dict[Any, float]) -> None:
    nonzero = {k: v for k, v in expected.items() if v}
    assert got.keys() == nonzero.keys()
    for key, value in nonzero.items():
        # closed days are stored as Float32 (~7 digits): a few kWh to within 1e-5
        assert got[key] == pytest.approx(value, abs=1e-5), key


# The register rollup of migration 006 (no catalog query reads it since 007, which points
# circuit_hour_energy at the billed interval facts): closed days plus the derived open days.
UNION = """SELECT circuit_id, meter_id, day, kwh FROM (
    SELECT circuit_id, meter_id, day, kwh FROM mallwatt.circuit_hour_kwh FINAL
    WHERE day <= (SELECT max(through) FROM mallwatt.circuit_hour_kwh_closed)
    UNION ALL
    SELECT circuit_id, meter_id, day, kwh FROM mallwatt.circuit_hour_kwh_live(
        from_day = '2026-01-01', to_day = '2026-01-31', mall_id = '', open_only = 1))
    ORDER BY circuit_id, meter_id, day"""


def close_days(client: Any, *args: Any, **kwargs: Any) -> Any:
    return close_any(client, *args, rollup=REGISTERS, **kwargs)


def closed_through(client: Any) -> Any:
    return closed_any(client, REGISTERS)


def test_closed_hourly_energies_equal_the_raw_reads_under_replays(folder: Path) -> None:
    frame = day_reads(5)
    expected = hour_energy_from_raw(frame)
    with wh.open_owner(folder, serve=False) as owner:
        c = owner.client
        # Nothing closed yet: every day is derived at query time.
        insert(c, frame.filter(pl.col("ts").dt.date() <= D0 + dt.timedelta(days=3)), "a")
        assert closed_through(c) is None
        # Close the first two days, then the rest arrives (and a replay with other bounds).
        assert close_days(c, D0 + dt.timedelta(days=1)) == (D0, D0 + dt.timedelta(days=1))
        insert(c, frame.filter(pl.col("ts").dt.date() > D0 + dt.timedelta(days=3)), "b")
        insert(c, frame.slice(100, 500), "replay")
        assert_same_energy(table_hours(c.query(UNION).result_rows), expected)
        # Close two more days (the last RECOMPUTE_DAYS closed ones again); later days stay derived.
        assert close_days(c, D0 + dt.timedelta(days=3)) == (D0, D0 + dt.timedelta(days=3))
        assert closed_through(c) == D0 + dt.timedelta(days=3)
        assert_same_energy(table_hours(c.query(UNION).result_rows), expected)
        # The table itself holds exactly the raw energies of the closed days.
        closed = c.query(
            "SELECT circuit_id, meter_id, day, kwh FROM mallwatt.circuit_hour_kwh FINAL "
            "ORDER BY circuit_id, meter_id, day"
        ).result_rows
        assert {r[2] for r in closed} == {D0 + dt.timedelta(days=i) for i in range(4)}
        in_closed = {k: v for k, v in expected.items() if k[2] <= D0 + dt.timedelta(days=3)}
        assert_same_energy(table_hours(closed), in_closed)
        # Late reads for a closed day (a replay of day 1) change nothing once re-closed.
        insert(c, frame.filter(pl.col("ts").dt.date() == D0 + dt.timedelta(days=1)), "late")
        close_days(c, D0 + dt.timedelta(days=5), from_day=D0 + dt.timedelta(days=1))
        c.command("OPTIMIZE TABLE mallwatt.circuit_hour_kwh FINAL")
        assert_same_energy(table_hours(c.query(UNION).result_rows), expected)
        # (the local-day views read billed energy since 007: tests/integration/test_warehouse_energy_facts.py)
