"""Replay reproduces the power loop: the relay outcomes, recorded with their arrival, go through
the same relay reconciliation in replay as in the stream, so the retried commands and the ops
alerts (relay_retry, tripped_but_drawing, meter_unreachable) come out with the same ids at the
same times.

The stream is modelled with the worker's own step functions (billing.step for readings and
payments, billing.apply_outcomes, billing.tick as the timer after every input at the stream
clock), and a collector that answers each command 2 s after it is issued, as the meter lets it.
"""

from __future__ import annotations

import heapq
import json
from typing import Any

import polars as pl
import pytest

from infra import topics as T
from pipelines import billing
from pipelines.context import build_context
from pipelines.core.arrival import collect, replay_arrival, tables
from pipelines.envelope import Envelope
from pipelines.generate import generate
from pipelines.portfolio import parse_portfolio
from pipelines.replay_relay import OUTCOME_SCHEMA, RelayReplay
from schemas import codec, readings

T0 = 1_784_080_800_000  # 2026-07-15 10:00 +08:00
RELAY_KINDS = ("relay_retry", "paid_but_dark", "tripped_but_drawing", "meter_unreachable")


@pytest.fixture(scope="module")
def ctx() -> billing.BillingContext:
    data = generate(1, 6, seed=5)
    for level in data["levels"]:
        level["policy"] = {"alert_levels": [], "cutoff": 0}
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"], merchant["protected"] = "standard", False
        merchant.pop("opening_balance_minor", None)  # opens at 0: the first charge trips
    return build_context(parse_portfolio(data), 8)


def _meters(ctx: billing.BillingContext, account: str) -> tuple[str, str]:
    meter = next(m for m, r in ctx.meter_route.items() if r.account_id == account)
    circuit = next(c for c, r in ctx.circuit_meter.items() if r.meter_id == meter)
    return meter, circuit


class Collector:
    """Answers a command 2 s after it is issued: the welded meter's TRIPs fail (relay stays
    CLOSED), the silent meter never answers, everything else is confirmed."""

    def __init__(self, welded: str, silent: str) -> None:
        self.welded, self.silent = welded, silent

    def outcome(self, cmd: dict[str, Any]) -> dict[str, Any] | None:
        if cmd["meter_id"] == self.silent:
            return None
        failed = cmd["meter_id"] == self.welded and cmd["action"] == "TRIP"
        return {"command_id": cmd["command_id"], "action": cmd["action"],
                "status": "FAILED" if failed else "CONFIRMED", "mall_id": cmd["mall_id"],
                "gateway_id": cmd["gateway_id"], "meter_id": cmd["meter_id"],
                "relay_after": "CLOSED" if failed or cmd["action"] == "RECONNECT" else "OPEN", "attempts": 3,
                "ts_ms": cmd["issued_at_ms"] + 2_000, "detail": "read-back CLOSED" if failed else ""}


def stream(ctx: billing.BillingContext, messages: list[tuple[int, str, Any]], collector: Collector
           ) -> tuple[list[dict], list[dict], list[dict]]:
    """The worker over the inputs in message-time order; returns (commands, relay alerts, the
    outcomes topic as exported)."""
    envs: dict[str, Envelope] = {}
    commands: list[dict] = []
    alerts: list[dict] = []
    outcomes: list[dict] = []
    queue = [(t, i, kind, value) for i, (t, kind, value) in enumerate(messages)]
    heapq.heapify(queue)
    seq, clock = len(queue), 0

    def publish(changed: dict[str, Envelope]) -> None:
        nonlocal seq
        for key, env in changed.items():
            envs[key] = env
            for item in env.outbox:
                if item.topic == T.RELAY_COMMANDS:
                    cmd = codec.decode("RelayCommand", item.value)
                    commands.append(cmd)
                    answer = collector.outcome(cmd)
                    if answer is not None:  # produced 0.5 s after the collector's read-back
                        heapq.heappush(queue, (answer["ts_ms"] + 500, seq, "outcome", answer))
                        seq += 1
                elif item.topic == T.ALERTS:
                    alert = codec.decode("Alert", item.value)
                    if alert["kind"] in RELAY_KINDS:
                        alerts.append(alert)

    while queue:
        t, _, kind, value = heapq.heappop(queue)
        clock = max(clock, t)
        if kind == "readings":
            keys = {ctx.bucket_of(a) for a in value["account_id"].unique().to_list()}
            changed = billing.step({k: envs.get(k, Envelope()) for k in keys}, value, None, ctx,
                                   {k: ("readings:0", t) for k in keys}, now_ms=t)
        elif kind == "payment":
            key = ctx.bucket_of(value["account_id"])
            changed = billing.step({key: envs.get(key, Envelope())}, None, [value], ctx, {key: ("payments:0", t)},
                                   now_ms=t)
        else:
            account = ctx.meter_route[value["meter_id"]].account_id
            key = ctx.bucket_of(account)
            changed = {key: billing.apply_outcomes(envs[key], account, [value], ctx, "outcomes:0", len(outcomes), t)}
            outcomes.append({**value, "partition": 0, "offset": len(outcomes), "msg_ts_ms": t})
        publish(changed)
        for key in sorted(envs):  # the timer after the input, at the stream clock
            ticked = billing.tick(envs[key], ctx, clock)
            if ticked is not None:
                publish({key: ticked})
    return commands, alerts, outcomes


