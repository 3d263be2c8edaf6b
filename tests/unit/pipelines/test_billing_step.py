"""The stream's billing step without Kafka: routing, idempotency, outbox contents."""

from __future__ import annotations

import polars as pl
import pytest

from pipelines import billing
from pipelines.context import build_context
from pipelines.envelope import Envelope, bucket_key
from pipelines.generate import generate
from pipelines.portfolio import parse_portfolio
from schemas import codec
from schemas.keys import account_shard

T0 = 1_784_080_800_000  # 2026-07-15 10:00 +08:00, a peak hour (136 fen/kWh)
PARTITIONS = 8


@pytest.fixture(scope="module")
def ctx() -> billing.BillingContext:
    data = generate(1, 6, seed=5)
    for merchant in data["malls"][0]["merchants"]:  # one plain retail level for hand arithmetic
        merchant["level"] = "standard"
        merchant["protected"] = False
    return build_context(parse_portfolio(data), PARTITIONS)


def _merchant(ctx: billing.BillingContext) -> tuple[str, str, str]:
    account = "M01-S0001"
    route = next(r for r in ctx.meter_route.values() if r.account_id == account)
    circuit = next(c for c, r in ctx.circuit_meter.items() if r.meter_id == route.meter_id)
    return account, route.meter_id, circuit


def _readings(account: str, meter: str, circuit: str, kwh: list[float], start: int = T0) -> pl.DataFrame:
    n = len(kwh)
    return pl.DataFrame({"circuit_id": [circuit] * n, "meter_id": [meter] * n, "account_id": [account] * n,
                         "ts_ms": [start + i * 900_000 for i in range(n)], "import_kwh": kwh})


def _decoded(env: Envelope, topic: str, schema: str) -> list[dict]:
    return [codec.decode(schema, o.value) for o in env.outbox if o.topic == topic]


def test_routing_rejects_unknown_and_misrouted(ctx: billing.BillingContext) -> None:
    account, meter, circuit = _merchant(ctx)
    frame = pl.concat([_readings(account, meter, circuit, [1.0, 2.0]),
                       _readings("X", "ghost", "ghost.1", [1.0])])
    right = account_shard(account, PARTITIONS)
    routed = billing.route_readings(frame, ctx, right)
    assert routed.buckets == [bucket_key(account, PARTITIONS)]
    assert routed.frame.height == 2
    assert any("unknown circuit" in r and "ghost.1" in r for r in routed.rejected)
    routed = billing.route_readings(frame, ctx, (right + 1) % PARTITIONS)
    assert routed.buckets == [] and any("another shard" in r for r in routed.rejected)


def test_topup_charge_and_trip_in_outbox(ctx: billing.BillingContext) -> None:
    account, meter, circuit = _merchant(ctx)
    env = billing.apply_payment(Envelope(), {"payment_id": "p-1", "account_id": account, "ts_ms": T0 - 1,
                                             "amount_minor": 300, "kind": "TOPUP"}, ctx, "payments:0", 0)
    ledger = _decoded(env, "mallwatt.ledger", "LedgerEntry")
    assert [(e["kind"], e["amount_minor"], e["balance_after_minor"]) for e in ledger] == [("topup", 300, 300)]
    # 1 kWh per 15 minutes at the peak price 136 fen/kWh: 136 fen per interval.
    # 300 - 136 = 164, 164 - 136 = 28, 28 - 136 = -108 -> credit trip at the third interval.
    env = billing.apply_readings(env, _readings(account, meter, circuit, [100.0, 101.0, 102.0, 103.0]),
                                 ctx, "readings:3", 10)
    charges = _decoded(env, "mallwatt.ledger", "LedgerEntry")
    assert [c["amount_minor"] for c in charges] == [-136, -136, -136]
    assert charges[-1]["balance_after_minor"] == 300 - 3 * 136
    commands = _decoded(env, "mallwatt.relay-commands", "RelayCommand")
    assert [(c["action"], c["reason"], c["meter_id"]) for c in commands] == [("TRIP", "credit", meter)]
    assert env.hwm == {"payments:0": 0, "readings:3": 10}
    # balance in state equals the sum of the ledger entries produced
    assert env.accounts[account]["balance"] == 300 - 3 * 136


def test_envelope_round_trip_and_replay_guard(ctx: billing.BillingContext) -> None:
    account, meter, circuit = _merchant(ctx)
    env = billing.apply_readings(Envelope(), _readings(account, meter, circuit, [5.0, 6.0]), ctx, "r:1", 7)
    again = Envelope.from_bytes(env.to_bytes())
    assert again.accounts == env.accounts and again.circuits == env.circuits and again.hwm == env.hwm
    assert [o.value for o in again.outbox] == [o.value for o in env.outbox]
    assert again.applied("r:1", 7) and again.applied("r:1", 3) and not again.applied("r:1", 8)


def test_redelivered_readings_do_not_charge_twice(ctx: billing.BillingContext) -> None:
    account, meter, circuit = _merchant(ctx)
    frame = _readings(account, meter, circuit, [10.0, 11.0, 12.0])
    env = billing.apply_readings(Envelope(), frame, ctx, "r:1", 1)
    first = _decoded(env, "mallwatt.ledger", "LedgerEntry")
    # the same readings under a new offset (a collector spool re-send): no new money moves
    env2 = billing.apply_readings(env, frame, ctx, "r:1", 2)
    assert _decoded(env2, "mallwatt.ledger", "LedgerEntry") == []
    assert env2.accounts[account]["balance"] == env.accounts[account]["balance"] == sum(
        e["amount_minor"] for e in first)


