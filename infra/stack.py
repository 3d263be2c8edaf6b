"""`mallwatt stack up | down | status`: the local real components in one command.

up: resolve Kafka jars (cached outside git), start the KRaft broker, provision topics,
apply warehouse migrations; with --monitoring also Prometheus and Alertmanager
(infra/monitoring.py). down: stop the broker (and the monitoring it started). status: exits 3 when a component is down
(Kafka not answering, warehouse unreachable, or a service named by --require unhealthy). With MALLWATT_KAFKA / MALLWATT_CLICKHOUSE
set, the external services are used and nothing is started or stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from infra import broker
from infra.redact import redact, redact_mapping
from infra.topics import TOPICS, provision_topics, wait_until_served


def migrate_warehouse() -> list[str]:
    """Apply missing migrations; a running owner (the sink) already migrated at its start."""
    from infra import warehouse
    from infra.warehouse_endpoint import live_owner

    if warehouse.server_url():
        return warehouse.apply_migrations(warehouse.get_client(), cluster=warehouse.cluster_name())
    if live_owner(warehouse.chdb_path()):
        return []
    with warehouse.open_owner(serve=False, migrate=False) as owner:
        return warehouse.apply_migrations(owner.client)


def up(kafka_only: bool = False, secure: bool = False, monitoring: bool = False,
       scrape: tuple[str, ...] = (), brokers: int | None = None) -> dict[str, object]:
    t0 = time.monotonic()
    config = broker.BrokerConfig.from_env(secure=secure, brokers=brokers)
    st = broker.start(config)
    out: dict[str, object] = {}
    if config.brokers > 1 and not config.external:  # what every component must be given
        out["client_env"] = f"MALLWATT_KAFKA={config.bootstrap}"
    if config.secure:
        from infra.kafka_security import apply_acls, credentials_file

        # This command acts as the admin principal for the rest of its own run only.
        os.environ["MALLWATT_KAFKA_CREDENTIALS"] = str(credentials_file(config.data_dir, "admin"))
        out["acl_bindings"] = apply_acls(config.admin_settings())
        out["credentials"] = str(credentials_file(config.data_dir, "PRINCIPAL"))
        out["client_env"] = (f"MALLWATT_KAFKA={config.bootstrap} "
                             f"MALLWATT_KAFKA_CREDENTIALS={credentials_file(config.data_dir, 'PRINCIPAL')}")
    created = provision_topics(config.bootstrap)
    wait_until_served(config.bootstrap)
    applied: list[str] = [] if kafka_only else migrate_warehouse()
    if monitoring:  # Prometheus and Alertmanager on loopback (infra/monitoring.py)
        from infra import monitoring as mon

        out.update(mon.up(scrape))
    return {"kafka": st.bootstrap, "kafka_pid": st.pid, "kafka_brokers": config.brokers, "secure": config.secure,
            **out, "topics_created": created,
            "topics_declared": len(TOPICS), "migrations_applied": applied,
            "seconds": round(time.monotonic() - t0, 1)}


def down(secure: bool = False) -> dict[str, object]:
    from infra import monitoring as mon

    return {"kafka_stopped": broker.stop(broker.BrokerConfig.from_env(secure=secure)), **mon.down()}


def probe_health(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> str:
    """'up', 'not ready: <why>' or 'not running' from a service's /healthz and /readyz."""
    import urllib.error
    import urllib.request

    base = f"http://{host}:{port}"
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=timeout_s):
            pass
    except (OSError, urllib.error.URLError):
        return "not running"
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=timeout_s):
            return "up"
    except urllib.error.HTTPError as exc:
        return f"not ready: {exc.read().decode(errors='replace').strip()[:200]}"
    except (OSError, urllib.error.URLError) as exc:
        return f"not ready: {exc}"


