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
