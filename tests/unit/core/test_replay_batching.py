"""`mallwatt replay --arrival-order` with its large default calls bills exactly what small calls bill.

A generated portfolio (the replay bench's own input: one message per shard and 15 minutes, daily
top-ups, a fifth of the merchants opening with little credit, so alerts, trips and the per-event
wallet all happen) is replayed twice: through the CLI with its defaults (500k-row chunks, the
opening cut, calls of many readings per account, Parquet written on a thread) and in memory in
chunks of a few messages (calls of one or two readings per circuit, the shape before the large
calls). Every ledger entry (all columns, each account's entries in order), alert, command,
interval, final balance and the final state must be equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bench.replay import write_input
from pipelines.core.arrival import (
    balances,
    chunks_of,
    collect,
    replay_arrival,
    segment_cuts,
    tables,
)
from pipelines.core.replay import load_context, main

KEYS = {"ledger": "account_id", "alerts": "account_id", "commands": "account_id", "intervals": "circuit_id"}


def _per_key(frame: pl.DataFrame, key: str) -> pl.DataFrame:
    """Rows grouped by account (circuit), each group in written order: calls cut differently
    interleave accounts differently in the file, never an account's own entries."""
    return frame.with_row_index("_n").sort(key, "_n").drop("_n")


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, pl.DataFrame], dict[str, pl.DataFrame],
                                                                 dict, dict]:
    work = tmp_path_factory.mktemp("batching")
    write_input(240, 2, work, low_balance_share=0.3)
    out = work / "out"
    assert main(["--arrival-order", "--quiet", "--config", str(work / "portfolio.yaml"), "--readings",
                 str(work / "readings.parquet"), "--payments", str(work / "payments.parquet"), "--out", str(out)]) == 0
    big = {n: pl.read_parquet(out / f"{n}.parquet") for n in (*KEYS, "balances")}
    big_state = json.loads((out / "state.json").read_text())

    ctx, state0 = load_context(str(work / "portfolio.yaml"))
    readings = pl.read_parquet(work / "readings.parquet")
    store, sink = collect()
    state = replay_arrival(ctx, chunks_of(readings, 500), pl.read_parquet(work / "payments.parquet"), sink,
                           state=state0)
    small = {n: f for n, f in tables(store).items() if n in KEYS}
    small["balances"] = balances(state)
    return big, small, big_state, state.to_dict()


def test_the_input_exercises_every_path(replayed: tuple) -> None:
    big, _, _, _ = replayed
    kinds = set(big["ledger"]["kind"].unique())
    assert {"charge", "topup", "opening_balance"} <= kinds, kinds
    assert big["alerts"].height and big["commands"].height  # low credit: alerts and trips
    assert (big["balances"]["relay"] == "tripped").any()


def test_large_calls_bill_exactly_what_small_calls_bill(replayed: tuple) -> None:
    big, small, big_state, small_state = replayed
    for name, key in KEYS.items():
        assert big[name].height == small[name].height, name
        assert _per_key(big[name], key).equals(_per_key(small[name], key)), name
    assert big["balances"].equals(small["balances"])
    assert big_state == small_state


def test_segment_cuts_with_far_apart_times() -> None:
    """Times too far apart for the single-accumulate trick take the per-account loop."""
    ts = np.array([0, 10**18, 5, 10**18 + 1, 4, 10**18 + 2], dtype=np.int64)  # account 0: 0, 5, 4 -> cut at 4
    acc = np.array([0, 1, 0, 2, 0, 3], dtype=np.int64)
    assert segment_cuts(np.arange(6), acc, ts * 2, ts * 2 + 1) == [4]
    assert segment_cuts(np.arange(6), np.arange(6), ts * 2, ts * 2 + 1) == []


def test_a_bigger_batch_keeps_file_order_per_account(tmp_path: Path) -> None:
    """--batch-size still bounds the chunks: a small one gives the same outputs."""
    write_input(60, 1, tmp_path, low_balance_share=0.3)
    base = ["--arrival-order", "--quiet", "--config", str(tmp_path / "portfolio.yaml"), "--readings",
            str(tmp_path / "readings.parquet"), "--payments", str(tmp_path / "payments.parquet")]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--batch-size", "300"]) == 0
    for name, key in KEYS.items():
        a, b = (pl.read_parquet(tmp_path / d / f"{name}.parquet") for d in "ab")
        assert _per_key(a, key).equals(_per_key(b, key)), name
