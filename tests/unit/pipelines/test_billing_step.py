"""The stream's billing step without Kafka: routing, idempotency, outbox contents."""

from __future__ import annotations

from dataclasses import replace

import polars as pl
import pytest

from pipelines import batching, billing
from pipelines.context import build_context
from pipelines.envelope import Envelope, state_key
from pipelines.generate import generate
from pipelines.portfolio import parse_portfolio
from schemas import codec
from schemas.keys import account_shard
from schemas.ledger import LEDGER_ROWS, row_entries

T0 = 1_784_080_800_000  # 2026-07-15 10:00 +08:00, a peak hour (136 fen/kWh)
PARTITIONS = 8


@pytest.fixture(scope="module")
def ctx() -> billing.BillingContext:
    data = generate(1, 6, seed=5)
    for merchant in data["malls"][0]["merchants"]:  # one plain retail level for hand arithmetic
        merchant["level"] = "standard"
        merchant["protected"] = False
        merchant.pop("opening_balance_minor", None)  # opening postings have their own test
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
    if schema == "LedgerBatch":  # the outbox carries packed rows; the forwarder makes the batches
        return [e for o in env.outbox if o.topic == LEDGER_ROWS for e in row_entries(o.value)]
    return [codec.decode(schema, o.value) for o in env.outbox if o.topic == topic]


def test_routing_rejects_unknown_and_misrouted(ctx: billing.BillingContext) -> None:
    account, meter, circuit = _merchant(ctx)
    frame = pl.concat([_readings(account, meter, circuit, [1.0, 2.0]),
                       _readings("X", "ghost", "ghost.1", [1.0])])
    right = account_shard(account, PARTITIONS)
    routed = batching.route_readings(frame, ctx, right)
    assert routed.buckets == [state_key(account)]
    assert routed.frame.height == 2
    assert any("unknown circuit" in r and "ghost.1" in r for _, _, r in routed.rejected)
    routed = batching.route_readings(frame, ctx, (right + 1) % PARTITIONS)
    assert routed.buckets == [] and any("another shard" in r for _, _, r in routed.rejected)


