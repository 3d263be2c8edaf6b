"""Merchant statements (daily or monthly) built from ledger entries, and the mall summary.

A statement is the account's ledger for one period, grouped into lines. Every line lists
the entry ids it came from, and ``opening + sum(movement lines) == closing`` is checked
against the ledger's own ``balance_after_minor``: a statement that does not add up raises
`StatementError` instead of being printed.

The opening balance is the ``balance_after_minor`` of the account's last entry before the
period (by ts, then entry_id, as the warehouse orders it), or 0 when the account has no
earlier entry: a configured opening balance is a ledger entry of its own (kind
``opening_balance``), so it appears as a line of the first period. Debt-register movements
(``debt_opening``, ``debt_add``, ``debt_writeoff``) are lines of amount 0 whose detail carries
the debt change; recoveries are ``debt_recovery`` lines that move both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pipelines.bills.allocation import parse_source_id
from pipelines.bills.periods import Period
from pipelines.bills.render import money

# Statement sections in print order; ledger kinds map onto them.
SECTIONS = ("opening", "opening_balance", "topup", "reversal", "refund", "energy", "standing_charge", "shared_cost",
            "adjustment", "debt", "debt_recovery", "emergency_credit", "other")
KIND_SECTION = {"opening_balance": "opening_balance", "debt_opening": "debt", "debt_add": "debt",
                "debt_writeoff": "debt", "topup": "topup", "reversal": "reversal", "refund": "refund", "charge": "energy",
                "standing_charge": "standing_charge", "shared_cost": "shared_cost", "adjustment": "adjustment",
                "debt_recovery": "debt_recovery", "emergency_credit_draw": "emergency_credit",
                "emergency_credit_repay": "emergency_credit"}


class StatementError(ValueError):
    """The ledger does not add up for this account and period."""


@dataclass(frozen=True)
class Opening:
    balance_minor: int
    ref: str  # entry id whose balance_after it is, or "config:opening_balance_minor"


@dataclass(frozen=True)
class Line:
    line_id: str
    section: str
    description: str
    amount_minor: int
    entry_ids: tuple[str, ...] = ()
    kwh: str | None = None  # exact decimal text, 3 places
    rate: str | None = None  # minor units per kWh (energy) or pool share (shared cost)
    tou_period: str | None = None
    tier: int | None = None
    quantity: int = 1  # entries (energy, standing days)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"line_id": self.line_id, "section": self.section, "description": self.description,
                "amount_minor": self.amount_minor, "kwh": self.kwh, "rate": self.rate,
                "tou_period": self.tou_period, "tier": self.tier, "quantity": self.quantity,
                "detail": dict(sorted(self.detail.items())), "entry_ids": list(self.entry_ids)}


@dataclass(frozen=True)
class Statement:
    doc_id: str
    account_id: str
    mall_id: str
    merchant_name: str
    period: str
    period_kind: str
    currency: str
    opening_minor: int
    closing_minor: int
    lines: tuple[Line, ...]

    def section_totals(self) -> dict[str, int]:
        out = dict.fromkeys(SECTIONS, 0)
        for line in self.lines:
            out[line.section] += line.amount_minor
        return out

    def energy_kwh(self) -> Decimal:
        return sum((Decimal(x.kwh) for x in self.lines if x.kwh), Decimal(0))

    def to_document(self) -> dict[str, Any]:
        return {"doc_id": self.doc_id, "doc_type": "statement", "refers_to": None,
                "account_id": self.account_id, "mall_id": self.mall_id, "merchant_name": self.merchant_name,
                "period": self.period, "period_kind": self.period_kind, "currency": self.currency,
                "opening_minor": self.opening_minor, "closing_minor": self.closing_minor,
                "net_minor": self.closing_minor - self.opening_minor,
                "lines": [x.to_dict() for x in self.lines]}


def statement_id(account_id: str, period: str) -> str:
    return f"ST-{period}-{account_id}"


def _kwh(wh: int) -> str:
    return str((Decimal(wh) / 1000).quantize(Decimal("0.001")))


def _order(e: Mapping[str, Any]) -> tuple[int, str]:
    return int(e["ts_ms"]), str(e["entry_id"])


NO_EARLIER_ENTRY = "ledger:none"


def opening_from_entries(before: Iterable[Mapping[str, Any]]) -> Opening:
    """The opening balance from the account's entries before the period (0 without any)."""
    last = max(before, key=_order, default=None)
    if last is None:
        return Opening(0, NO_EARLIER_ENTRY)
    return Opening(int(last["balance_after_minor"]), str(last["entry_id"]))


def _energy_lines(doc: str, entries: list[Mapping[str, Any]]) -> list[Line]:
    groups: dict[tuple[str, int, str], list[Mapping[str, Any]]] = {}
    for e in entries:
        key = (e.get("tou_period") or "-", int(e.get("tier") or 0), e.get("rate") or "-")
        groups.setdefault(key, []).append(e)
    out = []
    for (tou, tier, rate), es in sorted(groups.items()):
        wh = sum(int(e.get("energy_wh") or 0) for e in es)
        est = sum(1 for e in es if e.get("estimated"))
        out.append(Line(f"{doc}/energy:{tou}:{tier}:{rate}", "energy",
                        f"Energy {tou} tier {tier}: {_kwh(wh)} kWh @ {rate}/kWh",
                        sum(int(e["amount_minor"]) for e in es), tuple(sorted(e["entry_id"] for e in es)),
                        _kwh(wh), rate, tou, tier, len(es), {"estimated_entries": est} if est else {}))
    return out


