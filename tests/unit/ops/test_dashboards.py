"""Every Grafana dashboard and provisioning file: valid JSON/YAML, datasources that exist,
units on every panel, charts that draw what they say, and Grafana's env expansion."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import pipelines.metrics  # noqa: F401  (declares the families)
from infra import grafana_ops, warehouse_grafana
from infra.grafana_common import (
    GRAFANA_DIR,
    GRAFANA_ENV_DEFAULTS,
    expand_clickhouse_macros,
    grafana_environment,
    grafana_expand,
    referenced_variables,
)

DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
PROVISIONING = sorted((GRAFANA_DIR / "provisioning").rglob("*.yaml"))


def datasources() -> dict[str, str]:
    out = {}
    for path in (GRAFANA_DIR / "provisioning" / "datasources").glob("*.yaml"):
        for ds in yaml.safe_load(path.read_text())["datasources"]:
            out[ds["uid"]] = ds["type"]
    return out


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_committed_dashboards_are_what_the_builders_make() -> None:
    assert {p.name for p in DASHBOARDS} == {"mallwatt.json", "mallwatt-ops.json"}
    assert (GRAFANA_DIR / "dashboards" / "mallwatt.json").read_text() == warehouse_grafana.render()
    assert (GRAFANA_DIR / "dashboards" / "mallwatt-ops.json").read_text() == grafana_ops.render()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure_datasources_units_and_variables(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    known = datasources()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for v in dashboard["templating"]["list"]:
        if "datasource" in v:
            assert known.get(v["datasource"]["uid"]) == v["datasource"]["type"], v["name"]
    for panel in panels(dashboard):
        title = panel["title"]
        ds = panel["datasource"]
        assert known.get(ds["uid"]) == ds["type"], (title, ds)
        assert panel["fieldConfig"]["defaults"].get("unit"), title
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target["datasource"] == ds, title
            query = target.get("rawSql") or target.get("expr")
            assert query, title
            used = {a or b for a, b in re.findall(r"\$\{(\w+)\}|\$(?!__)(\w+)", query)}
            assert used <= variables, (title, used - variables)


def test_charts_draw_one_measure_per_slice_or_bar() -> None:
    dashboard = warehouse_grafana.build_dashboard()
    kinds = {p["title"]: p["type"] for p in dashboard["panels"]}
    assert "piechart" in kinds.values() and "barchart" in kinds.values()
    for panel in dashboard["panels"]:
        if panel["type"] == "piechart":
            # every row is a slice of the one selected column, not one slice per numeric column
            reduce = panel["options"]["reduceOptions"]
            assert reduce["values"] is True and reduce["fields"] == "/^kwh$/"
            assert panel["fieldConfig"]["defaults"]["unit"] == "kwatth"
        if panel["type"] == "barchart":
            assert panel["options"]["xField"], panel["title"]
    by_title = {p["title"]: p for p in dashboard["panels"]}
    assert by_title["Portfolio energy per day (kWh)"]["fieldConfig"]["defaults"]["unit"] == "kwatth"
    overrides = by_title["Collections vs energy cost"]["fieldConfig"]["overrides"]
    units = {o["matcher"]["options"]: o["properties"][0]["value"] for o in overrides}
    assert "suffix: fen" in units.values() and "percentunit" in units.values()


def _unit_for(column: str) -> str | None:
    unit = None  # Grafana applies every matching override in order: the last one wins
    for o in warehouse_grafana.field_config()["overrides"]:
        if re.search(o["matcher"]["options"].strip("/"), column):
            unit = o["properties"][0]["value"]
    return unit


def test_unit_rules_by_column_name() -> None:
    assert _unit_for("kwh") == _unit_for("kwh_closed") == _unit_for("baseline_kwh_day") == "kwatth"
    assert _unit_for("topups_minor") == "suffix: fen"
    assert _unit_for("avg_price_minor_per_kwh") == "suffix: fen/kWh"
    assert _unit_for("share") == _unit_for("completeness") == _unit_for("collection_ratio") == "percentunit"
    assert _unit_for("max_power_w") == "watt" and _unit_for("avg_kw_open") == "kwatt"
    assert _unit_for("kwh_per_m2") == "suffix: kWh/m²" and _unit_for("lag_s") == "s"
    assert _unit_for("account_id") is None and _unit_for("accounts") is None


def _metric_names() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                    "gauge": [""]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def test_ops_dashboard_reads_declared_metrics_only() -> None:
    declared = _metric_names() | {"up"}
    for panel in panels(grafana_ops.build_dashboard()):
        for target in panel["targets"]:
            used = set(re.findall(r"\b(mallwatt_\w+|up)\b(?=[{\[\s)]|$)", target["expr"]))
            assert used and used <= declared, (panel["title"], used - declared)


# --- Grafana's expansion -----------------------------------------------------------------


def test_expansion_is_grafanas() -> None:
    env = {"A": "x", "B_2": "y"}
    assert grafana_expand("${A}:$B_2/$A.z", env) == "x:y/x.z"
    assert grafana_expand("${A:-default}", env) == ""  # no defaults in Grafana
    assert grafana_expand("$UNSET|${}|$$|a$", env) == "||$|a$"
    assert grafana_expand("cost $ 5", env) == "cost $ 5"


def test_provisioning_expands_to_working_values() -> None:
    for path in PROVISIONING:
        text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        for name in referenced_variables(text):
            assert re.fullmatch(r"\w+", name), f"{path.name}: ${{{name}}} is not expanded by Grafana"
            assert name in GRAFANA_ENV_DEFAULTS, f"{path.name}: {name} has no default"
    env = grafana_environment({})
    ch = yaml.safe_load(grafana_expand(
        (GRAFANA_DIR / "provisioning/datasources/mallwatt-clickhouse.yaml").read_text(), env))
    j = ch["datasources"][0]["jsonData"]
    assert (j["host"], j["port"], j["username"]) == ("127.0.0.1", 8123, "default")
    prom = yaml.safe_load(grafana_expand(
        (GRAFANA_DIR / "provisioning/datasources/mallwatt-prometheus.yaml").read_text(), env))
    assert prom["datasources"][0]["url"] == "http://127.0.0.1:9090"
    provider = yaml.safe_load(grafana_expand(
        (GRAFANA_DIR / "provisioning/dashboards/mallwatt.yaml").read_text(), env))
    assert Path(provider["providers"][0]["options"]["path"]) == GRAFANA_DIR / "dashboards"
    custom = grafana_environment({"MALLWATT_CH_HOST": "ch.internal"})
    ch = yaml.safe_load(grafana_expand(
        (GRAFANA_DIR / "provisioning/datasources/mallwatt-clickhouse.yaml").read_text(), custom))
    assert ch["datasources"][0]["jsonData"]["host"] == "ch.internal"


def test_clickhouse_macros_are_all_expanded() -> None:
    start, end = "toDateTime64('2026-07-01 00:00:00', 3)", "toDateTime64('2026-07-02 00:00:00', 3)"
    for panel in warehouse_grafana.build_dashboard()["panels"]:
        sql = expand_clickhouse_macros(panel["targets"][0]["rawSql"], start, end,
                                       {"tz": "Asia/Shanghai", "mall": ""})
        assert "$" not in sql, panel["title"]
    assert expand_clickhouse_macros("WHERE $__timeFilter(ts) AND $tz = 1", "S", "E", {"tz": "'z'"}) == \
        "WHERE ts >= S AND ts <= E AND 'z' = 1"
