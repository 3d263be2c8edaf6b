"""`mallwatt topup`: publish a merchant payment (as the payment provider's webhook would)."""

from __future__ import annotations

import argparse
import re
import sys
import time
import uuid
from decimal import Decimal

from infra.broker import bootstrap_servers
from infra.kafka_security import kafka_config
from pipelines.money_input import produce_payment

#: The largest amount one command may move, in currency units: a typo guard far above any real
#: top-up (a month of a large restaurant's electricity is a few ten thousand CNY).
MAX_TOPUP_UNITS = 1_000_000
_AMOUNT = re.compile(r"[0-9]+(\.[0-9]{1,2})?")


def to_minor(amount: str) -> int:
    """'500' or '500.25' currency units -> minor units, exactly. Only ASCII digits with at most
    2 decimals (no exponent, sign, NaN, Infinity, or other scripts' digits) up to MAX_TOPUP_UNITS."""
    if not _AMOUNT.fullmatch(amount):
        raise ValueError(f"amount {amount!r} must be a positive number of currency units written with ASCII "
                         "digits and at most 2 decimals, e.g. 500 or 99.50")
    value = Decimal(amount)
    if value <= 0:
        raise ValueError(f"amount {amount!r} must be positive")
    if value > MAX_TOPUP_UNITS:
        raise ValueError(f"amount {amount!r} is above the limit of {MAX_TOPUP_UNITS} per payment")
    return int(value * 100)


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
    # printed before sending: whatever happens next, a retry can reuse this id and credit once
    print(f"payment id {payment['payment_id']} (retry with --payment-id {payment['payment_id']})", file=sys.stderr)
    from confluent_kafka import Producer

    producer = Producer(kafka_config(bootstrap_servers(), **{"enable.idempotence": True}))
    produce_payment(producer, payment)
    if producer.flush(30):
        print(f"mallwatt topup: Kafka did not confirm the payment; retry with --payment-id {payment['payment_id']}",
              file=sys.stderr)
        return 1
    print(f"{payment['payment_id']}: {args.kind} {amount / 100:.2f} for {args.account}")
    return 0
