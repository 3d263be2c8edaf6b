"""Worked tariff examples; amounts are exact nano-minor units (1 fen = 1e9)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import polars as pl
from billing_helpers import make_ctx, ms

from pipelines.core.models import CriticalPeak, Season, Tariff, TariffVersion, TierBlock
from pipelines.core.tariff import max_demand_kw, rate

CN = timezone(timedelta(hours=8))
GD = Tariff(id="gd", versions=[TariffVersion(
    effective_from=datetime(2021, 1, 1, tzinfo=CN),
    prices={"peak": "170", "flat": "100", "valley": "38"},  # 1.7 : 1 : 0.38
    weekday=[Season(hours="VVVVVVVV FF PP FF PPPPP FFFFF")],  # peak 10-12, 14-19; valley 0-8
    critical_peak=[CriticalPeak(months=[7, 8, 9], hours=[11, 15, 16], uplift_pct=25)])])


def iv(start: int, end: int, wh: int) -> pl.DataFrame:
    return pl.DataFrame({"circuit_id": ["c1"], "meter_id": ["m1"], "start_ms": [start], "end_ms": [end],
                         "energy_wh": [wh], "estimated": [False], "flag": [""], "account_id": ["a1"]})


def test_guangdong_peak_and_critical_peak_split_pro_rata():
    # Mon 2021-07-05 10:30-11:30 local, 2000 Wh: 10:30-11:00 peak, 11:00-11:30 critical peak
    # 1000 Wh * 170 fen/kWh = 170 fen; 1000 Wh * 170*1.25 = 212.5 fen -> 382.5 fen
    ctx = make_ctx(GD)
    r, _ = rate(iv(ms(2021, 7, 5, 10, 30), ms(2021, 7, 5, 11, 30), 2000), ctx, {})
    by = r.group_by("period").agg(pl.col("energy_wh").sum(), pl.col("amount_n").sum()).sort("period")
    assert by.rows() == [("peak", 1000, 170_000_000_000), ("sharp", 1000, 212_500_000_000)]


def test_guangdong_valley_to_flat_in_october_no_critical_peak():
    # Oct: 07:50-08:10, 300 Wh: 10 min valley (100 Wh*38 = 3.8 fen), 10 min flat (150? no: time
    # pro rata 20 min -> 150/150 Wh): 150*38/1000 = 5.7 fen, 150*100/1000 = 15 fen
    ctx = make_ctx(GD)
    r, _ = rate(iv(ms(2021, 10, 11, 7, 50), ms(2021, 10, 11, 8, 10), 300), ctx, {})
    assert r.select("period", "energy_wh", "amount_n").rows() == [
        ("valley", 150, 5_700_000_000), ("flat", 150, 15_000_000_000)]


def test_pro_rata_split_is_exact_integer_apportionment():
    # 100 Wh over 07:55-08:10 (5 min valley, 10 min flat): 100*5/15 = 33.3 -> 33, rest 67
    r, _ = rate(iv(ms(2021, 10, 11, 7, 55), ms(2021, 10, 11, 8, 10), 100), make_ctx(GD), {})
    assert r["energy_wh"].to_list() == [33, 67]


def test_tier_boundary_splits_the_interval():
    # flat 100 fen/kWh; block 1 up to 1 kWh, then +50 fen. Month already at 600 Wh; 1500 Wh more:
    # 400 Wh * 100 = 40 fen in block 0, 1100 Wh * 150 = 165 fen in block 1
    t = Tariff(id="tier", versions=[TariffVersion(prices={"flat": 100}, tiers=[
        TierBlock(upto_kwh=1), TierBlock(adder=50)])])
    from pipelines.core.tariff import TierCounter
    r, c = rate(iv(ms(2024, 5, 1, 10), ms(2024, 5, 1, 10, 15), 1500), make_ctx(t), {"a1": TierCounter(202405, 600)})
    assert r.select("tier", "energy_wh", "amount_n").rows() == [(0, 400, 40_000_000_000), (1, 1100, 165_000_000_000)]
    assert c["a1"].wh == 2100
    # a new month starts the blocks again
    r, c = rate(iv(ms(2024, 6, 1, 10), ms(2024, 6, 1, 10, 15), 500), make_ctx(t), c)
    assert r["tier"].to_list() == [0] and c["a1"].month == 202406


def test_dst_spring_forward_new_york():
    # 2024-03-10: 01:30 EST (06:30Z) to 03:30 EDT (07:30Z) is one real hour, 1000 Wh.
    # 06:30-07:00Z is local hour 1 (valley 40), 07:00-07:30Z is local hour 3 (peak 200):
    # 500*40/1000 = 20 fen + 500*200/1000 = 100 fen
    t = Tariff(id="ny", versions=[TariffVersion(prices={"valley": 40, "peak": 200},
                                                weekday=[Season(hours="VV" + "P" * 22)])])
    ny = ZoneInfo("America/New_York")
    start = ms(2024, 3, 10, 1, 30, tz=ny)
    r, _ = rate(iv(start, start + 3_600_000, 1000), make_ctx(t, tz="America/New_York"), {})
    r = r.group_by("period", maintain_order=True).agg(pl.col("energy_wh").sum(), pl.col("amount_n").sum())
    assert r.rows() == [
        ("valley", 500, 20_000_000_000), ("peak", 500, 100_000_000_000)]


def test_version_change_mid_interval_and_weekend_holiday_schedule():
    # price 100 until 2024-07-01 00:00 local, then 120; interval 23:45-00:15 with 200 Wh:
    # 100 Wh * 100 = 10 fen + 100 Wh * 120 = 12 fen
    t = Tariff(id="v", versions=[TariffVersion(prices={"flat": 100}),
                                 TariffVersion(effective_from=datetime(2024, 7, 1, tzinfo=CN), prices={"flat": 120})])
    r, _ = rate(iv(ms(2024, 6, 30, 23, 45), ms(2024, 7, 1, 0, 15), 200), make_ctx(t), {})
    assert r.select("price_u", "amount_n").rows() == [(100_000_000, 10_000_000_000), (120_000_000, 12_000_000_000)]
    # a mall holiday on a Tuesday uses the weekend schedule (all valley here)
    w = Tariff(id="w", versions=[TariffVersion(prices={"flat": 100, "valley": 30}, weekday=[Season(hours="F" * 24)],
                                               weekend=[Season(hours="V" * 24)])])
    ctx = make_ctx(w, holidays=["2024-10-01"])
    r, _ = rate(iv(ms(2024, 10, 1, 12), ms(2024, 10, 1, 12, 15), 100), ctx, {})
    assert r["period"].to_list() == ["valley"]


def test_merchant_multiplier_and_demand_helper():
    # 90 % of 100 fen/kWh = 90; 250 Wh in one 15-min slot = 1 kW average
    ctx = make_ctx(Tariff.flat("f", 100))
    ctx.accounts["a1"] = ctx.accounts["a1"].model_copy(update={"price_multiplier": Decimal("0.9")})
    ctx.__dict__.pop("account_frame", None)
    r, _ = rate(iv(ms(2024, 5, 1, 10), ms(2024, 5, 1, 10, 15), 250), ctx, {})
    assert r["price_u"].to_list() == [90_000_000]
    assert max_demand_kw(r)["max_kw"].to_list() == ["1"]
