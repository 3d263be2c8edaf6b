"""The catalog headers, parameter binding, dimension rows and the Grafana files (no engine)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from infra import warehouse_grafana
from infra.warehouse_catalog import catalog, convert, markdown_table, query_spec
from infra.warehouse_dims import dimension_rows
from infra.warehouse_sql import list_migrations
from pipelines.generate import generate
from pipelines.portfolio import parse_portfolio

GRAFANA = Path(warehouse_grafana.__file__).resolve().parent / "grafana"
PLACEHOLDER = re.compile(r"\{(\w+):([^{}]+)\}")


def defined_objects() -> set[str]:
    """Tables and views the migrations create (plus the migrations table)."""
    names = {"schema_migrations"}
    pattern = re.compile(
        r"CREATE\s+(?:MATERIALIZED\s+)?(?:TABLE|VIEW)\s+IF\s+NOT\s+EXISTS\s+mallwatt\.(\w+)", re.I
    )
    for migration in list_migrations():
        for statement in migration.statements:
            names.update(pattern.findall(statement))
    return names


def test_catalog_headers_declare_exactly_the_parameters_used() -> None:
    specs = catalog()
    assert len(specs) >= 19
    for spec in specs:
        used = dict(PLACEHOLDER.findall(spec.sql))
        declared = {p.name: p.type for p in spec.params}
        assert used == declared, spec.name
        assert spec.columns and spec.purpose and spec.sources, spec.name
        assert all(t.startswith("mallwatt.") for t in spec.watermark_topics), spec.name
        assert len({c.name for c in spec.columns}) == len(spec.columns), spec.name


def test_catalog_queries_read_only_defined_objects_and_never_raw_readings() -> None:
    objects = defined_objects()
    for spec in catalog():
        referenced = set(re.findall(r"mallwatt\.(\w+)", spec.sql))
        assert referenced <= objects, (spec.name, referenced - objects)
        # Dashboards never scan raw readings: a rollup answers every reading question.
        assert "readings" not in referenced, spec.name


def test_binding_fills_defaults_and_rejects_unknown_or_missing() -> None:
    spec = query_spec("anomaly_closed_hours")
    bound = spec.bind({"from_day": "2026-03-01", "to_day": "2026-03-07", "min_kw": "2.5"})
    assert bound["tz"] == "Asia/Shanghai" and bound["mall_id"] == ""
    assert bound["open_hour"] == 10 and bound["min_kw"] == 2.5
    assert bound["exclude_purposes"] == ["refrigeration"]
    with pytest.raises(ValueError, match="missing parameter to_day"):
        spec.bind({"from_day": "2026-03-01"})
    with pytest.raises(ValueError, match="unknown parameter"):
        spec.bind({"from_day": "2026-03-01", "to_day": "2026-03-02", "colour": "red"})
    assert convert("Array(String)", "a, b") == ["a", "b"]
    assert convert("Array(String)", "['x']") == ["x"]
    assert convert("Array(String)", "") == []
    assert convert("UInt32", "7") == 7
    assert convert("Date", "2026-01-01") == "2026-01-01"
    with pytest.raises(ValueError):
        convert("UInt8", "ten")
    # A named query without the catalog header still runs, unchecked, and is not listed.
    assert all(s.documented for s in catalog())


def test_markdown_table_lists_the_catalog() -> None:
    table = markdown_table()
    for spec in catalog():
        assert f"`{spec.name}`" in table


def test_dimension_rows_of_a_generated_portfolio() -> None:
    portfolio = parse_portfolio(generate(2, 7, seed=3))
    rows = dimension_rows(portfolio)
    assert len(rows["dim_malls"]) == 2
    assert len(rows["dim_accounts"]) == 2 * (7 + 1)  # merchants + one landlord per mall
    landlords = [r for r in rows["dim_accounts"] if r["is_landlord"]]
    assert {r["account_id"] for r in landlords} == {"M01-LANDLORD", "M02-LANDLORD"}
    circuits = rows["dim_circuits"]
    assert len(circuits) == 2 * (7 + 3)
    common = [c for c in circuits if c["is_common"]]
    assert {c["purpose"] for c in common} == {"hvac", "elevator", "public_lighting"}
    assert all(c["account_id"].endswith("-LANDLORD") and len(c["pool_ids"]) == 1 for c in common)
    mall = rows["dim_malls"][0]
    merchants = [m for _, m in portfolio.merchants() if m.id.startswith("M01")]
    assert mall["leasable_m2"] == pytest.approx(sum(m.leased_area_m2 for m in merchants))


def test_grafana_dashboard_is_valid_and_reads_existing_tables() -> None:
    path = GRAFANA / "dashboards" / "mallwatt.json"
    dashboard = json.loads(path.read_text())
    # The committed file is what the builder makes from the current catalog.
    assert path.read_text() == warehouse_grafana.render()
    objects = defined_objects()
    panels = dashboard["panels"]
    assert {p["description"].split()[2] for p in panels} >= {
        "consumption_daily", "tou_shares", "top_movers", "alerts_daily", "relay_trips",
        "anomaly_tripped_drawing", "collector_completeness", "completeness"}  # fmt: skip
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        for target in panel["targets"]:
            sql = target["rawSql"]
            referenced = set(re.findall(r"mallwatt\.(\w+)", sql))
            assert referenced and referenced <= objects, (panel["title"], referenced - objects)
            assert not PLACEHOLDER.search(sql), panel["title"]  # every parameter substituted
            assert target["datasource"]["uid"] == "mallwatt-clickhouse"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used = {m for p in panels for m in re.findall(r"\$\{(\w+)\}", p["targets"][0]["rawSql"])}
    assert used <= variables


def test_grafana_provisioning_files() -> None:
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "mallwatt-clickhouse.yaml").read_text())
    ds = source["datasources"][0]
    assert ds["type"] == "grafana-clickhouse-datasource" and ds["uid"] == "mallwatt-clickhouse"
    assert ds["jsonData"]["defaultDatabase"] == "mallwatt"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "mallwatt.yaml").read_text())
    assert provider["providers"][0]["type"] == "file"
