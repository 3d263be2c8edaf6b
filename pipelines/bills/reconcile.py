"""Reconciliation: does the money (and the energy) add up? A report of every mismatch.

Checks (each finding is a dict with check, mall_id, account_id, expected, actual, detail):

* ``balance``: for every account, configured opening + sum of all ledger amounts up to the
  period end == ``balance_after_minor`` of its last entry (by ts, then entry_id).
* ``sign``: credits and debits have the sign their kind promises (a positive "charge" is a bug).
* ``shared_cost``: each pool posting (same source id) moves money between accounts, never
  creates it: its entries sum to 0.
* ``collections``: when a payment-provider list is given, every provider payment has its
  ledger entry (``<account>:<kind>:<payment_id>``) with the same amount, and no top-up
  entry of the period is unknown to the provider.
* ``energy_loss``: when the mall has a main (utility) meter, the energy of all other
  circuits (tenants and common areas) against it: loss % outside [min, max] is a finding.

The report also carries the per-mall figures (collections vs deductions, energy) so finance
sees the numbers behind an empty mismatch list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from pipelines.portfolio import MallConfig

CREDIT_KINDS = {"topup", "emergency_credit_draw"}
DEBIT_KINDS = {"charge", "standing_charge", "debt_recovery", "emergency_credit_repay", "reversal", "refund"}
COLLECTION_KINDS = ("topup", "reversal", "refund")


@dataclass(frozen=True)
class AccountTotals:
    account_id: str
    mall_id: str
    entries: int
    sum_minor: int
    last_balance_minor: int
    last_entry_id: str


def account_totals(entries: Iterable[Mapping[str, Any]]) -> dict[str, AccountTotals]:
    """Per-account totals of ledger rows (the warehouse computes the same in SQL)."""
    acc: dict[str, list[Any]] = {}
    for e in entries:
        a = acc.setdefault(str(e["account_id"]), [str(e["mall_id"]), 0, 0, None])
        a[1] += 1
        a[2] += int(e["amount_minor"])
        key = (int(e["ts_ms"]), str(e["entry_id"]))
        if a[3] is None or key > a[3][0]:
            a[3] = (key, int(e["balance_after_minor"]))
    return {k: AccountTotals(k, v[0], v[1], v[2], v[3][1], v[3][0][1]) for k, v in acc.items()}


def _finding(check: str, mall_id: str | None, account_id: str | None, expected: Any, actual: Any,
             detail: str) -> dict[str, Any]:
    return {"check": check, "mall_id": mall_id, "account_id": account_id, "expected": expected,
            "actual": actual, "detail": detail}


def _pct(num: int, den: int) -> str:
    return str((Decimal(num) * 100 / Decimal(den)).quantize(Decimal("0.01"), ROUND_HALF_UP))


def energy_balance(mall: MallConfig, circuit_wh: Mapping[str, int]) -> dict[str, Any] | None:
    """Main meter vs everything metered below it, or None when the mall has no main meter."""
    if mall.main_meter is None:
        return None
    main = next(m for m in mall.meters if m.id == mall.main_meter)
    main_circuits = {c.id for c in main.circuits}
    main_wh = sum(circuit_wh.get(c, 0) for c in main_circuits)
    below = sum(circuit_wh.get(c.id, 0) for m in mall.meters if m.id != main.id for c in m.circuits)
    return {"mall_id": mall.id, "main_meter": main.id, "main_wh": main_wh, "metered_wh": below,
            "loss_wh": main_wh - below, "loss_pct": _pct(main_wh - below, main_wh) if main_wh else None}


def reconcile(period: str, totals: Mapping[str, AccountTotals], period_entries: list[Mapping[str, Any]], *,
              config_openings: Mapping[str, int] | None = None, malls: Iterable[MallConfig] = (),
              circuit_wh: Mapping[str, int] | None = None,
              provider_payments: Iterable[Mapping[str, Any]] | None = None,
              loss_pct_range: tuple[Decimal, Decimal] = (Decimal("-1"), Decimal("10"))) -> dict[str, Any]:
    """The reconciliation report of one period (pure).

    `totals`: per account, every entry up to the period end; `period_entries`: the period's
    rows; `provider_payments`: dicts with payment_id, account_id, kind, amount_minor.
    """
    openings = config_openings or {}
    findings: list[dict[str, Any]] = []
    for acct in sorted(totals):
        t = totals[acct]
        expected = openings.get(acct, 0) + t.sum_minor
        if expected != t.last_balance_minor:
            findings.append(_finding("balance", t.mall_id, acct, expected, t.last_balance_minor,
                                     f"opening {openings.get(acct, 0)} + {t.entries} entries sum {t.sum_minor} "
                                     f"!= balance_after of {t.last_entry_id}"))
    pools: dict[tuple[str, str], int] = {}
    flows: dict[str, dict[str, int]] = {}
    for e in sorted(period_entries, key=lambda e: str(e["entry_id"])):
        kind, amount, mall = str(e["kind"]), int(e["amount_minor"]), str(e["mall_id"])
        if (kind in CREDIT_KINDS and amount <= 0) or (kind in DEBIT_KINDS and amount >= 0):
            findings.append(_finding("sign", mall, e["account_id"], "credit" if kind in CREDIT_KINDS else "debit",
                                     amount, f"{e['entry_id']}: {kind} with amount {amount}"))
        if kind == "shared_cost":
            key = (mall, str(e["source_id"]))
            pools[key] = pools.get(key, 0) + amount
        f = flows.setdefault(mall, {"collections_minor": 0, "deductions_minor": 0, "other_minor": 0})
        if kind in COLLECTION_KINDS:
            f["collections_minor"] += amount
        elif amount < 0:
            f["deductions_minor"] += amount
        else:
            f["other_minor"] += amount
    for (mall, src), total in sorted(pools.items()):
        if total != 0:
            findings.append(_finding("shared_cost", mall, None, 0, total,
                                     f"pool posting {src} sums to {total}: money created or lost"))
    if provider_payments is not None:
        findings += _collections(provider_payments, period_entries)
    energy = []
    lo, hi = loss_pct_range
    for mall in sorted(malls, key=lambda m: m.id):
        row = energy_balance(mall, circuit_wh or {})
        if row is None:
            continue
        energy.append(row)
        pct = row["loss_pct"]
        if pct is None or not lo <= Decimal(pct) <= hi:
            findings.append(_finding("energy_loss", mall.id, None, f"{lo}..{hi} %", pct,
                                     f"main meter {row['main_wh']} Wh vs metered {row['metered_wh']} Wh"))
    return {"period": period, "mismatches": findings,
            "flows": [{"mall_id": m, **f} for m, f in sorted(flows.items())], "energy": energy,
            "accounts_checked": len(totals)}


def _collections(provider: Iterable[Mapping[str, Any]], entries: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    ledger = {str(e["entry_id"]): e for e in entries if e["kind"] in COLLECTION_KINDS}
    seen: set[str] = set()
    out = []
    for p in sorted(provider, key=lambda p: str(p["payment_id"])):
        kind = str(p.get("kind", "topup")).lower()
        eid = f"{p['account_id']}:{kind}:{p['payment_id']}"
        seen.add(eid)
        entry = ledger.get(eid)
        want = int(p["amount_minor"]) * (1 if kind == "topup" else -1)
        if entry is None:
            out.append(_finding("collections", None, p["account_id"], want, None,
                                f"provider payment {p['payment_id']} has no ledger entry {eid}"))
        elif kind != "reversal" and int(entry["amount_minor"]) != want:
            out.append(_finding("collections", entry["mall_id"], p["account_id"], want, entry["amount_minor"],
                                f"provider payment {p['payment_id']} booked with another amount"))
    for eid, entry in sorted(ledger.items()):
        if entry["kind"] == "topup" and eid not in seen:
            out.append(_finding("collections", entry["mall_id"], entry["account_id"], None, entry["amount_minor"],
                                f"ledger top-up {eid} unknown to the payment provider"))
    return out
