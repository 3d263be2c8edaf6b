"""`mallwatt stack up | down | status`: the local real components in one command.

up: resolve Kafka jars (cached outside git), start the KRaft broker, provision topics,
apply warehouse migrations. down: stop the broker. With MALLWATT_KAFKA / MALLWATT_CLICKHOUSE
set, the external services are used and nothing is started or stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from infra import broker
from infra.topics import TOPICS, provision_topics, wait_until_served


def migrate_warehouse() -> list[str]:
    """Apply missing migrations; a running owner (the sink) already migrated at its start."""
    from infra import warehouse
    from infra.warehouse_endpoint import live_owner

    if warehouse.server_url():
        return warehouse.apply_migrations(warehouse.get_client())
    if live_owner(warehouse.chdb_path()):
        return []
    with warehouse.open_owner(serve=False, migrate=False) as owner:
        return warehouse.apply_migrations(owner.client)


def up(kafka_only: bool = False, secure: bool = False) -> dict[str, object]:
    t0 = time.monotonic()
    config = broker.BrokerConfig.from_env(secure=secure)
    st = broker.start(config)
    out: dict[str, object] = {}
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
    return {"kafka": st.bootstrap, "kafka_pid": st.pid, "secure": config.secure, **out, "topics_created": created,
            "topics_declared": len(TOPICS), "migrations_applied": applied,
            "seconds": round(time.monotonic() - t0, 1)}


def down(secure: bool = False) -> dict[str, object]:
    return {"kafka_stopped": broker.stop(broker.BrokerConfig.from_env(secure=secure))}


def status(secure: bool = False) -> dict[str, object]:
    st = broker.status(broker.BrokerConfig.from_env(secure=secure))
    out: dict[str, object] = {"kafka_running": st.running, "kafka": st.bootstrap, "kafka_pid": st.pid,
                              "topics": st.topics, "kafka_external": st.external}
    try:
        from infra import warehouse
        from infra.warehouse_endpoint import live_owner

        owner = live_owner(warehouse.chdb_path())
        out["warehouse"] = warehouse.server_url() or (
            f"{warehouse.chdb_path()} (owned by pid {owner.pid})" if owner else f"{warehouse.chdb_path()} (idle)")
    except Exception as exc:  # status must report, not fail
        out["warehouse"] = f"unavailable: {exc}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mallwatt stack",
        description="Start, stop or inspect the local stack: a single-node Kafka broker (KRaft, "
        "data in var/kafka) and the embedded ClickHouse warehouse (var/chdb). Set MALLWATT_KAFKA "
        "and MALLWATT_CLICKHOUSE to use existing services instead.")
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--kafka-only", action="store_true", help="up: skip warehouse migrations")
    parser.add_argument("--secure", action="store_true",
                        help="the secured broker (var/kafka-secure, port 19192): TLS with a local CA, SCRAM-SHA-512 "
                        "users per component, ACLs; prints the client settings (docs/security.md)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        result = {"up": lambda: up(args.kafka_only, args.secure), "down": lambda: down(args.secure),
                  "status": lambda: status(args.secure)}[args.action]()
    except Exception as exc:
        print(f"mallwatt stack {args.action}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value}")
    return 0
