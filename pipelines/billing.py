"""The stream's billing step: envelope in, envelope (with its outbox) out. No Kafka here.

The faust agents call these functions; tests call them directly.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import polars as pl

from infra import topics as T
from pipelines.config_holder import ContextHolder  # noqa: F401
from pipelines.context import BillingContext
from pipelines.core.engine import BatchOutputs, CoreState, process_batch
from pipelines.core.postings import apply_postings
from pipelines.envelope import Envelope, OutboxItem
from pipelines.facts import interval_facts
from pipelines.loadcontrol import LoadOutputs, process_load
from pipelines.relaygate import GateCommand, Holds, held_by, set_hold
from schemas import codec
from schemas.intervals import INTERVAL_ROWS, pack_interval_rows
from schemas.ledger import LEDGER_ROWS, pack_ledger_rows

log = logging.getLogger("mallwatt.billing")


def apply_readings(env: Envelope, readings: pl.DataFrame, ctx: BillingContext, source: str, offset: int) -> Envelope:
    """Readings of one bucket (tests and tools; the worker uses pipelines.batching)."""
    return step({"_": env}, readings, None, ctx, {"_": (source, offset)}, lambda _a: "_")["_"]


def payment_row(payment: dict[str, Any]) -> dict[str, Any]:
    """A decoded Payment as the core's payment input."""
    return {"payment_id": payment["payment_id"], "account_id": payment["account_id"], "ts_ms": payment["ts_ms"],
            "amount_minor": payment["amount_minor"], "kind": str(payment["kind"]).lower(),
            "reverses_payment_id": payment.get("reverses_payment_id")}


def apply_payment(env: Envelope, payment: dict[str, Any], ctx: BillingContext, source: str, offset: int) -> Envelope:
    return step({"_": env}, None, [payment_row(payment)], ctx, {"_": (source, offset)}, lambda _a: "_")["_"]


def apply_posting(env: Envelope, posting: dict[str, Any], ctx: BillingContext, source: str,
                  offset: int) -> Envelope:
    """A LedgerPosting through the account's wallet; a rejected one (not a duplicate) raises an alert."""
    new_state, out = apply_postings(CoreState(dict(env.circuits), dict(env.accounts)), [posting], ctx.rating)
    holds = {"_": {m: list(h) for m, h in env.holds.items()}}
    tagged = outbox_items(out, ctx, lambda _a: "_", {"_": (source, offset)})
    tagged += gate_wallet_commands(out, holds, ctx, lambda _a: "_")
    for row in out.rejected_payments.iter_rows(named=True):
        if row["reason"] == "duplicate":
            continue
        alert = {"alert_id": f"{row['payment_id']}:rejected", "kind": "rejected_posting", "severity": "WARNING",
                 "mall_id": ctx.account_mall.get(row["account_id"], "unknown"), "account_id": row["account_id"],
                 "meter_id": None, "ts_ms": row["ts_ms"], "message": f"posting {row['payment_id']} not applied: "
                 f"{row['reason']}", "details": {"amount_minor": str(row["amount_minor"]), "reason": row["reason"]}}
        tagged.append(("_", OutboxItem(T.ALERTS, row["account_id"].encode(), codec.encode("Alert", alert))))
    return Envelope(accounts=new_state.accounts, circuits=env.circuits, hwm={**env.hwm, source: offset},
                    outbox=[item for _, item in tagged], updates=env.updates + 1, holds=holds["_"], extra=env.extra)


def step(envs: dict[str, Envelope], readings: pl.DataFrame | None, payments: list[dict[str, Any]] | None,
         ctx: BillingContext, positions: dict[str, tuple[str, int]], bucket_of: Any = None) -> dict[str, Envelope]:
    """One core call over the state of `envs` (bucket key -> envelope). Each bucket records
    its input position (source, offset) as its new high-water mark; outputs go to the outbox
    of the bucket that owns their account."""
    bucket_of = bucket_of or ctx.bucket_of
    state = CoreState()
    for env in envs.values():
        state.circuits.update(env.circuits)
        state.accounts.update(env.accounts)
    if readings is None:
        readings = pl.DataFrame(schema={"circuit_id": pl.String, "meter_id": pl.String, "ts_ms": pl.Int64,
                                        "import_kwh": pl.Float64})
    new_state, out = process_batch(state, readings, payments, ctx.rating)
    holds = _HoldCopies(envs)
    tagged = outbox_items(out, ctx, bucket_of, positions)
    tagged += interval_items(out, new_state, ctx, bucket_of)
    tagged += gate_wallet_commands(out, holds, ctx, bucket_of)
    load_state: dict[str, Any] = {}
    # load control needs power values; without any it would change nothing
    if readings.height and "power_w" in readings.columns and readings["power_w"].null_count() < readings.height:
        for env in envs.values():
            load_state.update(env.extra.get("load", {}))
        load_state, load_out = process_load(readings, load_state, ctx.load_limits)
        tagged += load_items(load_out, holds, ctx, bucket_of)
    result: dict[str, Envelope] = {}
    for key, env in envs.items():
        extra = {**env.extra, "load": {}} if load_state else env.extra
        source, offset = positions[key]
        result[key] = Envelope(accounts={}, circuits={}, hwm={**env.hwm, source: offset}, outbox=[],
                               updates=env.updates + 1, holds=holds.get(key, env.holds),  # get: no copy
                               extra=extra)
    for account, value in load_state.items():
        result[bucket_of(account)].extra["load"][account] = value
    for account, value in new_state.accounts.items():
        result[bucket_of(account)].accounts[account] = value
    for circuit, value in new_state.circuits.items():
        route = ctx.circuit_meter.get(circuit)
        key = bucket_of(route.account_id) if route else _bucket_holding(circuit, envs)
        result[key].circuits[circuit] = value
    for key, item in tagged:
        result[key].outbox.append(item)
    return result


