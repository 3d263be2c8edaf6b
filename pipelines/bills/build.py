"""A period's bills for a portfolio: statements, mall summaries and pool allocations.

`bills_from_entries` is pure (ledger rows in); `load_bills` reads the warehouse after checking
that the period is closed. Both give identical output for identical ledger contents.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipelines.bills import warehouse_io
from pipelines.bills.allocation import Allocation, allocate_mall
from pipelines.bills.periods import Period, require_closed
from pipelines.bills.statements import (
    NO_EARLIER_ENTRY,
    Opening,
    Statement,
    build_statement,
    mall_summary,
)
from pipelines.context import landlord_account
from pipelines.portfolio import MallConfig, Portfolio


@dataclass(frozen=True)
class PeriodBills:
    period: Period
    statements: list[Statement]
    summaries: list[dict[str, Any]]
    allocations: list[Allocation]


def _malls(portfolio: Portfolio, mall_id: str | None) -> list[MallConfig]:
    return [portfolio.mall(mall_id)] if mall_id else sorted(portfolio.malls, key=lambda m: m.id)


def bills_from_entries(portfolio: Portfolio, period: Period, entries: list[Mapping[str, Any]],
                       openings: Mapping[str, Opening], mall_id: str | None = None,
                       circuit_wh: Mapping[str, int] | None = None) -> PeriodBills:
    """Statements, summaries and pool allocations of a period. `circuit_wh`: billed Wh per
    circuit (interval facts) for consumption shares; None: from the ledger's charges."""
    statements: list[Statement] = []
    summaries, allocations = [], []
    for mall in _malls(portfolio, mall_id):
        start, end = period.start_ms(mall.timezone), period.end_ms(mall.timezone)
        rows = [e for e in entries if e["mall_id"] == mall.id and start <= int(e["ts_ms"]) < end]
        names = {m.id: m.name for m in mall.merchants}
        landlord = landlord_account(mall.id)
        names[landlord] = f"{mall.name} (landlord)"
        accounts = sorted(set(names) | {str(e["account_id"]) for e in rows})
        mall_statements = []
        for account in accounts:
            # no earlier entry: 0 (a configured opening balance is the first period's opening_balance line)
            opening = openings.get(account) or Opening(0, NO_EARLIER_ENTRY)
            mall_statements.append(build_statement(account, mall.id, period, mall.timezone, rows, opening,
                                                   merchant_name=names.get(account, ""), currency=portfolio.currency))
        statements += mall_statements
        summaries.append(mall_summary(mall.id, period.label, mall_statements))
        allocations += allocate_mall(mall, period.label, rows, circuit_wh=circuit_wh)
    return PeriodBills(period, statements, summaries, allocations)


def load_bills(portfolio: Portfolio, period: Period, *, mall_id: str | None = None,
               path: str | os.PathLike[str] | None = None, check_closed: bool = True) -> PeriodBills:
    """Read the period's ledger from the warehouse and build its bills (closed periods only)."""
    watermark = warehouse_io.complete_until_ms(warehouse_io.LEDGER_TOPIC, path) if check_closed else None
    entries: list[dict[str, Any]] = []
    openings: dict[str, Opening] = {}
    circuit_wh: dict[str, int] = {}
    for mall in _malls(portfolio, mall_id):
        if check_closed:
            require_closed(period, mall.timezone, watermark)
        start, end = period.start_ms(mall.timezone), period.end_ms(mall.timezone)
        entries += warehouse_io.period_entries(start, end, mall.id, path)
        openings |= warehouse_io.openings_at(start, mall.id, path)
        circuit_wh |= warehouse_io.circuit_energy_wh(start, end, mall.id, path)
    return bills_from_entries(portfolio, period, entries, openings, mall_id, circuit_wh)
