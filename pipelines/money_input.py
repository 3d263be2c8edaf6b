"""Producing payments and postings: to the partition of their claim (pipelines.core.claims).

Every producer of money input (the payment gateway, `mallwatt topup`, `mallwatt post`, the
demo, the benches and tests) goes through here, so every use of an id reaches the partition
that holds its claim.
"""

from __future__ import annotations

from typing import Any

from infra import topics as T
from pipelines.core.claims import claim_key, claim_partition
from schemas import codec


def produce_payment(producer: Any, payment: dict[str, Any], partitions: int | None = None, **kwargs: Any) -> None:
    """Produce a Payment to mallwatt.payments (confluent_kafka Producer; kwargs go to produce)."""
    count = partitions or T.default_partitions()
    producer.produce(T.PAYMENTS, key=claim_key(payment, "pay").encode(),
                     partition=claim_partition(payment, count, "pay"), value=codec.encode("Payment", payment),
                     **kwargs)


def produce_posting(producer: Any, posting: dict[str, Any], partitions: int | None = None, **kwargs: Any) -> None:
    """Produce a LedgerPosting to mallwatt.postings."""
    count = partitions or T.default_partitions()
    producer.produce(T.POSTINGS, key=claim_key(posting, "post").encode(),
                     partition=claim_partition(posting, count, "post"),
                     value=codec.encode("LedgerPosting", posting), **kwargs)


def operator_key(path: str | None) -> Any:
    """The signing operator's private key (`--key` / MALLWATT_OPERATOR_KEY)."""
    from pathlib import Path

    from pipelines.signing import SigningKeyError, load_private

    if not path:
        raise SigningKeyError("--key (or MALLWATT_OPERATOR_KEY): the operator's private key is required; make one "
                              "with `mallwatt keys new NAME` and register its public key under security.operators "
                              "with a role that has money.topup / money.adjust")
    return load_private(Path(path), "--key")


def edge_context(config: str) -> Any:
    """The billing context of the portfolio at `config`: the CLIs check money commands against the
    same accounts, policies and operator registry the worker uses, before producing anything."""
    from pipelines.context import build_context
    from pipelines.portfolio import load_portfolio

    return build_context(load_portfolio(config), T.default_partitions())


def signed_and_checked(records: list[dict[str, Any]], operator: str, key: Any, ctx: Any
                       ) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Each record signed by `operator`, and the (index, problem) of those the worker would refuse
    (unknown account, permission, role or account limit: pipelines.core.money_authority)."""
    from pipelines.claiming import money_decision
    from pipelines.core.money_authority import sign_money

    signed = [sign_money(r, operator, key) for r in records]
    problems = [(i, p) for i, r in enumerate(signed) if (p := money_decision(r, ctx).problem()) is not None]
    return signed, problems
