"""The portal's read model: per-account balance, activity, alerts, relay state and usage,
kept in memory from the stream's results (mallwatt.ledger, alerts, relay-commands).

Pure state: every method takes its time explicitly; the Kafka feed (pipelines.portal.feed)
calls the apply_* methods under its lock. Bounded per account: the last ACTIVITY entries, the
last ALERTS alerts, HOURS hourly usage buckets and DAYS daily totals, and SEEN recent entry
ids for deduplication (a replayed batch carries the same entry ids).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
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
SEEN = 512  # recent entry ids per account: a replay of a batch is far younger than this
RECENT_DAYS = 7  # consumption window for the days-left estimate
#: Ledger kinds that are energy charges: usage by hour and TOU period comes from these.
CHARGE_KINDS = frozenset({"charge"})
#: Kinds that debit for consumption (the days-left rate): energy plus the daily standing charge.
SPEND_KINDS = frozenset({"charge", "standing_charge", "shared_cost"})


@dataclass
class AccountView:
    account_id: str
    mall_id: str
    balance_minor: int | None = None
    balance_ts_ms: int | None = None  # ledger time of the entry that set the balance
    applied_ms: int | None = None  # when the read model applied it (the "as of" the page shows)
    relay: str = "unknown"  # connected | disconnected | unknown, from the last relay command
    relay_ts_ms: int | None = None
    relay_reason: str | None = None
    activity: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=ACTIVITY))
    charges: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=CHARGES))
    alerts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=ALERTS))
    # hour start (epoch ms) -> TOU period -> [energy Wh, money minor]
    hours: OrderedDict[int, dict[str, list[int]]] = field(default_factory=OrderedDict)
    # local date (ISO) -> [energy Wh, money minor of charges, spend minor]
    days: OrderedDict[str, list[int]] = field(default_factory=OrderedDict)
    first_spend_ms: int | None = None
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)


ENTRY_FIELDS = ("entry_id", "kind", "amount_minor", "balance_after_minor", "ts_ms", "source_id",
                "tou_period", "energy_wh", "interval_start_ms")


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
            entry_id = entry["entry_id"]
            if entry_id in view.seen:
                self.duplicates += 1
                continue
            view.seen[entry_id] = None
            if len(view.seen) > SEEN:
                view.seen.popitem(last=False)
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
        slim = {name: entry.get(name) for name in ENTRY_FIELDS}
        (view.charges if kind in CHARGE_KINDS else view.activity).append(slim)
        amount = int(entry["amount_minor"])
        if kind in SPEND_KINDS and amount < 0:
            view.first_spend_ms = ts if view.first_spend_ms is None else min(view.first_spend_ms, ts)
        at = entry.get("interval_start_ms")
        at = int(at) if at is not None else ts
        day = datetime.fromtimestamp(at / 1000, self.tz(view.mall_id)).date().isoformat()
        totals = view.days.get(day)
        if totals is None:
            totals = view.days[day] = [0, 0, 0]
            if len(view.days) > DAYS:
                # dates arrive nearly in order; drop the oldest date, not the first inserted
                del view.days[min(view.days)]
        if kind in SPEND_KINDS and amount < 0:
            totals[2] += -amount
        if kind not in CHARGE_KINDS:
            return
        wh = int(entry.get("energy_wh") or 0)
        totals[0] += wh
        totals[1] += -amount
        hour = at - at % HOUR_MS  # zones with whole-hour offsets (the TOU rule's own premise)
        bucket = view.hours.get(hour)
        if bucket is None:
            bucket = view.hours[hour] = {}
            if len(view.hours) > HOURS:
                del view.hours[min(view.hours)]
        cell = bucket.setdefault(entry.get("tou_period") or "unknown", [0, 0])
        cell[0] += wh
        cell[1] += -amount

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
        merged = sorted([*view.activity, *view.charges], key=lambda e: e["ts_ms"], reverse=True)
        return merged[:limit]

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
        for hour, bucket in sorted((view.hours if view else {}).items()):
            if not start <= hour < start + DAY_MS + HOUR_MS:  # DST days are 23-25 h long
                continue
            if datetime.fromtimestamp(hour / 1000, tz).date() != datetime.fromtimestamp(start / 1000, tz).date():
                continue
            local_hour = datetime.fromtimestamp(hour / 1000, tz).hour
            for period, (wh, money) in sorted(bucket.items()):
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
        days = [{"date": d, "energy_wh": t[0], "kwh": _kwh(t[0]), "amount_minor": t[1]}
                for d, t in sorted((view.days if view else {}).items()) if d.startswith(month)]
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
        first = (today - timedelta(days=RECENT_DAYS - 1)).isoformat()
        spent = sum(t[2] for d, t in view.days.items() if first <= d <= today.isoformat())
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
