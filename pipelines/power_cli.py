"""`mallwatt power off|on`: remote power control of a meter, an area, an account or a mall.

The order is expanded here to one OperatorCommand per meter, produced to the partition of
the meter's account, so the worker that owns that account's relay holds applies it. Every
record keeps the original order (scope, target, reason, operator) for the audit trail.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

from infra import topics as T
from infra.broker import bootstrap_servers
from infra.kafka_security import kafka_config
from pipelines.context import landlord_account
from pipelines.portfolio import ConfigError, Portfolio, load_portfolio
from schemas import codec
from schemas.keys import account_shard


def meters_in_scope(portfolio: Portfolio, scope: str, target: str) -> list[tuple[str, str, str]]:
    """(mall id, meter id, account id) of every meter the order covers; KeyError if none."""
    out = []
    for mall, meter in portfolio.meters():
        account = meter.account or landlord_account(mall.id)
        area = next((m.area for m in mall.merchants if m.id == meter.account), None)
        if (scope == "METER" and meter.id == target) or (scope == "MALL" and mall.id == target) or \
                (scope == "AREA" and area == target) or (scope == "ACCOUNT" and account == target):
            out.append((mall.id, meter.id, account))
    if not out:
        raise KeyError(f"no meter matches --{scope.lower()} {target!r}")
    return out


def build_commands(portfolio: Portfolio, action: str, scope: str, target: str, reason: str, operator: str,
                   ts_ms: int, order_id: str) -> list[dict]:
    return [{"command_id": f"{order_id}:{meter}", "action": action, "scope": scope, "target_id": target,
             "mall_id": mall_id, "reason": reason, "operator": operator, "ts_ms": ts_ms, "meter_id": meter,
             "account_id": account, "order_id": order_id}
            for mall_id, meter, account in meters_in_scope(portfolio, scope, target)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mallwatt power",
        description="Trip (off) or restore (on) power remotely, with a reason. An operator trip "
        "is separate from a credit trip: a top-up never restores a meter an operator switched off, "
        "and 'on' never restores a meter whose merchant is out of credit.")
    parser.add_argument("action", choices=("off", "on"))
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--meter", help="one meter id")
    target.add_argument("--area", help="every merchant meter in an area")
    target.add_argument("--account", help="every meter of a merchant (or <mall>-LANDLORD)")
    target.add_argument("--mall", help="every meter of a mall")
    parser.add_argument("--reason", required=True, help="why (kept in the audit trail)")
    parser.add_argument("--operator", default=os.environ.get("USER", "operator"), help="who (default $USER)")
    parser.add_argument("--config", default=os.environ.get("MALLWATT_CONFIG", "var/portfolio.yaml"),
                        help="portfolio config (default %(default)s)")
    args = parser.parse_args(argv)
    scope, value = next((s.upper(), v) for s, v in
                        (("meter", args.meter), ("area", args.area), ("account", args.account),
                         ("mall", args.mall)) if v)
    try:
        portfolio = load_portfolio(args.config)
        commands = build_commands(portfolio, "POWER_OFF" if args.action == "off" else "POWER_ON", scope, value,
                                  args.reason, args.operator, int(time.time() * 1000), f"op-{uuid.uuid4().hex[:12]}")
    except (ConfigError, KeyError) as exc:
        print(f"mallwatt power: {exc}", file=sys.stderr)
        return 2
    from confluent_kafka import Producer

    producer = Producer(kafka_config(bootstrap_servers(), **{"enable.idempotence": True}))
    partitions = T.default_partitions()
    for command in commands:
        producer.produce(T.OPERATOR_COMMANDS, key=command["account_id"].encode(),
                         partition=account_shard(command["account_id"], partitions),
                         value=codec.encode("OperatorCommand", command))
    if producer.flush(30):
        print("mallwatt power: Kafka did not confirm every command; re-run the same order", file=sys.stderr)
        return 1
    print(f"{commands[0]['order_id']}: power {args.action} for {len(commands)} meter(s) "
          f"({scope.lower()} {value}), reason: {args.reason}")
    return 0
