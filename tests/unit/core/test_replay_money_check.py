"""Replay repeats the stream's money check: a manual top-up the claim step would refuse is
refused by replay too (exported with its whole record), provider payments pass untouched."""

import json

import polars as pl
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipelines.context import build_context
from pipelines.core.arrival import claim_in_order
from pipelines.core.money_authority import MONEY_RECORD, sign_money
from pipelines.core.replay import time_bounds
from pipelines.generate import generate
from pipelines.portfolio import parse_portfolio
from pipelines.signing import public_key_text

KEY = Ed25519PrivateKey.generate()
T0 = 1_784_080_800_000


def _ctx():
    data = generate(1, 3, seed=4, mall_prefix="R")
    data["security"] = {"operators": [{"id": "fin", "public_key": public_key_text(KEY.public_key()),
                                       "roles": ["finance"]}]}
    return build_context(parse_portfolio(data), 8), data["malls"][0]["merchants"][0]["id"]


def _row(payment: dict, offset: int, manual: bool) -> dict:
    return {"payment_id": payment["payment_id"], "account_id": payment["account_id"], "kind": "topup",
            "amount_minor": payment["amount_minor"], "ts_ms": payment["ts_ms"], "reverses_payment_id": None,
            "partition": 0, "offset": offset, "msg_ts_ms": payment["ts_ms"],
            MONEY_RECORD: json.dumps(payment, sort_keys=True) if manual else None}


def test_arrival_replay_refuses_what_the_claim_step_refuses() -> None:
    ctx, account = _ctx()
    base = {"account_id": account, "kind": "TOPUP", "currency": "CNY", "ts_ms": T0, "reverses_payment_id": None,
            "claim_partition": None, "claim_offset": None, "operator_id": None, "key_id": None, "signature": None}
    unsigned = {**base, "payment_id": "m-1", "amount_minor": 500, "provider": "cli"}
    signed = sign_money({**base, "payment_id": "m-2", "amount_minor": 700, "provider": "cli"}, "fin", KEY)
    forged = {**signed, "payment_id": "m-3"}  # a signed record with a changed field
    provider = {**base, "payment_id": "w-1", "amount_minor": 900, "provider": "wechat"}
    rows = [_row(unsigned, 0, True), _row(signed, 1, True), _row(forged, 2, True), _row(provider, 3, False)]
    accepted, _, refused = claim_in_order(pl.DataFrame(rows), ctx.rating, time_bounds(ctx.rating))
    assert sorted(accepted["payment_id"].to_list()) == ["m-2", "w-1"]
    assert dict(zip(refused["payment_id"].to_list(), refused["reason"].to_list(), strict=True)) == {
        "m-1": "unsigned", "m-3": "bad_signature"}