def test_routing_by_lookup_equals_the_join_with_the_route_table(ctx: billing.BillingContext,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A step looks its circuits up one by one (a join hashes the whole portfolio's route
    table); above ROUTE_LOOKUP_ROWS it joins. Both give the same routes, rejections included."""
    rows = []
    for i, (circuit, route) in enumerate(sorted(ctx.circuit_meter.items())):
        rows.append(_readings(route.account_id, route.meter_id, circuit, [1.0 + i, 2.0 + i]))
    rows.append(_readings("X", "ghost", "ghost.1", [1.0]))
    frame = batching.messages_frame([(i % PARTITIONS, i, f) for i, f in enumerate(rows)])
    looked_up = batching.route_readings(frame, ctx)
    monkeypatch.setattr(batching, "ROUTE_LOOKUP_ROWS", 0)
    joined = batching.route_readings(frame, ctx)
    assert looked_up.frame.equals(joined.frame) and looked_up.frame.height > 0
    assert sorted(looked_up.buckets) == sorted(joined.buckets) and looked_up.rejected == joined.rejected
    assert any("unknown circuit" in r for _, _, r in joined.rejected)
    assert any("another shard" in r for _, _, r in joined.rejected)


def test_topup_charge_and_trip_in_outbox(ctx: billing.BillingContext) -> None:
    account, meter, circuit = _merchant(ctx)
    env = billing.apply_payment(Envelope(), {"payment_id": "p-1", "account_id": account, "ts_ms": T0 - 1,
                                             "amount_minor": 300, "kind": "TOPUP"}, ctx, "payments:0", 0)
    ledger = _decoded(env, "mallwatt.ledger", "LedgerBatch")
    assert [(e["kind"], e["amount_minor"], e["balance_after_minor"]) for e in ledger] == [("topup", 300, 300)]
    # 1 kWh per 15 minutes at the peak price 136 fen/kWh: 136 fen per interval.
    # 300 - 136 = 164, 164 - 136 = 28, 28 - 136 = -108 -> credit trip at the third interval.
    env = billing.apply_readings(env, _readings(account, meter, circuit, [100.0, 101.0, 102.0, 103.0]),
                                 ctx, "readings:3", 10)
    charges = _decoded(env, "mallwatt.ledger", "LedgerBatch")
    assert [c["amount_minor"] for c in charges] == [-136, -136, -136]
    assert charges[-1]["balance_after_minor"] == 300 - 3 * 136
    commands = _decoded(env, "mallwatt.relay-commands", "RelayCommand")
    assert [(c["action"], c["reason"], c["meter_id"]) for c in commands] == [("TRIP", "credit", meter)]
    assert env.hwm == {"payments:0": 0, "readings:3": 10}
    # balance in state equals the sum of the ledger entries produced
    assert env.accounts[account].balance == 300 - 3 * 136


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
    first = _decoded(env, "mallwatt.ledger", "LedgerBatch")
    # the same readings under a new offset (a collector spool re-send): no new money moves
    env2 = billing.apply_readings(env, frame, ctx, "r:1", 2)
    assert _decoded(env2, "mallwatt.ledger", "LedgerBatch") == []
    assert env2.accounts[account].balance == env.accounts[account].balance == sum(
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
    ledger = _decoded(env, "mallwatt.ledger", "LedgerBatch")
    # 500 - 700 = -200: at or below the cutoff 0, so the shared cost trips the relay like any debit
    assert [(e["kind"], e["amount_minor"], e["balance_after_minor"], e["rate"]) for e in ledger] == [
        ("shared_cost", -700, -200, "0.077778")]
    assert [(c["action"], c["reason"]) for c in _decoded(env, "mallwatt.relay-commands", "RelayCommand")] == [
        ("TRIP", "credit")]
    # the same entry id again (a re-run of the allocation) is a duplicate claim (test_claiming.py);
    # the accepted posting delivered twice carries the same claimed position: the mark skips it
    assert env.applied("postings:0", 0)


def test_unknown_posting_kind_is_refused_with_an_alert(ctx: billing.BillingContext) -> None:
    account, _, _ = _merchant(ctx)
    env = billing.apply_posting(Envelope(), {"entry_id": "x1", "account_id": account, "mall_id": "M01",
                                             "kind": "gift", "amount_minor": 100, "ts_ms": T0, "source_id": "?"},
                                ctx, "postings:0", 0)
    alerts = _decoded(env, "mallwatt.alerts", "Alert")
    assert [a["kind"] for a in alerts] == ["rejected_posting"] and "unknown posting kind gift" in alerts[0]["message"]
    assert _decoded(env, "mallwatt.ledger", "LedgerBatch") == []


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


def _shard_messages(ctx: billing.BillingContext, steps: int) -> tuple[int, list[tuple[int, pl.DataFrame]]]:
    """Reading messages (offset, frame) of the shard with the most accounts, one per 15 minutes."""
    routes = ctx.circuit_routes.join(
        pl.DataFrame({"circuit_id": list(ctx.circuit_meter),
                      "meter_id": [r.meter_id for r in ctx.circuit_meter.values()],
                      "account_id": [r.account_id for r in ctx.circuit_meter.values()]}), on="circuit_id")
    shard = routes.group_by("shard").len().sort("len", "shard", descending=True)["shard"][0]
    mine = routes.filter(pl.col("shard") == shard)
    n = mine.height
    return shard, [(offset, pl.DataFrame({
        "circuit_id": mine["circuit_id"], "meter_id": mine["meter_id"], "account_id": mine["account_id"],
        "ts_ms": [T0 + offset * 900_000] * n, "import_kwh": [10.0 + offset * (1 + i % 3) for i in range(n)]}))
        for offset in range(steps)]


def _bill(ctx: billing.BillingContext, table: dict[str, Envelope], shard: int,
          messages: list[tuple[int, pl.DataFrame]]) -> list[dict]:
    """One billing step over `messages`, as the worker does it; returns the ledger entries produced."""
    routed = batching.route_readings(batching.messages_frame([(shard, o, f) for o, f in messages]), ctx)
    envs = {k: table.get(k, Envelope()) for k in routed.buckets}
    return _written(table, batching.apply_readings_many(envs, routed, ctx, "r"))


def _written(table: dict[str, Envelope], rounds: list[dict[str, Envelope]]) -> list[dict]:
    """Write each round to `table` as the worker does; the ledger entries of every round's outbox."""
    entries = []
    for changed in rounds:
        table.update(changed)
        entries += [e for env in changed.values() for e in _decoded(env, "mallwatt.ledger", "LedgerBatch")]
    return entries


def _funded(ctx: billing.BillingContext, shard: int) -> dict[str, Envelope]:
    table: dict[str, Envelope] = {}
    for i, account in enumerate(a for a in ctx.accounts if account_shard(a, PARTITIONS) == shard):
        key = state_key(account)
        table[key] = billing.apply_payment(table.get(key, Envelope()), {
            "payment_id": f"open-{account}", "account_id": account, "ts_ms": T0 - 1, "amount_minor": 400,
            "kind": "TOPUP"}, ctx, "payments:0", i)
    return table


@pytest.fixture(scope="module")
def big_ctx() -> billing.BillingContext:
    """Enough merchants that one shard spans several state buckets."""
    data = generate(1, 60, seed=5)
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"], merchant["protected"] = "standard", False
    return build_context(parse_portfolio(data), PARTITIONS)


def test_one_step_over_many_messages_equals_message_by_message(big_ctx: billing.BillingContext) -> None:
    ctx = big_ctx
    shard, messages = _shard_messages(ctx, 6)
    one_by_one, batched = _funded(ctx, shard), _funded(ctx, shard)
    single = [e for m in messages for e in _bill(ctx, one_by_one, shard, [m])]
    together = _bill(ctx, batched, shard, messages)
    assert len(batched) >= 3 and len(single) > len(messages)
    assert sorted(single, key=lambda e: e["entry_id"]) == sorted(together, key=lambda e: e["entry_id"])
    assert {k: e.accounts for k, e in one_by_one.items()} == {k: e.accounts for k, e in batched.items()}
    assert all(e.hwm[f"r:{shard}"] == messages[-1][0] for e in batched.values())
    # an account's entries keep their order inside a batch
    for account in {e["account_id"] for e in together}:
        stamps = [e["ts_ms"] for e in together if e["account_id"] == account and e["kind"] == "charge"]
        assert stamps == sorted(stamps)


def test_replayed_step_applies_only_messages_above_each_buckets_mark(big_ctx: billing.BillingContext) -> None:
    ctx = big_ctx
    shard, messages = _shard_messages(ctx, 5)
    reference = _funded(ctx, shard)
    per_message = [_bill(ctx, reference, shard, [m]) for m in messages]
    table = _funded(ctx, shard)
    _bill(ctx, table, shard, messages[:1])
    after_first = dict(table)
    _bill(ctx, table, shard, messages[1:2])
    # a crash lost one bucket's write of the second step: it is back at its state after offset 0
    lost = sorted(table)[0]
    table[lost] = after_first[lost]
    assert len(table) >= 3 and table[lost].hwm[f"r:{shard}"] == 0
    # redelivery from offset 0: each bucket applies only the messages above its own mark
    replayed = _bill(ctx, table, shard, messages)
    expected = [e for entries in per_message[2:] for e in entries]
    expected += [e for e in per_message[1] if e["account_id"] in table[lost].accounts]
    assert per_message[1] and sorted(e["entry_id"] for e in replayed) == sorted(e["entry_id"] for e in expected)
    assert {k: e.accounts for k, e in table.items()} == {k: e.accounts for k, e in reference.items()}


def test_one_step_spans_partitions_with_a_mark_per_partition(big_ctx: billing.BillingContext) -> None:
    ctx = big_ctx
    shards = sorted({account_shard(a, PARTITIONS) for a in ctx.accounts})[:2]
    inputs = {}
    for shard in shards:
        mine = ctx.circuit_routes.filter(pl.col("shard") == shard)["circuit_id"].to_list()
        inputs[shard] = [(offset, pl.DataFrame({
            "circuit_id": mine, "meter_id": [ctx.circuit_meter[c].meter_id for c in mine],
            "account_id": [ctx.circuit_meter[c].account_id for c in mine],
            "ts_ms": [T0 + offset * 900_000] * len(mine), "import_kwh": [5.0 + offset] * len(mine)}))
            for offset in range(3)]
    separate: dict[str, Envelope] = {}
    for shard in shards:
        separate.update(_funded(ctx, shard))
    together = dict(separate)
    for shard in shards:
        _bill(ctx, separate, shard, inputs[shard])
    frame = batching.messages_frame([(s, o, f) for s in shards for o, f in inputs[s]])
    routed = batching.route_readings(frame, ctx)
    assert routed.rejected == []
    _written(together, batching.apply_readings_many({k: together[k] for k in routed.buckets}, routed, ctx, "r"))
    assert {k: e.accounts for k, e in together.items()} == {k: e.accounts for k, e in separate.items()}
    for key, env in together.items():
        assert env.hwm[f"r:{account_shard(key, PARTITIONS)}"] == 2


def _two_shards_input(ctx: billing.BillingContext, cycles: int) -> tuple[list[int], batching.Routed]:
    shards = sorted({account_shard(a, PARTITIONS) for a in ctx.accounts})[:2]
    messages = []
    for shard in shards:
        mine = ctx.circuit_routes.filter(pl.col("shard") == shard)["circuit_id"].to_list()
        messages += [(shard, offset, pl.DataFrame({
            "circuit_id": mine, "meter_id": [ctx.circuit_meter[c].meter_id for c in mine],
            "account_id": [ctx.circuit_meter[c].account_id for c in mine],
            "ts_ms": [T0 + offset * 900_000] * len(mine), "import_kwh": [5.0 + offset * (1 + i % 3)
                                                                         for i in range(len(mine))]}))
            for offset in range(cycles)]
    return shards, batching.route_readings(batching.messages_frame(messages), ctx)


@pytest.mark.parametrize("ahead", [0, 3])
def test_a_step_billed_in_parts_equals_one_call(big_ctx: billing.BillingContext, ahead: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A catch-up step is billed part by part (the worker awaits between parts): each part holds
    at most the limit of accounts, each account's rows whole and in order, the accounts near
    their relay level (`first`) in a part of their own ahead of the rest, and the parts billed
    one after another give every entry and every state of one call."""
    ctx = big_ctx
    shards, routed = _two_shards_input(ctx, 4)
    first = set(sorted(routed.buckets)[5:5 + ahead]) | {"an account without readings here"}
    monkeypatch.setattr(batching, "FIRST_MIN_ACCOUNTS", 2)
    parts = batching.parts(routed, max_accounts=7, first=first)
    assert len(parts) == bool(ahead) + -(-(len(routed.buckets) - ahead) // 7)
    if ahead:
        assert sorted(parts[0][1].buckets) == sorted(first & set(routed.buckets))
    seen: list[str] = []
    for partitions, part in parts:
        assert len(part.buckets) <= 7
        assert set(part.frame["shard"].unique().to_list()) == set(partitions)
        seen += part.buckets
        for key in part.buckets:  # an account's rows: all of them, in the step's order
            assert part.frame.filter(pl.col("bucket") == key).equals(routed.frame.filter(pl.col("bucket") == key))
    assert sorted(seen) == sorted(routed.buckets)  # every account in exactly one part
    whole: dict[str, Envelope] = {}
    for shard in shards:
        whole.update(_funded(ctx, shard))
    in_parts = dict(whole)
    one_call = _written(whole, batching.apply_readings_many({k: whole[k] for k in routed.buckets}, routed, ctx, "r"))
    by_parts = [e for _, part in parts for e in _written(in_parts, batching.apply_readings_many(
        {k: in_parts[k] for k in part.buckets}, part, ctx, "r"))]
    assert len(one_call) > len(routed.buckets)
    assert sorted(one_call, key=lambda e: e["entry_id"]) == sorted(by_parts, key=lambda e: e["entry_id"])
    assert {k: (e.accounts, e.hwm) for k, e in whole.items()} == {k: (e.accounts, e.hwm) for k, e in in_parts.items()}


def test_a_step_within_the_part_limit_is_one_part_over_its_partitions(big_ctx: billing.BillingContext,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    shards, routed = _two_shards_input(big_ctx, 2)
    # a step of fewer accounts than FIRST_MIN_ACCOUNTS puts none ahead: one core call
    monkeypatch.setattr(batching, "FIRST_MIN_ACCOUNTS", len(routed.buckets) + 1)
    [(_, part)] = batching.parts(routed, max_accounts=len(routed.buckets), first=set(routed.buckets[:1]))
    assert part is routed
    monkeypatch.setattr(batching, "FIRST_MIN_ACCOUNTS", 2)
    [(partitions, part)] = batching.parts(routed, max_accounts=len(routed.buckets))
    assert partitions == frozenset(shards) and part is routed
    # every account near its relay level: nothing to put ahead of the rest
    [(_, part)] = batching.parts(routed, max_accounts=len(routed.buckets), first=set(routed.buckets))
    assert part is routed
    [(_, urgent), (_, rest)] = batching.parts(routed, max_accounts=len(routed.buckets), first=set(routed.buckets[:1]))
    assert urgent.buckets == routed.buckets[:1] and sorted(rest.buckets) == sorted(routed.buckets[1:])
    assert batching.parts(batching.Routed(routed.frame.clear(), [], []), 7) == []


def test_payments_in_one_step_credit_each_payment_once(ctx: billing.BillingContext) -> None:
    accounts = [a for a in ctx.accounts if not a.endswith("LANDLORD")][:2]

    def pay(pid: str, account: str, amount: int) -> dict:
        return {"payment_id": pid, "account_id": account, "ts_ms": T0, "amount_minor": amount, "kind": "TOPUP"}

    # accepted payments, as the claim step passes them on: (claimed partition, claimed offset, payment);
    # p1 comes twice with its one claimed position (the forwarder published it again)
    messages = [(0, offset, pay(pid, a, amount)) for offset, (pid, a, amount) in
                [(0, ("p1", accounts[0], 500)), (1, ("p2", accounts[1], 700)), (0, ("p1", accounts[0], 500)),
                 (3, ("p3", accounts[0], 1000))]]
    keys = {state_key(a) for a in accounts}
    table = {k: Envelope() for k in keys}
    topups = _written(table, batching.apply_payments_many(table, messages, ctx, "pay"))
    balances = {a: table[state_key(a)].accounts[a].balance for a in accounts}
    assert balances == {accounts[0]: 1500, accounts[1]: 700}
    assert sorted(e["source_id"] for e in topups) == ["p1", "p2", "p3"]
    # the same messages again (redelivery after a crash): nothing to do
    assert batching.apply_payments_many(table, messages, ctx, "pay") == []


def test_a_backlog_beyond_the_round_limit_is_billed_in_bounded_rounds(big_ctx: billing.BillingContext) -> None:
    """Hours of backlog in one step (here 200 cadences): the old bucket design wrote one value of
    1.45 MB for such a step at 35,000 merchants and crashed; now every account is billed in
    rounds of at most ROWS_PER_ACCOUNT readings, each value stays small, and the result equals
    message by message."""
    from pipelines.envelope import MAX_VALUE_BYTES

    ctx = big_ctx
    shard, messages = _shard_messages(ctx, 200)
    one_by_one, batched = _funded(ctx, shard), _funded(ctx, shard)
    single = [e for m in messages for e in _bill(ctx, one_by_one, shard, [m])]
    routed = batching.route_readings(batching.messages_frame([(shard, o, f) for o, f in messages]), ctx)
    envs = {k: batched.get(k, Envelope()) for k in routed.buckets}
    rounds = batching.apply_readings_many(envs, routed, ctx, "r", rows_per_account=16)
    # a merchant's 200 readings take 13 rounds (whole messages); the landlord's common-area
    # meters bring several readings per message, so it takes more
    assert len(rounds) > 200 // 16
    sizes = [len(env.to_bytes()) for changed in rounds for env in changed.values()]
    assert max(sizes) < MAX_VALUE_BYTES // 8
    together = _written(batched, rounds)
    assert sorted(single, key=lambda e: e["entry_id"]) == sorted(together, key=lambda e: e["entry_id"])
    assert {k: e.accounts for k, e in one_by_one.items()} == {k: e.accounts for k, e in batched.items()}
    assert all(e.hwm[f"r:{shard}"] == messages[-1][0] for k, e in batched.items() if k in routed.buckets)


def test_a_value_above_the_limit_is_refused_by_name() -> None:
    from pipelines.core.wallet import AccountState
    from pipelines.envelope import OutboxItem, ValueTooLarge

    env = Envelope(accounts={"A1": AccountState("A1")},
                   outbox=[OutboxItem("mallwatt.alerts", b"A1", b"x" * 5000)])
    with pytest.raises(ValueTooLarge, match=r"\['A1'\].*above the limit of 4096 bytes"):
        env.to_bytes(limit=4096)
    assert Envelope.from_bytes(env.to_bytes()).outbox == env.outbox


def test_an_envelope_read_without_its_outbox_is_the_same_state(ctx: billing.BillingContext) -> None:
    """The worker reads stored envelopes without the outputs of their last change (a step
    writes a new outbox); everything else round-trips, and a foreign value is still refused."""
    account, meter, circuit = _merchant(ctx)
    env = billing.apply_payment(Envelope(), {"payment_id": "p-9", "account_id": account, "ts_ms": T0 - 1,
                                             "amount_minor": 300, "kind": "TOPUP"}, ctx, "payments:0", 0)
    env = billing.apply_readings(env, _readings(account, meter, circuit, [100.0, 101.0]), ctx, "readings:3", 4)
    raw = env.to_bytes()
    full, lean = Envelope.from_bytes(raw), Envelope.from_bytes(raw, outbox=False)
    assert full.outbox and lean.outbox == []
    assert replace(lean, outbox=full.outbox) == full
    with pytest.raises(ValueError, match="unknown format"):
        Envelope.from_bytes(b"XX" + raw, outbox=False)
