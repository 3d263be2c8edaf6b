"""`mallwatt replay --jobs N` equals `--jobs 1` account by account, output by output.

The input is the stream model's export (`test_arrival_replay`): a generated portfolio with
common-area meters (the malls' LANDLORD accounts), low opening balances (emergency credit,
trips and reconnects), top-ups, stragglers older than the lateness window and a re-sent
collector batch; plus a reading of an unknown circuit, a reading from the far future (refused by
the time guard), a payment id used again by another account (refused by its claim) and a
payment of an unknown account. Every output (ledger entries with ids, amounts and
balance_after, alerts, relay commands, intervals, balances, refusals) must hold the same rows
per account in the same order, and state.json must be the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from test_arrival_replay import PARTITIONS, run, world  # noqa: F401 - `world` is a fixture

from pipelines.context import BillingContext
from pipelines.core.replay import main
from pipelines.core.replay_jobs import JobFilter
from pipelines.portfolio import dump_portfolio
from pipelines.proof_input import ProofInput

OUTPUTS = ("ledger", "alerts", "commands", "intervals", "balances", "rejected_readings", "rejected_payments")


def _inputs(world: tuple[ProofInput, BillingContext], tmp_path: Path) -> list[str]:  # noqa: F811
    inp, ctx = world
    _, readings, payments = run(inp, ctx, 2)
    first = readings.row(0, named=True)
    odd = pl.DataFrame([{**first, "circuit_id": "NO-SUCH-CIRCUIT", "offset": first["offset"]},
                        {**first, "ts_ms": first["ts_ms"] + 400 * 86_400_000}], schema=readings.schema)
    readings = pl.concat([odd, readings])  # at the head of the partition, offsets not going back
    pay = payments.row(0, named=True)
    other = next(a for a in payments["account_id"].to_list() if a != pay["account_id"])
    payments = pl.concat([payments, pl.DataFrame([
        {**pay, "account_id": other, "offset": pay["offset"] + 10_000},  # the same id, another account
        {**pay, "payment_id": "nobody-1", "account_id": "NO-SUCH-ACCOUNT", "offset": pay["offset"] + 10_001}],
        schema=payments.schema)])
    dump_portfolio(inp.portfolio, tmp_path / "p.yaml")
    readings.write_parquet(tmp_path / "r.parquet", row_group_size=500)
    payments.write_parquet(tmp_path / "pay.parquet")
    return ["--config", str(tmp_path / "p.yaml"), "--readings", str(tmp_path / "r.parquet"),
            "--payments", str(tmp_path / "pay.parquet"), "--batch-size", "700", "--quiet"]


def _per_account(out: Path) -> dict[str, pl.DataFrame]:
    got = {}
    for name in OUTPUTS:
        frame = pl.read_parquet(out / f"{name}.parquet")
        key = "account_id" if "account_id" in frame.columns else "circuit_id"
        # each account's (or circuit's) rows in file order: the order that must not change
        got[name] = frame.with_row_index("_row").sort(key, "_row", nulls_last=True).drop("_row")
    return got


@pytest.mark.parametrize("arrival", [True, False])
def test_jobs_equal_one_job_per_account(world: tuple[ProofInput, BillingContext],  # noqa: F811
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arrival: bool) -> None:
    monkeypatch.setenv("MALLWATT_PARTITIONS", str(PARTITIONS))
    from pipelines.core import replay_output

    def no_rewrite(*_: object) -> None:
        raise AssertionError("the jobs' Parquet files must append as bytes (same schema)")
    monkeypatch.setattr(replay_output, "_rewrite", no_rewrite)
    args = _inputs(world, tmp_path) + (["--arrival-order"] if arrival else [])
    outs = {}
    for jobs in (1, 2, 3):
        outs[jobs] = tmp_path / f"out{jobs}"
        assert main([*args, "--out", str(outs[jobs]), "--jobs", str(jobs)]) == 0
    one = _per_account(outs[1])
    assert one["ledger"].height and one["alerts"].height and one["commands"].height and one["intervals"].height
    assert {"topup", "charge", "emergency_credit_draw"} <= set(one["ledger"]["kind"].to_list())
    assert one["rejected_readings"].height >= 2 and one["rejected_payments"].height >= 2
    jobs_of = {JobFilter(0, 2, PARTITIONS).job_of(a) for a in one["balances"]["account_id"].to_list()}
    assert jobs_of == {0, 1}  # both jobs bill accounts
    for jobs in (2, 3):
        other = _per_account(outs[jobs])
        for name in OUTPUTS:
            assert other[name].schema == one[name].schema, name
            assert other[name].equals(one[name]), (jobs, name)
        assert (outs[jobs] / "state.json").read_bytes() == (outs[1] / "state.json").read_bytes()
        assert not [p for p in outs[jobs].iterdir() if p.name.startswith(".")]  # the part files are gone


def test_a_failed_job_is_named(world: tuple[ProofInput, BillingContext], tmp_path: Path,  # noqa: F811
                               capsys: pytest.CaptureFixture[str]) -> None:
    args = _inputs(world, tmp_path)
    (tmp_path / "pay.parquet").write_text("not parquet")
    assert main([*args, "--arrival-order", "--out", str(tmp_path / "out"), "--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert "pay.parquet" in err and "Traceback" not in err
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] if (tmp_path / "out").exists() \
        else True


def test_a_child_failure_names_the_job(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that dies (here: a child started without its inputs) is named with its partitions
    and its own last message, and the parent stops."""
    from pipelines.core import replay_parallel as rp

    parts = tmp_path / "parts"
    jobs = rp.start_jobs(["--config", str(tmp_path / "missing.yaml"), "--readings", str(tmp_path / "r.parquet")],
                         2, 4, parts)
    with pytest.raises(rp.JobFailed) as failed:
        rp.wait(jobs, _Quiet())
    assert "job 2/2 (partitions 1, 3) failed (exit 2)" in str(failed.value)
    assert "missing.yaml" in str(failed.value)
    assert failed.value.code == 2


class _Quiet:
    def tick(self, _ts: int | None) -> None:
        pass


def test_outcomes_need_one_job(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--config", "c", "--readings", "r", "--out", str(tmp_path), "--arrival-order", "--outcomes", "o",
              "--jobs", "2"])


def test_job_filter_owns_partition_groups() -> None:
    jobs = [JobFilter(i, 3, 8) for i in range(3)]
    assert [j.owned_partitions() for j in jobs] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    for account in ("M01-S001", "M02-LANDLORD", "x"):
        owners = [j.mine(account) for j in jobs]
        assert owners.count(True) == 1
    assert jobs[0].mine(None) and not jobs[1].mine(None)  # no account: job 0


def test_jobs_equal_one_job_in_json_lines(world: tuple[ProofInput, BillingContext],  # noqa: F811
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLWATT_PARTITIONS", str(PARTITIONS))
    args = [*_inputs(world, tmp_path), "--arrival-order", "--format", "jsonl"]
    for jobs in (1, 2):
        assert main([*args, "--out", str(tmp_path / f"out{jobs}"), "--jobs", str(jobs)]) == 0
    for name in OUTPUTS:
        one, two = (pl.read_ndjson(tmp_path / f"out{j}" / f"{name}.jsonl") for j in (1, 2))
        if not one.height:
            assert not two.height, name
            continue
        key = "account_id" if "account_id" in one.columns else "circuit_id"
        one, two = (f.with_row_index("_row").sort(key, "_row", nulls_last=True).drop("_row") for f in (one, two))
        assert two.equals(one), name
    assert (tmp_path / "out2" / "state.json").read_bytes() == (tmp_path / "out1" / "state.json").read_bytes()
