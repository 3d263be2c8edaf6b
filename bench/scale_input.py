"""What `mallwatt bench scale` feeds the worker: the portfolio and live-shaped input.

Live shape, as the collectors publish it (collectors/publish.py): every circuit is read
once per poll cycle (the cadence), and each mall's collector produces one ReadingBatch per
account shard per cycle, to the partition of that shard. The messages of a cycle are
spread evenly over it. Register values follow from the cycle number (base + rate x cycle),
so any cycle can be built again, in any order, with the same values.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipelines.context import landlord_account
from pipelines.generate import generate
from pipelines.portfolio import dump_portfolio, parse_portfolio
from pipelines.roster import write_tables
from schemas import codec
from schemas.keys import account_shard
from schemas.readings import frame_to_batch

MALL_STALLS = 700  # merchants per generated mall (a large mall)
TABLES_FROM = 10_000  # portfolios this large are written as roster tables
T0 = 1_784_080_800_000  # 2026-07-15 10:00 +08:00: a peak hour, for the simulated clock
PEAK_PRICE_FEN = 170  # the highest price of the generated tariff (critical peak), fen/kWh
OPENING_MINOR = 10_000_000  # opening top-up of an ordinary account: never runs out in a run


@dataclass(frozen=True)
class Roster:
    """The bench portfolio as the input generator needs it."""

    config: Path  # what the worker loads
    merchants: list[str]  # merchant account ids
    trip_candidates: list[str]  # accounts with the plain level (cutoff 0), not protected
    circuits: pl.DataFrame  # circuit_id, meter_id, account_id, mall_id, max_kw


def write_portfolio(merchants: int, directory: Path) -> Roster:
    """Write an N-merchant portfolio (one circuit each, malls of MALL_STALLS stalls) for the
    worker and return its roster. The only place the bench writes the portfolio: a faster
    roster format replaces this function, nothing else."""
    malls = max(1, math.ceil(merchants / MALL_STALLS))
    data = generate(malls, math.ceil(merchants / malls), seed=11, mall_prefix="B")
    extra = malls * math.ceil(merchants / malls) - merchants
    if extra:  # the last mall is smaller, so the portfolio has exactly `merchants`
        last = data["malls"][-1]
        dropped = {m["id"] for m in last["merchants"][len(last["merchants"]) - extra:]}
        last["merchants"] = [m for m in last["merchants"] if m["id"] not in dropped]
        last["meters"] = [m for m in last["meters"] if m["account"] not in dropped]
        parse_portfolio(data, "<bench portfolio>")
    for mall in data["malls"]:  # the stream posts opening balances: the bench's money comes from top-ups
        for merchant in mall["merchants"]:
            merchant["opening_balance_minor"] = 0
    directory.mkdir(parents=True, exist_ok=True)
    if merchants >= TABLES_FROM:  # rules in YAML, roster as Parquet tables (docs/roster.md): loads in seconds
        config = write_tables(data, directory / "portfolio", "parquet")
    else:
        config = directory / "portfolio.yaml"
        dump_portfolio(data, config)
    rows: dict[str, list[Any]] = {"circuit_id": [], "meter_id": [], "account_id": [], "mall_id": [], "max_kw": []}
    for mall in data["malls"]:
        for meter in mall["meters"]:
            for circuit in meter["circuits"]:
                rows["circuit_id"].append(circuit["id"])
                rows["meter_id"].append(meter["id"])
                rows["account_id"].append(meter["account"] or landlord_account(mall["id"]))
                rows["mall_id"].append(mall["id"])
                rows["max_kw"].append(float(meter["max_kw"]))
    all_merchants = [m for mall in data["malls"] for m in mall["merchants"]]
    return Roster(config, [m["id"] for m in all_merchants],
                  [m["id"] for m in all_merchants if m["level"] == "standard" and not m["protected"]],
                  pl.DataFrame(rows))


@dataclass(frozen=True)
class Message:
    partition: int
    value: bytes
    readings: int
    ts_ms: int  # the readings' timestamp (unique per message within the run)
    trip_accounts: tuple[str, ...]  # accounts of interest in it (trip latency)
    slot: float  # when in its cycle it is sent, as a fraction of the cadence


@dataclass
class _Group:
    mall_id: str
    shard: int
    index: np.ndarray  # rows of the circuit table
    base: pl.DataFrame  # the columns that never change
    trip_accounts: tuple[str, ...]


@dataclass
class LiveInput:
    """Reading batches of any poll cycle, and the top-ups that go with them."""

    roster: Roster
    partitions: int
    cadence_s: float
    trip_accounts: list[str]
    seed: int = 3
    groups: list[_Group] = field(init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        circuits = self.roster.circuits
        n = circuits.height
        max_kw = circuits["max_kw"].to_numpy()
        accounts = circuits["account_id"].to_list()
        tripping = set(self.trip_accounts)
        is_trip = np.array([a in tripping for a in accounts])
        # ordinary circuits draw 5-50 % of their limit; the trip accounts 80 % (under the
        # load-control limit, so they trip for credit only)
        self.power_kw = np.where(is_trip, 0.8 * max_kw, rng.uniform(0.05, 0.5, n) * max_kw)
        self.base_kwh = rng.uniform(100, 9000, n)
        self.kwh_per_cycle = self.power_kw * self.cadence_s / 3600
        shards = np.array([account_shard(a, self.partitions) for a in accounts])
        malls = circuits["mall_id"].to_numpy()
        groups = []
        for mall in dict.fromkeys(malls.tolist()):
            for shard in range(self.partitions):
                index = np.flatnonzero((malls == mall) & (shards == shard))
                if not index.size:
                    continue
                base = circuits[index].select("circuit_id", "meter_id", "account_id").with_columns(
                    power_w=pl.Series(self.power_kw[index] * 1000), voltage_v=pl.lit(230.0),
                    current_a=pl.Series(self.power_kw[index] * 1000 / 230), power_factor=pl.lit(0.95),
                    relay=pl.lit(0, pl.UInt8))
                groups.append(_Group(mall, shard, index, base,
                                     tuple(a for a in base["account_id"].to_list() if a in tripping)))
        order = random.Random(self.seed).sample(range(len(groups)), len(groups))  # malls interleave
        self.groups = [groups[i] for i in order]
        self.readings_per_cycle = n

    @property
    def messages_per_cycle(self) -> int:
        return len(self.groups)

    def cost_per_cycle_minor(self, account: str) -> int:
        """Most an account can be charged in one cycle (at the highest price)."""
        rows = np.flatnonzero(self.roster.circuits["account_id"].to_numpy() == account)
        return max(1, math.ceil(float(self.kwh_per_cycle[rows].sum()) * PEAK_PRICE_FEN))

    def cycle(self, n: int) -> list[Message]:
        """The reading batches of poll cycle `n`, in send order."""
        return list(self.messages(n))

    def messages(self, n: int) -> Iterator[Message]:
        """The reading batches of poll cycle `n`, each made when it is taken: building a whole
        350,000-merchant cycle first took seconds, and the paced producer then sent the
        batches due meanwhile in one burst at the start of every cycle (150 messages, 2 s of
        the worker's billing at once)."""
        registers = self.base_kwh + self.kwh_per_cycle * n
        count = len(self.groups)
        for j, g in enumerate(self.groups):
            ts = T0 + int(n * self.cadence_s * 1000) + int(j * self.cadence_s * 1000 / count)
            frame = g.base.with_columns(ts_ms=pl.lit(ts, pl.Int64),
                                        import_kwh=pl.Series(registers[g.index]))
            record = frame_to_batch(frame, batch_id=f"bench-{g.mall_id}/{g.shard}/{n}", collector_id=f"bench-{g.mall_id}",
                                    mall_id=g.mall_id, shard=g.shard, seq=n, collected_at_ms=ts)
            yield Message(g.shard, codec.encode("ReadingBatch", record), frame.height, ts, g.trip_accounts,
                          j / count)


def payment(payment_id: str, account: str, amount_minor: int, ts_ms: int) -> dict[str, Any]:
    return {"payment_id": payment_id, "account_id": account, "kind": "TOPUP", "amount_minor": amount_minor,
            "currency": "CNY", "ts_ms": ts_ms, "provider": "bench", "reverses_payment_id": None}


def opening_payments(live: LiveInput) -> list[dict[str, Any]]:
    """One opening top-up per merchant: plenty for ordinary accounts; for the trip accounts
    one to four cycles of their use, so their first trips spread over the first cycles."""
    tripping = {a: i for i, a in enumerate(live.trip_accounts)}
    out = []
    for account in live.roster.merchants:
        i = tripping.get(account)
        amount = OPENING_MINOR if i is None else live.cost_per_cycle_minor(account) * (1 + i % 4)
        out.append(payment(f"open-{account}", account, amount, T0 - 1))
    return out


def choose_trip_accounts(roster: Roster, count: int, seed: int = 5) -> list[str]:
    candidates = roster.trip_candidates
    return random.Random(seed).sample(candidates, min(count, len(candidates)))


def state_value_bytes_after_year(days: int = 365, readings_per_day: int = 24) -> int:
    """Bytes of one account's stored state after a year of daily top-ups and hourly readings,
    applied through the billing step functions (no Kafka). The state is what the worker
    would store for the account alone, without the outputs of its last change.

    Uses the public step API (pipelines.billing.apply_payment / apply_readings on an
    Envelope); a new state design only has to change this function."""
    from pipelines import billing
    from pipelines.context import build_context
    from pipelines.envelope import Envelope

    data = generate(1, 1, seed=5)
    merchant = data["malls"][0]["merchants"][0]
    merchant["level"], merchant["protected"] = "standard", False
    ctx = build_context(parse_portfolio(data), 8)
    account = merchant["id"]
    meter = next(m for m in data["malls"][0]["meters"] if m["account"] == account)
    circuit = meter["circuits"][0]["id"]
    day_ms, hour_ms = 86_400_000, 3_600_000
    env = Envelope()
    register = 1000.0
    for day in range(days):
        start = T0 - 10 * hour_ms + day * day_ms  # local midnight
        env = billing.apply_payment(env, payment(f"year-{day}", account, 3_000, start), ctx, "payments:0", day)
        kwh = [register + 0.4 * (h + 1) for h in range(readings_per_day)]
        register = kwh[-1]
        frame = pl.DataFrame({"circuit_id": [circuit] * readings_per_day, "meter_id": [meter["id"]] * readings_per_day,
                              "account_id": [account] * readings_per_day,
                              "ts_ms": [start + (h + 1) * day_ms // readings_per_day for h in range(readings_per_day)],
                              "import_kwh": kwh})
        env = billing.apply_readings(env, frame, ctx, "readings:0", day)
    return len(replace(env, outbox=[]).to_bytes())
