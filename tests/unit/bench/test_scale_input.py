"""The live-shaped input of `mallwatt bench scale`: the collectors' batch shape, no Kafka."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from bench.scale_input import LiveInput, choose_trip_accounts, opening_payments, write_portfolio
from schemas import codec
from schemas.keys import account_shard
from schemas.readings import batch_to_frame

PARTITIONS = 8


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> LiveInput:
    roster = write_portfolio(750, tmp_path_factory.mktemp("scale"))  # two malls, the last one smaller
    return LiveInput(roster, PARTITIONS, 15.0, choose_trip_accounts(roster, 5))


def _frames(live: LiveInput, n: int) -> list[tuple[int, int, pl.DataFrame, dict]]:
    out = []
    for msg in live.cycle(n):
        record = codec.decode("ReadingBatch", msg.value)
        out.append((msg.partition, msg.ts_ms, batch_to_frame(record), record))
    return out


def test_portfolio_has_exactly_the_merchants_asked_for(live: LiveInput) -> None:
    roster = live.roster
    assert len(roster.merchants) == len(set(roster.merchants)) == 750
    assert Path(roster.config).exists()
    merchant_circuits = roster.circuits.filter(pl.col("account_id").is_in(roster.merchants))
    assert merchant_circuits.height == 750  # one circuit each
    assert set(roster.circuits["mall_id"]) == {"B01", "B02"}


def test_every_circuit_once_per_cycle_one_batch_per_mall_and_shard(live: LiveInput) -> None:
    messages = _frames(live, 3)
    frame = pl.concat([f for _, _, f, _ in messages])
    assert sorted(frame["circuit_id"]) == sorted(live.roster.circuits["circuit_id"])
    seen = set()
    for partition, ts, f, record in messages:
        assert (record["mall_id"], record["shard"]) not in seen
        seen.add((record["mall_id"], record["shard"]))
        assert record["shard"] == partition
        assert {account_shard(a, PARTITIONS) for a in f["account_id"]} == {partition}
        assert f["ts_ms"].unique().to_list() == [ts]
    assert len({ts for _, ts, _, _ in messages}) == len(messages) == live.messages_per_cycle


def test_registers_grow_by_one_cadence_of_power(live: LiveInput) -> None:
    first = pl.concat([f for _, _, f, _ in _frames(live, 4)]).sort("circuit_id")
    second = pl.concat([f for _, _, f, _ in _frames(live, 5)]).sort("circuit_id")
    used = (second["import_kwh"] - first["import_kwh"]).to_numpy()
    expected = (first["power_w"] / 1000 * 15 / 3600).to_numpy()
    assert used == pytest.approx(expected)
    assert (second["ts_ms"] - first["ts_ms"]).unique().to_list() == [15_000]


def test_trip_accounts_start_with_a_few_cycles_of_credit(live: LiveInput) -> None:
    opening = {p["account_id"]: p["amount_minor"] for p in opening_payments(live)}
    assert set(opening) == set(live.roster.merchants)
    for account in live.trip_accounts:
        assert opening[account] <= 4 * live.cost_per_cycle_minor(account)
    ordinary = set(live.roster.merchants) - set(live.trip_accounts)
    assert min(opening[a] for a in ordinary) > 10_000 * max(map(live.cost_per_cycle_minor, live.trip_accounts))