def test_sustained_overload_trips_once_and_a_spike_does_not(ctx: billing.BillingContext) -> None:
    account, meter, circuit = _merchant(ctx)
    limit = ctx.load_limits[account].max_power_w  # 15 kW for the standard level
    # readings 10 s apart: a 10 s spike (shorter than the 30 s debounce), then 60 s above the limit
    power = [1000, limit + 5000, 1000, limit + 5000, limit + 5000, limit + 5000, limit + 5000, limit + 5000,
             limit + 5000, limit + 5000]
    n = len(power)
    frame = pl.DataFrame({"circuit_id": [circuit] * n, "meter_id": [meter] * n, "account_id": [account] * n,
                          "ts_ms": [T0 + i * 10_000 for i in range(n)], "import_kwh": [50.0 + i * 0.01 for i in range(n)],
                          "power_w": [float(p) for p in power], "power_factor": [0.9] * n, "relay": [0] * n},
                         schema_overrides={"relay": pl.UInt8})
    env = billing.apply_payment(Envelope(), {"payment_id": "p-big", "account_id": account, "ts_ms": T0 - 1,
                                             "amount_minor": 10**7, "kind": "TOPUP"}, ctx, "payments:0", 0)
    env = billing.apply_readings(env, frame.head(3), ctx, "r:1", 1)  # the spike
    assert _decoded(env, "mallwatt.relay-commands", "RelayCommand") == []
    env = billing.apply_readings(env, frame.tail(n - 3), ctx, "r:1", 2)  # sustained
    trips = _decoded(env, "mallwatt.relay-commands", "RelayCommand")
    assert [(c["action"], c["reason"], c["meter_id"]) for c in trips] == [("TRIP", "overload", meter)]
    assert env.holds == {meter: ["overload"]}
    assert any(a["kind"] == "overload" for a in _decoded(env, "mallwatt.alerts", "Alert"))
    # a top-up does not undo an overload trip
    env = billing.apply_payment(env, {"payment_id": "p-more", "account_id": account, "ts_ms": T0 + n * 10_000,
                                      "amount_minor": 100, "kind": "TOPUP"}, ctx, "payments:0", 1)
    assert _decoded(env, "mallwatt.relay-commands", "RelayCommand") == []


def test_shared_cost_posting_moves_money_once_and_can_trip(ctx: billing.BillingContext) -> None:
    account, meter, _ = _merchant(ctx)
    env = billing.apply_payment(Envelope(), {"payment_id": "p-s", "account_id": account, "ts_ms": T0,
                                             "amount_minor": 500, "kind": "TOPUP"}, ctx, "payments:0", 0)
    posting = {"entry_id": f"{account}:shr:M01-P-hvac:2026-07", "account_id": account, "mall_id": "M01",
               "kind": "shared_cost", "amount_minor": -700, "ts_ms": T0 + 1, "source_id": "M01-P-hvac|area|2026-07|9000",
               "rate": "0.077778"}
    env = billing.apply_posting(env, posting, ctx, "postings:0", 0)
    ledger = _decoded(env, "mallwatt.ledger", "LedgerEntry")
    # 500 - 700 = -200: at or below the cutoff 0, so the shared cost trips the relay like any debit
    assert [(e["kind"], e["amount_minor"], e["balance_after_minor"], e["rate"]) for e in ledger] == [
        ("shared_cost", -700, -200, "0.077778")]
    assert [(c["action"], c["reason"]) for c in _decoded(env, "mallwatt.relay-commands", "RelayCommand")] == [
        ("TRIP", "credit")]
    # the same entry id again (a re-run of the allocation) moves nothing and raises no alert
    again = billing.apply_posting(env, {**posting, "ts_ms": T0 + 2}, ctx, "postings:0", 1)
    assert again.outbox == [] and again.accounts[account]["balance"] == -200


def test_unknown_posting_kind_is_refused_with_an_alert(ctx: billing.BillingContext) -> None:
    account, _, _ = _merchant(ctx)
    env = billing.apply_posting(Envelope(), {"entry_id": "x1", "account_id": account, "mall_id": "M01",
                                             "kind": "gift", "amount_minor": 100, "ts_ms": T0, "source_id": "?"},
                                ctx, "postings:0", 0)
    alerts = _decoded(env, "mallwatt.alerts", "Alert")
    assert [a["kind"] for a in alerts] == ["rejected_posting"] and "unknown posting kind gift" in alerts[0]["message"]
    assert _decoded(env, "mallwatt.ledger", "LedgerEntry") == []


def test_post_cli_names_the_bad_line() -> None:
    from pipelines.postings_cli import parse_lines

    good = '{"entry_id": "a", "account_id": "A", "mall_id": "M", "kind": "adjustment", "amount_minor": 5, ' \
           '"ts_ms": 1, "source_id": "s"}'
    assert parse_lines([good, ""], "f.jsonl")[0]["amount_minor"] == 5
    with pytest.raises(ValueError, match=r"f.jsonl:2: missing field\(s\) ts_ms"):
        parse_lines([good, '{"entry_id": "b", "account_id": "A", "mall_id": "M", "kind": "adjustment", '
                           '"amount_minor": 5, "source_id": "s"}'], "f.jsonl")
    with pytest.raises(ValueError, match="amount_minor must be an integer"):
        parse_lines([good.replace('"amount_minor": 5', '"amount_minor": 5.5')], "f.jsonl")
