"""Statements of closed periods for the portal, made by the bills' own code.

The figures come from `pipelines.bills.statements.build_statement` (the function behind
`mallwatt bills statement` and the ERP export) over the account's ledger rows from the
warehouse; the portal computes no money of its own. A period is served only once the ledger
watermark has passed its end (`pipelines.bills.periods.require_closed`), so a statement never
changes after it is first shown: documents are cached (bounded LRU) per account and period.

`StatementSource` is the warehouse seam (tests give a list of ledger rows); the warehouse
implementation reads two named queries, sql/queries/portal_account_*.sql.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from pipelines.bills.periods import Period, parse_period, require_closed
from pipelines.bills.statements import NO_EARLIER_ENTRY, Opening, build_statement

MAX_LISTED = 24  # months listed (two years); older ones stay reachable by their period
CACHE = 2_000  # statement documents kept (a document is a few kB)


@dataclass(frozen=True)
class AccountSpan:
    """An account's ledger before a point in time."""

    entries: int
    first_ts_ms: int | None
    opening: Opening  # the balance after the last of those entries


class StatementSource(Protocol):
    def complete_until_ms(self) -> int | None: ...

    def entries(self, account_id: str, start_ms: int, end_ms: int) -> list[Mapping[str, Any]]: ...

    def span(self, account_id: str, before_ms: int) -> AccountSpan: ...


class WarehouseSource:
    """The warehouse (chDB folder or server, routed by infra.warehouse)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = path

    def complete_until_ms(self) -> int | None:
        from pipelines.bills import warehouse_io

        return warehouse_io.complete_until_ms(warehouse_io.LEDGER_TOPIC, self.path)

    def entries(self, account_id: str, start_ms: int, end_ms: int) -> list[Mapping[str, Any]]:
        from infra.warehouse import run_named_query

        return run_named_query("portal_account_entries", {"account_id": account_id, "start_ms": start_ms,
                                                          "end_ms": end_ms}, path=self.path).to_dicts()

    def span(self, account_id: str, before_ms: int) -> AccountSpan:
        from infra.warehouse import run_named_query

        rows = run_named_query("portal_account_span", {"account_id": account_id, "before_ms": before_ms},
                               path=self.path).to_dicts()
        row = rows[0] if rows else {"entries": 0}
        if not row.get("entries"):
            return AccountSpan(0, None, Opening(0, NO_EARLIER_ENTRY))
        return AccountSpan(int(row["entries"]), int(row["first_ts_ms"]),
                           Opening(int(row["last_balance_minor"]), str(row["last_entry_id"])))


class EntriesSource:
    """Ledger rows in memory (tests, and any caller that already holds them)."""

    def __init__(self, rows: list[Mapping[str, Any]], complete_until_ms: int | None) -> None:
        self.rows, self.watermark = rows, complete_until_ms

    def complete_until_ms(self) -> int | None:
        return self.watermark

    def entries(self, account_id: str, start_ms: int, end_ms: int) -> list[Mapping[str, Any]]:
        return [r for r in self.rows if r["account_id"] == account_id and start_ms <= int(r["ts_ms"]) < end_ms]

    def span(self, account_id: str, before_ms: int) -> AccountSpan:
        from pipelines.bills.statements import opening_from_entries

        mine = [r for r in self.rows if r["account_id"] == account_id and int(r["ts_ms"]) < before_ms]
        first = min((int(r["ts_ms"]) for r in mine), default=None)
        return AccountSpan(len(mine), first, opening_from_entries(mine))


class Statements:
    """Listing and building an account's statements (blocking: call from a worker thread)."""

    def __init__(self, source: StatementSource, cache_size: int = CACHE) -> None:
        self.source = source
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()

    def periods(self, account_id: str, tz: str, now_ms: int) -> dict[str, Any]:
        """Closed months with ledger entries of this account, newest first."""
        watermark = self.source.complete_until_ms()
        zone = ZoneInfo(tz)
        current = datetime.fromtimestamp(now_ms / 1000, zone).date().replace(day=1)
        found = self.source.span(account_id, period_of(current).end_ms(tz))
        months: list[dict[str, Any]] = []
        if found.first_ts_ms is not None and watermark is not None:
            month = period_of(datetime.fromtimestamp(found.first_ts_ms / 1000, zone).date().replace(day=1))
            while month.first_day <= current and len(months) < 10 * MAX_LISTED:
                if month.end_ms(tz) <= watermark:
                    months.append({"period": month.label, "period_kind": month.kind,
                                   "start_ms": month.start_ms(tz), "end_ms": month.end_ms(tz)})
                month = period_of(month.end_day)
        return {"account_id": account_id, "complete_until_ms": watermark, "timezone": tz,
                "statements": months[::-1][:MAX_LISTED]}

    def statement(self, account_id: str, mall_id: str, tz: str, label: str, *, merchant_name: str = "",
                  currency: str = "CNY") -> dict[str, Any]:
        """The bills' statement document. Raises ValueError (bad period), PeriodOpen (not closed)
        and StatementError (the ledger does not add up)."""
        period = parse_period(label)
        key = (account_id, period.label)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        require_closed(period, tz, self.source.complete_until_ms())
        start, end = period.start_ms(tz), period.end_ms(tz)
        opening = self.source.span(account_id, start).opening
        rows = self.source.entries(account_id, start, end)
        doc = build_statement(account_id, mall_id, period, tz, rows, opening, merchant_name=merchant_name,
                              currency=currency).to_document()
        self._cache[key] = doc
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return doc


def period_of(first_day: date) -> Period:
    return parse_period(first_day.strftime("%Y-%m"))
