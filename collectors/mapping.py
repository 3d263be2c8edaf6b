"""From the portfolio config to what one collector polls and where its readings belong.

A collector serves one mall, or a shard of that mall's gateways (`--gateways G1,G2` or
`--shard i/n`), so a mall with many buses can be split over several processes. A
gateway is owned by exactly one collector: its relay commands and its bus lock live there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from collectors.profile import load_profile
from collectors.spec import DeviceSpec
from pipelines.context import landlord_account
from pipelines.portfolio import Gateway, MallConfig, Portfolio, load_portfolio


@dataclass(frozen=True, slots=True)
class MeterRoute:
    meter_id: str
    mall_id: str
    gateway_id: str
    account_id: str  # the merchant, or the mall's landlord account for common meters
    circuits: tuple[str, ...]  # circuit ids, in profile circuit order


@dataclass(frozen=True)
class CollectorPlan:
    mall_id: str
    gateways: tuple[str, ...]  # ids of the gateways this collector owns
    devices: list[DeviceSpec]
    routes: dict[str, MeterRoute] = field(default_factory=dict)  # meter id -> route
    timeout_s: float = 1.0  # the slowest owned gateway's configured timeout

    def owns(self, meter_id: str) -> bool:
        return meter_id in self.routes

    def account_of(self, meter_id: str) -> str:
        return self.routes[meter_id].account_id

    def gateway_of(self, meter_id: str) -> str:
        return self.routes[meter_id].gateway_id

    def circuits_of(self, meter_id: str) -> tuple[str, ...]:
        return self.routes[meter_id].circuits

    def circuit_accounts(self) -> dict[str, str]:
        """circuit id -> account id, for every owned meter."""
        return {c: r.account_id for r in self.routes.values() for c in r.circuits}


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' with 0 <= i < n."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ValueError(f"shard {text!r}: expected i/n, e.g. 0/2") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need 0 <= i < n")
    return i, n


def select_gateways(mall: MallConfig, gateways: Sequence[str] | None = None,
                    shard: tuple[int, int] | None = None) -> list[Gateway]:
    """The mall's gateways this collector owns.

    A shard takes every n-th gateway in id order (round-robin balances small malls
    better than hashing). Adding a gateway can move others to another shard: restart all
    collectors of the mall after such a config change, or name gateways explicitly.
    """
    if gateways is not None and shard is not None:
        raise ValueError("give either gateways or a shard, not both")
    ordered = sorted(mall.gateways, key=lambda g: g.id)
    if gateways is not None:
        known = {g.id for g in ordered}
        unknown = sorted(set(gateways) - known)
        if unknown:
            raise ValueError(f"mall {mall.id}: unknown gateway(s) {unknown}; known: {sorted(known)}")
        wanted = set(gateways)
        return [g for g in ordered if g.id in wanted]
    if shard is not None:
        i, n = shard
        return [g for k, g in enumerate(ordered) if k % n == i]
    return ordered


def plan_mall(portfolio: Portfolio | str | Path, mall_id: str, *,
              gateways: Sequence[str] | None = None, shard: tuple[int, int] | str | None = None,
              interval_s: float | None = None) -> CollectorPlan:
    """DeviceSpecs and routes for one mall (or a shard of its gateways).

    interval_s overrides every meter's configured poll interval (demo, tests).
    """
    if not isinstance(portfolio, Portfolio):
        portfolio = load_portfolio(portfolio)
    mall = portfolio.mall(mall_id)
    if isinstance(shard, str):
        shard = parse_shard(shard)
    owned = {g.id: g for g in select_gateways(mall, gateways, shard)}
    landlord = landlord_account(mall.id)
    devices: list[DeviceSpec] = []
    routes: dict[str, MeterRoute] = {}
    for meter in mall.meters:
        gw = owned.get(meter.gateway)
        if gw is None:
            continue
        profile_circuits = load_profile(meter.model).circuits
        if len(meter.circuits) > len(profile_circuits):
            raise ValueError(f"meter {meter.id}: {len(meter.circuits)} circuits configured, "
                             f"profile {meter.model} measures {len(profile_circuits)}")
        circuits = dict(zip(profile_circuits, (c.id for c in meter.circuits), strict=False))
        devices.append(DeviceSpec(meter.id, meter.model, gw.host, gw.port, meter.unit_id,
                                  interval_s if interval_s is not None else meter.poll_interval_s,
                                  circuits, gateway_id=gw.id))
        routes[meter.id] = MeterRoute(meter.id, mall.id, gw.id, meter.account or landlord,
                                      tuple(circuits.values()))
    timeout = max((g.timeout_s for g in owned.values()), default=1.0)
    return CollectorPlan(mall.id, tuple(sorted(owned)), devices, routes, timeout)


__all__ = ["CollectorPlan", "MeterRoute", "parse_shard", "plan_mall", "select_gateways"]
