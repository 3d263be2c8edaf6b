"""Common-area allocation, worked by hand.

Units of mall M1: A 100 m2, B 60 m2, C 40 m2 (vacant), D 50 m2.
Sub-metered energy: A 3000 Wh, B 1000 Wh, C 0, D 6000 Wh.
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from pipelines.bills.allocation import (
    Unit,
    allocate,
    allocate_mall,
    allocation_postings,
    largest_remainder,
    parse_source_id,
)
from pipelines.portfolio import PoolMethod, SharedPool, parse_portfolio

UNITS = [Unit("A", 100, consumption_wh=3000), Unit("B", 60, consumption_wh=1000),
         Unit("C", 40, vacant=True), Unit("D", 50, consumption_wh=6000)]
LL = "M1-LANDLORD"


def pool(method: PoolMethod, **kw: object) -> SharedPool:
    return SharedPool(id="P-HVAC", name="HVAC", meters=["M1-C-HVAC"], method=method, **kw)


def amounts(alloc: object) -> dict[tuple[str, str, str], int]:
    return {(x.unit_id, x.account_id, x.role): x.amount_minor for x in alloc.lines}  # type: ignore[attr-defined]


def test_area_with_exclusion_vacancy_and_residue() -> None:
    # D excluded -> denominator 100 + 60 + 40 = 200 m2 (the vacant C stays in it).
    # 1001 fen: A 1001*100/200 = 500.5, B 1001*60/200 = 300.3, C 1001*40/200 = 200.2
    # floors 500 + 300 + 200 = 1000, residue 1 -> largest remainder .5 -> A.
    a = allocate("M1", pool(PoolMethod.AREA, exclude=["D"]), "2026-10", 1001, UNITS)
    assert amounts(a) == {("A", "A", "tenant"): 501, ("B", "B", "tenant"): 300, ("C", LL, "vacant"): 200}
    assert sum(x.amount_minor for x in a.lines) == 1001
    assert {x.unit_id: x.share for x in a.lines} == {"A": Fraction(1, 2), "B": Fraction(3, 10), "C": Fraction(1, 5)}


def test_area_without_exclusion_includes_everyone() -> None:
    # 250 m2: A 1000*100/250 = 400, B 240, C 160 (landlord), D 200.
    a = allocate("M1", pool(PoolMethod.AREA), "2026-10", 1000, UNITS)
    assert amounts(a) == {("A", "A", "tenant"): 400, ("B", "B", "tenant"): 240,
                          ("C", LL, "vacant"): 160, ("D", "D", "tenant"): 200}


def test_residue_tie_goes_to_smaller_id() -> None:
    # 1 fen over two equal halves: both remainders .5, tie -> "X" before "Y".
    a = allocate("M1", pool(PoolMethod.AREA), "2026-10", 1, [Unit("Y", 50), Unit("X", 50)])
    assert amounts(a) == {("X", "X", "tenant"): 1, ("Y", "Y", "tenant"): 0}
    assert largest_remainder(3, {"b": Fraction(1, 2), "a": Fraction(1, 2)}) == {"a": 2, "b": 1}


def test_fixed_percentages_excluded_share_stays_with_landlord() -> None:
    # A 50 %, B 30 %, D 10 % but D excluded -> unallocated 20 %.
    # 999: A 499.5, B 299.7, landlord 199.8 -> floors 997, residue 2 -> .8 landlord, .7 B.
    p = pool(PoolMethod.FIXED, fixed_shares={"A": 50, "B": 30, "D": 10}, exclude=["D"])
    a = allocate("M1", p, "2026-10", 999, UNITS)
    assert amounts(a) == {("A", "A", "tenant"): 499, ("B", "B", "tenant"): 300,
                          (LL, LL, "unallocated"): 200}


def test_fixed_shares_above_100_percent_rejected() -> None:
    with pytest.raises(ValueError, match="at most 100"):
        allocate("M1", pool(PoolMethod.FIXED, fixed_shares={"A": 70, "B": 40}), "2026-10", 10, UNITS)


def test_consumption_share_excluding_d() -> None:
    # D excluded: 3000 + 1000 + 0 = 4000 Wh. 999: A 749.25, B 249.75 -> residue 1 -> B.
    a = allocate("M1", pool(PoolMethod.CONSUMPTION, exclude=["D"]), "2026-10", 999, UNITS)
    assert amounts(a) == {("A", "A", "tenant"): 749, ("B", "B", "tenant"): 250}


def test_consumption_nobody_used_anything_stays_with_landlord() -> None:
    a = allocate("M1", pool(PoolMethod.CONSUMPTION), "2026-10", 500, [Unit("A", 10), Unit("B", 10)])
    assert amounts(a) == {(LL, LL, "unallocated"): 500}


def test_weighted_mix() -> None:
    # area (D excluded): A 1/2, B 3/10, C 1/5; consumption: A 3/4, B 1/4.
    # 50/50 mix: A 5/8, B 11/40, C 1/10 -> 1000: A 625, B 275, C 100 (landlord).
    p = pool(PoolMethod.MIX, mix_weights={"area": 0.5, "consumption": 0.5}, exclude=["D"])
    a = allocate("M1", p, "2026-10", 1000, UNITS)
    assert amounts(a) == {("A", "A", "tenant"): 625, ("B", "B", "tenant"): 275, ("C", LL, "vacant"): 100}


def test_postings_conserve_money_and_have_stable_ids() -> None:
    a = allocate("M1", pool(PoolMethod.AREA, exclude=["D"]), "2026-10", 1001, UNITS)
    posts = allocation_postings(a, posted_at_ms=1_000)
    assert [(p["entry_id"], p["amount_minor"]) for p in posts] == [
        ("A:shr:P-HVAC:2026-10", -501), ("B:shr:P-HVAC:2026-10", -300),
        ("M1-LANDLORD:shr:P-HVAC:2026-10", 801)]  # landlord keeps the vacant 200
    assert sum(p["amount_minor"] for p in posts) == 0
    assert {p["kind"] for p in posts} == {"shared_cost"}
    assert posts[0]["rate"] == "0.500000"
    assert parse_source_id(posts[0]["source_id"]) == {"pool_id": "P-HVAC", "method": "area",
                                                      "period": "2026-10", "pool_cost_minor": 1001}
    assert allocation_postings(a, posted_at_ms=1_000) == posts


def test_allocate_mall_takes_the_pool_cost_from_landlord_charges() -> None:
    portfolio = parse_portfolio({
        "name": "t", "tariffs": [{"id": "flat", "versions": [{"prices": {"flat": 100}}]}],
        "malls": [{"id": "M1", "name": "M1", "tariff": "flat", "areas": [{"id": "F1"}],
                   "gateways": [{"id": "G1", "port": 1502}],
                   "merchants": [{"id": "A", "name": "A", "area": "F1", "leased_area_m2": 30},
                                 {"id": "B", "name": "B", "area": "F1", "leased_area_m2": 10}],
                   "meters": [{"id": "MH", "model": "eastron_sdm120", "gateway": "G1", "unit_id": 1, "circuits": [{"id": "CH"}]},
                              {"id": "MA", "model": "eastron_sdm120", "gateway": "G1", "unit_id": 2, "account": "A",
                               "circuits": [{"id": "CA"}]}],
                   "pools": [{"id": "HVAC", "name": "HVAC", "meters": ["MH"]}]}]})
    entries = [
        {"account_id": LL, "kind": "charge", "circuit_id": "CH", "amount_minor": -150, "energy_wh": 1500},
        {"account_id": LL, "kind": "charge", "circuit_id": "CH", "amount_minor": -250, "energy_wh": 2500},
        {"account_id": "A", "kind": "charge", "circuit_id": "CA", "amount_minor": -99, "energy_wh": 990},
    ]
    (a,) = allocate_mall(portfolio.mall("M1"), "2026-10", entries)
    # cost 150 + 250 = 400 over 40 m2: A 300, B 100.
    assert (a.cost_minor, a.energy_wh) == (400, 4000)
    assert amounts(a) == {("A", "A", "tenant"): 300, ("B", "B", "tenant"): 100}
