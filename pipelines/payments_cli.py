"""`mallwatt topup`: publish a merchant payment (as the payment provider's webhook would)."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from decimal import Decimal, InvalidOperation

from infra.broker import bootstrap_servers
from pipelines.money_input import produce_payment


def to_minor(amount: str) -> int:
    """'500' or '500.25' currency units -> minor units, exactly; more than 2 decimals is an error."""
    try:
        value = Decimal(amount)
    except InvalidOperation:
        raise ValueError(f"amount {amount!r} is not a number") from None
    minor = value * 100
    if minor != minor.to_integral_value() or minor <= 0:
        raise ValueError(f"amount {amount!r} must be positive with at most 2 decimals")
    return int(minor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mallwatt topup",
        description="Credit a merchant's prepaid account. The payment id is the provider's: "
        "sending the same id twice never credits twice.")
    parser.add_argument("account", help="merchant account id, e.g. M01-S0007")
    parser.add_argument("amount", help="amount in currency units, e.g. 500 or 99.50")
    parser.add_argument("--payment-id", help="the provider's payment id (default: a new one)")
    parser.add_argument("--kind", choices=("TOPUP", "REVERSAL", "REFUND"), default="TOPUP")
    parser.add_argument("--reverses", help="REVERSAL/REFUND: the payment id it reverses")
    parser.add_argument("--ts-ms", type=int, help="payment time, epoch ms (default now)")
    args = parser.parse_args(argv)
    try:
        amount = to_minor(args.amount)
    except ValueError as exc:
        parser.error(str(exc))
    payment = {"payment_id": args.payment_id or f"cli-{uuid.uuid4().hex[:12]}", "account_id": args.account,
               "kind": args.kind, "amount_minor": amount, "ts_ms": args.ts_ms or int(time.time() * 1000),
               "provider": "cli", "reverses_payment_id": args.reverses}
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap_servers(), "enable.idempotence": True})
    produce_payment(producer, payment)
    if producer.flush(30):
        print("mallwatt topup: Kafka did not confirm the payment; retry with the same --payment-id",
              file=sys.stderr)
        return 1
    print(f"{payment['payment_id']}: {args.kind} {amount / 100:.2f} for {args.account}")
    return 0
