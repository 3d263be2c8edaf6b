"""`mallwatt topup`: a manual top-up, reversal or refund, signed by a finance operator's key.

Payments a provider reports come through the portal's webhook (pipelines/portal), checked by
the provider's HMAC. A payment entered by hand is `provider: cli` and carries the operator's
Ed25519 signature; it is checked here against the portfolio (the account exists, the operator
holds money.topup / money.adjust, the role's and the account's limits) before anything is
produced, and again by the worker's claim step (pipelines.core.money_authority).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import uuid
from decimal import Decimal

from infra.broker import bootstrap_servers
from infra.kafka_security import kafka_config
from pipelines.money_input import edge_context, operator_key, produce_payment, signed_and_checked
from pipelines.portfolio import ConfigError
from pipelines.signing import SigningKeyError, add_operator_arguments

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
        description="Credit a merchant's prepaid account by hand, signed with your operator key (a role with "
        "money.topup; reversals and refunds need money.adjust). Sending the same payment id twice never credits "
        "twice. Checked against the portfolio before sending: unknown accounts and amounts above your role's or "
        "the account's limit are refused (docs/security.md, Money commands).")
    parser.add_argument("account", help="merchant account id, e.g. M01-S0007")
    parser.add_argument("amount", help="amount in currency units, e.g. 500 or 99.50")
    parser.add_argument("--payment-id", help="the provider's payment id (default: a new one)")
    parser.add_argument("--kind", choices=("TOPUP", "REVERSAL", "REFUND"), default="TOPUP")
    parser.add_argument("--reverses", help="REVERSAL/REFUND: the payment id it reverses")
    parser.add_argument("--ts-ms", type=int, help="payment time, epoch ms (default now)")
    add_operator_arguments(parser)
    args = parser.parse_args(argv)
    try:
        amount = to_minor(args.amount)
    except ValueError as exc:
        parser.error(str(exc))
    payment = {"payment_id": args.payment_id or f"cli-{uuid.uuid4().hex[:12]}", "account_id": args.account,
               "kind": args.kind, "amount_minor": amount, "ts_ms": args.ts_ms or int(time.time() * 1000),
               "provider": "cli", "reverses_payment_id": args.reverses}
    try:
        [payment], problems = signed_and_checked([payment], args.operator, operator_key(args.key),
                                                 edge_context(args.config))
    except (ConfigError, SigningKeyError, OSError) as exc:
        print(f"mallwatt topup: {exc}", file=sys.stderr)
        return 2
    if problems:
        print(f"mallwatt topup: refused, nothing sent: {problems[0][1]}", file=sys.stderr)
        return 2
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
