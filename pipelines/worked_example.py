"""One month of one merchant through the stream, replay, the warehouse and the bill.

    python -m pipelines.worked_example [--chdb DIR]

The merchant M01-S0001 of a generated mall, July 2026 in Asia/Shanghai: 15-minute readings
with a register wrap (day 1), a meter swap (day 15) and a late reading (day 20), an opening
balance from the config, two top-ups (one re-sent by the provider) and a shared-cost posting.
Each source computes the same figures its own way (docs/billing.md, "Worked example"):

- stream: the billing step functions without Kafka (claims, routing, rounds), figures from
  the outboxes (interval facts and ledger rows);
- replay: `pipelines.core.replay.replay` over the same recorded input;
- warehouse: the stream's outputs through the sink's decoders and insert into embedded chDB,
  read with the named queries `bills_circuit_energy` and `bills_ledger_period`;
- bill: the July statement built from the warehouse (`pipelines.bills.build.load_bills`).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from infra import topics as T
from infra import warehouse as wh
from infra.warehouse_dims import load_dimensions
from pipelines import batching, billing, claiming
from pipelines.bills.build import load_bills
from pipelines.bills.periods import parse_period
from pipelines.context import BillingContext, build_context
from pipelines.core.claims import claim_key, claim_partition
from pipelines.core.postings import apply_postings
from pipelines.core.replay import replay
from pipelines.envelope import Envelope, state_key, unframe_value
from pipelines.generate import generate
from pipelines.portfolio import Portfolio, parse_portfolio
from pipelines.sink_tables import TOPIC_TABLES, drop_known_ledger_rows, insert_arrow
from schemas import codec
from schemas.intervals import INTERVAL_ROWS, rows_to_interval_batch, unpack_interval_rows
from schemas.keys import account_shard
from schemas.ledger import LEDGER_ROWS, frame_to_ledger_batch, rows_to_frame, unpack_ledger_rows

ACCOUNT = "M01-S0001"
MALL = "M01"
MONTH = "2026-07"
TZ = "Asia/Shanghai"
PARTITIONS = 8
STEP_MS = 900_000
DAY_MS = 86_400_000
OPENING_MINOR = 20_000
NEW_METER = "M01-S0001-E1-NEW"
INTERVAL_COLUMNS = ["circuit_id", "meter_id", "account_id", "mall_id", "start_ms", "end_ms", "energy_wh",
                    "billed_total_wh", "estimated", "flag"]


@dataclass(frozen=True)
class Figures:
    """What one source says about the merchant's month (energy in exact Wh, money in fen)."""

    source: str
    energy_wh: int
    opening_minor: int  # the configured opening balance, posted in the month
    energy_minor: int
    topups_minor: int
    shared_cost_minor: int
    closing_minor: int

    def key(self) -> tuple[int, ...]:
        return (self.energy_wh, self.opening_minor, self.energy_minor, self.topups_minor, self.shared_cost_minor, self.closing_minor)


@dataclass
class MonthInput:
    """The recorded input in arrival order: one readings message per local day (the late
    reading rides with the next day's message), payments and the posting between them."""

    portfolio: Portfolio
    ctx: BillingContext
    circuit: str
    messages: list[tuple[int, pl.DataFrame]]  # (arrival ms, readings)
    payments: list[tuple[int, dict[str, Any]]]  # (arrival ms, Payment); a re-send included
    posting: dict[str, Any]  # applied after the month's last reading

    @property
    def start_ms(self) -> int:
        return parse_period(MONTH).start_ms(TZ)

    @property
    def end_ms(self) -> int:
        return parse_period(MONTH).end_ms(TZ)


