"""Tariff and wallet-policy configuration models (pydantic v2, extra fields forbidden).

Units, fixed for the whole core:
- money: integer minor units (fen/cents);
- prices: exact decimals in *minor units per kWh* with at most 6 decimal places
  (e.g. ``Decimal("98.5")`` fen/kWh); the engine converts them to integer
  micro-minor units per kWh (``PRICE_SCALE``) so that ``Wh * price`` is an exact integer
  in nano-minor units (``AMOUNT_SCALE`` per minor unit);
- energy: integer Wh.

Holiday calendars are per mall and passed to the engine, not stored in a tariff.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

PRICE_SCALE = 1_000_000  # integer price unit = 1e-6 minor units per kWh
AMOUNT_SCALE = 1_000_000_000  # Wh * price unit = 1e-9 minor units ("nano-minor")
GRID_MS = 15 * 60 * 1000  # every TOU boundary and version change lies on this UTC grid
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Period(StrEnum):
    SHARP = "sharp"
    PEAK = "peak"
    FLAT = "flat"
    VALLEY = "valley"
    DEEP_VALLEY = "deep_valley"


#: One-letter codes used in 24-character hour strings ("VVVVVVVVFFPPFFPPPPPFFFFF").
PERIOD_CODES: dict[str, Period] = {
    "S": Period.SHARP, "P": Period.PEAK, "F": Period.FLAT, "V": Period.VALLEY, "D": Period.DEEP_VALLEY,
}

#: Largest money amount a configuration may carry (10^12 minor units = 10 billion CNY): far
#: above any real figure, far below int64, so sums of many of them cannot overflow an Int64.
MAX_MINOR = 10**12
MAX_PRICE = Decimal(10**7)  # minor units per kWh (100,000 CNY/kWh): anything above is a typo
Price = Annotated[Decimal, Field(ge=0, le=MAX_PRICE, decimal_places=6)]
Minor = Annotated[int, Field(ge=-MAX_MINOR, le=MAX_MINOR, description="integer minor units")]
PositiveMinor = Annotated[int, Field(ge=0, le=MAX_MINOR)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def price_units(price: Decimal) -> int:
    """Exact integer micro-minor units per kWh for a validated price."""
    scaled = price * PRICE_SCALE
    if scaled != scaled.to_integral_value():
        raise ValueError(f"price {price} has more than 6 decimal places")
    return int(scaled)


class Season(_Model):
    """Hour-of-day periods for some months: ``hours`` is 24 letters S/P/F/V/D, hour 0 first.

    Spaces are ignored, so ``"VVVVVVVV FF PP FF PPPPP FFFFF"`` is fine.
    """

    months: list[Annotated[int, Field(ge=1, le=12)]] = Field(default_factory=lambda: list(range(1, 13)))
    hours: str

    @field_validator("hours")
    @classmethod
    def _hours(cls, v: str) -> str:
        v = v.replace(" ", "").replace("_", "").upper()
        if len(v) != 24 or any(c not in PERIOD_CODES for c in v):
            raise ValueError("hours must be 24 letters from S/P/F/V/D (hour 0 first)")
        return v


class CriticalPeak(_Model):
    """Hours (start hours, local) in the given months billed as SHARP at peak price * (1 + uplift)."""

    months: list[Annotated[int, Field(ge=1, le=12)]]
    hours: list[Annotated[int, Field(ge=0, le=23)]]
    uplift_pct: Annotated[Decimal, Field(ge=0)] = Decimal(25)
    weekends: bool = True  # also applies on weekends/holidays


class TierBlock(_Model):
    """A consumption block within the billing month (local calendar month, per account).

    Blocks are listed in ascending order; ``upto_kwh`` None means "no upper bound" (last block).
    The block price is ``period_price * multiplier + adder``.
    """

    upto_kwh: Annotated[Decimal, Field(gt=0)] | None = None
    adder: Annotated[Decimal, Field(ge=0, le=MAX_PRICE, decimal_places=6)] = Decimal(0)
    multiplier: Annotated[Decimal, Field(ge=0, le=1000)] = Decimal(1)


class TariffVersion(_Model):
    """One effective-dated version of a tariff; it applies from ``effective_from`` until the next.

    A flat tariff is just ``{effective_from: ..., prices: {flat: 98.5}}``: with a single price
    and no schedule, every hour uses that period.
    """

    effective_from: AwareDatetime = EPOCH
    prices: dict[Period, Price]
    weekday: list[Season] = Field(default_factory=list)
    weekend: list[Season] | None = None  # None: weekends and holidays use the weekday schedule
    weekend_days: list[Annotated[int, Field(ge=0, le=6)]] = Field(default_factory=lambda: [5, 6])  # Mon=0
    critical_peak: list[CriticalPeak] = Field(default_factory=list)
    tiers: list[TierBlock] = Field(default_factory=list)
    standing_charge_per_day: PositiveMinor = 0
    demand_charge_per_kw: Price | None = None  # minor units per kW of monthly max 15-min average

    @field_validator("effective_from")
    @classmethod
    def _aligned(cls, v: datetime) -> datetime:
        ms = int(v.timestamp() * 1000)
        if ms % GRID_MS:
            raise ValueError("effective_from must fall on a 15-minute boundary")
        return v

    @model_validator(mode="after")
    def _complete(self) -> TariffVersion:
        if not self.prices:
            raise ValueError("prices: at least one period price is required")
        if not self.weekday and len(self.prices) != 1:
            raise ValueError("weekday: a schedule is required when more than one period is priced")
        for name, seasons in (("weekday", self.weekday), ("weekend", self.weekend or [])):
            if not seasons:
                continue
            months = sorted(m for s in seasons for m in s.months)
            if months != list(range(1, 13)):
                raise ValueError(f"{name}: seasons must cover each month exactly once")
            used = {PERIOD_CODES[c] for s in seasons for c in s.hours}
            missing = used - set(self.prices)
            if missing:
                raise ValueError(f"{name}: no price for {sorted(missing)}")
        if self.critical_peak and Period.PEAK not in self.prices:
            raise ValueError("critical_peak: needs a peak price to uplift")
        if self.tiers:
            bounds = [t.upto_kwh for t in self.tiers]
            if any(b is None for b in bounds[:-1]) or bounds[-1] is not None:
                raise ValueError("tiers: only the last block may (and must) have upto_kwh: null")
            finite = [b for b in bounds if b is not None]
            if finite != sorted(set(finite)):
                raise ValueError("tiers: upto_kwh must be strictly increasing")
        return self

    @property
    def effective_from_ms(self) -> int:
        return int(self.effective_from.timestamp() * 1000)


class Tariff(_Model):
    """An energy tariff: prices in minor units per kWh of the account's currency."""

    id: str
    versions: list[TariffVersion] = Field(min_length=1)

    @field_validator("versions")
    @classmethod
    def _ordered(cls, v: list[TariffVersion]) -> list[TariffVersion]:
        times = [x.effective_from_ms for x in v]
        if times != sorted(set(times)):
            raise ValueError("versions must have strictly increasing effective_from")
        return v

    @classmethod
    def flat(cls, id: str, price: Decimal | int | str, standing_charge_per_day: int = 0) -> Tariff:
        """A one-price tariff valid since the epoch."""
        return cls(id=id, versions=[TariffVersion(
            prices={Period.FLAT: Decimal(str(price))}, standing_charge_per_day=standing_charge_per_day)])


