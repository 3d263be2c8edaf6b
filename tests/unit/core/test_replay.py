"""Replay over files: same figures as process_batch, what-if tariff re-rating."""

from __future__ import annotations

import json

import polars as pl
import yaml
from billing_helpers import make_ctx, ms, readings

from pipelines.core.models import Tariff, WalletPolicy
from pipelines.core.replay import main, replay

T0 = ms(2024, 5, 6, 12)
ROWS = [("c1", "m1", T0 + i * 60_000, 10.0 + i * 0.1) for i in range(11)]  # 10 x 100 Wh = 1 kWh
PAY = pl.DataFrame({"payment_id": ["p1"], "account_id": ["a1"], "ts_ms": [T0], "amount_minor": [5000],
                    "kind": ["TOPUP"], "reverses_payment_id": [None]})


def test_replay_in_small_batches_matches_expected_figures():
    # flat 1000 fen/kWh: 1 kWh costs 1000 fen; 5000 - 1000 = 4000
    ctx = make_ctx(policy=WalletPolicy(alert_levels=[]), lateness_ms=60_000)
    state, t = replay(ctx, readings(ROWS), PAY, batch_size=3)
    assert t["balances"].rows() == [("a1", 4000, 0, 0, "connected")]
    assert t["ledger"]["amount_minor"].sum() == 4000 and state.circuits["c1"].billed_wh == 1000


def test_cli_writes_tables_and_rerates_under_another_tariff(tmp_path):
    cfg = {"tariffs": [{"id": "t", "versions": [{"prices": {"flat": 1000}}]}],
           "malls": [{"mall_id": "m"}],
           "accounts": [{"account_id": "a1", "mall_id": "m", "tariff_id": "t"}],
           "circuits": [{"circuit_id": "c1", "account_id": "a1"}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    readings(ROWS).write_ndjson(tmp_path / "r.jsonl")
    PAY.write_parquet(tmp_path / "p.parquet")
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(json.loads(Tariff.flat("half", 500).model_dump_json())))
    args = ["--config", str(tmp_path / "c.yaml"), "--readings", str(tmp_path / "r.jsonl"),
            "--payments", str(tmp_path / "p.parquet")]
    assert main([*args, "--out", str(tmp_path / "o1")]) == 0
    assert main([*args, "--out", str(tmp_path / "o2"), "--tariff", str(tmp_path / "w.yaml")]) == 0
    # 1 kWh at 1000 vs 500 fen/kWh
    assert pl.read_parquet(tmp_path / "o1/balances.parquet")["balance_minor"].to_list() == [4000]
    assert pl.read_parquet(tmp_path / "o2/balances.parquet")["balance_minor"].to_list() == [4500]