def month_input(seed: int = 7) -> MonthInput:
    """The worked example's portfolio and input (deterministic for a seed)."""
    data = generate(1, 6, seed=5)
    for merchant in data["malls"][0]["merchants"]:
        merchant["level"] = "standard"  # no emergency credit or friendly hours: plain prepaid
        merchant["protected"] = False
        merchant["opening_balance_minor"] = OPENING_MINOR if merchant["id"] == ACCOUNT else 0
        merchant.pop("opening_debt_minor", None)
    portfolio = parse_portfolio(data)
    ctx = build_context(portfolio, PARTITIONS)
    route = next(r for r in ctx.meter_route.values() if r.account_id == ACCOUNT)
    circuit = next(c for c, r in ctx.circuit_meter.items() if r.meter_id == route.meter_id)
    cfg = ctx.rating.circuits[circuit]
    top = Decimal(str(cfg.register_max_kwh))
    modulus = top + Decimal(str(cfg.register_resolution_kwh))
    start = parse_period(MONTH).start_ms(TZ)
    days = (parse_period(MONTH).end_ms(TZ) - start) // DAY_MS
    rng = np.random.default_rng(seed)
    # 0.05 .. 0.40 kWh per 15 minutes, on the register's 0.01 kWh grid
    steps = [Decimal(int(x)) / 100 for x in rng.integers(5, 41, size=days * 96)]
    value, meter = top - Decimal("2.50"), route.meter_id  # wraps during the first day
    swap_at = 14 * 96 + 40  # 15 July 10:00: the meter is replaced, the new one starts at 7.00 kWh
    rows: list[tuple[str, str, int, float]] = []
    for k, inc in enumerate(steps):
        if k == swap_at:
            value, meter = Decimal("7.00"), NEW_METER
        elif k:
            value = (value + inc) % modulus if meter == route.meter_id else value + inc
        rows.append((circuit, meter, start + k * STEP_MS, float(value)))
    schema = {"circuit_id": pl.String, "meter_id": pl.String, "ts_ms": pl.Int64, "import_kwh": pl.Float64}
    late_k = 19 * 96 + 50  # 20 July 12:30 + 1 min, sent with 21 July's readings (the collector's spool)
    a, b = Decimal(str(rows[late_k][3])), Decimal(str(rows[late_k + 1][3]))
    late = (circuit, rows[late_k][1], rows[late_k][2] + 60_000, float(((a + b) / 2).quantize(Decimal("0.01"))))
    messages = []
    for d in range(days):
        day = rows[d * 96:(d + 1) * 96] + ([late] if d == 20 else [])
        messages.append((start + (d + 1) * DAY_MS + 30_000, pl.DataFrame(day, schema=schema, orient="row")))
    pay = {"account_id": ACCOUNT, "kind": "TOPUP", "reverses_payment_id": None}
    payments = [(start + 7 * DAY_MS + 3_600_000, {**pay, "payment_id": "wx-0708", "ts_ms": start + 7 * DAY_MS + 3_600_000,
                                                 "amount_minor": 30_000}),
                (start + 7 * DAY_MS + 3_660_000, {**pay, "payment_id": "wx-0708", "ts_ms": start + 7 * DAY_MS + 3_600_000,
                                                 "amount_minor": 30_000}),  # the provider's re-send
                (start + 19 * DAY_MS + 7_200_000, {**pay, "payment_id": "al-0720", "ts_ms": start + 19 * DAY_MS + 7_200_000,
                                                  "amount_minor": 40_000})]
    posting = {"entry_id": f"{ACCOUNT}:shr:M01-P-hvac:{MONTH}", "account_id": ACCOUNT, "mall_id": MALL,
               "kind": "shared_cost", "amount_minor": -1_250, "ts_ms": parse_period(MONTH).end_ms(TZ) - 60_000,
               "source_id": f"M01-P-hvac|area|{MONTH}|16071", "rate": "0.077778"}
    return MonthInput(portfolio, ctx, circuit, messages, payments, posting)


# --- the stream ----------------------------------------------------------------------------


@dataclass
class StreamRun:
    intervals: list[tuple[Any, ...]]
    ledger: list[tuple[Any, ...]]
    env: Envelope


