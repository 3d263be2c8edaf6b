"""Every ClickHouse panel's SQL (and template variable query), with Grafana's macros and
variables expanded as the plugin does, runs on the migrated schema in embedded chDB."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from infra import warehouse as wh
from infra.grafana_common import GRAFANA_DIR, expand_clickhouse_macros

pytestmark = pytest.mark.integration

START = "toDateTime64('2026-07-13 00:00:00', 3, 'Asia/Shanghai')"
END = "toDateTime64('2026-07-14 23:59:59', 3, 'Asia/Shanghai')"
VARIABLES = {"tz": "Asia/Shanghai", "mall": ""}


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("dash") / "chdb"
    with wh.open_owner(folder, serve=False):  # applies every migration
        pass
    yield folder
    wh.release_folder(folder)


def clickhouse_queries() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for path in sorted((GRAFANA_DIR / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for v in dashboard["templating"]["list"]:
            if v.get("datasource", {}).get("type") == "grafana-clickhouse-datasource":
                out.append((f"{path.name}: variable {v['name']}", v["query"], {}))
        for panel in dashboard["panels"]:
            if panel.get("datasource", {}).get("type") == "grafana-clickhouse-datasource":
                for target in panel["targets"]:
                    out.append((f"{path.name}: {panel['title']}", target["rawSql"], panel))
    return out


QUERIES = clickhouse_queries()


def test_there_are_panels_to_check() -> None:
    assert len(QUERIES) >= 15


@pytest.mark.parametrize(("name", "sql", "panel"), QUERIES, ids=[q[0] for q in QUERIES])
def test_panel_sql_runs_on_the_migrated_schema(migrated: Path, name: str, sql: str,
                                               panel: dict[str, Any]) -> None:
    table = wh.query_arrow(expand_clickhouse_macros(sql, START, END, VARIABLES), path=migrated)
    numeric = [f.name for f in table.schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
               or pa.types.is_decimal(f.type)]
    if panel.get("type") == "piechart":  # one measure: each row is a slice
        assert numeric == ["kwh"] and len(table.schema) == 2, table.schema
    if panel.get("type") == "barchart":  # the x field plus one measure
        assert panel["options"]["xField"] in table.schema.names and len(numeric) == 1, table.schema
    if panel.get("type") == "timeseries":
        assert "time" in table.schema.names
