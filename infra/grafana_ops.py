"""The ops dashboard (Prometheus): throughput, lag, latency, dead letters, relay outcomes,
collectors, the sink and the notifier, from the metrics of pipelines/metrics.py.

    python -m infra.grafana_ops       # writes infra/grafana/dashboards/mallwatt-ops.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

from infra.grafana_common import GRAFANA_DIR, field_config

DASHBOARD = GRAFANA_DIR / "dashboards" / "mallwatt-ops.json"
DATASOURCE = {"type": "prometheus", "uid": "mallwatt-prometheus"}

# (row title, [(panel title, type, unit, [(legend, PromQL)])])
ROWS: list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]]]]]] = [
    ("Stream", [
        ("Worker input (msg/s)", "timeseries", "suffix: msg/s",
         [("{{topic}}", "sum by (topic) (rate(mallwatt_worker_input_messages_total[$__rate_interval]))")]),
        ("Worker and forwarder output (msg/s)", "timeseries", "suffix: msg/s",
         [("worker {{topic}}", "sum by (topic) (rate(mallwatt_worker_output_messages_total[$__rate_interval]))"),
          ("forwarder {{topic}}", "sum by (topic) (rate(mallwatt_forwarder_messages_total[$__rate_interval]))")]),
        ("Consumer lag per partition", "timeseries", "short",
         [("{{component}} {{topic}}[{{partition}}]",
           "max by (component, topic, partition) (mallwatt_consumer_lag_messages)")]),
        ("Step duration (p50, p95)", "timeseries", "s",
         [("p95 {{topic}}", "histogram_quantile(0.95, sum by (le, topic) "
                            "(rate(mallwatt_worker_step_duration_seconds_bucket[$__rate_interval])))"),
          ("p50 {{topic}}", "histogram_quantile(0.5, sum by (le, topic) "
                            "(rate(mallwatt_worker_step_duration_seconds_bucket[$__rate_interval])))")]),
        ("Reading to relay command (p50, p95)", "timeseries", "s",
         [("p95", "histogram_quantile(0.95, sum by (le) "
                  "(rate(mallwatt_worker_reading_to_command_seconds_bucket[$__rate_interval])))"),
          ("p50", "histogram_quantile(0.5, sum by (le) "
                  "(rate(mallwatt_worker_reading_to_command_seconds_bucket[$__rate_interval])))")]),
        ("Dead letters (per 5 min)", "timeseries", "short",
         [("{{component}} {{stage}} {{reason}}",
           "sum by (component, stage, reason) (increase(mallwatt_dead_letters_total[5m]))")]),
    ]),
    ("Relays", [
        ("Relay commands by outcome (per 15 min)", "timeseries", "short",
         [("{{action}} {{outcome}}", "sum by (action, outcome) (increase(mallwatt_relay_commands_total[15m]))")]),
        ("Unconfirmed relay commands and retries", "timeseries", "short",
         [("unconfirmed {{action}}", "sum by (action) (mallwatt_relay_commands_unconfirmed)"),
          ("retries {{action}} (per 15 min)",
           "sum by (action) (increase(mallwatt_relay_command_retries_total[15m]))")]),
        ("Paid accounts still tripped", "stat", "short",
         [("{{mall}}", "sum by (mall) (mallwatt_relay_paid_tripped_accounts)")]),
    ]),
    ("Collectors", [
        ("Readings published (readings/s)", "timeseries", "suffix: readings/s",
         [("{{collector}}", "sum by (collector) (rate(mallwatt_collector_readings_total[$__rate_interval]))")]),
        ("Gateways up / down", "timeseries", "short",
         [("{{collector}} {{state}}", "sum by (collector, state) (mallwatt_collector_gateways)")]),
        ("Spool depth (records waiting for Kafka)", "timeseries", "short",
         [("{{collector}}", "max by (collector) (mallwatt_collector_spool_records)")]),
        ("Poll failures (share)", "timeseries", "percentunit",
         [("{{collector}}", "sum by (collector) (rate(mallwatt_collector_polls_total{result=\"failed\"}[$__rate_interval]))"
                            " / sum by (collector) (rate(mallwatt_collector_polls_total[$__rate_interval]))")]),
        ("collector_offline episodes open", "stat", "short",
         [("{{cause}}", "sum by (cause) (mallwatt_watch_offline_episodes)")]),
    ]),
    ("Warehouse and notifier", [
        ("Rows inserted (rows/s)", "timeseries", "suffix: rows/s",
         [("{{table}}", "sum by (table) (rate(mallwatt_sink_rows_inserted_total[$__rate_interval]))")]),
        ("Watermark age", "timeseries", "s",
         [("{{topic}}", "max by (topic) (mallwatt_sink_watermark_age_seconds)")]),
        ("Insert failures (per 5 min)", "timeseries", "short",
         [("{{table}}", "sum by (table) (increase(mallwatt_sink_insert_failures_total[5m]))")]),
        ("Notifications by channel and result (per 15 min)", "timeseries", "short",
         [("{{channel}} {{result}}",
           "sum by (channel, result) (increase(mallwatt_notify_deliveries_total[15m]))")]),
        ("Processes up", "stat", "short", [("{{job}} {{instance}}", "up{job=~\"mallwatt.*\"}")]),
    ]),
]  # fmt: skip


def _panel(pid: int, title: str, kind: str, unit: str, queries: list[tuple[str, str]],
           x: int, y: int) -> dict[str, Any]:
    options: dict[str, Any] = {"legend": {"showLegend": True, "displayMode": "list",
                                          "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    if kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "values": False, "fields": ""},
                   "colorMode": "value", "graphMode": "none"}
    return {
        "id": pid, "title": title, "type": kind, "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": 8, "h": 8},
        "fieldConfig": field_config(unit, overrides=False, min=0), "options": options,
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                     "legendFormat": legend, "range": True}
                    for i, (legend, expr) in enumerate(queries)],
    }  # fmt: skip


def build_dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, pid = 0, 1
    for row_title, row_panels in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, (title, kind, unit, queries) in enumerate(row_panels):
            panels.append(_panel(pid, title, kind, unit, queries, (i % 3) * 8, y + (i // 3) * 8))
            pid += 1
        y += ((len(row_panels) + 2) // 3) * 8
    return {
        "uid": "mallwatt-ops", "title": "mallwatt ops", "schemaVersion": 39, "version": 1,
        "editable": False, "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
        "tags": ["mallwatt", "ops"], "timezone": "browser", "panels": panels,
        "templating": {"list": []},
    }


def render() -> str:
    return json.dumps(build_dashboard(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    DASHBOARD.write_text(render())
    print(f"wrote {DASHBOARD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