def status(require: tuple[str, ...] = (), secure: bool = False) -> dict[str, object]:
    """The stack's state; `down` lists what is not working: Kafka and the warehouse always,
    services (sink, worker, ...: their /healthz and /readyz) when named in `require`."""
    from pipelines.metrics import metrics_port

    st = broker.status(broker.BrokerConfig.from_env(secure=secure))
    down: list[str] = []
    out: dict[str, object] = {"kafka_running": st.running, "kafka": st.bootstrap, "kafka_pid": st.pid,
                              "topics": st.topics, "kafka_external": st.external}
    for node in st.nodes:  # a local cluster: each node, and which are down
        out[f"kafka_node_{node['node']}"] = f"pid {node['pid']}" if node["running"] else "not running"
        if not node["running"]:
            down.append(f"kafka node {node['node']}")
    # a live pid whose broker does not answer is down; a cluster missing a node is degraded (listed above)
    if st.topics is None or (not st.nodes and not st.running):
        down.append("kafka")
    try:
        from infra import warehouse
        from infra.warehouse_endpoint import live_owner

        url = warehouse.server_url()
        if url:
            warehouse.get_client().query("SELECT 1")
            out["warehouse"] = url
        else:
            owner = live_owner(warehouse.chdb_path())
            out["warehouse"] = (f"{warehouse.chdb_path()} (owned by pid {owner.pid})" if owner
                                else f"{warehouse.chdb_path()} (idle)")
    except Exception as exc:  # status must report, not fail
        out["warehouse"] = redact(f"unavailable: {exc}")
        down.append("warehouse")
    from infra import monitoring as mon

    for name, state in mon.status().items():  # only when `up --monitoring` started them here
        out[name] = state
        if state == "not running":
            down.append(name)
    for component in require:
        state = probe_health(metrics_port(component))
        out[component] = state
        if state != "up":
            down.append(component)
    out["down"] = down
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mallwatt stack",
        description="Start, stop or inspect the local stack: a single-node Kafka broker (KRaft, "
        "data in var/kafka; or a cluster, --brokers 3) and the embedded ClickHouse warehouse (var/chdb). Set MALLWATT_KAFKA "
        "and MALLWATT_CLICKHOUSE to use existing services instead.")
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--kafka-only", action="store_true", help="up: skip warehouse migrations")
    parser.add_argument("--brokers", type=int, help="up: a local KRaft cluster of this many nodes (3: replication "
                        "factor 3, min.insync.replicas 2), each in <data dir>/node-<id>, ports from "
                        "MALLWATT_KAFKA_PORT up (docs/kafka.md); down/status find the nodes of the last up")
    parser.add_argument("--secure", action="store_true",
                        help="the secured broker (var/kafka-secure, port 19192): TLS with a local CA, SCRAM-SHA-512 "
                        "users per component, ACLs; prints the client settings (docs/security.md)")
    parser.add_argument("--monitoring", action="store_true",
                        help="up: also start Prometheus and Alertmanager (Debian's packages, installed when missing) "
                        "on loopback under var/monitoring, scraping every running component (docs/operations.md)")
    parser.add_argument("--scrape", default="", help="up --monitoring: scrape these components too even if not "
                        "running yet, e.g. collector,worker,sink")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--require", default="", help="status: also check these services' "
                        "/healthz and /readyz, e.g. sink,worker,notify (ports: docs/operations.md)")
    args = parser.parse_args(argv)
    require = tuple(c.strip() for c in args.require.split(",") if c.strip())
    scrape = tuple(c.strip() for c in args.scrape.split(",") if c.strip())
    try:
        result = {"up": lambda: up(args.kafka_only, args.secure, args.monitoring, scrape, args.brokers),
                  "down": lambda: down(args.secure),
                  "status": lambda: status(require, args.secure)}[args.action]()
    except Exception as exc:
        print(redact(f"mallwatt stack {args.action}: {exc}"), file=sys.stderr)
        return 1
    # Settings may carry credentials (MALLWATT_CLICKHOUSE=https://user:pass@host): never printed.
    result = redact_mapping(result)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {redact(value)}")
    if result.get("down"):  # status: 3 is the LSB code for "not running"
        print(f"mallwatt stack status: down: {', '.join(result['down'])}", file=sys.stderr)  # type: ignore[arg-type]
        return 3
    return 0