class _HoldCopies(dict[str, Holds]):
    """Each key's relay holds, copied from its envelope on first use: most accounts of a step
    change no hold, and copying every touched account's holds cost a dict per account."""

    def __init__(self, envs: dict[str, Envelope]) -> None:
        super().__init__()
        self._envs = envs

    def __missing__(self, key: str) -> Holds:
        value = {m: list(h) for m, h in self._envs[key].holds.items()}
        self[key] = value
        return value


def _bucket_holding(circuit: str, envs: dict[str, Envelope]) -> str:
    """A circuit no longer in the config keeps living in the bucket that held it."""
    for key, env in envs.items():
        if circuit in env.circuits:
            return key
    raise KeyError(f"circuit {circuit!r} is in no bucket and not in the config")


def apply_operator(env: Envelope, command: dict[str, Any], ctx: BillingContext, source: str,
                   offset: int) -> Envelope:
    """An operator's power off/on for one meter: sets or clears the operator hold, audited as an alert."""
    meter = command["meter_id"]
    route = ctx.meter_route[meter]
    holds = {m: list(h) for m, h in env.holds.items()}
    on = command["action"] == "POWER_OFF"
    gated = set_hold(holds, [meter], "operator", on, command["command_id"])
    items = [relay_item(ctx, g, route.account_id, command["ts_ms"], f"operator:{command['operator']}")
             for g in gated]
    still = held_by(holds, meter)
    audit = {"alert_id": f"{command['command_id']}:audit", "kind": "operator_power", "severity": "INFO",
             "mall_id": route.mall_id, "account_id": route.account_id, "meter_id": meter,
             "ts_ms": command["ts_ms"],
             "message": f"operator {command['operator']} {command['action'].lower()} ({command['reason']}); "
                        f"relay {'command sent' if gated else 'unchanged'}; holds now {still or 'none'}",
             "details": {"command_id": command["command_id"], "scope": command["scope"],
                         "target_id": command["target_id"], "holds": ",".join(still)}}
    items.append(OutboxItem(T.ALERTS, route.account_id.encode(), codec.encode("Alert", audit)))
    return Envelope(accounts=env.accounts, circuits=env.circuits, hwm={**env.hwm, source: offset},
                    outbox=items, updates=env.updates + 1, holds=holds, extra=env.extra)


def outbox_items(out: BatchOutputs, ctx: BillingContext, bucket_of: Any,
                 positions: dict[str, tuple[str, int]]) -> list[tuple[str, OutboxItem]]:
    """The outputs of one core call, each tagged with the bucket that carries it. The ledger
    goes out column-wise: one LedgerBatch per bucket and change (named by its input position)."""
    items = ledger_items(out.ledger, ctx, bucket_of, positions) if out.ledger.height else []
    for row in out.alerts.iter_rows(named=True):
        details = json.loads(row["details"]) if row["details"] else {}
        record = {**row, "details": {k: str(v) for k, v in details.items()}}
        items.append((bucket_of(row["account_id"]), OutboxItem(
            T.ALERTS, (row["account_id"] or row["mall_id"]).encode(), codec.encode("Alert", record))))
    for row in out.rejected_readings.iter_rows(named=True):
        route = ctx.circuit_meter.get(row["circuit_id"])
        if route is None:
            continue
        alert = {"alert_id": f"{row['circuit_id']}:rej:{row['ts_ms']}", "kind": "meter_fault", "severity": "WARNING",
                 "mall_id": route.mall_id, "account_id": route.account_id, "meter_id": row["meter_id"],
                 "ts_ms": row["ts_ms"], "message": f"reading not billed: {row['reason']}",
                 "details": {"circuit_id": row["circuit_id"], "import_kwh": str(row["import_kwh"]),
                             "reason": str(row["reason"])}}
        items.append((bucket_of(route.account_id), OutboxItem(T.ALERTS, route.account_id.encode(),
                                                              codec.encode("Alert", alert))))
    # rejected payments already come with a rejected_topup alert from the wallet
    return items


