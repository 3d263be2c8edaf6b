"""Portfolio config -> what one collector polls and where its readings belong."""

from __future__ import annotations

import copy

import pytest

from collectors.mapping import parse_shard, plan_mall, select_gateways
from pipelines.context import landlord_account
from pipelines.generate import generate
from pipelines.portfolio import Portfolio, parse_portfolio


def _portfolio(gateways: int = 5, stalls: int = 12) -> Portfolio:
    """One generated mall whose meters are spread round-robin over `gateways` buses."""
    data = copy.deepcopy(generate(1, stalls, seed=7, mall_prefix="TMAP"))
    mall = data["malls"][0]
    base = mall["gateways"][0]
    # ids deliberately out of order: shards must follow id order, not config order
    mall["gateways"] = [{**base, "id": f"TMAP01-GW{k:02d}", "port": 16000 + k,
                         "timeout_s": 1.0 + k / 10}
                        for k in reversed(range(1, gateways + 1))]
    for i, meter in enumerate(mall["meters"]):
        meter["gateway"] = f"TMAP01-GW{i % gateways + 1:02d}"
    return parse_portfolio(data)


def test_plan_covers_every_meter_with_its_gateway_and_circuits() -> None:
    p = _portfolio()
    mall = p.malls[0]
    plan = plan_mall(p, mall.id)
    assert plan.mall_id == mall.id
    assert plan.gateways == tuple(sorted(g.id for g in mall.gateways))
    assert {d.meter_id for d in plan.devices} == {m.id for m in mall.meters}
    gw = {g.id: g for g in mall.gateways}
    for m in mall.meters:
        spec = next(d for d in plan.devices if d.meter_id == m.id)
        assert (spec.host, spec.port, spec.unit_id, spec.profile, spec.gateway_id) == (
            gw[m.gateway].host, gw[m.gateway].port, m.unit_id, m.model, m.gateway)
        assert spec.interval_s == m.poll_interval_s
        assert spec.circuit_id("main") == m.circuits[0].id  # profile circuit -> config id
        assert plan.circuits_of(m.id) == (m.circuits[0].id,)
        assert plan.gateway_of(m.id) == m.gateway
    assert plan.timeout_s == max(g.timeout_s for g in mall.gateways)


def test_accounts_route_merchants_and_common_meters_to_the_landlord() -> None:
    p = _portfolio()
    mall = p.malls[0]
    plan = plan_mall(p, mall.id)
    common = [m for m in mall.meters if m.account is None]
    assert common, "the generated mall has common-area meters"
    for m in mall.meters:
        want = m.account if m.account else f"{mall.id}-LANDLORD"
        assert plan.account_of(m.id) == want
    assert landlord_account(mall.id) == f"{mall.id}-LANDLORD"
    accounts = plan.circuit_accounts()
    assert accounts == {m.circuits[0].id: (m.account or f"{mall.id}-LANDLORD")
                        for m in mall.meters}


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_shards_partition_the_gateways(n: int) -> None:
    p = _portfolio(gateways=5)
    mall = p.malls[0]
    plans = [plan_mall(p, mall.id, shard=f"{i}/{n}") for i in range(n)]
    owned = [g for pl in plans for g in pl.gateways]
    assert sorted(owned) == sorted(g.id for g in mall.gateways)  # each exactly once
    meters = [d.meter_id for pl in plans for d in pl.devices]
    assert sorted(meters) == sorted(m.id for m in mall.meters)
    ordered = sorted(g.id for g in mall.gateways)
    for i, pl in enumerate(plans):
        assert pl.gateways == tuple(ordered[i::n])  # round-robin in id order
        for mid in pl.routes:
            assert pl.gateway_of(mid) in pl.gateways
        others = {mid for j, q in enumerate(plans) if j != i for mid in q.routes}
        assert not any(pl.owns(mid) for mid in others)


def test_named_gateways_and_selection_errors() -> None:
    p = _portfolio(gateways=4)
    mall = p.malls[0]
    plan = plan_mall(p, mall.id, gateways=["TMAP01-GW03", "TMAP01-GW01"])
    assert plan.gateways == ("TMAP01-GW01", "TMAP01-GW03")
    assert {plan.gateway_of(mid) for mid in plan.routes} == {"TMAP01-GW01", "TMAP01-GW03"}
    assert plan.timeout_s == pytest.approx(1.3)  # the slowest owned gateway
    with pytest.raises(ValueError, match="unknown gateway"):
        plan_mall(p, mall.id, gateways=["TMAP01-GW99"])
    with pytest.raises(ValueError, match="either"):
        select_gateways(mall, ["TMAP01-GW01"], (0, 2))
    assert [g.id for g in select_gateways(mall)] == sorted(g.id for g in mall.gateways)


def test_parse_shard_and_interval_override() -> None:
    assert parse_shard("0/1") == (0, 1) and parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/2", "1/0", "x", "1/2/3", ""):
        with pytest.raises(ValueError):
            parse_shard(bad)
    p = _portfolio(gateways=2)
    plan = plan_mall(p, p.malls[0].id, shard=(1, 2), interval_s=0.5)
    assert plan.devices and all(d.interval_s == 0.5 for d in plan.devices)
    with pytest.raises(KeyError):
        plan_mall(p, "NO-SUCH-MALL")