def _shared_lines(doc: str, entries: list[Mapping[str, Any]]) -> list[Line]:
    out = []
    for e in sorted(entries, key=lambda e: e["entry_id"]):
        src = parse_source_id(str(e.get("source_id") or "")) or {}
        pool, covered = src.get("pool_id", "?"), src.get("period", "?")
        credit = int(e["amount_minor"]) > 0
        what = "tenants' share" if credit else "share"
        cost = src.get("pool_cost_minor")
        out.append(Line(f"{doc}/shared:{pool}:{covered}", "shared_cost",
                        f"Common area {pool} {covered}: {src.get('method', '?')}, {what} {e.get('rate')} "
                        f"of {'?' if cost is None else money(cost)}",
                        int(e["amount_minor"]), (str(e["entry_id"]),), rate=e.get("rate"), detail=src))
    return out


_DEBT_WORDS = {"debt_opening": "Arrears carried over", "debt_add": "Debt added", "debt_writeoff": "Debt written off",
               "debt_recovery": "Debt recovered"}


def _debt_line(doc: str, e: Mapping[str, Any]) -> Line:
    """A debt movement: its balance effect as the amount, the debt change in the detail."""
    change = e.get("debt_change_minor")
    kind = str(e["kind"])
    words = _DEBT_WORDS.get(kind, kind)
    text = f"{words} {e.get('source_id') or ''}".strip()
    if change is not None:
        text += f" (debt {'+' if int(change) > 0 else '-'}{money(abs(int(change)))})"
    detail = {} if change is None else {"debt_change_minor": int(change)}
    return Line(f"{doc}/{kind}:{e['entry_id']}", KIND_SECTION[kind], text, int(e["amount_minor"]),
                (str(e["entry_id"]),), detail=detail)


def build_statement(account_id: str, mall_id: str, period: Period, tz: str, entries: Iterable[Mapping[str, Any]],
                    opening: Opening, *, merchant_name: str = "", currency: str = "CNY") -> Statement:
    """One account's statement for one period from ledger rows (others are ignored)."""
    start, end = period.start_ms(tz), period.end_ms(tz)
    mine = sorted((e for e in entries if e["account_id"] == account_id and start <= int(e["ts_ms"]) < end),
                  key=_order)
    doc = statement_id(account_id, period.label)
    by_section: dict[str, list[Mapping[str, Any]]] = {}
    for e in mine:
        by_section.setdefault(KIND_SECTION.get(str(e["kind"]), "other"), []).append(e)
    lines = [Line(f"{doc}/opening", "opening", "Opening balance", opening.balance_minor, (opening.ref,))]
    for section in SECTIONS[1:]:
        es = by_section.get(section, [])
        if not es:
            continue
        if section == "energy":
            lines += _energy_lines(doc, es)
        elif section == "shared_cost":
            lines += _shared_lines(doc, es)
        elif section in ("debt", "debt_recovery"):
            lines += [_debt_line(doc, e) for e in es]
        elif section == "standing_charge":
            lines.append(Line(f"{doc}/standing", section, f"Standing charges, {len(es)} day(s)",
                              sum(int(e["amount_minor"]) for e in es), tuple(e["entry_id"] for e in es),
                              quantity=len(es)))
        else:
            lines += [Line(f"{doc}/{e['kind']}:{e['entry_id']}", section, f"{e['kind']} {e.get('source_id') or ''}".strip(),
                           int(e["amount_minor"]), (str(e["entry_id"]),)) for e in es]
    closing = int(mine[-1]["balance_after_minor"]) if mine else opening.balance_minor
    total = sum(x.amount_minor for x in lines)
    if total != closing:
        raise StatementError(
            f"{doc}: opening {opening.balance_minor} + movements {total - opening.balance_minor} = {total}, "
            f"but the ledger's closing balance is {closing} (last entry {mine[-1]['entry_id'] if mine else '-'})")
    return Statement(doc, account_id, mall_id, merchant_name, period.label, period.kind, currency,
                     opening.balance_minor, closing, tuple(lines))


def mall_summary(mall_id: str, period: str, statements: Iterable[Statement]) -> dict[str, Any]:
    """Portfolio figures for one mall and period, from its statements."""
    sts = [s for s in statements if s.mall_id == mall_id]
    sections = dict.fromkeys(SECTIONS[1:], 0)
    kwh = Decimal(0)
    for s in sts:
        for k, v in s.section_totals().items():
            if k != "opening":
                sections[k] += v
        kwh += s.energy_kwh()
    return {"mall_id": mall_id, "period": period, "accounts": len(sts),
            "opening_minor": sum(s.opening_minor for s in sts), "closing_minor": sum(s.closing_minor for s in sts),
            "energy_kwh": str(kwh), "sections_minor": sections,
            "negative_balances": sum(1 for s in sts if s.closing_minor < 0)}