def run_stream(inp: MonthInput) -> StreamRun:
    """The stream's steps in arrival order: payments and the posting through the claims table
    and the accepted topics; readings routed and billed in rounds; outputs from the outboxes."""
    ctx, key = inp.ctx, state_key(ACCOUNT)
    shard = account_shard(ACCOUNT, PARTITIONS)
    envs: dict[str, Envelope] = {key: Envelope()}
    claims: dict[str, Any] = {}
    offsets: dict[str, int] = {}
    intervals: list[tuple[Any, ...]] = []
    ledger: list[tuple[Any, ...]] = []

    def collect(changed: dict[str, Envelope]) -> None:
        for k, env in changed.items():
            envs[k] = env
            for item in env.outbox:
                if item.topic == INTERVAL_ROWS:
                    intervals.extend(unpack_interval_rows(item.value))
                elif item.topic == LEDGER_ROWS:
                    ledger.extend(unpack_ledger_rows(item.value))

    def claimed(record: dict[str, Any], topic: str, namespace: str, schema: str) -> dict[str, Any] | None:
        """The claim step at the next offset of `topic`; the accepted record (None: refused or a re-send)."""
        offset = offsets[topic] = offsets.get(topic, -1) + 1
        key_ = claim_key(record, namespace)
        step = claiming.claim_step(claiming.decode_claim(claims.get(key_)), record, topic,
                                   claim_partition(record, PARTITIONS, namespace), offset, ctx)
        if step.value is not None:
            claims[key_] = step.value
        if not step.decision.accepted or step.value is None:
            return None
        accepted = [o for o in unframe_value(step.value)[0] if o.topic != T.ALERTS]
        return codec.decode(schema, accepted[0].value)

    events: list[tuple[int, int, Any]] = [(t, 1, m) for t, m in inp.messages]
    events += [(t, 0, p) for t, p in inp.payments]
    for arrival, kind, item in sorted(events, key=lambda e: (e[0], e[1])):
        if kind == 0:
            payment = claimed(item, T.PAYMENTS, "pay", "Payment")
            if payment is not None:
                good = [(payment["claim_partition"], payment["claim_offset"], payment)]
                for changed in batching.apply_payments_many(envs, good, ctx, now_ms=arrival):
                    collect(changed)
            continue
        offset = offsets[T.READINGS] = offsets.get(T.READINGS, -1) + 1
        routed = batching.route_readings(batching.messages_frame([(shard, offset, item, arrival)]), ctx, shard)
        if routed.rejected:
            raise ValueError(f"readings refused by the stream's routing: {routed.rejected}")
        for changed in batching.apply_readings_many(envs, routed, ctx):
            collect(changed)
    posting = claimed(inp.posting, T.POSTINGS, "post", "LedgerPosting")
    if posting is None:
        raise ValueError(f"posting {inp.posting['entry_id']} was not accepted by its claim")
    source, offset = claiming.accepted_position(posting, T.POSTINGS_ACCEPTED)  # type: ignore[misc]
    collect({key: billing.apply_posting(envs[key], posting, ctx, source, offset, now_ms=inp.end_ms)})
    return StreamRun(intervals, ledger, envs[key])



def _month(frame: pl.DataFrame, inp: MonthInput, ts: str) -> pl.DataFrame:
    return frame.filter((pl.col("account_id") == ACCOUNT) & pl.col(ts).is_between(inp.start_ms, inp.end_ms,
                                                                                    closed="left"))


def _money(ledger: pl.DataFrame) -> tuple[int, int, int, int]:
    """Opening balance, energy charges, top-ups and shared costs of ledger rows (minor units)."""
    def total(*kinds: str) -> int:
        return int(ledger.filter(pl.col("kind").is_in(kinds))["amount_minor"].sum())
    return total("opening_balance"), total("charge"), total("topup"), total("shared_cost")


def stream_figures(run: StreamRun, inp: MonthInput) -> Figures:
    facts = _month(pl.DataFrame(run.intervals, schema=INTERVAL_COLUMNS, orient="row"), inp, "end_ms")
    ledger = _month(rows_to_frame(run.ledger), inp, "ts_ms")
    # the closing balance is the wallet's own state after the month, not a ledger figure
    return Figures("stream", int(facts["energy_wh"].sum()), *_money(ledger), run.env.accounts[ACCOUNT].balance)


def replay_figures(inp: MonthInput) -> Figures:
    """`replay()` over the recorded input (readings with their Kafka times, every payment as
    sent, re-send included), then the month's posting through the same wallet code."""
    readings = pl.concat([m.with_columns(msg_ts_ms=pl.lit(t, pl.Int64)) for t, m in inp.messages])
    payments = pl.DataFrame([p for _, p in inp.payments]).with_columns(pl.col("kind").str.to_lowercase())
    state, tables = replay(inp.ctx.rating, readings, payments)
    state, out = apply_postings(state, [inp.posting], inp.ctx.rating)
    ledger = pl.concat([tables["ledger"], out.ledger], how="diagonal_relaxed")
    intervals = tables["intervals"]
    if "account_id" not in intervals.columns:
        circuits = [c for c, cfg in inp.ctx.rating.circuits.items() if cfg.account_id == ACCOUNT]
        intervals = intervals.filter(pl.col("circuit_id").is_in(circuits)).with_columns(account_id=pl.lit(ACCOUNT))
    energy = int(_month(intervals, inp, "end_ms")["energy_wh"].sum())
    return Figures("replay", energy, *_money(_month(ledger, inp, "ts_ms")), state.accounts[ACCOUNT].balance)


