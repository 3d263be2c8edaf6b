"""The stream's billing step: envelope in, envelope (with its outbox) out. No Kafka here.

The faust agents call these functions; tests call them directly.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import polars as pl

from infra import topics as T
from pipelines.audit import audit_item, audit_record
from pipelines.config_holder import ContextHolder  # noqa: F401
from pipelines.context import BillingContext
from pipelines.core.engine import BatchOutputs, CoreState, process_batch
from pipelines.core.engine import tick as core_tick
from pipelines.core.postings import apply_postings
from pipelines.core.wallet import friendly_until
from pipelines.envelope import Envelope, OutboxItem, state_key
from pipelines.facts import interval_facts
from pipelines.loadcontrol import LoadOutputs, process_load
from pipelines.powerloop import PowerLoop, day_due, wallet_due
from pipelines.relaygate import held_by
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
                  offset: int, now_ms: int | None = None) -> Envelope:
    """A LedgerPosting through the account's wallet; a rejected one (not a duplicate) raises an alert.
    `now_ms` (the message's Kafka timestamp) stamps the relay commands it causes."""
    new_state, out = apply_postings(CoreState(dict(env.circuits), dict(env.accounts)), [posting], ctx.rating)
    loop = PowerLoop({"_": env}, ctx, now_ms, lambda _a: "_")
    tagged = outbox_items(out, ctx, lambda _a: "_", {"_": (source, offset)})
    tagged += gate_wallet_commands(out, loop, ctx)
    for row in out.rejected_payments.iter_rows(named=True):
        if row["reason"] == "duplicate":
            continue
        alert = {"alert_id": f"{row['payment_id']}:rejected", "kind": "rejected_posting", "severity": "WARNING",
                 "mall_id": ctx.account_mall.get(row["account_id"], "unknown"), "account_id": row["account_id"],
                 "meter_id": None, "ts_ms": row["ts_ms"], "message": f"posting {row['payment_id']} not applied: "
                 f"{row['reason']}", "details": {"amount_minor": str(row["amount_minor"]), "reason": row["reason"]}}
        tagged.append(("_", OutboxItem(T.ALERTS, row["account_id"].encode(), codec.encode("Alert", alert))))
    return Envelope(accounts=new_state.accounts, circuits=env.circuits, hwm={**env.hwm, source: offset},
                    outbox=[item for _, item in tagged], updates=env.updates + 1, holds=loop.holds_of("_"),
                    extra=env.extra, relays=loop.relays_of("_"))


def step(envs: dict[str, Envelope], readings: pl.DataFrame | None, payments: list[dict[str, Any]] | None,
         ctx: BillingContext, positions: dict[str, tuple[str, int]], bucket_of: Any = None,
         now_ms: int | None = None) -> dict[str, Envelope]:
    """One core call over the state of `envs` (bucket key -> envelope). Each bucket records
    its input position (source, offset) as its new high-water mark; outputs go to the outbox
    of the bucket that owns their account. `now_ms` is the step's time (the newest Kafka
    message timestamp of its input): relay commands are stamped with it, and the readings'
    relay column is checked against the meters' desired state (pipelines.powerloop)."""
    bucket_of = bucket_of or ctx.bucket_of
    state = CoreState()
    for env in envs.values():
        state.circuits.update(env.circuits)
        state.accounts.update(env.accounts)
    if readings is None:
        readings = pl.DataFrame(schema={"circuit_id": pl.String, "meter_id": pl.String, "ts_ms": pl.Int64,
                                        "import_kwh": pl.Float64})
    new_state, out = process_batch(state, readings, payments, ctx.rating)
    loop = PowerLoop(envs, ctx, now_ms, bucket_of)
    # the outputs in the order each key's outbox gets them (see _outboxes)
    ledger = ledger_items(out.ledger, ctx, bucket_of, positions) if out.ledger.height else []
    alerts = alert_items(out, ctx, bucket_of)
    intervals = interval_items(out, new_state, ctx, bucket_of)
    later = gate_wallet_commands(out, loop, ctx)
    load_state: dict[str, Any] = {}
    # load control needs power values; without any it would change nothing
    if readings.height and "power_w" in readings.columns and readings["power_w"].null_count() < readings.height:
        for env in envs.values():
            if load := env.extra.get("load"):
                load_state.update(load)
        load_state, load_out = process_load(readings, load_state, ctx.load_limits)
        later += load_items(load_out, loop, ctx, bucket_of)
    if now_ms is not None and readings.height:
        later += loop.observe(readings, now_ms)
    return _merge(envs, new_state, load_state, _outboxes(ledger, alerts, intervals, later), loop, positions, ctx,
                  bucket_of)


def _outboxes(ledger: list[tuple[str, OutboxItem]], alerts: list[tuple[str, OutboxItem]],
              intervals: list[tuple[str, OutboxItem]], later: list[tuple[str, OutboxItem]]
              ) -> dict[str, list[OutboxItem]]:
    """Each key's outbox: its items of `ledger`, `alerts`, `intervals`, `later`, in that order
    (each list's own order kept). Without a loop per item where a step has one ledger item per
    key and no alerts (the live shape): this runs for every account a step touches."""
    boxes = {key: [item] for key, item in ledger}
    if len(boxes) < len(ledger) or alerts:  # a key with several ledger items, or alerts between
        boxes = {}
        _append(boxes, ledger, alerts)
    _append(boxes, intervals, later)
    return boxes


def _append(boxes: dict[str, list[OutboxItem]], *parts: list[tuple[str, OutboxItem]]) -> None:
    """Add each (key, item) of `parts` to its key's outbox, in order."""
    for part in parts:
        for key, item in part:
            box = boxes.get(key)
            if box is None:
                boxes[key] = [item]
            else:
                box.append(item)


def _merge(envs: dict[str, Envelope], new_state: CoreState, load_state: dict[str, Any],
           boxes: dict[str, list[OutboxItem]], loop: PowerLoop, positions: dict[str, tuple[str, int]],
           ctx: BillingContext, bucket_of: Any) -> dict[str, Envelope]:
    """The step's new envelopes: each key's accounts, circuits, load state and outputs (`boxes`:
    key -> its outbox, from `_outboxes`).

    Positional and without a call per account where the key is the account id (the worker's
    keys: `ctx.bucket_of`): this runs for every account a step touches."""
    if _keyed_by_account(ctx, bucket_of):
        result = _merge_own(envs, new_state, load_state, boxes, loop, positions, ctx)
        if result is not None:
            return result
    result = {}
    holds, relays = loop.holds, loop.relays  # copies of the keys the power loop changed
    for key, env in envs.items():
        source, offset = positions[key]
        hwm = env.hwm.copy()
        hwm[source] = offset
        result[key] = Envelope({}, {}, hwm, boxes.pop(key, []), env.updates + 1, holds.get(key, env.holds),
                               {**env.extra, "load": {}} if load_state else env.extra,  # no copy
                               relays.get(key, env.relays))
    if boxes:  # an output for a key not in the step: refused as indexing `result` would
        raise KeyError(next(iter(boxes)))
    for account, value in load_state.items():
        result[bucket_of(account)].extra["load"][account] = value
    for account, value in new_state.accounts.items():
        result[bucket_of(account)].accounts[account] = value
    _place_circuits(result, new_state, envs, ctx, bucket_of)
    return result


def _merge_own(envs: dict[str, Envelope], new_state: CoreState, load_state: dict[str, Any],
               boxes: dict[str, list[OutboxItem]], loop: PowerLoop, positions: dict[str, tuple[str, int]],
               ctx: BillingContext) -> dict[str, Envelope] | None:
    """`_merge` where each key is its account's id: every envelope built whole in one pass (its
    account, load state and outbox looked up by its key). None when some account, load state or
    outbox of the step has no envelope of its own here (the general pass then places them, or
    fails as it does)."""
    accounts = new_state.accounts
    holds, relays = loop.holds, loop.relays
    result: dict[str, Envelope] = {}
    n_acc = n_load = n_box = 0
    no_account: dict[str, Any] = {}
    # (dict.copy, then set: cheaper than a {**d, k: v} literal; the same keys in the same order)
    for key, env in envs.items():
        source, offset = positions[key]
        s = accounts.get(key)
        box = boxes.get(key)
        hwm = env.hwm.copy()
        hwm[source] = offset
        extra = env.extra
        if load_state:
            load = load_state.get(key, no_account)
            extra = extra.copy()
            extra["load"] = {} if load is no_account else {key: load}
            n_load += load is not no_account
        result[key] = Envelope({} if s is None else {key: s}, {}, hwm, [] if box is None else box,
                               env.updates + 1, holds.get(key, env.holds), extra, relays.get(key, env.relays))
        n_acc += s is not None
        n_box += box is not None
    if n_acc < len(accounts) or n_load < len(load_state) or n_box < len(boxes):
        return None
    _place_circuits(result, new_state, envs, ctx, None)
    return result


def _place_circuits(result: dict[str, Envelope], new_state: CoreState, envs: dict[str, Envelope],
                    ctx: BillingContext, bucket_of: Any) -> None:
    """Each circuit state into the envelope of its account's key (`bucket_of` None: the key is
    the account id); a circuit no longer in the config stays where it was."""
    routes = ctx.circuit_meter
    for circuit, value in new_state.circuits.items():
        route = routes.get(circuit)
        if route is None:
            key = _bucket_holding(circuit, envs)
        else:
            key = route.account_id if bucket_of is None else bucket_of(route.account_id)
        result[key].circuits[circuit] = value


def _bucket_holding(circuit: str, envs: dict[str, Envelope]) -> str:
    """A circuit no longer in the config keeps living in the bucket that held it."""
    for key, env in envs.items():
        if circuit in env.circuits:
            return key
    raise KeyError(f"circuit {circuit!r} is in no bucket and not in the config")


def apply_operator(env: Envelope, command: dict[str, Any], ctx: BillingContext, source: str,
                   offset: int, now_ms: int | None = None) -> Envelope:
    """An operator's power off/on for one meter: sets or clears the operator hold, audited as an alert."""
    meter = command["meter_id"]
    route = ctx.meter_route[meter]
    decision = ctx.operator_decision(command)
    if not decision.accepted:  # the worker dead-letters these before; any other caller is refused here
        raise PermissionError(decision.problem())
    who = "+".join(decision.principals)  # verified signers, never the free-text operator field
    loop = PowerLoop({"_": env}, ctx, now_ms, lambda _a: "_")
    on = command["action"] == "POWER_OFF"
    gated = loop.gate(route.account_id, [meter], "operator", on, command["command_id"], None, command["ts_ms"],
                      f"operator:{who}")
    items = [item for _, item in gated]
    still = held_by(loop.holds_of("_"), meter)
    audit = {"alert_id": f"{command['command_id']}:audit", "kind": "operator_power", "severity": "INFO",
             "mall_id": route.mall_id, "account_id": route.account_id, "meter_id": meter,
             "ts_ms": command["ts_ms"],
             "message": f"operator {who} {command['action'].lower()} ({command['reason']}); "
                        f"relay {'command sent' if gated else 'unchanged'}; holds now {still or 'none'}",
             "details": {"command_id": command["command_id"], "scope": command["scope"],
                         "target_id": command["target_id"], "holds": ",".join(still),
                         "principals": who, "order_id": command["order_id"]}}
    items.append(OutboxItem(T.ALERTS, route.account_id.encode(), codec.encode("Alert", audit)))
    items.append(audit_item(audit_record(
        command["ts_ms"], who, "power.order", f"meter:{meter}", "accepted", "worker",
        f"{command['action']} order {command['order_id']} ({command['scope'].lower()} {command['target_id']}): "
        f"{command['reason']}; relay {'command sent' if gated else 'unchanged'}",
        event_id=f"{command['command_id']}:audit")))
    return Envelope(accounts=env.accounts, circuits=env.circuits, hwm={**env.hwm, source: offset},
                    outbox=items, updates=env.updates + 1, holds=loop.holds_of("_"), extra=env.extra,
                    relays=loop.relays_of("_"))


def outbox_items(out: BatchOutputs, ctx: BillingContext, bucket_of: Any,
                 positions: dict[str, tuple[str, int]]) -> list[tuple[str, OutboxItem]]:
    """The outputs of one core call, each tagged with the bucket that carries it. The ledger
    goes out column-wise: one LedgerBatch per bucket and change (named by its input position)."""
    items = ledger_items(out.ledger, ctx, bucket_of, positions) if out.ledger.height else []
    return items + alert_items(out, ctx, bucket_of)


def alert_items(out: BatchOutputs, ctx: BillingContext, bucket_of: Any) -> list[tuple[str, OutboxItem]]:
    """The alerts of one core call (its own and those of refused readings), each tagged with the
    bucket that carries it."""
    items: list[tuple[str, OutboxItem]] = []
    for row in out.alerts.iter_rows(named=True):
        details = json.loads(row["details"]) if row["details"] else {}
        record = {**row, "details": {k: str(v) for k, v in details.items()}}
        items.append((bucket_of(row["account_id"]), OutboxItem(
            T.ALERTS, (row["account_id"] or row["mall_id"]).encode(), codec.encode("Alert", record))))
    for row in out.rejected_readings.iter_rows(named=True):
        route = ctx.circuit_meter.get(row["circuit_id"])
        if route is None:
            continue
        # the reason is part of the id: a late reading and a re-sent copy of one circuit and
        # time are two refusals, and consumers deduplicate alerts by id
        alert = {"alert_id": f"{row['circuit_id']}:rej:{row['ts_ms']}:{row['reason']}", "kind": "meter_fault",
                 "severity": "WARNING",
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
    if _keyed_by_account(ctx, bucket_of):  # no call per account
        return [(account, OutboxItem(LEDGER_ROWS, account.encode(), packed)) for account, packed in
                pack_ledger_rows(ledger)]
    return [(bucket_of(account), OutboxItem(LEDGER_ROWS, account.encode(), packed))
            for account, packed in pack_ledger_rows(ledger)]


def _keyed_by_account(ctx: BillingContext, bucket_of: Any) -> bool:
    """Whether `bucket_of` is the worker's: each account's key is its id."""
    return bucket_of == ctx.bucket_of and state_key("a") == "a"


def interval_items(out: BatchOutputs, new_state: CoreState, ctx: BillingContext,
                   bucket_of: Any) -> list[tuple[str, OutboxItem]]:
    """Each account's interval facts (billed energy with its flags, late/spike markers) as
    packed rows in the outbox of its own state record; the forwarder gathers them into
    IntervalBatches (like the ledger rows)."""
    if not out.intervals.height and not out.rejected_readings.height:
        return []
    facts = interval_facts(out.intervals, out.rejected_readings, new_state.circuits, ctx)
    if _keyed_by_account(ctx, bucket_of):  # no call per account
        return [(account, OutboxItem(INTERVAL_ROWS, account.encode(), packed)) for account, packed in
                pack_interval_rows(facts)]
    return [(bucket_of(account), OutboxItem(INTERVAL_ROWS, account.encode(), packed))
            for account, packed in pack_interval_rows(facts)]


def gate_wallet_commands(out: BatchOutputs, loop: PowerLoop, ctx: BillingContext) -> list[tuple[str, OutboxItem]]:
    """Wallet trips and reconnects, filtered through every other reason a meter is held open;
    each tagged with the bucket that carries it."""
    items: list[tuple[str, OutboxItem]] = []
    for row in out.commands.iter_rows(named=True):
        account = row["account_id"]
        meters = ctx.account_meters.get(account, [])
        if row["action"].upper() == "TRIP":  # the wallet trips for "credit" or "warning": that is the hold
            hold = "warning" if row["reason"] == "warning" else "credit"
            items += loop.gate(account, meters, hold, True, row["command_id"], None, row["cause_ts_ms"], "pipeline")
        else:  # a top-up releases both credit holds
            items += loop.gate(account, meters, "warning", False, row["command_id"], row["reason"],
                               row["cause_ts_ms"], "pipeline")
            items += loop.gate(account, meters, "credit", False, row["command_id"], row["reason"],
                               row["cause_ts_ms"], "pipeline")
    return items


def load_items(out: LoadOutputs, loop: PowerLoop, ctx: BillingContext,
               bucket_of: Any) -> list[tuple[str, OutboxItem]]:
    """Load-control alerts, and its trips/restores filtered through the relay holds."""
    items: list[tuple[str, OutboxItem]] = []
    for alert in out.alerts:
        record = {**alert, "details": {k: str(v) for k, v in alert.get("details", {}).items()}}
        items.append((bucket_of(alert["account_id"]), OutboxItem(T.ALERTS, alert["account_id"].encode(),
                                                      codec.encode("Alert", record))))
    for cmd in out.commands:
        account = cmd["account_id"]
        items += loop.gate(account, ctx.account_meters.get(account, []), cmd["hold"], cmd["action"] == "TRIP",
                           cmd["command_id"], cmd["reason"], cmd["cause_ts_ms"], "loadcontrol")
    return items


def apply_outcomes(env: Envelope, account: str, outcomes: list[dict[str, Any]], ctx: BillingContext, source: str,
                   offset: int, now_ms: int) -> Envelope:
    """RelayOutcomes of one account's meters (in topic order): observations of the power loop;
    a failed or expired command is re-issued (pipelines.core.relay)."""
    loop = PowerLoop({"_": env}, ctx, now_ms, lambda _a: "_")
    items = [item for o in outcomes for _, item in loop.outcome(account, o, now_ms)]
    return Envelope(accounts=env.accounts, circuits=env.circuits, hwm={**env.hwm, source: offset}, outbox=items,
                    updates=env.updates + 1, holds=loop.holds_of("_"), extra=env.extra, relays=loop.relays_of("_"))


def tick(env: Envelope, ctx: BillingContext, now_ms: int) -> Envelope | None:
    """Timer step of one account at `now_ms` (explicit): the standing charges and debt schedule
    of days its readings reached, trips deferred by a friendly period whose period has ended
    (engine.tick), then relay chains that are due. None when nothing
    changed (nothing to write). The high-water marks stay: a tick consumes no input."""
    loop = PowerLoop({"_": env}, ctx, now_ms, lambda _a: "_")
    tagged: list[tuple[str, OutboxItem]] = []
    accounts = env.accounts
    if wallet_due(env, ctx.rating, now_ms):  # standing charges, debt schedule, deferred trips
        state, out = core_tick(CoreState(dict(env.circuits), dict(env.accounts)), now_ms, ctx.rating)
        accounts = state.accounts
        tagged += outbox_items(out, ctx, lambda _a: "_", {})
        tagged += gate_wallet_commands(out, loop, ctx)
    tagged += loop.tick(now_ms)
    if not tagged and accounts == env.accounts and loop.relays_of("_") == env.relays:
        return None
    return Envelope(accounts=accounts, circuits=env.circuits, hwm=env.hwm, outbox=[item for _, item in tagged],
                    updates=env.updates + 1, holds=loop.holds_of("_"), extra=env.extra, relays=loop.relays_of("_"))


def next_timer_ms(env: Envelope, ctx: BillingContext, now_ms: int) -> int:
    """When the timer must look at this account again after a tick that changed nothing: the
    earliest relay chain due, or the first moment a deferred trip's friendly period can be over."""
    dues = [row[9] for row in env.relays.values() if row[9] > now_ms]
    seen = [t for c in env.circuits.values() for t in (c.last_ts_ms, c.max_seen_ts_ms) if t is not None]
    for s in env.accounts.values():
        rating = ctx.rating.accounts.get(s.account_id)
        if (s.deferred or s.warn_pending) and rating is not None:
            mall = ctx.rating.malls[rating.mall_id]
            anchor = max(seen if seen else [now_ms])
            since = s.deferred_at if s.deferred_at >= 0 else anchor
            dues.append(max(now_ms + 1, friendly_until(rating.policy.friendly, since, mall.tz,
                                                       frozenset(mall.holidays))))
    day = day_due(env, ctx.rating)  # a day the readings reached: due at its start
    if day is not None and day > now_ms:
        dues.append(day)
    return min(dues) if dues else now_ms + 60_000
