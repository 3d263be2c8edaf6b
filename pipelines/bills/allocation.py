"""Common-area cost sharing: a pool's cost split among tenants in exact minor units.

Shares are exact fractions (config floats are read through their decimal text, never as
binary floats). The rounding rule, the only one:

    every line gets floor(cost * share); the residue (cost minus the sum of floors, always
    smaller than the number of lines) goes one minor unit at a time to the lines with the
    largest fractional remainders, ties broken by unit id in ascending order
    (largest-remainder / Hamilton method).

So the lines always add up to the pool cost exactly. Lines are tenants (billed), vacant
units (their share stays with the landlord, shown as a line of its own) and
"unallocated" (what no method assigned: fixed percentages below 100 %, excluded fixed
shares, a consumption pool nobody used); the last two post no ledger entry because the
pool's energy was charged to the landlord account in the first place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

from pipelines.context import landlord_account
from pipelines.portfolio import MallConfig, PoolMethod, SharedPool

SHARE_PLACES = Decimal("0.000001")


@dataclass(frozen=True)
class Unit:
    """A leasable unit (merchant) as the allocation sees it."""

    merchant_id: str
    leased_area_m2: float
    vacant: bool = False
    consumption_wh: int = 0  # sub-metered energy in the period (CONSUMPTION / MIX methods)


@dataclass(frozen=True)
class AllocationLine:
    unit_id: str  # merchant id, or the landlord account for "unallocated"
    account_id: str  # who pays: the merchant, or the landlord for vacant / unallocated
    role: str  # "tenant" | "vacant" | "unallocated"
    share: Fraction
    amount_minor: int

    @property
    def share_text(self) -> str:
        return share_text(self.share)


@dataclass(frozen=True)
class Allocation:
    mall_id: str
    pool_id: str
    pool_name: str
    method: str
    period: str
    cost_minor: int
    energy_wh: int
    lines: tuple[AllocationLine, ...]

    @property
    def landlord(self) -> str:
        return landlord_account(self.mall_id)

    def tenant_total(self) -> int:
        return sum(x.amount_minor for x in self.lines if x.role == "tenant")


def share_text(share: Fraction) -> str:
    """A share for display (6 places, half up); the amounts use the exact fraction."""
    return str((Decimal(share.numerator) / Decimal(share.denominator)).quantize(SHARE_PLACES, ROUND_HALF_UP))


def _exact(value: float) -> Fraction:
    return Fraction(str(value))


def _proportional(units: list[Unit], weight: Mapping[str, Fraction]) -> dict[str, Fraction]:
    total = sum((weight[u.merchant_id] for u in units), Fraction(0))
    if total <= 0:
        return {}
    return {u.merchant_id: weight[u.merchant_id] / total for u in units if weight[u.merchant_id] > 0}


def method_shares(method: PoolMethod, pool: SharedPool, units: list[Unit]) -> dict[str, Fraction]:
    """Shares per participating unit for one method; they add up to at most 1."""
    if method == PoolMethod.AREA:
        return _proportional(units, {u.merchant_id: _exact(u.leased_area_m2) for u in units})
    if method == PoolMethod.CONSUMPTION:
        return _proportional(units, {u.merchant_id: Fraction(max(u.consumption_wh, 0)) for u in units})
    if method == PoolMethod.FIXED:
        present = {u.merchant_id for u in units}
        shares = {m: _exact(p) / 100 for m, p in pool.fixed_shares.items() if m in present and p > 0}
        if sum(shares.values(), Fraction(0)) > 1 or any(p < 0 for p in pool.fixed_shares.values()):
            raise ValueError(f"pool {pool.id}: fixed shares must be >= 0 and add up to at most 100 %")
        return shares
    if method == PoolMethod.MIX:
        weights = {m: _exact(w) for m, w in pool.mix_weights.items() if w > 0}
        if not weights or PoolMethod.MIX in weights or any(w < 0 for w in pool.mix_weights.values()):
            raise ValueError(f"pool {pool.id}: mix needs positive weights of area/fixed/consumption")
        total_w = sum(weights.values(), Fraction(0))
        out: dict[str, Fraction] = {}
        for m, w in sorted(weights.items()):
            for unit_id, s in method_shares(m, pool, units).items():
                out[unit_id] = out.get(unit_id, Fraction(0)) + s * w / total_w
        return out
    raise ValueError(f"unknown pool method {method!r}")


def largest_remainder(total: int, shares: Mapping[str, Fraction]) -> dict[str, int]:
    """Split `total` minor units by shares that add up to exactly 1 (see the module doc)."""
    if sum(shares.values(), Fraction(0)) != 1:
        raise ValueError("shares must add up to exactly 1")
    exact = {k: total * s for k, s in shares.items()}
    floors = {k: v.numerator // v.denominator for k, v in exact.items()}
    residue = total - sum(floors.values())
    order = sorted(shares, key=lambda k: (-(exact[k] - floors[k]), k))
    for k in order[:residue]:
        floors[k] += 1
    return floors


def allocate(mall_id: str, pool: SharedPool, period: str, cost_minor: int, units: Iterable[Unit],
             energy_wh: int = 0) -> Allocation:
    """One pool's cost for one period split over the mall's units (pure)."""
    if cost_minor < 0:
        raise ValueError(f"pool {pool.id}: negative cost {cost_minor}")
    excluded = set(pool.exclude)
    # Excluded tenants leave the pool and its denominator; vacant units stay in it.
    members = sorted((u for u in units if u.merchant_id not in excluded), key=lambda u: u.merchant_id)
    shares = method_shares(pool.method, pool, members)
    landlord = landlord_account(mall_id)
    vacant = {u.merchant_id for u in members if u.vacant}
    line_shares = {k: s for k, s in shares.items() if s > 0}
    rest = 1 - sum(line_shares.values(), Fraction(0))
    if rest < 0:
        raise ValueError(f"pool {pool.id}: shares add up to more than 1")
    if rest > 0:
        line_shares[landlord] = rest
    amounts = largest_remainder(cost_minor, line_shares)
    lines = []
    for unit_id in sorted(line_shares):
        if unit_id == landlord:
            role, account = "unallocated", landlord
        else:
            role, account = ("vacant", landlord) if unit_id in vacant else ("tenant", unit_id)
        lines.append(AllocationLine(unit_id, account, role, line_shares[unit_id], amounts[unit_id]))
    return Allocation(mall_id, pool.id, pool.name, pool.method.value, period, cost_minor, energy_wh, tuple(lines))


# --- from ledger data -------------------------------------------------------------------------


def pool_circuits(mall: MallConfig, pool: SharedPool) -> set[str]:
    meters = set(pool.meters)
    return {c.id for m in mall.meters if m.id in meters for c in m.circuits}


def pool_cost(entries: Iterable[Mapping[str, Any]], mall: MallConfig, pool: SharedPool) -> tuple[int, int]:
    """(cost in minor units, energy Wh) of a pool: the landlord's charges on the pool's circuits.

    `entries` are ledger rows of the period; the caller picks the period.
    """
    landlord, circuits = landlord_account(mall.id), pool_circuits(mall, pool)
    cost = wh = 0
    for e in entries:
        if e["account_id"] == landlord and e["kind"] == "charge" and e.get("circuit_id") in circuits:
            cost -= int(e["amount_minor"])
            wh += int(e.get("energy_wh") or 0)
    return cost, wh


def tenant_consumption(entries: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Wh per account from charge entries (charges that posted 0 minor units are not in the ledger)."""
    out: dict[str, int] = {}
    for e in entries:
        if e["kind"] == "charge":
            out[e["account_id"]] = out.get(e["account_id"], 0) + int(e.get("energy_wh") or 0)
    return out