# --- the warehouse and the bill ------------------------------------------------------------


def load_warehouse(run: StreamRun, inp: MonthInput, client: Any) -> None:
    """The stream's outputs as the forwarder publishes them (IntervalBatch, LedgerBatch) through
    the sink's own decoders and insert, with the portfolio's dimensions."""
    load_dimensions(client, inp.portfolio)
    for topic, value in (("mallwatt.intervals", codec.encode("IntervalBatch", rows_to_interval_batch(
                             run.intervals, "worked:0@0"))),
                         ("mallwatt.ledger", codec.encode("LedgerBatch", frame_to_ledger_batch(
                             rows_to_frame(run.ledger), "worked:0@0")))):
        spec = TOPIC_TABLES[topic]
        chunk, _, _ = spec.decode(value)
        data = spec.to_arrow([chunk])
        if topic == "mallwatt.ledger":
            data = drop_known_ledger_rows(data, client)
        insert_arrow(client, spec.table, data, f"worked-{topic}")


def warehouse_figures(inp: MonthInput, path: str) -> Figures:
    window = {"start_ms": inp.start_ms, "end_ms": inp.end_ms, "mall_id": MALL}
    energy = wh.run_named_query("bills_circuit_energy", window, path=path)
    circuits = [c for c, cfg in inp.ctx.rating.circuits.items() if cfg.account_id == ACCOUNT]
    ledger = wh.run_named_query("bills_ledger_period", window, path=path).filter(pl.col("account_id") == ACCOUNT)
    closing = int(ledger.sort("ts_ms", "entry_id")["balance_after_minor"][-1])
    return Figures("warehouse", int(energy.filter(pl.col("circuit_id").is_in(circuits))["wh"].sum()),
                   *_money(ledger), closing)


def bill_figures(inp: MonthInput, path: str) -> Figures:
    bills = load_bills(inp.portfolio, parse_period(MONTH), mall_id=MALL, path=path, check_closed=False)
    st = next(s for s in bills.statements if s.account_id == ACCOUNT)
    totals = st.section_totals()
    return Figures("bill", int(st.energy_kwh() * 1000), totals["opening_balance"], totals["energy"], totals["topup"], totals["shared_cost"],
                   st.closing_minor)


def worked_month(chdb: Path | None = None) -> list[Figures]:
    """The four sources' figures for the month (a temporary chDB folder unless `chdb`)."""
    inp = month_input()
    run = run_stream(inp)
    figures = [stream_figures(run, inp), replay_figures(inp)]
    with tempfile.TemporaryDirectory(prefix="mallwatt-worked-") as tmp:
        folder = chdb or Path(tmp) / "chdb"
        try:
            with wh.open_owner(folder, serve=False) as owner:
                load_warehouse(run, inp, owner.client)
                figures.append(warehouse_figures(inp, str(folder)))
                figures.append(bill_figures(inp, str(folder)))
        finally:
            wh.release_folder(folder)
    return figures


def table(figures: list[Figures]) -> str:
    """The figures as a Markdown table (kWh exact to the Wh, money in CNY with fen)."""
    def cny(minor: int) -> str:
        return f"{Decimal(minor) / 100:,.2f}"
    lines = ["| source | energy (kWh) | opening balance (CNY) | energy charges (CNY) | top-ups (CNY) | shared cost (CNY) | closing balance (CNY) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for f in figures:
        lines.append(f"| {f.source} | {Decimal(f.energy_wh) / 1000:,.3f} | {cny(f.opening_minor)} | {cny(f.energy_minor)} | "
                     f"{cny(f.topups_minor)} | {cny(f.shared_cost_minor)} | {cny(f.closing_minor)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.worked_example", description=__doc__.splitlines()[0])
    ap.add_argument("--chdb", type=Path, help="keep the warehouse in this (new) folder instead of a temporary one")
    a = ap.parse_args(argv)
    figures = worked_month(a.chdb)
    print(f"{ACCOUNT}, {MONTH} ({TZ})\n")
    print(table(figures))
    same = len({f.key() for f in figures}) == 1
    print("\nall four agree" if same else "\nTHE SOURCES DISAGREE")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
