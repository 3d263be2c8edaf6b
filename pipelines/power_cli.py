"""`mallwatt power off|on`: remote power control of a meter, an area, an account or a mall.

The order is expanded here to one OperatorCommand per meter, produced to the partition of
the meter's account, so the worker that owns that account's relay holds applies it. Every
record keeps the original order (scope, target, reason, operator) for the audit trail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from infra import topics as T
from infra.broker import bootstrap_servers
from infra.home import data_dir
from infra.kafka_security import kafka_config
from pipelines.audit import audit_record
from pipelines.context import landlord_account
from pipelines.core.authority import LIFE_SAFETY, WIDE_SCOPES, sign_order
from pipelines.portfolio import ConfigError, Portfolio, load_portfolio
from pipelines.signing import SigningKeyError, add_operator_arguments, load_private
from schemas import codec
from schemas.keys import account_shard

LIFE_SAFETY_NOTE = "life-safety circuit: never switched by an area or mall order"


def meters_in_scope(portfolio: Portfolio, scope: str, target: str) -> list[tuple[str, str, str]]:
    """(mall id, meter id, account id) of every meter the order covers; KeyError if none.
    An area- or mall-wide order leaves life-safety circuits out (see `skipped_in_scope`)."""
    out = []
    for mall, meter in portfolio.meters():
        account = meter.account or landlord_account(mall.id)
        area = next((m.area for m in mall.merchants if m.id == meter.account), None)
        if (scope == "METER" and meter.id == target) or (scope == "MALL" and mall.id == target) or \
                (scope == "AREA" and area == target) or (scope == "ACCOUNT" and account == target):
            if scope in WIDE_SCOPES and meter.circuits[0].purpose.value in LIFE_SAFETY:
                continue
            out.append((mall.id, meter.id, account))
    if not out:
        raise KeyError(f"no meter matches --{scope.lower()} {target!r}")
    return out


def skipped_in_scope(portfolio: Portfolio, scope: str, target: str) -> list[tuple[str, str]]:
    """(meter id, purpose) of the life-safety meters an area- or mall-wide order leaves out."""
    if scope not in WIDE_SCOPES:
        return []
    out = []
    for mall, meter in portfolio.meters():
        area = next((m.area for m in mall.merchants if m.id == meter.account), None)
        purpose = meter.circuits[0].purpose.value
        if purpose in LIFE_SAFETY and ((scope == "MALL" and mall.id == target) or (scope == "AREA" and area == target)):
            out.append((meter.id, purpose))
    return out


def build_commands(portfolio: Portfolio, action: str, scope: str, target: str, reason: str, operator: str,
                   ts_ms: int, order_id: str, signatures: list[dict[str, str]] | None = None) -> list[dict]:
    return [{"command_id": f"{order_id}:{meter}", "action": action, "scope": scope, "target_id": target,
             "mall_id": mall_id, "reason": reason, "operator": operator, "ts_ms": ts_ms, "meter_id": meter,
             "account_id": account, "order_id": order_id, "signatures": list(signatures or [])}
            for mall_id, meter, account in meters_in_scope(portfolio, scope, target)]


def new_order(action: str, scope: str, target: str, reason: str, ts_ms: int, order_id: str) -> dict[str, Any]:
    return {"order_id": order_id, "action": action, "scope": scope, "target_id": target, "reason": reason,
            "ts_ms": ts_ms}


def signed_commands(portfolio: Portfolio, order: dict[str, Any], signers: list[tuple[str, Any]]) -> list[dict]:
    """The order's per-meter commands, signed by each (operator id, private key) in turn."""
    signatures = [sign_order(order, who, key) for who, key in signers]
    return build_commands(portfolio, order["action"], order["scope"], order["target_id"], order["reason"],
                          "+".join(who for who, _ in signers), order["ts_ms"], order["order_id"], signatures)


def _produce(commands: list[dict]) -> bool:
    from confluent_kafka import Producer

    producer = Producer(kafka_config(bootstrap_servers(), **{"enable.idempotence": True}))
    partitions = T.default_partitions()
    for command in commands:
        producer.produce(T.OPERATOR_COMMANDS, key=command["account_id"].encode(),
                         partition=account_shard(command["account_id"], partitions),
                         value=codec.encode("OperatorCommand", command))
    return producer.flush(30) == 0


def _audit(record: dict[str, Any]) -> None:
    """The CLI's own audit events (proposals, approvals); the worker audits what it executes."""
    from confluent_kafka import Producer

    from pipelines.audit import produce_audit

    producer = Producer(kafka_config(bootstrap_servers(), **{"enable.idempotence": True}))
    produce_audit(producer, record)
    if producer.flush(10):
        print("mallwatt power: the audit event was not confirmed by Kafka", file=sys.stderr)


def _key(path: str | None) -> Any:
    if not path:
        raise SigningKeyError("--key (or MALLWATT_OPERATOR_KEY): the operator's private key is required; "
                              "make one with `mallwatt keys new NAME` and register its public key under "
                              "security.operators in the portfolio")
    return load_private(Path(path), "--key")


