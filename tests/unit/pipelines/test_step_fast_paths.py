"""The billing step's fast paths for the worker's keys and live input give the same bytes.

`billing._merge_own` builds each envelope in one pass where the key is the account id, and
`loadcontrol._new_states_once` builds the load states in one pass over live rows (one reading
per circuit). Both must give exactly what the general passes give, down to the order of keys
in every dict: that order is in the changelog bytes."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import polars as pl
import pytest

import pipelines.loadcontrol as lc
from pipelines import batching, billing
from pipelines.context import build_context
from pipelines.envelope import Envelope, state_key
from pipelines.generate import generate
from pipelines.loadcontrol import BannedBand, LoadLimits, LoadPolicy, process_load
from pipelines.portfolio import parse_portfolio
from schemas.keys import account_shard
from schemas.readings import FRAME_SCHEMA

T0 = 1_784_080_800_000
PARTITIONS = 8


@pytest.fixture(scope="module")
def ctx() -> billing.BillingContext:
    return build_context(parse_portfolio(generate(1, 60, seed=5)), PARTITIONS)


def _counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[Any]:
    calls: list[Any] = []
    real = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        calls.append(result)
        return result
    monkeypatch.setattr(module, name, spy)
    return calls


def _live_frame(ctx: billing.BillingContext, shard: int, step: int, rng: np.random.Generator) -> pl.DataFrame:
    """One reading per circuit of the shard, with power: some over the limit, some OPEN relays."""
    routes = ctx.circuit_routes.filter(pl.col("shard") == shard)
    circuits = routes["circuit_id"].to_list()
    n = len(circuits)
    power = rng.uniform(100, 3000, n)
    power[::7] = 60_000.0  # over any level's limit, every step: overload alerts and trips
    return pl.DataFrame({
        "circuit_id": circuits, "meter_id": [ctx.circuit_meter[c].meter_id for c in circuits],
        "account_id": [ctx.circuit_meter[c].account_id for c in circuits],
        "ts_ms": [T0 + step * 60_000] * n, "import_kwh": 100.0 + step * rng.uniform(0.01, 0.2, n),
        "power_w": power, "power_factor": [0.95] * n,
        "relay": pl.Series(np.where(rng.random(n) < 0.05, 1, 0), dtype=pl.UInt8)})


def test_merge_for_account_keys_equals_the_general_merge(ctx: billing.BillingContext,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    own = _counting(monkeypatch, billing, "_merge_own")
    rng = np.random.default_rng(3)
    shard = account_shard(next(iter(ctx.accounts)), PARTITIONS)
    table: dict[str, Envelope] = {}
    kinds: set[str] = set()
    for step in range(6):
        frame = _live_frame(ctx, shard, step, rng)
        if step == 3:  # a late copy of some readings: refused-reading alerts between ledger and intervals
            frame = pl.concat([frame, frame.head(5).with_columns(ts_ms=pl.col("ts_ms") - 60_000)])
        routed = batching.route_readings(batching.messages_frame([(shard, step, frame, T0 + step * 60_000)]), ctx)
        assert routed.rejected == []
        envs = {k: table.get(k, Envelope()) for k in routed.buckets}
        positions = {k: (f"r:{shard}", step) for k in envs}
        fast = billing.step(envs, routed.frame, None, ctx, positions, now_ms=T0 + step * 60_000)
        general = billing.step(envs, routed.frame, None, ctx, positions, lambda a: state_key(a),
                               now_ms=T0 + step * 60_000)
        assert list(fast) == list(general)
        assert {k: e.to_bytes() for k, e in fast.items()} == {k: e.to_bytes() for k, e in general.items()}
        table.update(fast)
        kinds |= {o.topic for e in fast.values() for o in e.outbox}
    assert own and all(result is not None for result in own)
    assert {"mallwatt.alerts", "mallwatt.relay-commands"} <= kinds  # the rules ran
    assert any(e.extra.get("load") for e in table.values())


SCHEMA = {k: FRAME_SCHEMA[k] for k in ("circuit_id", "meter_id", "account_id", "ts_ms", "power_w", "power_factor",
                                       "relay")}


def test_load_states_of_live_rows_equal_the_plain_pass_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    once = _counting(monkeypatch, lc, "_new_states_once")
    rng = np.random.default_rng(4)
    limits = {f"A{i:02d}": LoadLimits("M", 3000, 0 if i % 2 else 30, LoadPolicy(
        cooldown_s=90, banned=(BannedBand(),), banned_action="trip" if i % 3 else "alert",
        restore="manual" if i % 7 == 0 else "auto"), trip=i % 5 != 0) for i in range(60)}
    circuits = [(f"c{i}-{j}", f"m{i}-{j}", f"A{i:02d}") for i in range(60) for j in range(1 + i % 3)]

    def batch(step: int) -> pl.DataFrame:
        rows = [(c, m, a, T0 + step * 30_000 + int(rng.integers(0, 3)), float(rng.choice([200.0, 1500.0, 2500.0,
                 4000.0])), float(rng.choice([0.7, 1.0])), int(rng.choice([0, 0, 0, 1]))) for c, m, a in circuits
                if step or rng.random() < 0.7]  # the first batch leaves some accounts new to the next
        rng.shuffle(rows)
        return pl.DataFrame(rows, schema=SCHEMA, orient="row")

    def run(small: int, batches: list[pl.DataFrame]) -> list[str]:
        monkeypatch.setattr(lc, "SMALL", small)
        state: dict[str, Any] = {}
        seen = []
        for frame in batches:
            state, out = process_load(frame, state, limits)
            seen.append(json.dumps([state, out.alerts, out.commands, out.late]))  # key order counts
        return seen

    batches = [batch(step) for step in range(8)]
    assert run(-1, batches) == run(10**9, batches)
    assert len(once) == len(batches)


def test_day_due_looks_zones_up_per_context_as_timer_due_ms(ctx: billing.BillingContext) -> None:
    """powerloop.day_due reads each account's zone from a map built once per rating context:
    the same day as engine.timer_due_ms, also after the context changes (another mall zone)."""
    import copy

    from pipelines import powerloop
    from pipelines.core.engine import timer_due_ms
    from pipelines.core.wallet import AccountState

    account = next(iter(ctx.accounts))
    env = Envelope(accounts={account: AccountState(account, standing_day="2026-07-14")},
                   circuits={})
    assert powerloop.day_due(env, ctx.rating) is None  # no billed reading yet
    env.circuits = _one_circuit_at(ctx, account, T0 + 3 * 86_400_000)  # readings past the next day
    rating = ctx.rating
    mall = rating.accounts[account].mall_id
    moved = copy.copy(rating)  # another context: the mall in another zone
    moved.malls = {**rating.malls, mall: rating.malls[mall].model_copy(update={"tz": "America/New_York"})}
    for r in (rating, moved, rating):
        expected = timer_due_ms(env.accounts[account], r)
        assert expected is not None and powerloop.day_due(env, r) == expected
    assert timer_due_ms(env.accounts[account], moved) != timer_due_ms(env.accounts[account], rating)
    unknown = Envelope(accounts={"nobody": AccountState("nobody", standing_day="2026-07-14")}, circuits=env.circuits)
    assert powerloop.day_due(unknown, rating) is None


def _one_circuit_at(ctx: billing.BillingContext, account: str, ts: int) -> dict[str, Any]:
    from pipelines.core.interval import CircuitState

    circuit = next(c for c, r in ctx.circuit_meter.items() if r.account_id == account)
    return {circuit: CircuitState(circuit, ctx.circuit_meter[circuit].meter_id, ts, 1000, ts, 0, 0, [])}
