"""`mallwatt post`: publish ledger postings (JSON lines) to the wallets.

    mallwatt bills allocate --month 2026-10 | mallwatt post -

Each line is a LedgerPosting (schemas/ledger_posting.avsc): entry_id, account_id, mall_id, kind
(shared_cost | adjustment | opening_balance | debt_add | debt_writeoff), amount_minor, ts_ms,
source_id, rate. amount_minor is signed (credits positive) for money kinds; for debt_add and
debt_writeoff it is the positive size of the debt movement (the balance does not change; the
ledger entry has amount 0 and debt_change_minor +/- the size; docs/billing.md).
The entry id is final: posting the same file twice moves money once.

Every posting is signed with the operator's key (--operator, --key; a role with money.adjust)
and checked against the portfolio (--config) before anything is produced: an unknown account
or an amount above the role's max_adjustment_minor or the account's limit refuses the whole
file, naming the line; the worker checks the signature and limits again
(pipelines.core.money_authority, docs/security.md "Money commands").
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from infra.broker import bootstrap_servers
from infra.kafka_security import kafka_config
from pipelines.core.wallet import DEBT_POSTING_KINDS, POSTING_KINDS
from pipelines.money_input import edge_context, operator_key, produce_posting, signed_and_checked
from pipelines.portfolio import ConfigError
from pipelines.signing import SigningKeyError, add_operator_arguments

REQUIRED = ("entry_id", "account_id", "mall_id", "kind", "amount_minor", "ts_ms", "source_id")


def parse_lines(lines: list[str], source: str) -> list[dict[str, Any]]:
    """Postings from JSON lines; a bad line is an error naming the file, line and field."""
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}:{number}: not JSON ({exc.msg})") from None
        missing = [f for f in REQUIRED if f not in record]
        if missing:
            raise ValueError(f"{source}:{number}: missing field(s) {', '.join(missing)}")
        if not isinstance(record["amount_minor"], int) or isinstance(record["amount_minor"], bool):
            raise ValueError(f"{source}:{number}: amount_minor must be an integer (minor units)")
        if record["kind"] not in POSTING_KINDS:
            raise ValueError(f"{source}:{number}: kind: unknown posting kind {record['kind']!r} "
                             f"(known: {', '.join(POSTING_KINDS)})")
        if record["kind"] in DEBT_POSTING_KINDS and record["amount_minor"] <= 0:
            raise ValueError(f"{source}:{number}: amount_minor: {record['kind']} takes the positive size "
                             "of the debt movement")
        out.append({**{f: record[f] for f in REQUIRED}, "rate": record.get("rate")})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mallwatt post", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="JSON lines file, or - for standard input")
    parser.add_argument("--dry-run", action="store_true", help="validate, sign and check only, publish nothing")
    add_operator_arguments(parser)
    args = parser.parse_args(argv)
    source = "<stdin>" if args.file == "-" else args.file
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()  # noqa: SIM115
        lines = text.splitlines()
        postings = parse_lines(lines, source)
        postings, problems = signed_and_checked(postings, args.operator, operator_key(args.key),
                                                edge_context(args.config))
    except (ConfigError, SigningKeyError, OSError, ValueError) as exc:
        print(f"mallwatt post: {exc}", file=sys.stderr)
        return 2
    if problems:
        numbers = [n for n, line in enumerate(lines, 1) if line.strip()]  # a posting's line in the file
        for index, problem in problems[:20]:
            print(f"mallwatt post: {source}:{numbers[index]}: {problem}", file=sys.stderr)
        print(f"mallwatt post: {len(problems)} posting(s) refused; nothing published", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"{len(postings)} posting(s) valid; nothing published")
        return 0
    from confluent_kafka import Producer

    producer = Producer(kafka_config(bootstrap_servers(), **{"enable.idempotence": True}))
    for p in postings:
        produce_posting(producer, p)
    if producer.flush(30):
        print("mallwatt post: Kafka did not confirm every posting; post the same file again", file=sys.stderr)
        return 1
    print(f"published {len(postings)} posting(s)")
    return 0