def _send(portfolio: Portfolio, order: dict[str, Any], signers: list[tuple[str, Any]]) -> int:
    commands = signed_commands(portfolio, order, signers)
    if not _produce(commands):
        print("mallwatt power: Kafka did not confirm every command; re-run the same order", file=sys.stderr)
        return 1
    who = " + ".join(w for w, _ in signers)
    print(f"{order['order_id']}: power {order['action']} for {len(commands)} meter(s) "
          f"({order['scope'].lower()} {order['target_id']}), reason: {order['reason']}, signed by {who}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mallwatt power",
        description="Trip (off) or restore (on) power remotely, with a reason, signed by the operator's key. "
        "An operator trip is separate from a credit trip: a top-up never restores a meter an operator switched "
        "off, and 'on' never restores a meter whose merchant is out of credit. Area- and mall-wide orders "
        "leave life-safety circuits (elevator, fire, emergency lighting) out and wait for a second operator: "
        "`off` writes the signed proposal, `approve ORDER_ID` adds the approval and sends it "
        "(docs/security.md).")
    parser.add_argument("action", choices=("off", "on", "approve"))
    parser.add_argument("order_id", nargs="?", help="approve: the proposed order's id")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--meter", help="one meter id")
    target.add_argument("--area", help="every merchant meter in an area")
    target.add_argument("--account", help="every meter of a merchant (or <mall>-LANDLORD)")
    target.add_argument("--mall", help="every meter of a mall")
    parser.add_argument("--reason", help="why (required for off/on; kept in the audit trail)")
    add_operator_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="show the meters the order would switch; send nothing")
    parser.add_argument("--orders-dir", type=Path, default=Path(os.environ.get("MALLWATT_ORDERS_DIR", str(data_dir("orders")))),
                        help="where proposals wait for approval (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        portfolio = load_portfolio(args.config)
        if args.action == "approve":
            return _approve(portfolio, args)
        picked = [(s.upper(), v) for s, v in (("meter", args.meter), ("area", args.area), ("account", args.account),
                                             ("mall", args.mall)) if v]
        if not picked:
            parser.error("off/on need one of --meter, --area, --account, --mall")
        if not (args.reason or "").strip():
            parser.error("--reason is required (and kept in the audit trail)")
        scope, value = picked[0]
        order = new_order("POWER_OFF" if args.action == "off" else "POWER_ON", scope, value, args.reason.strip(),
                          int(time.time() * 1000), f"op-{uuid.uuid4().hex[:12]}")
        meters = meters_in_scope(portfolio, scope, value)
        skipped = skipped_in_scope(portfolio, scope, value)
        if args.dry_run:
            print(json.dumps({"order": order, "meters": [m for _, m, _ in meters],
                              "skipped_life_safety": [{"meter": m, "purpose": p} for m, p in skipped]}, indent=1))
            return 0
        key = _key(args.key)
        if scope in portfolio.security.approval_scopes:
            proposal = {"order": order, "signatures": [sign_order(order, args.operator, key)],
                        "meters": len(meters), "skipped_life_safety": [m for m, _ in skipped]}
            args.orders_dir.mkdir(parents=True, exist_ok=True)
            (args.orders_dir / f"{order['order_id']}.json").write_text(json.dumps(proposal, indent=1))
            _audit(audit_record(order["ts_ms"], args.operator, "power.proposed", f"{scope.lower()}:{value}", "waiting",
                                "cli", f"order {order['order_id']} {order['action']}: {order['reason']}; "
                                f"{len(meters)} meters, life-safety left out: {len(skipped)}",
                                event_id=f"{order['order_id']}:proposed"))
            print(f"{order['order_id']}: {scope.lower()}-wide power {args.action} of {len(meters)} meter(s) "
                  f"(life-safety left out: {len(skipped)}) waits for approval; a second operator runs:\n"
                  f"  mallwatt power approve {order['order_id']} --operator OTHER --key OTHER_KEY")
            return 0
        return _send(portfolio, order, [(args.operator, key)])
    except (ConfigError, KeyError, SigningKeyError, OSError, ValueError) as exc:
        print(f"mallwatt power: {exc}", file=sys.stderr)
        return 2


def _approve(portfolio: Portfolio, args: argparse.Namespace) -> int:
    if not args.order_id:
        raise KeyError("approve needs the order id that `mallwatt power off|on` printed")
    path = args.orders_dir / f"{args.order_id}.json"
    proposal = json.loads(path.read_text(encoding="utf-8"))
    order, first = proposal["order"], proposal["signatures"][0]
    if first["operator_id"] == args.operator:
        raise ValueError(f"{args.order_id}: proposed by {args.operator!r}; a second operator must approve it")
    key = _key(args.key)
    commands = signed_commands(portfolio, order, [])
    signatures = [first, sign_order(order, args.operator, key)]
    for command in commands:
        command["signatures"], command["operator"] = signatures, f"{first['operator_id']}+{args.operator}"
    if not _produce(commands):
        print("mallwatt power: Kafka did not confirm every command; run the approval again", file=sys.stderr)
        return 1
    path.rename(path.with_suffix(".sent.json"))
    _audit(audit_record(int(time.time() * 1000), args.operator, "power.approved",
                        f"{order['scope'].lower()}:{order['target_id']}", "sent", "cli",
                        f"order {order['order_id']} by {first['operator_id']}: {len(commands)} meters",
                        event_id=f"{order['order_id']}:approved"))
    print(f"{order['order_id']}: approved by {args.operator}; power {order['action']} sent for {len(commands)} "
          f"meter(s) ({order['scope'].lower()} {order['target_id']}), proposed by {first['operator_id']}")
    return 0