class FriendlyCredit(_Model):
    """When credit trips are not allowed (mall local time). ``weekday_hours`` are [start, end)
    hour pairs; a pair with start > end wraps midnight, e.g. [18, 8]."""

    weekday_hours: list[tuple[Annotated[int, Field(ge=0, le=24)], Annotated[int, Field(ge=0, le=24)]]] = \
        Field(default_factory=list)
    weekends: bool = False
    holidays: bool = False
    weekend_days: list[Annotated[int, Field(ge=0, le=6)]] = Field(default_factory=lambda: [5, 6])


class DebtRecovery(_Model):
    """Recovery of the account's separate debt register: a share of each top-up and/or a fixed
    amount per period, both limited by ``cap_per_period`` (periods are local days/ISO weeks/months)."""

    percent_of_topup: Annotated[Decimal, Field(ge=0, le=100)] = Decimal(0)
    fixed_per_period: PositiveMinor = 0
    period: str = Field(default="week", pattern="^(day|week|month)$")
    cap_per_period: PositiveMinor | None = None


class WalletPolicy(_Model):
    """Prepaid behaviour of one account; all amounts in integer minor units."""

    alert_levels: list[Minor] = Field(default_factory=lambda: [5000, 1000])
    warning_trip_level: Minor | None = None  # trip once per downward crossing; merchant may re-close
    cutoff: Annotated[int, Field(ge=-MAX_MINOR, le=0)] = 0  # trip at balance <= cutoff; negative = overdraft
    emergency_credit: PositiveMinor = 0  # drawn automatically at cutoff, repaid first
    friendly: FriendlyCredit | None = None
    protected: bool = False  # never tripped for credit; still billed and alerted
    debt_recovery: DebtRecovery | None = None
    min_topup: Annotated[int, Field(ge=1, le=MAX_MINOR)] = 1
    max_topup: Annotated[int, Field(ge=1, le=MAX_MINOR)] | None = None
    # one signed posting or reversal on this account (pipelines.core.money_authority; None: its default)
    max_adjustment: Annotated[int, Field(ge=1, le=MAX_MINOR)] | None = None

    @model_validator(mode="after")
    def _levels(self) -> WalletPolicy:
        if self.warning_trip_level is not None and self.warning_trip_level <= self.cutoff:
            raise ValueError("warning_trip_level must be above cutoff")
        if self.max_topup is not None and self.max_topup < self.min_topup:
            raise ValueError("max_topup must be >= min_topup")
        return self


class AccountRating(_Model):
    """What the engine needs per account: tariff, policy and merchant overrides."""

    account_id: str
    mall_id: str
    tariff_id: str  # an override tariff is just a different id here
    policy: WalletPolicy = Field(default_factory=WalletPolicy)
    price_multiplier: Annotated[Decimal, Field(gt=0)] = Decimal(1)  # merchant discount/surcharge
    # Carried over from a previous system: the core posts them once, when it first creates the
    # account's state (ledger kinds opening_balance and debt_opening; see wallet.open_account).
    opening_balance_minor: Minor = 0
    opening_debt_minor: PositiveMinor = 0


class CircuitConfig(_Model):
    """Physical limits of one metered circuit, for rollover/reset/spike decisions."""

    circuit_id: str
    account_id: str
    max_kw: Annotated[Decimal, Field(gt=0)] = Decimal(100)
    register_max_kwh: Annotated[Decimal, Field(gt=0)] | None = Decimal("99999.99")  # None: never wraps
    register_resolution_kwh: Annotated[Decimal, Field(gt=0)] = Decimal("0.01")


class Mall(_Model):
    mall_id: str
    tz: str = "Asia/Shanghai"
    holidays: list[str] = Field(default_factory=list)  # ISO dates, local