def test_replay_reproduces_retries_and_ops_alerts(ctx: billing.BillingContext) -> None:
    welded_account, silent_account = "M01-S0001", "M01-S0002"
    welded, welded_c = _meters(ctx, welded_account)
    silent, silent_c = _meters(ctx, silent_account)
    messages: list[tuple[int, str, Any]] = []
    rows = []
    for i in range(120):  # a readings message every 20 s for 40 minutes
        ts = T0 + i * 20_000
        frame = pl.DataFrame({
            "circuit_id": [welded_c, silent_c], "meter_id": [welded, silent],
            "account_id": [welded_account, silent_account], "ts_ms": [ts, ts],
            "import_kwh": [100.0 + 0.01 * i, 200.0 + 0.01 * i],
            "relay": pl.Series([0, 2], dtype=pl.UInt8),  # the welded relay reads closed; the silent one unknown
            "power_w": [800.0, float("nan")]})
        # through the wire format, as the worker reads a ReadingBatch
        wire = readings.batch_to_frame(codec.decode("ReadingBatch", codec.encode("ReadingBatch", readings.frame_to_batch(
            frame, batch_id=f"b{i}", collector_id="c", mall_id="M01", shard=0, seq=i, collected_at_ms=ts))))
        messages.append((ts + 300, "readings", wire))
        rows.append(wire.with_columns(partition=pl.lit(0, pl.Int64), offset=pl.lit(i, pl.Int64),
                                      msg_ts_ms=pl.lit(ts + 300, pl.Int64)))
    paid = T0 + 30 * 60_000
    payment = {"payment_id": "p-late", "account_id": welded_account, "ts_ms": paid, "amount_minor": 100_000,
               "kind": "topup", "reverses_payment_id": None}
    messages.append((paid + 500, "payment", payment))

    commands, alerts, outcomes = stream(ctx, messages, Collector(welded, silent))
    kinds = {(a["kind"], a["meter_id"]) for a in alerts}
    # the loop did its work in the stream: retries, the escalations, a reconnect after the top-up
    assert {("relay_retry", welded), ("tripped_but_drawing", welded), ("relay_retry", silent),
            ("meter_unreachable", silent)} <= kinds
    assert any(c["command_id"].endswith(":r3") for c in commands)
    assert any(c["action"] == "RECONNECT" and c["meter_id"] == welded for c in commands)

    store, sink = collect()
    pays = pl.DataFrame([{**payment, "partition": 0, "offset": 0, "msg_ts_ms": paid + 500}])
    relay = RelayReplay(ctx, pl.DataFrame(outcomes, schema=OUTCOME_SCHEMA), sink)
    replay_arrival(ctx.rating, [(0, pl.concat(rows))], pays, sink, relay=relay)
    got = tables(store)
    # each meter's commands and alerts in the same order with every field (ids, times, reasons);
    # the order between meters is the order of separate outboxes, not part of the contract
    assert per_meter(got["relay_commands"].to_dicts()) == per_meter(commands)
    assert per_meter([{**a, "details": json.loads(a["details"])} for a in got["relay_alerts"].to_dicts()]) == \
        per_meter(alerts)

    # without the outcomes, replay cannot know the welded relay failed: the stream's retries differ
    store2, sink2 = collect()
    replay_arrival(ctx.rating, [(0, pl.concat(rows))], pays, sink2, relay=RelayReplay(ctx, None, sink2))
    assert per_meter(tables(store2)["relay_commands"].to_dicts()) != per_meter(commands)


def per_meter(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["meter_id"], []).append(r)
    return out
