"""The portal's read model: per-account balance, activity, alerts, relay state and usage,
kept in memory from the stream's results (mallwatt.ledger, alerts, relay-commands).

Pure state: every method takes its time explicitly; the Kafka feed (pipelines.portal.feed)
calls the apply_* methods under its lock. Bounded per account: the last ACTIVITY entries, the
last ALERTS alerts, HOURS hourly usage buckets and DAYS daily totals, and SEEN recent entry
ids for deduplication (a replayed batch carries the same entry ids).
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from pipelines.portal.preferences import Preferences

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
ACTIVITY = 30  # money movements other than interval charges (top-ups, postings, fees)
CHARGES = 30  # most recent interval charges
ALERTS = 20
HOURS = 48  # today and yesterday in any time zone
DAYS = 35  # this month, and the recent consumption behind "days left"
SEEN = 256  # recent entry ids per account (as 64-bit hashes): a replay after a forwarder restart
# re-sends at most the forwarding window (10 min), far fewer of an account's entries than this
RECENT_DAYS = 7  # consumption window for the days-left estimate
#: Ledger kinds that are energy charges: usage by hour and TOU period comes from these.
CHARGE_KINDS = frozenset({"charge"})
#: Kinds that debit for consumption (the days-left rate): energy plus the daily standing charge.
SPEND_KINDS = frozenset({"charge", "standing_charge", "shared_cost"})


@dataclass(slots=True)
class AccountView:
    account_id: str
    mall_id: str
    balance_minor: int | None = None
    balance_ts_ms: int | None = None  # ledger time of the entry that set the balance
    applied_ms: int | None = None  # when the read model applied it (the "as of" the page shows)
    relay: str = "unknown"  # connected | disconnected | unknown, from the last relay command
    relay_ts_ms: int | None = None
    relay_reason: str | None = None
    # entries as tuples in ENTRY_FIELDS order (a dict per entry cost 3x the memory at 350k accounts)
    activity: deque[tuple[Any, ...]] = field(default_factory=lambda: deque(maxlen=ACTIVITY))
    charges: deque[tuple[Any, ...]] = field(default_factory=lambda: deque(maxlen=CHARGES))
    alerts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=ALERTS))
    # rows of HOUR_ROW: hour start (epoch ms), TOU period index (PERIODS), energy Wh, money minor
    hours: array[int] = field(default_factory=lambda: array("q"))
    # rows of DAY_ROW: local date (proleptic ordinal), energy Wh, money minor of charges, spend minor
    days: array[int] = field(default_factory=lambda: array("q"))
    first_spend_ms: int | None = None
    # hashes of the last SEEN entry ids, a ring (8 bytes each; the ids as strings cost ~85 kB per account)
    seen: array[int] = field(default_factory=lambda: array("q"))
    seen_next: int = 0


ENTRY_FIELDS = ("entry_id", "kind", "amount_minor", "balance_after_minor", "ts_ms", "source_id",
                "tou_period", "energy_wh", "interval_start_ms")
_TS, _SOURCE = ENTRY_FIELDS.index("ts_ms"), ENTRY_FIELDS.index("source_id")
_SAME = object()  # marks a source_id equal to the entry id
HOUR_ROW = DAY_ROW = 4  # flat int64 rows: a dict of lists per hour cost ~400 bytes, a row 32


def _row(rows: array[int], width: int, key: int, sub: int | None = None) -> int:
    """Index of the row with this key (and sub-key), newest rows first; -1 when absent."""
    for i in range(len(rows) - width, -1, -width):
        if rows[i] == key and (sub is None or rows[i + 1] == sub):
            return i
    return -1


def _keys(rows: array[int], width: int) -> list[int]:
    return sorted(set(rows[0::width]))


def _drop_oldest(rows: array[int], width: int, keep: int) -> None:
    """Keep the `keep` newest distinct keys (keys arrive nearly in order, not exactly)."""
    keys = _keys(rows, width)
    if len(keys) <= keep:
        return
    cut = keys[-keep]
    kept = [rows[i:i + width] for i in range(0, len(rows), width) if rows[i] >= cut]
    del rows[:]
    for row in kept:
        rows.extend(row)


class ReadModel:
    """Accounts' views; `mall_tz` gives each mall's zone (usage days and hours are local)."""

    def __init__(self, mall_tz: dict[str, str] | None = None, default_tz: str = "Asia/Shanghai") -> None:
        self.mall_tz = {m: ZoneInfo(tz) for m, tz in (mall_tz or {}).items()}
        self.default_tz = ZoneInfo(default_tz)
        self.accounts: dict[str, AccountView] = {}
        self.entries_applied = 0
        self.duplicates = 0
        # alert preferences of the accounts that saved some (mallwatt.alert-preferences)
        self.preferences: dict[str, Preferences] = {}
        self.periods: list[str] = []  # TOU period names, by the index the hour rows carry
        self._period_index: dict[str, int] = {}

    def period_index(self, name: str) -> int:
        found = self._period_index.get(name)
        if found is None:
            found = self._period_index[name] = len(self.periods)
            self.periods.append(name)
        return found

    def tz(self, mall_id: str) -> ZoneInfo:
        return self.mall_tz.get(mall_id, self.default_tz)

    def view(self, account_id: str, mall_id: str = "") -> AccountView:
        view = self.accounts.get(account_id)
        if view is None:
            view = self.accounts[account_id] = AccountView(account_id, mall_id)
        elif mall_id and not view.mall_id:
            view.mall_id = mall_id
        return view

    # --- applying the stream ------------------------------------------------------------

    def apply_entries(self, entries: list[dict[str, Any]], applied_ms: int) -> int:
        """LedgerEntry-shaped dicts in ledger order (schemas.ledger.batch_entries); returns how
        many were new. The newest entry consumed sets the balance: an account's entries reach
        the ledger topic in the order the wallet posted them (one partition), and an entry
        published again after a forwarder restart is dropped by its id."""
        new = 0
        for entry in entries:
            view = self.view(entry["account_id"], entry.get("mall_id") or "")
            digest = hash(entry["entry_id"])  # in-process only: str hashes are salted per process
            if digest in view.seen:
                self.duplicates += 1
                continue
            if len(view.seen) < SEEN:
                view.seen.append(digest)
            else:
                view.seen[view.seen_next] = digest
                view.seen_next = (view.seen_next + 1) % SEEN
            new += 1
            self._apply_one(view, entry, applied_ms)
        self.entries_applied += new
        return new

    def _apply_one(self, view: AccountView, entry: dict[str, Any], applied_ms: int) -> None:
        ts = int(entry["ts_ms"])
        # ledger order, not entry time: a top-up paid a second earlier than a charge already
        # posted still comes after it, and its balance_after includes that charge (an entry
        # time guard left such a top-up out of the balance shown)
        view.balance_minor = int(entry["balance_after_minor"])
        view.balance_ts_ms = ts
        view.applied_ms = applied_ms
        kind = entry["kind"]
        slim = list(map(entry.get, ENTRY_FIELDS))
        if slim[_SOURCE] == slim[0]:  # a charge's source is its own entry id: keep one string, not two
            slim[_SOURCE] = _SAME
        (view.charges if kind in CHARGE_KINDS else view.activity).append(tuple(slim))
        amount = int(entry["amount_minor"])
        if kind in SPEND_KINDS and amount < 0:
            view.first_spend_ms = ts if view.first_spend_ms is None else min(view.first_spend_ms, ts)
        at = entry.get("interval_start_ms")
        at = int(at) if at is not None else ts
        day = datetime.fromtimestamp(at / 1000, self.tz(view.mall_id)).date().toordinal()
        charge = kind in CHARGE_KINDS
        if not charge and not (kind in SPEND_KINDS and amount < 0):
            return
        d = _row(view.days, DAY_ROW, day)
        if d < 0:
            d = len(view.days)
            view.days.extend((day, 0, 0, 0))
        if kind in SPEND_KINDS and amount < 0:
            view.days[d + 3] += -amount
        if len(view.days) > DAYS * DAY_ROW:
            _drop_oldest(view.days, DAY_ROW, DAYS)
            d = _row(view.days, DAY_ROW, day)
        if not charge or d < 0:  # d < 0: an entry older than every day kept
            return
        wh = int(entry.get("energy_wh") or 0)
        view.days[d + 1] += wh
        view.days[d + 2] += -amount
        hour = at - at % HOUR_MS  # zones with whole-hour offsets (the TOU rule's own premise)
        period = self.period_index(entry.get("tou_period") or "unknown")
        h = _row(view.hours, HOUR_ROW, hour, period)
        if h < 0:
            h = len(view.hours)
            view.hours.extend((hour, period, 0, 0))
        view.hours[h + 2] += wh
        view.hours[h + 3] += -amount
        if len(view.hours) > HOURS * HOUR_ROW:
            _drop_oldest(view.hours, HOUR_ROW, HOURS)

    def apply_alert(self, alert: dict[str, Any]) -> None:
        account = alert.get("account_id")
        if not account:
            return  # meter or collector alerts without an account are the operators' business
        view = self.view(account, alert.get("mall_id") or "")
        if any(a["alert_id"] == alert["alert_id"] for a in view.alerts):
            return
        view.alerts.append({k: alert.get(k) for k in ("alert_id", "kind", "severity", "ts_ms", "message")})

    def apply_preferences(self, prefs: Preferences) -> bool:
        """Keep the newest record per account (the compacted topic replays them in any age order
        after a restart, and the portal applies its own write before the feed brings it back)."""
        current = self.preferences.get(prefs.account_id)
        if current is not None and current.updated_ms > prefs.updated_ms:
            return False
        self.preferences[prefs.account_id] = prefs
        return True

    def apply_relay_command(self, command: dict[str, Any]) -> None:
        account = command.get("account_id")
        if not account:
            return
        view = self.view(account, command.get("mall_id") or "")
        ts = int(command.get("cause_ts_ms") or command["issued_at_ms"])
        if view.relay_ts_ms is not None and ts < view.relay_ts_ms:
            return
        view.relay = "disconnected" if command["action"] == "TRIP" else "connected"
        view.relay_ts_ms, view.relay_reason = ts, command.get("reason")

    # --- queries ------------------------------------------------------------------------

    def balance(self, account_id: str, now_ms: int) -> dict[str, Any] | None:
        view = self.accounts.get(account_id)
        if view is None:
            return None
        return {"account_id": account_id, "mall_id": view.mall_id, "balance_minor": view.balance_minor,
                "balance_ts_ms": view.balance_ts_ms, "as_of_ms": view.applied_ms,
                "relay": {"state": view.relay, "ts_ms": view.relay_ts_ms, "reason": view.relay_reason},
                "days_left": self.days_left(account_id, now_ms)}

    def activity(self, account_id: str, limit: int = 20) -> list[dict[str, Any]]:
        view = self.accounts.get(account_id)
        if view is None:
            return []
        merged = sorted([*view.activity, *view.charges], key=lambda e: e[_TS], reverse=True)
        out = [dict(zip(ENTRY_FIELDS, e, strict=True)) for e in merged[:limit]]
        for e in out:
            if e["source_id"] is _SAME:
                e["source_id"] = e["entry_id"]
        return out

    def alerts(self, account_id: str) -> list[dict[str, Any]]:
        view = self.accounts.get(account_id)
        return sorted(view.alerts, key=lambda a: a["ts_ms"], reverse=True) if view else []

    def usage_today(self, account_id: str, now_ms: int) -> dict[str, Any]:
        """Today's (local) charges by hour and TOU period, kWh as decimal strings of Wh/1000."""
        view = self.accounts.get(account_id)
        tz = self.tz(view.mall_id if view else "")
        start = _local_day_start(now_ms, tz)
        hours: list[dict[str, Any]] = []
        periods: dict[str, list[int]] = {}
        rows = view.hours if view else array("q")
        cells = sorted((rows[i], self.periods[rows[i + 1]], rows[i + 2], rows[i + 3])
                       for i in range(0, len(rows), HOUR_ROW))
        for hour, period, wh, money in cells:
            if not start <= hour < start + DAY_MS + HOUR_MS:  # DST days are 23-25 h long
                continue
            if datetime.fromtimestamp(hour / 1000, tz).date() != datetime.fromtimestamp(start / 1000, tz).date():
                continue
            local_hour = datetime.fromtimestamp(hour / 1000, tz).hour
            hours.append({"hour": local_hour, "hour_start_ms": hour, "tou_period": period,
                          "energy_wh": wh, "kwh": _kwh(wh), "amount_minor": money})
            total = periods.setdefault(period, [0, 0])
            total[0] += wh
            total[1] += money
        return {"date": datetime.fromtimestamp(start / 1000, tz).date().isoformat(), "hours": hours,
                "by_period": [{"tou_period": p, "energy_wh": w, "kwh": _kwh(w), "amount_minor": m}
                              for p, (w, m) in sorted(periods.items())],
                "energy_wh": sum(w for w, _ in periods.values()),
                "amount_minor": sum(m for _, m in periods.values())}

    def usage_month(self, account_id: str, now_ms: int) -> dict[str, Any]:
        view = self.accounts.get(account_id)
        tz = self.tz(view.mall_id if view else "")
        month = datetime.fromtimestamp(now_ms / 1000, tz).date().isoformat()[:7]
        rows = view.days if view else array("q")
        dated = sorted((date.fromordinal(rows[i]).isoformat(), rows[i + 1], rows[i + 2])
                       for i in range(0, len(rows), DAY_ROW))
        days = [{"date": d, "energy_wh": wh, "kwh": _kwh(wh), "amount_minor": money}
                for d, wh, money in dated if d.startswith(month) and (wh or money)]
        return {"month": month, "days": days, "energy_wh": sum(d["energy_wh"] for d in days),
                "amount_minor": sum(d["amount_minor"] for d in days)}

    def days_left(self, account_id: str, now_ms: int) -> float | None:
        """Balance over the average daily spend of the last RECENT_DAYS local days (today
        included, pro rata to the time elapsed since spending was first seen). None when
        nothing was spent recently; 0 when the balance is gone."""
        view = self.accounts.get(account_id)
        if view is None or view.balance_minor is None:
            return None
        if view.balance_minor <= 0:
            return 0.0
        tz = self.tz(view.mall_id)
        today = datetime.fromtimestamp(now_ms / 1000, tz).date()
        first = (today - timedelta(days=RECENT_DAYS - 1)).toordinal()
        rows = view.days
        spent = sum(rows[i + 3] for i in range(0, len(rows), DAY_ROW) if first <= rows[i] <= today.toordinal())
        if spent <= 0 or view.first_spend_ms is None:
            return None
        window_start = _local_day_start(now_ms, tz) - (RECENT_DAYS - 1) * DAY_MS
        span_ms = now_ms - max(window_start, view.first_spend_ms)
        span_days = max(span_ms, HOUR_MS) / DAY_MS  # at least an hour: no wild rate from one entry
        return round(view.balance_minor / (spent / span_days), 1)

    def accounts_of_mall(self, mall_id: str) -> list[str]:
        return sorted(a for a, v in self.accounts.items() if v.mall_id == mall_id)


def _local_day_start(now_ms: int, tz: ZoneInfo) -> int:
    local = datetime.fromtimestamp(now_ms / 1000, tz)
    return int(local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)


def _kwh(wh: int) -> str:
    """Wh as an exact kWh decimal string (no binary float on the way)."""
    sign, wh = ("-", -wh) if wh < 0 else ("", wh)
    return f"{sign}{wh // 1000}.{wh % 1000:03d}"