def ledger_items(ledger: pl.DataFrame, ctx: BillingContext, bucket_of: Any,
                 positions: dict[str, tuple[str, int]]) -> list[tuple[str, OutboxItem]]:
    """Each account's ledger entries, in order, as packed rows in the outbox of its own state
    record. The forwarder gathers the rows of many records into one LedgerBatch: encoding a
    LedgerBatch per account and step cost more than the whole core on live input."""
    return [(bucket_of(account), OutboxItem(LEDGER_ROWS, account.encode(), packed))
            for account, packed in pack_ledger_rows(ledger)]


def interval_items(out: BatchOutputs, new_state: CoreState, ctx: BillingContext,
                   bucket_of: Any) -> list[tuple[str, OutboxItem]]:
    """Each account's interval facts (billed energy with its flags, late/spike markers) as
    packed rows in the outbox of its own state record; the forwarder gathers them into
    IntervalBatches (like the ledger rows)."""
    if not out.intervals.height and not out.rejected_readings.height:
        return []
    facts = interval_facts(out.intervals, out.rejected_readings, new_state.circuits, ctx)
    return [(bucket_of(account), OutboxItem(INTERVAL_ROWS, account.encode(), packed))
            for account, packed in pack_interval_rows(facts)]


def gate_wallet_commands(out: BatchOutputs, holds_by_bucket: dict[str, Holds], ctx: BillingContext,
                         bucket_of: Any) -> list[tuple[str, OutboxItem]]:
    """Wallet trips and reconnects, filtered through every other reason a meter is held open;
    each tagged with the bucket that carries it."""
    items: list[tuple[str, OutboxItem]] = []
    for row in out.commands.iter_rows(named=True):
        meters = ctx.account_meters.get(row["account_id"], [])
        holds = holds_by_bucket[bucket_of(row["account_id"])]
        if row["action"].upper() == "TRIP":  # the wallet trips for "credit" or "warning": that is the hold
            hold = "warning" if row["reason"] == "warning" else "credit"
            gated = set_hold(holds, meters, hold, True, row["command_id"])
        else:  # a top-up releases both credit holds
            gated = set_hold(holds, meters, "warning", False, row["command_id"], row["reason"])
            gated += set_hold(holds, meters, "credit", False, row["command_id"], row["reason"])
        items += [(bucket_of(row["account_id"]), relay_item(ctx, g, row["account_id"], row["cause_ts_ms"],
                                                            "pipeline"))
                  for g in gated]
    return items


def load_items(out: LoadOutputs, holds_by_bucket: dict[str, Holds], ctx: BillingContext,
               bucket_of: Any) -> list[tuple[str, OutboxItem]]:
    """Load-control alerts, and its trips/restores filtered through the relay holds."""
    items: list[tuple[str, OutboxItem]] = []
    for alert in out.alerts:
        record = {**alert, "details": {k: str(v) for k, v in alert.get("details", {}).items()}}
        items.append((bucket_of(alert["account_id"]), OutboxItem(T.ALERTS, alert["account_id"].encode(),
                                                      codec.encode("Alert", record))))
    for cmd in out.commands:
        account = cmd["account_id"]
        meters = ctx.account_meters.get(account, [])
        gated = set_hold(holds_by_bucket[bucket_of(account)], meters, cmd["hold"], cmd["action"] == "TRIP",
                         cmd["command_id"], cmd["reason"])
        items += [(bucket_of(account), relay_item(ctx, g, account, cmd["cause_ts_ms"], "loadcontrol"))
                  for g in gated]
    return items


def relay_item(ctx: BillingContext, g: GateCommand, account_id: str | None, ts_ms: int,
               requested_by: str) -> OutboxItem:
    route = ctx.meter_route[g.meter_id]
    command = {"command_id": g.command_id, "action": g.action, "reason": g.reason, "mall_id": route.mall_id,
               "gateway_id": route.gateway_id, "meter_id": g.meter_id, "account_id": account_id,
               "issued_at_ms": ts_ms, "cause_ts_ms": ts_ms, "requested_by": requested_by}
    return OutboxItem(T.RELAY_COMMANDS, route.gateway_id.encode(), codec.encode("RelayCommand", command))
