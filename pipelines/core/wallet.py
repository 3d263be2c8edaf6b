"""Prepaid wallet: ledger entries, alerts and relay commands for one account, event by event.

Rounding rule (the only one): each account keeps ``acc_n``, the not-yet-posted part of its
exact energy charges in nano-minor units (0 <= acc_n < AMOUNT_SCALE). A charge adds its exact
amount to ``acc_n``, posts ``acc_n // AMOUNT_SCALE`` minor units and keeps the remainder. So the
sum of posted energy charges always equals floor(exact total) and never drifts, whatever the
batching. Every other movement is already in integer minor units.

``balance == sum(amount_minor of the account's ledger entries)`` holds after every event, and
``debt == sum(debt_change_minor)`` likewise: a movement of the separate debt register (opening
arrears, an operator's debt_add / debt_writeoff, a recovery) carries its change in
``debt_change_minor``; one that leaves the balance alone has ``amount_minor`` 0.
Entry ids derive from the input that caused them (interval key, payment id, local date), so a
replay yields identical ids. Nothing here reads a clock: the caller passes event timestamps,
and `evaluate_deferred` lets a timer re-check a trip deferred by a friendly-credit period.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from pipelines.core.models import AMOUNT_SCALE, PRICE_SCALE, AccountRating, FriendlyCredit, Tariff
from pipelines.core.tariff import TierCounter, local_day_start_ms, version_at

CREDIT_KINDS = ("topup",)


@dataclass(slots=True)
class AccountState:
    """Everything the wallet remembers about one account (plain data, serialisable)."""

    account_id: str
    balance: int = 0
    acc_n: int = 0  # unposted exact charge residue, nano-minor units
    debt: int = 0  # separate debt register recovered by DebtRecovery (set by migration/operator)
    ec_owed: int = 0  # emergency credit drawn and not yet repaid
    fired_levels: list[int] = field(default_factory=list)  # alert levels disarmed until a top-up
    warning_fired: bool = False
    warn_pending: bool = False  # warning trip wanted but deferred
    relay: str = "connected"  # connected | tripped (credit trips only; operator trips live elsewhere)
    trip_reason: str | None = None  # credit | warning
    deferred: bool = False  # credit trip wanted but held back by a friendly-credit period
    standing_day: str | None = None  # last local date charged its standing charge
    recovery_period: str | None = None
    recovered_in_period: int = 0
    # No payment, reversal or posting ids here: they are claimed once across the portfolio
    # before they reach the wallet (pipelines.core.claims), so this state stays O(1) over years.
    tier_month: int = 0
    tier_wh: int = 0
    # when the waiting trip was deferred (-1: none, or a state from before this field): its
    # friendly period's end is when it is due, whoever reaches that time (a charge, the timer)
    deferred_at: int = -1

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__} | {  # type: ignore[attr-defined]
            "fired_levels": list(self.fired_levels)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AccountState:
        return cls(**{**d, "fired_levels": list(d.get("fired_levels", []))})

    def copy(self) -> AccountState:
        """An independent copy (positional: this runs for every touched account of a batch)."""
        return AccountState(
            self.account_id, self.balance, self.acc_n, self.debt, self.ec_owed, list(self.fired_levels),
            self.warning_fired, self.warn_pending, self.relay, self.trip_reason, self.deferred, self.standing_day,
            self.recovery_period, self.recovered_in_period, self.tier_month, self.tier_wh, self.deferred_at)

    @property
    def tiers(self) -> TierCounter:
        return TierCounter(self.tier_month, self.tier_wh)


@dataclass(frozen=True, slots=True)
class Charge:
    ts_ms: int
    amount_n: int
    entry_id: str
    circuit_id: str | None = None
    meter_id: str | None = None
    start_ms: int | None = None
    energy_wh: int | None = None
    period: str | None = None
    tier: int | None = None
    price_u: int | None = None
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class Payment:
    payment_id: str
    ts_ms: int
    amount_minor: int
    kind: str = "topup"  # topup | reversal | refund
    reverses_payment_id: str | None = None


@dataclass(frozen=True, slots=True)
class Posting:
    """A money movement decided outside the wallet (shared cost, adjustment, opening balance)."""

    entry_id: str  # final: the wallet posts it at most once
    kind: str  # shared_cost | adjustment | opening_balance
    amount_minor: int  # signed: credits positive, debits negative
    ts_ms: int
    source_id: str
    rate: str | None = None


POSTING_KINDS = ("shared_cost", "adjustment", "opening_balance", "debt_add", "debt_writeoff")
#: Postings that move the debt register, not the balance: amount_minor is the (positive) size.
DEBT_POSTING_KINDS = ("debt_add", "debt_writeoff")


@dataclass
class WalletOut:
    ledger: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def in_friendly(fc: FriendlyCredit | None, ts_ms: int, tz: str, holidays: frozenset[str]) -> bool:
    if fc is None:
        return False
    t = datetime.fromtimestamp(ts_ms / 1000, ZoneInfo(tz))
    if fc.holidays and t.date().isoformat() in holidays:
        return True
    if fc.weekends and t.weekday() in fc.weekend_days:
        return True
    h = t.hour
    return any((s <= h < e) if s < e else (h >= s or h < e) for s, e in fc.weekday_hours)


FRIENDLY_STEP_MS = 900_000  # friendly periods start and end on local hours: quarter hours in any zone
FRIENDLY_LOOKBACK_STEPS = 7 * 96  # a week: longer than any friendly period plus the timer's delay


def friendly_end(fc: FriendlyCredit | None, ts_ms: int, tz: str, holidays: frozenset[str]) -> int:
    """When the stretch outside friendly credit that contains `ts_ms` began: the end of the
    friendly period before it. A deferred trip is stamped with it, so stream and replay raise
    the same trip (same id, same time) whether a charge or the timer notices it, and however late."""
    t = ts_ms - ts_ms % FRIENDLY_STEP_MS
    for _ in range(FRIENDLY_LOOKBACK_STEPS):
        if in_friendly(fc, t - FRIENDLY_STEP_MS, tz, holidays):
            return t
        t -= FRIENDLY_STEP_MS
    return t


def friendly_until(fc: FriendlyCredit | None, ts_ms: int, tz: str, holidays: frozenset[str]) -> int:
    """The first quarter hour after `ts_ms` outside friendly credit (at most a week ahead): when a
    timer must look again at a trip deferred at `ts_ms`."""
    t = ts_ms - ts_ms % FRIENDLY_STEP_MS
    for _ in range(FRIENDLY_LOOKBACK_STEPS):
        t += FRIENDLY_STEP_MS
        if not in_friendly(fc, t, tz, holidays):
            return t
    return t


@lru_cache(maxsize=65_536)
def rate_str(price_u: int | None) -> str | None:
    return None if price_u is None else str(Decimal(price_u) / PRICE_SCALE)


@lru_cache(maxsize=65_536)
def _next_day_start_ms(standing_day: str, tz: str) -> int:
    """The first instant of the local day after ``standing_day``: before it, nothing is due."""
    return local_day_start_ms(date.fromisoformat(standing_day) + timedelta(days=1), tz)


class Wallet:
    """Applies events to one account; construct per account and call `apply` in time order."""

    def __init__(self, state: AccountState, rating: AccountRating, tariff: Tariff, tz: str,
                 holidays: frozenset[str], out: WalletOut) -> None:
        self.s, self.r, self.p, self.t, self.tz, self.hol, self.o = state, rating, rating.policy, tariff, tz, holidays, out

    # -- ledger -----------------------------------------------------------------------------
    def _entry(self, entry_id: str, kind: str, amount: int, ts: int, source: str, c: Charge | None = None,
               debt_change: int | None = None) -> None:
        self.s.balance += amount
        self.o.ledger.append({
            "entry_id": entry_id, "account_id": self.s.account_id, "mall_id": self.r.mall_id, "kind": kind,
            "amount_minor": amount, "balance_after_minor": self.s.balance, "ts_ms": ts, "source_id": source,
            "meter_id": c.meter_id if c else None, "circuit_id": c.circuit_id if c else None,
            "interval_start_ms": c.start_ms if c else None, "energy_wh": c.energy_wh if c else None,
            "tou_period": c.period if c else None, "tier": c.tier if c else None,
            "rate": rate_str(c.price_u) if c else None, "estimated": c.estimated if c else False,
            "debt_change_minor": debt_change,
        })

    def _alert(self, kind: str, severity: str, ts: int, cause: str, message: str, **details: Any) -> None:
        self.o.alerts.append({
            "alert_id": f"{self.s.account_id}:{kind}:{cause}", "kind": kind, "severity": severity,
            "mall_id": self.r.mall_id, "account_id": self.s.account_id, "meter_id": None, "ts_ms": ts,
            "message": message, "details": {k: str(v) for k, v in details.items()}})

    def _command(self, action: str, reason: str, ts: int, cause: str) -> None:
        self.o.commands.append({
            "command_id": f"{self.s.account_id}:{action.lower()}:{cause}", "action": action, "reason": reason,
            "mall_id": self.r.mall_id, "account_id": self.s.account_id, "cause_ts_ms": ts, "cause_id": cause})

    def _reject(self, p: Payment, reason: str) -> None:
        self.o.rejected.append({"payment_id": p.payment_id, "account_id": self.s.account_id,
                                "ts_ms": p.ts_ms, "amount_minor": p.amount_minor, "kind": p.kind, "reason": reason})
        self._alert("rejected_topup", "WARNING", p.ts_ms, p.payment_id, f"payment rejected: {reason}")

    # -- periodic ---------------------------------------------------------------------------
    def _periodic(self, ts: int) -> None:
        """The time-driven postings due by `ts`, day by day in time order: each local day's
        standing charge and, when a debt-recovery period starts, its fixed recovery, both dated at
        the day's local start, each day followed by the alert and trip rules at that time (caused
        by its own entry). So the day's postings and what they trigger are the same whether an
        event of the account (a charge, a payment, a posting) or the timer (`timer`) reaches the
        day first: stream and replay agree however often the timer runs."""
        sd = self.s.standing_day
        if sd is not None and ts < _next_day_start_ms(sd, self.tz):  # still the standing day: no day due
            self._friendly_due(ts)
            return
        today = datetime.fromtimestamp(ts / 1000, ZoneInfo(self.tz)).date()
        # an account's rules apply from its first event: its first day is charged, and the event
        # itself runs the rules (a new account whose first event is a top-up is not tripped, nor
        # given emergency credit, for that day's standing charge before the top-up)
        rules = self.s.standing_day is not None
        days = [today] if self.s.standing_day is None else [
            date.fromordinal(o) for o in range(date.fromisoformat(self.s.standing_day).toordinal() + 1,
                                               today.toordinal() + 1)]
        for d in days:
            start = local_day_start_ms(d, self.tz)
            self._friendly_due(start)  # a deferred trip due before this day began comes first
            v = version_at(self.t, start)
            fee = v.standing_charge_per_day if v else 0
            posted = len(self.o.ledger)
            if fee:
                self._entry(f"{self.s.account_id}:standing:{d.isoformat()}", "standing_charge", -fee, start,
                            d.isoformat())
            self.s.standing_day = d.isoformat()
            self._debt_period(d, start)
            if rules and len(self.o.ledger) > posted:
                self._after_debit(start, self.o.ledger[-1]["entry_id"])
        self._friendly_due(ts)

    def _friendly_due(self, ts: int) -> None:
        """Raise a deferred trip if the friendly period it was deferred in ended by `ts`: at that
        end and named by it, so stream and replay agree however many periods passed since."""
        s = self.s
        if (s.deferred or s.warn_pending) and s.deferred_at >= 0:
            end = friendly_until(self.p.friendly, s.deferred_at, self.tz, self.hol)
            if end <= ts:
                self._check_trip(end, f"friendly_end:{end}")

    def _debt_period(self, day: date, start: int) -> None:
        """A new debt-recovery period (day, ISO week or month) starting with `day`: its fixed
        amount, dated at the local start of the period's first day seen (the cap counts per period)."""
        dr = self.p.debt_recovery
        if dr is None:
            return
        key = {"day": day.isoformat(), "month": day.strftime("%Y-%m"),
               "week": "{}-W{:02d}".format(*day.isocalendar()[:2])}[dr.period]
        if key != self.s.recovery_period:
            self.s.recovery_period, self.s.recovered_in_period = key, 0
            x = self._recoverable(dr.fixed_per_period)
            if x:
                self._recover(x, f"{self.s.account_id}:debtfix:{key}", start, key)

    def timer(self, upto_ms: int) -> None:
        """Timer input: the postings of the local days that began by `upto_ms` (the account's own
        newest time, see engine.tick), and the trips they cause. Nothing for an account whose
        first day is not known yet (no event so far)."""
        if self.s.standing_day is not None:
            self._periodic(upto_ms)

    def _recoverable(self, want: int) -> int:
        dr = self.p.debt_recovery
        assert dr is not None
        room = want if dr.cap_per_period is None else min(want, dr.cap_per_period - self.s.recovered_in_period)
        return max(0, min(room, self.s.debt))

    def _recover(self, x: int, entry_id: str, ts: int, source: str) -> None:
        self.s.debt -= x
        self.s.recovered_in_period += x
        self._entry(entry_id, "debt_recovery", -x, ts, source, debt_change=-x)

    def _debt(self, entry_id: str, kind: str, change: int, ts: int, source: str) -> None:
        """A debt-register movement: a ledger line of amount 0 carrying the change."""
        self.s.debt += change
        self._entry(entry_id, kind, 0, ts, source, debt_change=change)

    def open(self, ts: int) -> None:
        """Carry over the configured opening balance and arrears of a new account, as ledger
        entries with fixed ids (so stream and replay post them once and identically). The
        account's next event runs the alert and trip rules."""
        r, acct = self.r, self.s.account_id
        if r.opening_balance_minor:
            self._entry(f"{acct}:opening_balance", "opening_balance", r.opening_balance_minor, ts, "config")
        if r.opening_debt_minor:
            self._debt(f"{acct}:opening_debt", "debt_opening", r.opening_debt_minor, ts, "config")

    # -- events -----------------------------------------------------------------------------
    def charge(self, c: Charge) -> None:
        self._periodic(c.ts_ms)
        self.s.acc_n += c.amount_n
        post, self.s.acc_n = divmod(self.s.acc_n, AMOUNT_SCALE)
        if post:
            self._entry(c.entry_id, "charge", -post, c.ts_ms, c.entry_id, c)
        self._after_debit(c.ts_ms, c.entry_id)

    def payment(self, p: Payment) -> None:
        """A payment that won its claim (pipelines.core.claims): its id is new across the
        portfolio, a top-up is within the account's limits, and a reversal carries the amount
        of the top-up it reverses."""
        s, acct = self.s, self.s.account_id
        self._periodic(p.ts_ms)
        if p.kind == "topup":
            self._entry(f"{acct}:topup:{p.payment_id}", "topup", p.amount_minor, p.ts_ms, p.payment_id)
            left = p.amount_minor
            if s.ec_owed:
                r = min(s.ec_owed, left)
                s.ec_owed -= r
                left -= r
                self._entry(f"{acct}:ecrepay:{p.payment_id}", "emergency_credit_repay", -r, p.ts_ms, p.payment_id)
            dr = self.p.debt_recovery
            if dr is not None and dr.percent_of_topup and s.debt:
                x = min(self._recoverable(int(p.amount_minor * dr.percent_of_topup // 100)), left)
                if x:
                    self._recover(x, f"{acct}:debtpct:{p.payment_id}", p.ts_ms, p.payment_id)
            self._after_credit(p.ts_ms, p.payment_id)
        elif p.kind == "reversal":
            orig = p.reverses_payment_id
            if orig is None or p.amount_minor <= 0:
                return self._reject(p, f"nothing to reverse for {orig}")
            self._entry(f"{acct}:reversal:{p.payment_id}", "reversal", -p.amount_minor, p.ts_ms, orig)
            self._after_debit(p.ts_ms, p.payment_id)
        elif p.kind == "refund":
            if p.amount_minor <= 0 or p.amount_minor > s.balance - max(self.p.cutoff, 0):
                return self._reject(p, "refund exceeds available balance")
            self._entry(f"{acct}:refund:{p.payment_id}", "refund", -p.amount_minor, p.ts_ms, p.payment_id)
            self._after_debit(p.ts_ms, p.payment_id)
        else:
            self._reject(p, f"unknown payment kind {p.kind}")

    def posting(self, p: Posting) -> None:
        """A posting that won its claim (its entry id is new across the portfolio)."""
        s = self.s
        reason = None
        if p.kind not in POSTING_KINDS:
            reason = f"unknown posting kind {p.kind}"
        elif p.amount_minor == 0:
            reason = "zero amount"
        elif p.kind in DEBT_POSTING_KINDS and p.amount_minor < 0:
            reason = f"{p.kind} amount must be positive (the size of the debt movement)"
        elif p.kind == "debt_writeoff" and p.amount_minor > s.debt:
            reason = f"write-off {p.amount_minor} exceeds the debt {s.debt}"
        if reason is not None:
            self.o.rejected.append({"payment_id": p.entry_id, "account_id": s.account_id, "ts_ms": p.ts_ms,
                                    "amount_minor": p.amount_minor, "kind": p.kind, "reason": reason})
            return
        self._periodic(p.ts_ms)
        if p.kind in DEBT_POSTING_KINDS:
            self._debt(p.entry_id, p.kind, p.amount_minor if p.kind == "debt_add" else -p.amount_minor,
                       p.ts_ms, p.source_id)
            return
        self._entry(p.entry_id, p.kind, p.amount_minor, p.ts_ms, p.source_id)
        self.o.ledger[-1]["rate"] = p.rate
        if p.amount_minor < 0:
            self._after_debit(p.ts_ms, p.entry_id)
        else:
            self._after_credit(p.ts_ms, p.entry_id)

    # -- thresholds -------------------------------------------------------------------------
    def _after_debit(self, ts: int, cause: str) -> None:
        s, p = self.s, self.p
        for level in sorted(p.alert_levels, reverse=True):
            if s.balance <= level and level not in s.fired_levels:
                s.fired_levels.append(level)
                self._alert("low_balance", "WARNING", ts, f"{level}:{cause}",
                            f"balance {s.balance} at or below {level}", level=level, balance=s.balance)
        if p.warning_trip_level is not None and s.balance <= p.warning_trip_level and not s.warning_fired:
            s.warning_fired = True
            s.warn_pending = True
        self._check_trip(ts, cause)

    def _check_trip(self, ts: int, cause: str) -> None:
        s, p = self.s, self.p
        if p.protected:
            s.warn_pending = s.deferred = False
            s.deferred_at = -1
            return
        want = "credit" if s.balance <= p.cutoff else ("warning" if s.warn_pending else None)
        if want is None or (s.relay == "tripped" and (s.trip_reason == "credit" or want == "warning")):
            s.warn_pending = s.warn_pending and s.relay != "tripped"
            return
        if in_friendly(p.friendly, ts, self.tz, self.hol):
            if not s.deferred:
                self._alert("trip_deferred", "INFO", ts, cause, f"{want} trip deferred by friendly credit")
                s.deferred_at = ts
            s.deferred = True
            return
        if s.deferred:  # due when the friendly period ended, whoever notices (a charge or the timer)
            ts = friendly_end(p.friendly, ts, self.tz, self.hol)
            cause = f"friendly_end:{ts}"
        s.deferred, s.deferred_at = False, -1
        if want == "credit" and p.emergency_credit and s.ec_owed == 0:
            s.ec_owed = p.emergency_credit
            self._entry(f"{s.account_id}:ecdraw:{cause}", "emergency_credit_draw", p.emergency_credit, ts, cause)
            self._alert("emergency_credit", "WARNING", ts, cause, f"emergency credit {p.emergency_credit} drawn")
            if s.balance > p.cutoff:
                return
        s.warn_pending = False
        if s.relay == "tripped":  # warning trip escalates to a credit trip: relay already open
            s.trip_reason = want
            return
        s.relay, s.trip_reason = "tripped", want
        kind = "credit_trip" if want == "credit" else "warning_trip"
        self._command("TRIP", want, ts, cause)
        self._alert(kind, "CRITICAL", ts, cause, f"{want} trip at balance {s.balance}", balance=s.balance)

    def _after_credit(self, ts: int, cause: str) -> None:
        s, p = self.s, self.p
        s.fired_levels = [lv for lv in s.fired_levels if s.balance <= lv]
        if p.warning_trip_level is not None and s.balance > p.warning_trip_level:
            s.warning_fired = s.warn_pending = False
        if s.balance > p.cutoff:
            s.deferred, s.deferred_at = False, -1
        if s.relay == "tripped":
            ok = s.balance > p.cutoff if s.trip_reason == "credit" else (
                p.warning_trip_level is None or s.balance > p.warning_trip_level)
            if ok:
                s.relay, s.trip_reason = "connected", None
                self._command("RECONNECT", "topup", ts, cause)
                self._alert("reconnect", "INFO", ts, cause, f"reconnect at balance {s.balance}")
        self._after_debit(ts, cause)  # a top-up too small to lift the balance re-checks trips


def evaluate_deferred(state: AccountState, now_ms: int, rating: AccountRating, tariff: Tariff, tz: str,
                      holidays: frozenset[str], anchor_ms: int | None = None) -> tuple[AccountState, WalletOut]:
    """Timer hook: raise a trip deferred by a friendly-credit period once the period is over.

    The period that matters is the one the trip was deferred in (`deferred_at`), not the one
    around `now_ms` (a timer may run long after the account's data, and a replay's clock stops at
    its last input). The trip is due at that period's end and stamped with it; before then nothing
    happens. A state from before `deferred_at` uses the period around `anchor_ms`, the account's
    own newest time (its latest reading)."""
    s = state.copy()
    out = WalletOut()
    if s.deferred or s.warn_pending:
        fc = rating.policy.friendly
        at = now_ms
        if s.deferred_at >= 0:  # the end of the period it was deferred in
            at = friendly_until(fc, s.deferred_at, tz, holidays)
            if at > now_ms:
                return s, out
        elif anchor_ms is not None:  # a state from before `deferred_at`: the period around the anchor
            if in_friendly(fc, anchor_ms, tz, holidays):
                at = friendly_until(fc, anchor_ms, tz, holidays)
            else:
                at = friendly_end(fc, anchor_ms, tz, holidays)
            if at > now_ms:
                return s, out
        Wallet(s, rating, tariff, tz, holidays, out)._check_trip(at, f"timer:{at}")
    return s, out


def open_account(rating: AccountRating, tariff: Tariff, tz: str, holidays: frozenset[str], first_ts_ms: int,
                 out: WalletOut) -> AccountState:
    """The state of an account the core has never seen, with its opening entries posted.

    Called where the core first creates an account's state, before the account's first event.
    The entries are dated at the local start of that event's day: the same day (so the same
    statement period) as the event, and not after the day's standing charge."""
    s = AccountState(rating.account_id)
    day = datetime.fromtimestamp(first_ts_ms / 1000, ZoneInfo(tz)).date()
    Wallet(s, rating, tariff, tz, holidays, out).open(local_day_start_ms(day, tz))
    return s
