"""Every mallwatt metric, declared in one place, and the tiny HTTP server that serves them.

Each process serves `/metrics` (Prometheus text format), `/healthz` (200 while the process
runs) and `/readyz` (200 when its `ready` callable says so, else 503 with the reason):

    from pipelines import metrics as m
    server = m.serve(m.metrics_port("sink", args.metrics_port), ready=sink.readiness)
    m.SINK_ROWS.labels(table="readings").inc(n)
    ...
    server.close()

Names follow the Prometheus conventions: `mallwatt_<component>_<what>_<unit>`, counters end
in `_total`, durations are seconds, timestamps are `_timestamp_seconds`. Labels have
bounded values only (topic, table, partition, channel, reason class, collector, gateway),
never account or message ids. The metrics table is in docs/operations.md.

Ports: `--metrics-port` on the command line, else `MALLWATT_<COMPONENT>_METRICS_PORT`,
else `MALLWATT_METRICS_PORT` (one process per host), else the component's default below.
0 picks a free port (tests); a negative port disables the server.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger("mallwatt.metrics")

DEFAULT_PORTS: dict[str, int] = {
    "collector": 9461, "sink": 9462, "notify": 9463, "worker": 9464, "forwarder": 9465,
    "portal": 9466, "watch": 9467,
}  # fmt: skip

# Seconds: from a fast batch step (ms) to a slow warehouse insert or relay round trip.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0)
SIZE_BUCKETS = (1, 10, 100, 500, 1000, 5000, 10_000, 50_000, 100_000, 250_000, 1_000_000)

# --- collectors (collectors/run.py) ---------------------------------------------------------
COLLECTOR_POLLS = Counter("mallwatt_collector_polls_total",
                          "Meter polls by result (ok: values read; failed: timeout or error).",
                          ["collector", "result"])
COLLECTOR_READINGS = Counter("mallwatt_collector_readings_total",
                             "Circuit readings written to the spool for publishing.", ["collector"])
COLLECTOR_ACKED = Counter("mallwatt_collector_spool_acked_records_total",
                          "Spool records (reading batches, events, outcomes) acknowledged by Kafka.",
                          ["collector"])
COLLECTOR_EVENTS = Counter("mallwatt_collector_events_total",
                           "Collector events published, by kind (gateway_down, spool_growing, ...).",
                           ["collector", "kind"])
COLLECTOR_SPOOL = Gauge("mallwatt_collector_spool_records",
                        "Spool records not yet acknowledged by Kafka.", ["collector"])
COLLECTOR_GATEWAYS = Gauge("mallwatt_collector_gateways",
                           "Gateways of this collector by state (up: connection open).",
                           ["collector", "state"])
COLLECTOR_GATEWAY_UP = Gauge("mallwatt_collector_gateway_up",
                             "1 while the gateway's Modbus TCP connection works, else 0.",
                             ["collector", "mall", "gateway"])
COLLECTOR_DEVICES = Gauge("mallwatt_collector_devices",
                          "Meters of this collector by state (down: stopped answering).",
                          ["collector", "state"])
COLLECTOR_KAFKA_UP = Gauge("mallwatt_collector_kafka_up",
                           "1 while the spool drains to Kafka, 0 while sends fail.", ["collector"])
COLLECTOR_LAST_READING = Gauge("mallwatt_collector_last_reading_timestamp_seconds",
                               "Wall time of the last reading spooled.", ["collector", "mall"])

# --- sink (pipelines/sink.py) ----------------------------------------------------------------
SINK_MESSAGES = Counter("mallwatt_sink_messages_total", "Kafka messages consumed, by topic.",
                        ["topic"])
SINK_ROWS = Counter("mallwatt_sink_rows_inserted_total", "Rows inserted into the warehouse.",
                    ["table"])
SINK_INSERT_FAILURES = Counter("mallwatt_sink_insert_failures_total",
                               "Failed warehouse inserts (each is retried, never committed).",
                               ["table"])
SINK_INSERT_SECONDS = Histogram("mallwatt_sink_insert_duration_seconds",
                                "Duration of one table's insert, watermark and commit.",
                                ["table"], buckets=DURATION_BUCKETS)
SINK_WATERMARK = Gauge("mallwatt_sink_watermark_timestamp_seconds",
                       "Event time every partition of the topic has been inserted up to.",
                       ["topic"])
SINK_WATERMARK_AGE = Gauge("mallwatt_sink_watermark_age_seconds",
                           "Now minus the topic's watermark (computed at scrape time).", ["topic"])

# --- notifier (pipelines/notify/) --------------------------------------------------------------
NOTIFY_ALERTS = Counter("mallwatt_notify_alerts_total",
                        "Alerts handled, by outcome (sent, partial, failed, duplicate, "
                        "rate_limited, no_route, error) and alert kind.", ["status", "kind"])
NOTIFY_DELIVERIES = Counter("mallwatt_notify_deliveries_total",
                            "Deliveries per target, by channel and result (sent, failed, "
                            "deduplicated, rate_limited).", ["channel", "provider", "result"])
NOTIFY_SEND_SECONDS = Histogram("mallwatt_notify_send_duration_seconds",
                                "One provider call, retries included.", ["channel"],
                                buckets=DURATION_BUCKETS)

# --- shared by every Kafka consumer ---------------------------------------------------------
DEAD_LETTERS = Counter("mallwatt_dead_letters_total",
                       "Messages sent to mallwatt.deadletter, by stage and reason class.",
                       ["component", "stage", "reason"])
CONSUMER_LAG = Gauge("mallwatt_consumer_lag_messages",
                     "High watermark minus the committed/consumed offset, per partition.",
                     ["component", "topic", "partition"])

# --- collector watch (pipelines/collector_watch.py) --------------------------------------------
WATCH_OFFLINE = Gauge("mallwatt_watch_offline_episodes",
                      "Open collector_offline episodes (gateway down, spool growing, silent).",
                      ["cause"])
WATCH_ALERTS = Counter("mallwatt_watch_alerts_total",
                       "collector_offline alerts published, by cause and state (open, resolved).",
                       ["cause", "state"])

# --- worker and forwarder (pipelines/worker_metrics.py) --------------------------------------
WORKER_INPUT = Counter("mallwatt_worker_input_messages_total", "Messages taken by the worker.",
                       ["topic"])
WORKER_OUTPUT = Counter("mallwatt_worker_output_messages_total",
                        "Output messages (ledger, alerts, relay commands) made by the worker.",
                        ["topic"])
WORKER_STEP_SECONDS = Histogram("mallwatt_worker_step_duration_seconds",
                                "One billing step (one take of messages).", ["topic"],
                                buckets=DURATION_BUCKETS)
WORKER_STEP_SIZE = Histogram("mallwatt_worker_step_size_messages", "Messages in one step.",
                             ["topic"], buckets=SIZE_BUCKETS)
WORKER_STATE_KEYS = Gauge("mallwatt_worker_state_keys", "Keys in the worker's tables.", ["table"])
WORKER_READING_TO_COMMAND = Histogram("mallwatt_worker_reading_to_command_seconds",
                                      "Reading time to relay command issue time.",
                                      buckets=LATENCY_BUCKETS)
WORKER_ALERTS = Counter("mallwatt_worker_alerts_total",
                        "Alerts the worker raised (published by the forwarder), by kind.", ["kind"])
FORWARDER_OUTPUT = Counter("mallwatt_forwarder_messages_total",
                           "Outbox messages published by the forwarder.", ["topic"])
RELAY_COMMANDS = Counter("mallwatt_relay_commands_total",
                         "Relay commands by action and outcome (issued, CONFIRMED, FAILED, ...).",
                         ["action", "outcome"])
RELAY_RETRIES = Counter("mallwatt_relay_command_retries_total", "Relay command re-issues.",
                        ["action"])
RELAY_UNCONFIRMED = Gauge("mallwatt_relay_commands_unconfirmed",
                          "Relay commands issued and not yet confirmed (reconciliation backlog).",
                          ["action"])
PAID_STILL_TRIPPED = Gauge("mallwatt_relay_paid_tripped_accounts",
                           "Accounts in credit whose meter still reads open.", ["mall"])

PORTAL_REQUESTS = Counter("mallwatt_portal_requests_total", "Portal HTTP requests, by route and status.",
                          ["route", "status"])
PORTAL_REQUEST_SECONDS = Histogram("mallwatt_portal_request_duration_seconds",
                                   "Portal request handling time, by route.", ["route"],
                                   buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


def reason_class(reason: str) -> str:
    """A bounded label from a free-text reason: the exception name or the first word."""
    head = reason.split(":", 1)[0].strip() or "unknown"
    return head.split()[0][:40]


def metrics_port(component: str, cli_value: int | None = None) -> int:
    """The port a component serves on (see the module doc); negative: disabled."""
    if cli_value is not None:
        return cli_value
    for name in (f"MALLWATT_{component.upper()}_METRICS_PORT", "MALLWATT_METRICS_PORT"):
        raw = os.environ.get(name)
        if raw:
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r}: not a port number") from None
    return DEFAULT_PORTS.get(component, 9460)


Readiness = Callable[[], bool | tuple[bool, str]]


class MetricsServer:
    """A daemon thread serving /metrics, /healthz and /readyz."""

    def __init__(self, port: int, *, host: str = "0.0.0.0", ready: Readiness | None = None,
                 registry: CollectorRegistry = REGISTRY) -> None:
        self.ready = ready
        self.registry = registry
        self.started = time.time()
        self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        self._httpd.daemon_threads = True
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def readiness(self) -> tuple[bool, str]:
        if self.ready is None:
            return True, "ok"
        try:
            answer = self.ready()
        except Exception as exc:  # a failing check means not ready, never a dead server
            return False, f"readiness check failed: {type(exc).__name__}: {exc}"
        if isinstance(answer, tuple):
            return bool(answer[0]), str(answer[1])
        return bool(answer), "ok" if answer else "not ready"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def _handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                ok, detail = server.readiness()
                self._send(200 if ok else 503, (detail.replace("\n", " ") + "\n").encode())
            else:
                self._send(404, b"not found: /metrics, /healthz, /readyz\n")

        def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # scrapes every few seconds would flood the process's log

    return Handler


def serve(port: int, *, ready: Readiness | None = None, host: str | None = None,
          registry: CollectorRegistry = REGISTRY) -> MetricsServer | None:
    """Start serving; None when disabled (negative port) or the port is taken, which is
    logged and never stops the process (Prometheus then reports the target down).
    host: MALLWATT_METRICS_HOST, else every interface (Prometheus may scrape from afar)."""
    if port < 0:
        return None
    host = host or os.environ.get("MALLWATT_METRICS_HOST") or "0.0.0.0"
    try:
        server = MetricsServer(port, host=host, ready=ready, registry=registry)
    except OSError as exc:
        log.error("metrics: cannot listen on %s:%d (%s); serving no metrics", host, port, exc)
        return None
    log.info("metrics on %s/metrics", server.url)
    return server


__all__ = ["DEFAULT_PORTS", "MetricsServer", "metrics_port", "reason_class", "serve"]


def lag_stats_config(component: str, interval_ms: int = 10_000) -> dict[str, Any]:
    """confluent-kafka consumer settings that export `mallwatt_consumer_lag_messages` per
    assigned partition from librdkafka's statistics (no extra broker round trips): the
    lag is the partition's high watermark minus the group's committed offset."""
    import json

    def on_stats(raw: str) -> None:
        try:
            stats = json.loads(raw)
        except ValueError:
            return
        for topic, t in (stats.get("topics") or {}).items():
            for part, p in (t.get("partitions") or {}).items():
                if part == "-1" or p.get("fetch_state") in (None, "none", "stopped"):
                    continue  # the internal UA partition, or one not assigned to us
                lag = p.get("consumer_lag", -1)
                if lag is not None and lag >= 0:
                    CONSUMER_LAG.labels(component, topic, part).set(lag)

    return {"statistics.interval.ms": interval_ms, "stats_cb": on_stats}
