"""Billing periods in a mall's local time and the "is it closed yet" rule.

A period is a local calendar day (``2026-10-05``) or month (``2026-10``) in the mall's
zone, turned into a half-open UTC millisecond range ``[start_ms, end_ms)``. Bills are only
made for closed periods: the ledger watermark (the slowest ledger partition's newest event
time in `mallwatt.ingest_watermark`) must have reached ``end_ms``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo


class PeriodOpen(RuntimeError):
    """The warehouse is not complete up to the end of the requested period."""


@dataclass(frozen=True)
class Period:
    label: str  # "2026-10" or "2026-10-05"
    kind: str  # "month" | "day"
    first_day: date
    end_day: date  # exclusive

    def start_ms(self, tz: str) -> int:
        return _local_midnight_ms(self.first_day, tz)

    def end_ms(self, tz: str) -> int:
        return _local_midnight_ms(self.end_day, tz)

    def days(self) -> list[date]:
        n = (self.end_day - self.first_day).days
        return [self.first_day + timedelta(days=i) for i in range(n)]

    def previous(self) -> Period:
        return parse_period((self.first_day - timedelta(days=1)).strftime(
            "%Y-%m" if self.kind == "month" else "%Y-%m-%d"))


def _local_midnight_ms(d: date, tz: str) -> int:
    return int(datetime(d.year, d.month, d.day, tzinfo=ZoneInfo(tz)).timestamp() * 1000)


def parse_period(text: str) -> Period:
    if re.fullmatch(r"\d{4}-\d{2}", text):
        first = date.fromisoformat(text + "-01")
        end = date(first.year + first.month // 12, first.month % 12 + 1, 1)
        return Period(text, "month", first, end)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        first = date.fromisoformat(text)
        return Period(text, "day", first, first + timedelta(days=1))
    raise ValueError(f"period {text!r}: expected YYYY-MM (month) or YYYY-MM-DD (day)")


def require_closed(period: Period, tz: str, complete_until_ms: int | None, what: str = "ledger") -> None:
    """Raise PeriodOpen unless the warehouse is complete up to the period's end."""
    end = period.end_ms(tz)
    if complete_until_ms is None or complete_until_ms < end:
        seen = "nothing" if complete_until_ms is None else datetime.fromtimestamp(
            complete_until_ms / 1000, ZoneInfo(tz)).isoformat()
        raise PeriodOpen(f"period {period.label} ({tz}) is not closed: the {what} watermark is at {seen}, "
                         f"bills need it at or past {datetime.fromtimestamp(end / 1000, ZoneInfo(tz)).isoformat()}")