def merchant_energy(mall: MallConfig, circuit_wh: Mapping[str, int]) -> dict[str, int]:
    """Billed Wh per merchant account from billed Wh per circuit (the interval facts)."""
    out: dict[str, int] = {}
    for meter in mall.meters:
        if meter.account is not None:
            wh = sum(int(circuit_wh.get(c.id, 0)) for c in meter.circuits)
            out[meter.account] = out.get(meter.account, 0) + wh
    return out


def allocate_mall(mall: MallConfig, period: str, entries: list[Mapping[str, Any]],
                  consumption_wh: Mapping[str, int] | None = None,
                  circuit_wh: Mapping[str, int] | None = None) -> list[Allocation]:
    """Every pool of a mall for one period from that period's ledger rows (the pool's cost).

    `circuit_wh`: billed Wh per circuit in the period from the interval facts
    (`warehouse_io.circuit_energy_wh`); when given, consumption shares and the pool's energy
    come from it (every billed Wh, also of charges that posted 0 minor units), else from the
    ledger's charge entries."""
    if consumption_wh is None:
        consumption_wh = merchant_energy(mall, circuit_wh) if circuit_wh is not None else tenant_consumption(entries)
    units = [Unit(m.id, m.leased_area_m2, m.vacant, consumption_wh.get(m.id, 0)) for m in mall.merchants]
    out = []
    for pool in sorted(mall.pools, key=lambda p: p.id):
        cost, wh = pool_cost(entries, mall, pool)
        if circuit_wh is not None:
            wh = sum(int(circuit_wh.get(c, 0)) for c in sorted(pool_circuits(mall, pool)))
        out.append(allocate(mall.id, pool, period, cost, units, wh))
    return out


# --- ledger postings --------------------------------------------------------------------------


def source_id(alloc: Allocation) -> str:
    # '|' cannot occur in ids (portfolio Identifier pattern), so statements can split it.
    return f"{alloc.pool_id}|{alloc.method}|{alloc.period}|{alloc.cost_minor}"


def parse_source_id(text: str) -> dict[str, Any] | None:
    parts = text.split("|")
    if len(parts) != 4:
        return None
    return {"pool_id": parts[0], "method": parts[1], "period": parts[2], "pool_cost_minor": int(parts[3])}


def allocation_postings(alloc: Allocation, posted_at_ms: int) -> list[dict[str, Any]]:
    """The SharedCostPosting records (docs/bills.md) that put an allocation on the ledger.

    Tenants are debited their amount; the landlord is credited what the tenants carry (its
    own charges for the pool's circuits stay, so it keeps exactly the vacant and unallocated
    part). Entry ids are `<account>:shr:<pool>:<period>`: posting twice credits once.
    Zero amounts post nothing. The wallet fills in balance_after.
    """
    def posting(account: str, amount: int, share: Fraction) -> dict[str, Any]:
        return {"entry_id": f"{account}:shr:{alloc.pool_id}:{alloc.period}", "account_id": account,
                "mall_id": alloc.mall_id, "kind": "shared_cost", "amount_minor": amount, "ts_ms": posted_at_ms,
                "source_id": source_id(alloc), "rate": share_text(share)}

    out = [posting(x.account_id, -x.amount_minor, x.share)
           for x in alloc.lines if x.role == "tenant" and x.amount_minor]
    recovered = alloc.tenant_total()
    if recovered:
        tenant_share = sum((x.share for x in alloc.lines if x.role == "tenant"), Fraction(0))
        out.append(posting(alloc.landlord, recovered, tenant_share))
    return sorted(out, key=lambda p: p["entry_id"])
