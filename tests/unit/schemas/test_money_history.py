"""Payments and postings written before version 3 (no signature fields) still read: unsigned."""

import io
import json

import fastavro
import pytest

from schemas import codec


def _old(stem: str, version: int, record: dict) -> bytes:
    schema = fastavro.parse_schema(json.loads((codec.HISTORY_DIR / f"{stem}.v2.avsc").read_text()))
    buf = io.BytesIO()
    buf.write(bytes([version]))
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


@pytest.mark.parametrize("version", [1, 2])
def test_old_payments_and_postings_decode_without_a_signature(version: int) -> None:
    payment = {"payment_id": "p", "account_id": "A", "kind": "TOPUP", "amount_minor": 5, "currency": "CNY",
               "ts_ms": 1, "provider": "sim", "reverses_payment_id": None, "claim_partition": None,
               "claim_offset": None}
    decoded = codec.decode("Payment", _old("payment", version, payment))
    assert decoded == {**payment, "operator_id": None, "key_id": None, "signature": None}
    posting = {"entry_id": "e", "account_id": "A", "mall_id": "M", "kind": "adjustment", "amount_minor": -5,
               "ts_ms": 1, "source_id": "s", "rate": None, "claim_partition": None, "claim_offset": None}
    decoded = codec.decode("LedgerPosting", _old("ledger_posting", version, posting))
    assert decoded == {**posting, "operator_id": None, "key_id": None, "signature": None}
