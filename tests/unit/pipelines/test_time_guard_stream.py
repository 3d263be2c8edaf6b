"""Bounded time in the stream's routing: a future reading is refused by name, the rest of its
message is billed, and the circuit keeps billing afterwards."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest

from pipelines import batching, billing
from pipelines.context import build_context
from pipelines.envelope import Envelope
from pipelines.generate import generate
from pipelines.portfolio import parse_portfolio
from schemas.keys import account_shard
from schemas.ledger import LEDGER_ROWS, row_entries

T0 = 1_784_080_800_000  # 2026-07-15 10:00 +08:00, a peak hour
Y3000 = int(datetime(3000, 1, 1, tzinfo=UTC).timestamp() * 1000)
Y2100 = int(datetime(2100, 1, 1, tzinfo=UTC).timestamp() * 1000)
PARTITIONS = 8


@pytest.fixture(scope="module")
def ctx() -> billing.BillingContext:
    data = generate(1, 6, seed=5)
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"] = "standard"
        merchant["protected"] = False
    return build_context(parse_portfolio(data), PARTITIONS)


def _route(ctx: billing.BillingContext, n: int = 2) -> tuple[str, str, list[str]]:
    """A merchant with at least ``n`` circuits in one shard (account, meter ids, circuits)."""
    account = "M01-S0001"
    circuits = [c for c, r in ctx.circuit_meter.items() if r.account_id == account]
    return account, ctx.circuit_meter[circuits[0]].meter_id, circuits[:n]


def _msg(circuit: str, meter: str, ts: list[int], kwh: list[float]) -> pl.DataFrame:
    return pl.DataFrame({"circuit_id": [circuit] * len(ts), "meter_id": [meter] * len(ts), "ts_ms": ts,
                         "import_kwh": kwh})


def _charges(envs: dict[str, Envelope]) -> list[dict]:
    """Charges in the outboxes (packed ledger rows; the forwarder makes the LedgerBatches)."""
    return [e for env in envs.values() for o in env.outbox if o.topic == LEDGER_ROWS
            for e in row_entries(o.value) if e["kind"] == "charge"]


def test_messages_frame_tags_the_message_time() -> None:
    a, b = _msg("c", "m", [1, 2], [1.0, 2.0]), _msg("c", "m", [3], [3.0])
    f = batching.messages_frame([(0, 5, a, 1000), (1, 7, b, None)])
    assert f.select("partition", "offset", "msg_ts_ms").rows() == [(0, 5, 1000), (0, 5, 1000), (1, 7, None)]
    assert "msg_ts_ms" not in batching.messages_frame([(0, 5, a), (1, 7, b)]).columns  # old callers
    assert batching.message_ts_ms(1_784_080_800.123) == 1_784_080_800_123
    assert batching.message_ts_ms(None) is None


def test_one_future_reading_is_refused_by_name_and_the_rest_billed(ctx: billing.BillingContext) -> None:
    account, meter, (circuit,) = _route(ctx, 1)
    shard = account_shard(account, PARTITIONS)
    good = _msg(circuit, meter, [T0, T0 + 900_000], [100.0, 101.0])
    mixed = _msg(circuit, meter, [T0 + 1_800_000, Y2100], [102.0, 500.0])
    frame = batching.messages_frame([(shard, 10, good, T0 + 900_000), (shard, 11, mixed, T0 + 1_800_000)])
    routed = batching.route_readings(frame, ctx)
    assert routed.frame["ts_ms"].to_list() == [T0, T0 + 900_000, T0 + 1_800_000]
    assert len(routed.rejected) == 1
    part, offset, reason = routed.rejected[0]
    assert (part, offset) == (shard, 11)
    assert reason.startswith("1 reading(s) refused, ts more than 300 s ahead of the broker time")
    assert f"{circuit}@2100-01-01T00:00:00Z" in reason


def test_circuit_keeps_billing_after_a_refused_year_3000_reading(ctx: billing.BillingContext) -> None:
    account, meter, (circuit,) = _route(ctx, 1)
    shard = account_shard(account, PARTITIONS)
    key = ctx.bucket_of(account)
    envs = {key: Envelope()}
    steps = [
        [(shard, 0, _msg(circuit, meter, [T0], [100.0]), T0)],
        [(shard, 1, _msg(circuit, meter, [Y3000], [100.5]), T0 + 60_000)],  # refused: absurd
        [(shard, 2, _msg(circuit, meter, [T0 + 900_000, T0 + 1_800_000], [101.0, 102.0]), T0 + 1_800_000)],
    ]
    refused, charged = [], []
    for messages in steps:
        routed = batching.route_readings(batching.messages_frame(messages), ctx)
        refused += routed.rejected
        for changed in batching.apply_readings_many(envs, routed, ctx):  # rounds, in order
            envs.update(changed)
            charged += _charges(changed)
    assert [(p, o) for p, o, _ in refused] == [(shard, 1)] and "plausible" in refused[0][2]
    # both real intervals billed at the peak price, nothing for year 3000
    assert [(c["ts_ms"], c["energy_wh"]) for c in charged] == [(T0 + 900_000, 1000), (T0 + 1_800_000, 1000)]
    assert envs[key].circuits[circuit].last_ts_ms == T0 + 1_800_000


def test_payment_and_posting_times(ctx: billing.BillingContext) -> None:
    assert batching.time_problem(T0, T0 + 5, ctx) is None
    assert "ahead of the broker time" in (batching.time_problem(T0 + 3_600_000, T0, ctx) or "")
    assert "plausible" in (batching.time_problem(Y3000, None, ctx) or "")
    assert "plausible" in (batching.time_problem(0, T0, ctx) or "")


def test_skew_comes_from_the_portfolio() -> None:
    data = generate(1, 2, seed=5)
    data["time"] = {"max_future_skew_s": 3600}
    ctx = build_context(parse_portfolio(data), PARTITIONS)
    assert batching.time_problem(T0 + 3_000_000, T0, ctx) is None
    assert batching.time_problem(T0 + 3_700_000, T0, ctx) is not None


def test_replay_refuses_what_the_stream_refuses(ctx: billing.BillingContext) -> None:
    from pipelines.core.engine import CoreState
    from pipelines.core.replay import replay, time_bounds

    account, meter, (circuit,) = _route(ctx, 1)
    rating, state0 = ctx.rating, CoreState()  # replay uses the stream's own context builder
    assert time_bounds(rating) == ctx.time_bounds
    ts = [T0, T0 + 900_000, Y2100, T0 + 1_800_000, Y3000]
    msg = [T0, T0 + 900_000, T0 + 900_000, T0 + 1_800_000, T0 + 1_800_000]
    frame = _msg(circuit, meter, ts, [100.0, 101.0, 150.0, 102.0, 170.0]).with_columns(
        msg_ts_ms=pl.Series(msg, dtype=pl.Int64))
    pays = pl.DataFrame({"payment_id": ["p1", "p2"], "account_id": [account] * 2, "ts_ms": [T0 - 1, Y2100],
                         "amount_minor": [10_000, 99_999], "kind": ["TOPUP"] * 2, "reverses_payment_id": [None] * 2,
                         "msg_ts_ms": [T0, T0]})
    _, tables = replay(rating, frame, pays, state=state0)
    refused = tables["rejected_readings"]
    assert sorted(refused["ts_ms"].to_list()) == [Y2100, Y3000]
    assert set(refused["reason"].str.split(":").list.first()) == {"future", "absurd"}
    assert tables["rejected_payments"].select("payment_id", "reason").rows() == [
        ("p2", "future: ts more than 300 s ahead of the broker time")]
    charges = tables["ledger"].filter(pl.col("kind") == "charge")
    assert charges["energy_wh"].sum() == 2000 and charges["ts_ms"].max() == T0 + 1_800_000
    # the stream, same input as one message per reading: the same two are refused
    routed = batching.route_readings(batching.messages_frame(
        [(account_shard(account, PARTITIONS), i, frame[i].drop("msg_ts_ms"), m) for i, m in enumerate(msg)]), ctx)
    assert [o for _, o, _ in routed.rejected] == [2, 4]
