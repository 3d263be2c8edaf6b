"""Replay in arrival order reproduces the stream, and the proof's comparison can fail.

The stream is modelled in memory with its own functions (routing, rounds of a step, claims,
accepted payments through the wallet's marks, outboxes as the forwarder publishes them):
random step sizes, rounds of one reading per account, re-delivered steps and re-published
outboxes. Its published outputs must equal `replay_arrival` of the same input as exported
(partition, offset, message time) entry by entry, balance by balance; a replay in time order
must not (payments arrive after readings newer than them); and a doctored stream (a doubled
top-up, a changed balance_after, a missing entry) must fail the comparison.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest

from infra import topics as T
from pipelines import batching, claiming
from pipelines.context import BillingContext, build_context
from pipelines.core.arrival import balances, chunks_of, collect, replay_arrival, segments, tables
from pipelines.core.claims import claim_partition
from pipelines.core.replay import replay
from pipelines.envelope import Envelope, OutboxItem
from pipelines.portfolio import parse_portfolio
from pipelines.proof import Published, Replayed, compare
from pipelines.proof_input import ProofInput, make_input
from pipelines.signing import relay_signer, sign_relay_value
from pipelines.take import distinct
from schemas import codec
from schemas.ledger import LEDGER_ROWS, row_entries

PARTITIONS = 4

SIGNER = relay_signer()


class StreamModel:
    """The worker's billing and claim steps and the forwarder, without Kafka."""

    def __init__(self, ctx: BillingContext, rng: random.Random) -> None:
        self.ctx, self.rng = ctx, rng
        self.envs: dict[str, Envelope] = {}
        self.claims: dict[str, bytes] = {}
        self.outboxes: list[list[OutboxItem]] = []
        self.published = Published()

    def _store(self, changed: dict[str, Envelope]) -> None:
        for key, env in changed.items():
            self.envs[key] = Envelope.from_bytes(env.to_bytes())  # through the bytes, as the table does
            self._forward(env.outbox)

    def _forward(self, outbox: list[OutboxItem]) -> None:
        self.outboxes.append(outbox)
        for item in outbox:
            if item.topic == LEDGER_ROWS:
                self.published.ledger += row_entries(item.value)
            elif item.topic == T.ALERTS:
                self.published.alerts.append(codec.decode("Alert", item.value))
            elif item.topic == T.RELAY_COMMANDS:
                # signed at publish time, as the forwarder does
                self.published.commands.append(codec.decode("RelayCommand", sign_relay_value(SIGNER, item.value)))
            elif item.topic == T.PAYMENTS_ACCEPTED:
                self._accepted.append(codec.decode("Payment", item.value))

    def readings(self, messages: list[tuple[int, int, pl.DataFrame, int]]) -> None:
        frame = batching.messages_frame(distinct(messages, lambda m: m[:2]))  # as the worker's bill_batch
        routed = batching.route_readings(frame, self.ctx)
        assert not routed.rejected
        envs = {k: self.envs.get(k, Envelope()) for k in routed.buckets}
        for changed in batching.apply_readings_many(envs, routed, self.ctx, rows_per_account=self.rng.choice([1, 2, 64])):
            self._store(changed)

    def payments(self, messages: list[tuple[int, int, dict[str, Any]]]) -> None:
        self._accepted: list[dict[str, Any]] = []
        for part, offset, record in messages:  # the claims agent
            key = claiming.claim_key(record, "pay")
            step = claiming.claim_step(claiming.decode_claim(self.claims.get(key)), record, T.PAYMENTS, part, offset,
                                       self.ctx)
            if step.value is not None:
                self.claims[key] = step.value
                self._forward(_outbox(step.value))
        good = [(p["claim_partition"], p["claim_offset"], p) for p in self._accepted]
        if self.rng.random() < 0.3:
            good += good[: len(good) // 2]  # the forwarder published some accepted payments twice
        envs = {k: self.envs.get(k, Envelope()) for k in {self.ctx.bucket_of(p["account_id"]) for *_, p in good}}
        for changed in batching.apply_payments_many(envs, good, self.ctx):
            self._store(changed)

    def republish(self) -> None:
        """A forwarder that died before its commit publishes some outboxes again."""
        for outbox in self.rng.sample(self.outboxes, min(3, len(self.outboxes))):
            self._forward([o for o in outbox if o.topic != T.PAYMENTS_ACCEPTED])


def _outbox(raw: bytes) -> list[OutboxItem]:
    from pipelines.envelope import outbox_of

    return outbox_of(raw)


def run(inp: ProofInput, ctx: BillingContext, seed: int, twice_in_step: bool = False
        ) -> tuple[Published, pl.DataFrame, pl.DataFrame]:
    """The model over the input as it arrives; returns what it published and the input as
    `mallwatt export-input` would write it (with partition, offset, msg_ts_ms). With
    `twice_in_step`, some steps hold the tail of their messages twice, as faust delivers them
    after a takeover or restart (see `pipelines.take.distinct`)."""
    rng = random.Random(seed)
    model = StreamModel(ctx, rng)
    offsets: dict[tuple[str, int], int] = {}
    clock = 1_800_000_000_000
    exported_r: list[pl.DataFrame] = []
    exported_p: list[dict[str, Any]] = []

    def position(topic: str, part: int) -> int:
        offsets[topic, part] = offsets.get((topic, part), -1) + 1
        return offsets[topic, part]

    for window in inp.windows:
        messages = []
        for shard, frame in window.readings:
            clock += 7
            offset = position(T.READINGS, shard)
            messages.append((shard, offset, frame.drop("account_id"), clock))
            exported_r.append(frame.drop("account_id").with_columns(
                partition=pl.lit(shard, pl.Int64), offset=pl.lit(offset, pl.Int64), msg_ts_ms=pl.lit(clock, pl.Int64)))
        i = 0
        while i < len(messages):  # steps of random size; sometimes a step is delivered again
            n = rng.randint(1, 6)
            step = messages[i:i + n]
            if twice_in_step and rng.random() < 0.3:
                step = step + step[rng.randrange(len(step)):]  # fetched, then again after the seek
            model.readings(step)
            if rng.random() < 0.2:
                model.readings(messages[i:i + n])
            i += n
        pays = []
        for payment in window.payments:
            clock += 11
            part = claim_partition(payment, PARTITIONS)
            offset = position(T.PAYMENTS, part)
            pays.append((part, offset, payment))
            exported_p.append({**payment, "partition": part, "offset": offset, "msg_ts_ms": clock})
        model.payments(pays)
        if rng.random() < 0.3:
            model.republish()
    model.published.worker_balances = {a: s.balance for env in model.envs.values() for a, s in env.accounts.items()}
    return model.published, pl.concat(exported_r), pl.DataFrame(exported_p)


@pytest.fixture(scope="module")
def world() -> tuple[ProofInput, BillingContext]:
    inp = make_input(1, 40, 40, per_window=2, partitions=PARTITIONS, seed=5, late=3)
    return inp, build_context(parse_portfolio(inp.portfolio), PARTITIONS)


def _arrival(ctx: BillingContext, readings: pl.DataFrame, payments: pl.DataFrame, chunk: int) -> Replayed:
    store, sink = collect()
    state = replay_arrival(ctx.rating, chunks_of(readings, chunk), payments, sink)
    t = tables(store)
    return Replayed(t["ledger"], balances(state), t.get("alerts"), t.get("commands"), t.get("rejected_readings"))


@pytest.mark.parametrize("seed", [1, 2])
def test_arrival_replay_equals_the_stream_model(world: tuple[ProofInput, BillingContext], seed: int) -> None:
    inp, ctx = world
    published, readings, payments = run(inp, ctx, seed)
    assert len(published.ledger) > len({e["entry_id"] for e in published.ledger})  # duplicates were published
    kinds = {e["kind"] for e in published.ledger}
    assert {"topup", "charge", "emergency_credit_draw"} <= kinds, kinds
    assert any(a["kind"] == "meter_fault" for a in published.alerts)  # the late and re-sent readings
    assert published.commands  # trips and reconnects happened
    for chunk in (997, 50_000):  # chunk boundaries must not matter
        assert compare(published, _arrival(ctx, readings, payments, chunk), ctx) == []


def test_a_message_delivered_twice_inside_one_step_is_billed_once(world: tuple[ProofInput, BillingContext]) -> None:
    """The chaos proof's finding: after a takeover faust delivered the uncommitted tail of a
    partition twice and both copies met in one step. The marks skip what an account applied in
    an earlier step, not a copy inside the same core call, which refused the copy's readings as
    `duplicate` (beside the `late` of a re-sent reading). What the model publishes must still
    equal the replay exactly, alerts included."""
    inp, ctx = world
    published, readings, payments = run(inp, ctx, 3, twice_in_step=True)
    assert compare(published, _arrival(ctx, readings, payments, 5_000), ctx) == []


def test_time_order_replay_differs_from_the_stream(world: tuple[ProofInput, BillingContext]) -> None:
    """Payments arrive after readings newer than them: by time, balances after differ."""
    inp, ctx = world
    published, readings, payments = run(inp, ctx, 1)
    _, t = replay(ctx.rating, readings, payments)
    problems = compare(published, Replayed(t["ledger"], t["balances"]))
    assert any("balance_after_minor" in p for p in problems)


def _doctored(published: Published, how: str) -> Published:
    ledger = [dict(e) for e in published.ledger]
    topup = next(i for i, e in enumerate(ledger) if e["kind"] == "topup")
    if how == "double_topup":  # the same top-up applied twice: same id, balance moved twice
        again = dict(ledger[topup])
        again["balance_after_minor"] += again["amount_minor"]
        ledger.insert(topup + 1, again)
    elif how == "balance_after":
        ledger[-1]["balance_after_minor"] += 1
    elif how == "missing":
        gone = ledger[topup]["entry_id"]
        ledger = [e for e in ledger if e["entry_id"] != gone]
    elif how == "exact_duplicate":
        ledger.insert(topup + 1, dict(ledger[topup]))
    commands = [dict(c) for c in published.commands]
    if how == "unsigned_command":  # every field as the replay's, but published without a signature
        commands[0]["signature"] = None
    return Published(ledger, published.alerts, commands, published.worker_balances)


@pytest.mark.parametrize("how", ["double_topup", "balance_after", "missing", "unsigned_command"])
def test_comparison_fails_on_a_doctored_stream(world: tuple[ProofInput, BillingContext], how: str) -> None:
    inp, ctx = world
    published, readings, payments = run(inp, ctx, 1)
    replayed = _arrival(ctx, readings, payments, 5_000)
    assert compare(published, replayed, ctx) == []
    problems = compare(_doctored(published, how), replayed, ctx)
    assert problems, how


def test_an_exact_duplicate_passes(world: tuple[ProofInput, BillingContext]) -> None:
    inp, ctx = world
    published, readings, payments = run(inp, ctx, 1)
    assert compare(_doctored(published, "exact_duplicate"), _arrival(ctx, readings, payments, 5_000), ctx) == []


def test_worker_state_is_compared(world: tuple[ProofInput, BillingContext]) -> None:
    inp, ctx = world
    published, readings, payments = run(inp, ctx, 1)
    account = next(iter(published.worker_balances or {}))
    published.worker_balances = {**(published.worker_balances or {}), account: -1}
    assert any("worker state" in p for p in compare(published, _arrival(ctx, readings, payments, 5_000)))


def test_segments_cut_where_one_call_would_reorder() -> None:
    def entries(rows: list[tuple[int, str, int, int]]) -> pl.DataFrame:
        return pl.DataFrame(rows, orient="row", schema={"pos": pl.Int64, "account_id": pl.String, "kmin": pl.Int64,
                                                         "kmax": pl.Int64})
    r = lambda pos, a, lo, hi: (pos, a, 2 * lo, 2 * hi + 1)  # noqa: E731 - a readings message
    p = lambda pos, a, ts: (pos, a, 2 * ts - 1, 2 * ts)  # noqa: E731 - a payment
    assert segments(entries([r(0, "A", 1, 2), r(1, "A", 3, 4), p(2, "A", 5), r(3, "A", 5, 6)])) == []
    assert segments(entries([r(0, "A", 1, 5), p(1, "A", 3)])) == [1]  # a payment older than billed readings
    assert segments(entries([p(0, "A", 5), r(1, "A", 3, 6)])) == [1]  # a reading older than a payment
    assert segments(entries([r(0, "A", 1, 5), r(1, "B", 1, 5), r(2, "A", 4, 4)])) == [2]  # a late reading
    assert segments(entries([r(0, "A", 5, 5), r(1, "A", 5, 5)])) == [1]  # a re-sent reading
    assert segments(entries([r(0, "A", 1, 5), p(1, "B", 3), p(2, "A", 2), r(3, "A", 1, 1)])) == [2, 3]


def test_replay_cli_arrival_order_streams_parquet(world: tuple[ProofInput, BillingContext], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`mallwatt replay --arrival-order` over exported files equals the stream model, reading the
    readings Parquet in small chunks and writing its outputs in row groups."""
    from pipelines.core.replay import main
    from pipelines.portfolio import dump_portfolio

    inp, ctx = world
    published, readings, payments = run(inp, ctx, 2)
    dump_portfolio(inp.portfolio, tmp_path / "p.yaml")
    readings.write_parquet(tmp_path / "r.parquet", row_group_size=500)
    payments.write_parquet(tmp_path / "pay.parquet")
    out = tmp_path / "out"
    assert main(["--arrival-order", "--config", str(tmp_path / "p.yaml"), "--readings", str(tmp_path / "r.parquet"),
                 "--payments", str(tmp_path / "pay.parquet"), "--out", str(out), "--batch-size", "700"]) == 0
    assert "readings/s" in capsys.readouterr().err  # the progress line
    t = {n: pl.read_parquet(out / f"{n}.parquet") for n in ("ledger", "balances", "alerts", "commands",
                                                             "rejected_readings")}
    assert pq.ParquetFile(out / "ledger.parquet").num_row_groups > 1  # written call by call
    replayed = Replayed(t["ledger"], t["balances"], t["alerts"], t["commands"], t["rejected_readings"])
    assert compare(published, replayed, ctx) == []


def test_replay_cli_names_a_row_out_of_arrival_order(world: tuple[ProofInput, BillingContext], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.core.replay import main
    from pipelines.portfolio import dump_portfolio

    inp, ctx = world
    _, readings, payments = run(inp, ctx, 2)
    dump_portfolio(inp.portfolio, tmp_path / "p.yaml")
    swapped = pl.concat([readings.slice(200), readings.slice(0, 200)])  # early messages at the end
    swapped.write_parquet(tmp_path / "r.parquet")
    args = ["--arrival-order", "--config", str(tmp_path / "p.yaml"), "--readings", str(tmp_path / "r.parquet"),
            "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not in arrival order" in err and "r.parquet: row " in err and "Traceback" not in err
    readings.drop("offset").write_parquet(tmp_path / "r.parquet")
    assert main(args) == 2
    assert "missing column 'offset'" in capsys.readouterr().err
