"""The Grafana dashboard of the warehouse, built from the catalog queries.

Each panel runs a catalog query (sql/queries/) with its `{name:Type}` parameters replaced
by Grafana macros and dashboard variables, so the dashboard and `mallwatt query` answer
the same question the same way. Regenerate after changing a query:

    python -m infra.warehouse_grafana        # writes infra/grafana/dashboards/mallwatt.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from infra.grafana_common import field_config
from infra.warehouse_catalog import query_spec

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "mallwatt.json"
DATASOURCE = {"type": "grafana-clickhouse-datasource", "uid": "mallwatt-clickhouse"}
TIME_SERIES, TABLE = 0, 1  # the plugin's "format" values

# Parameter -> Grafana expression. The range picker gives the local days; ${tz} and ${mall}
# are dashboard variables (${mall} is '' for every mall).
MACROS = {
    "tz": "'${tz}'",
    "from_day": "toDate($__fromTime, '${tz}')",
    "to_day": "toDate($__toTime, '${tz}')",
    "mall_id": "'${mall}'",
    "start": "$__fromTime",
    "end": "$__toTime",
    "topic_like": "'%'",
}

TOU_ORDER = "indexOf(['sharp', 'peak', 'flat', 'valley', 'deep_valley'], tou_period)"

# title, catalog query, panel type; optional: parameter overrides, "wrap" (SQL around the
# query: charts get exactly the columns they draw), "unit" (default unit), "options".
PANELS: list[dict[str, Any]] = [
    {"title": "Portfolio energy per day (kWh)", "query": "consumption_daily", "type": "timeseries",
     "params": {"by": "mall"}, "unit": "kwatth",
     "wrap": "SELECT toDateTime(day, '${tz}') AS time, key, kwh FROM ({sql}) ORDER BY time"},
    # one slice per TOU period: a single numeric column, every row a value
    {"title": "Time-of-use shares (kWh)", "query": "tou_shares", "type": "piechart", "unit": "kwatth",
     "wrap": f"SELECT tou_period, round(sum(kwh), 3) AS kwh FROM ({{sql}}) GROUP BY tou_period "
             f"ORDER BY {TOU_ORDER} = 0, {TOU_ORDER}, tou_period",
     "options": {"reduceOptions": {"values": True, "calcs": [], "fields": "/^kwh$/"},
                 "pieType": "donut", "displayLabels": ["name", "percent"],
                 "legend": {"displayMode": "table", "placement": "right", "values": ["value", "percent"]}}},
    {"title": "Top consumers and movers (vs previous period)", "query": "top_movers", "type": "table",
     "params": {"limit": "20"}},
    {"title": "Energy per business type (kWh)", "query": "consumption_daily", "type": "barchart",
     "params": {"by": "business_type"}, "unit": "kwatth",
     "wrap": "SELECT key AS business_type, round(sum(kwh), 3) AS kwh FROM ({sql}) GROUP BY key ORDER BY kwh DESC",
     "options": {"xField": "business_type", "orientation": "horizontal"}},
    {"title": "Average day (kW by local hour, all business types)", "query": "load_profile",
     "type": "barchart", "params": {"by": "business_type"}, "unit": "kwatt",
     "wrap": "SELECT leftPad(toString(hour), 2, '0') AS hour, round(sum(avg_kw), 3) AS avg_kw FROM ({sql}) "
             "GROUP BY hour ORDER BY hour",
     "options": {"xField": "hour"}},
    {"title": "Efficiency within business type (kWh/m2)", "query": "efficiency_rank", "type": "table"},
    {"title": "Common areas inside and outside opening hours", "query": "common_area_hours", "type": "table"},
    {"title": "Alerts per day", "query": "alerts_daily", "type": "table"},
    {"title": "Relay trips and reconnections", "query": "relay_trips", "type": "table"},
    {"title": "Tripped meters still drawing power", "query": "anomaly_tripped_drawing", "type": "table"},
    {"title": "Consumption while closed", "query": "anomaly_closed_hours", "type": "table"},
    {"title": "Baseline shifts", "query": "anomaly_baseline_shift", "type": "table"},
    {"title": "Collections vs energy cost", "query": "collections_vs_cost", "type": "table"},
    {"title": "Data completeness per collector", "query": "collector_completeness", "type": "table",
     "params": {"from_day": "toDate($__fromTime)", "to_day": "toDate($__toTime)"}},
    {"title": "Ingested up to (watermark)", "query": "completeness", "type": "table"},
]  # fmt: skip

_PLACEHOLDER = re.compile(r"\{(\w+):[^{}]+\}")


def panel_sql(query: str, overrides: dict[str, str] | None = None) -> str:
    """The catalog query with every parameter replaced by a Grafana expression."""
    spec = query_spec(query)
    values: dict[str, str] = {}
    for p in spec.params:
        if overrides and p.name in overrides:
            raw = overrides[p.name]
            values[p.name] = raw if not p.type.startswith("String") else f"'{raw}'"
        elif p.name in MACROS:
            values[p.name] = MACROS[p.name]
        elif p.default is not None:
            values[p.name] = p.default if not p.type.startswith("String") else f"'{p.default}'"
        else:
            raise ValueError(f"{query}: no Grafana value for parameter {p.name}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], spec.sql)


def build_dashboard() -> dict[str, Any]:
    panels = []
    for i, panel in enumerate(PANELS):
        sql = panel_sql(panel["query"], panel.get("params"))
        if "wrap" in panel:
            sql = panel["wrap"].replace("{sql}", sql)
        series = panel["type"] == "timeseries"
        panels.append({
            "id": i + 1, "title": panel["title"], "type": panel["type"], "datasource": DATASOURCE,
            "description": f"catalog query {panel['query']} (sql/queries/{panel['query']}.sql)",
            "gridPos": {"x": (i % 2) * 12, "y": (i // 2) * 8, "w": 12, "h": 8},
            "fieldConfig": field_config(panel.get("unit", "short")),
            "options": panel.get("options", {}),
            "targets": [{"refId": "A", "datasource": DATASOURCE, "editorType": "sql",
                         "queryType": "timeseries" if series else "table",
                         "format": TIME_SERIES if series else TABLE, "rawSql": sql}],
        })  # fmt: skip
    return {
        "uid": "mallwatt-portfolio", "title": "mallwatt portfolio", "schemaVersion": 39,
        "version": 1, "editable": False, "time": {"from": "now-30d", "to": "now"},
        "tags": ["mallwatt"], "timezone": "browser", "panels": panels,
        "templating": {"list": [
            {"name": "tz", "type": "custom", "query": "Asia/Shanghai", "label": "time zone",
             "current": {"text": "Asia/Shanghai", "value": "Asia/Shanghai"}},
            {"name": "mall", "type": "query", "label": "mall", "datasource": DATASOURCE,
             "query": "SELECT '' UNION ALL SELECT mall_id FROM mallwatt.dim_malls FINAL ORDER BY 1",
             "current": {"text": "", "value": ""}, "includeAll": False},
        ]},
    }  # fmt: skip


def render() -> str:
    return json.dumps(build_dashboard(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    DASHBOARD.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD.write_text(render())
    print(f"wrote {DASHBOARD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
