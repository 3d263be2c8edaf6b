"""Real chDB: the sink's insert path (chDB Python() table function) keeps every value of
every topic table, including raw bytes, and drops a retried block by its token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import warehouse as wh
from pipelines.sink_tables import (
    TOPIC_TABLES,
    _alert_row,
    _ledger_row,
    dead_letter_row,
    drop_known_ledger_rows,
    insert_arrow,
)

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "chdb"
    yield path
    wh.release_folder(path)


def test_insert_keeps_values_bytes_maps_and_nulls(folder: Path) -> None:
    dead = dead_letter_row({
        "source_topic": "t", "source_partition": 0, "source_offset": 7, "stage": "sink",
        "reason": "bad", "key": b"k", "value": b"\x00\xff\x01", "ts_ms": T0,
    })  # fmt: skip
    alert = _alert_row({
        "alert_id": "a1", "kind": "low_balance", "severity": "warn", "mall_id": "M1",
        "account_id": None, "meter_id": "m", "ts_ms": T0, "message": "x", "details": {"k": "v"},
    })  # fmt: skip
    entry = _ledger_row({
        "entry_id": "E1", "account_id": "A", "mall_id": "M1", "kind": "charge",
        "amount_minor": -5, "balance_after_minor": 5, "ts_ms": T0, "source_id": "s",
        "estimated": True, "tier": 1, "energy_wh": 10,
    })  # fmt: skip
    with wh.open_owner(folder, serve=False) as owner:
        c = owner.client
        for topic, row in (("mallwatt.deadletter", dead), ("mallwatt.alerts", alert),
                           ("mallwatt.ledger", entry)):  # fmt: skip
            spec = TOPIC_TABLES[topic]
            for _ in range(2):  # the second is a retry with the same token
                table = spec.to_arrow([[row]])
                if topic == "mallwatt.ledger":  # as Sink._write does on every attempt
                    table = drop_known_ledger_rows(table, c)
                if table.num_rows:
                    insert_arrow(c, spec.table, table, f"tok-{topic}")
        # The token drops a retried block from the base table only: chDB still runs the
        # views on it, so the ledger rollups rely on the entry_id check above.
        spec = TOPIC_TABLES["mallwatt.alerts"]
        insert_arrow(c, spec.table, spec.to_arrow([[alert]]), "tok-mallwatt.alerts")
        assert c.query("SELECT count() FROM mallwatt.alerts").result_rows == [(1,)]
        assert c.query(
            "SELECT hex(key), hex(value), source_offset FROM mallwatt.dead_letters"
        ).result_rows == [("6B", "00FF01", 7)]
        assert c.query("SELECT account_id, details FROM mallwatt.alerts").result_rows == [
            (None, {"k": "v"})
        ]
        assert c.query(
            "SELECT amount_minor, tier, energy_wh, tou_period, estimated FROM mallwatt.ledger"
        ).result_rows == [(-5, 1, 10, None, True)]
        assert c.query("SELECT sum(entries) FROM mallwatt.ledger_hourly").result_rows == [(1,)]
