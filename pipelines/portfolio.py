"""The one configuration model for a whole portfolio of malls.

A YAML file validated with pydantic; every error names the file and the field path
(``malls[0].meters[3].gateway``). Tariffs and wallet policies are the billing core's own
models, referenced here by id and by merchant level.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Iterator
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from collectors.profile import known_models
from pipelines.core.models import MAX_MINOR, Tariff, WalletPolicy
from pipelines.core.timeguard import TimeLimits
from pipelines.loadcontrol import LoadPolicy
from pipelines.security_config import SecurityConfig

Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")]
MAX_CONFIG_MINOR = MAX_MINOR  # the core's limit on any configured amount (core/models.py)
ConfigMinor = Annotated[int, Field(ge=-MAX_CONFIG_MINOR, le=MAX_CONFIG_MINOR)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class ConfigError(ValueError):
    """A portfolio file that cannot be used; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Purpose(StrEnum):
    LIGHTING = "lighting"
    SOCKETS = "sockets"
    AIR_CONDITIONING = "air_conditioning"
    KITCHEN = "kitchen"
    REFRIGERATION = "refrigeration"
    HVAC = "hvac"
    ELEVATOR = "elevator"
    PUBLIC_LIGHTING = "public_lighting"
    FIRE = "fire"  # fire pumps, smoke extraction, alarm panels
    EMERGENCY_LIGHTING = "emergency_lighting"
    MAIN = "main"
    OTHER = "other"


class BusinessType(StrEnum):
    RESTAURANT = "restaurant"
    RETAIL = "retail"
    CINEMA = "cinema"
    SUPERMARKET = "supermarket"
    SERVICES = "services"
    COMMON = "common"


class MerchantLevel(_Model):
    """A class of merchants sharing a wallet policy and load limits."""

    name: Identifier
    policy: WalletPolicy = Field(default_factory=WalletPolicy)
    max_power_w: Annotated[float, Field(gt=0)] = 20_000.0
    overload_debounce_s: Annotated[float, Field(ge=0)] = 30.0
    load: LoadPolicy = Field(default_factory=LoadPolicy)  # restore, cool-down, banned appliances


class Area(_Model):
    id: Identifier
    name: str = ""
    floor: int = 1


class Gateway(_Model):
    """A Modbus TCP gateway fronting one RS-485 bus of meters."""

    id: Identifier
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)]
    timeout_s: Annotated[float, Field(gt=0)] = 1.0


class Circuit(_Model):
    id: Identifier
    purpose: Purpose = Purpose.OTHER


class Meter(_Model):
    id: Identifier
    model: Identifier  # a profile name in collectors/profiles
    gateway: Identifier
    unit_id: Annotated[int, Field(ge=1, le=247)]
    account: Identifier | None = None  # None: a common-area or main meter owned by the mall
    circuits: list[Circuit] = Field(min_length=1, max_length=1)
    max_kw: Annotated[Finite, Field(gt=0, le=100_000)] = 60.0
    poll_interval_s: Annotated[Finite, Field(gt=0, le=86_400)] = 15.0


class Merchant(_Model):
    """A tenant and its prepaid account (one account per merchant; the id is the account id)."""

    id: Identifier
    name: str
    business_type: BusinessType = BusinessType.RETAIL
    area: Identifier
    level: Identifier = "standard"
    leased_area_m2: Annotated[Finite, Field(gt=0, le=1e7)]
    tariff: Identifier | None = None  # None: the mall's tariff
    price_multiplier: Annotated[Finite, Field(gt=0, le=1000)] = 1.0
    protected: bool = False
    alert_levels: list[ConfigMinor] | None = None  # overrides the level's thresholds
    # Carried over from the mall's previous system; posted once to the ledger when the account
    # first appears in billing (kinds opening_balance and debt_opening, docs/billing.md).
    opening_balance_minor: ConfigMinor = 0
    opening_debt_minor: Annotated[int, Field(ge=0, le=MAX_CONFIG_MINOR)] = 0
    vacant: bool = False


class PoolMethod(StrEnum):
    AREA = "area"
    FIXED = "fixed"
    CONSUMPTION = "consumption"
    MIX = "mix"


class SharedPool(_Model):
    """A common-area cost pool (central HVAC, elevators, public lighting) shared by tenants."""

    id: Identifier
    name: str
    meters: list[Identifier] = Field(min_length=1)
    method: PoolMethod = PoolMethod.AREA
    fixed_shares: dict[Identifier, Annotated[Finite, Field(ge=0)]] = Field(default_factory=dict)
    mix_weights: dict[PoolMethod, Annotated[Finite, Field(ge=0)]] = Field(default_factory=dict)
    exclude: list[Identifier] = Field(default_factory=list)


class MallHeader(_Model):
    """A mall's own settings (rules), without its roster: what a table-form portfolio keeps in YAML."""

    id: Identifier
    name: str
    timezone: str = "Asia/Shanghai"
    holidays: list[date] = Field(default_factory=list)
    tariff: Identifier
    pools: list[SharedPool] = Field(default_factory=list)
    main_meter: Identifier | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Asia/Shanghai)") from None
        return value


class BillingSettings(_Model):
    """Policy knobs of the billing core, the same for the stream and for replay.

    ``lateness_ms``: how long the interval step holds a reading back for stragglers before it
    bills (0: bill at once; a reading older than the circuit's last billed one is then rejected
    as late). ``gap_ms``: intervals longer than this are flagged estimated."""

    lateness_ms: Annotated[int, Field(ge=0, le=86_400_000)] = 0
    gap_ms: Annotated[int, Field(gt=0, le=31 * 86_400_000)] = 20 * 60_000


class MallConfig(MallHeader):
    """A mall with its roster: areas, gateways, merchants, meters (see docs/roster.md for tables)."""

    areas: list[Area] = Field(min_length=1)
    gateways: list[Gateway] = Field(default_factory=list)
    merchants: list[Merchant] = Field(default_factory=list)
    meters: list[Meter] = Field(default_factory=list)


class Portfolio(_Model):
    name: str
    currency: Annotated[str, Field(min_length=3, max_length=3)] = "CNY"
    tariffs: list[Tariff] = Field(min_length=1)
    levels: list[MerchantLevel] = Field(default_factory=lambda: [MerchantLevel(name="standard")])
    malls: list[MallConfig] = Field(min_length=1)
    # bounded time: how far input timestamps may run ahead of their Kafka message (docs/stream.md)
    time: TimeLimits = Field(default_factory=TimeLimits)
    billing: BillingSettings = Field(default_factory=BillingSettings)
    security: SecurityConfig = Field(default_factory=SecurityConfig)  # operators, roles (docs/security.md)

    @model_validator(mode="after")
    def _references(self) -> Portfolio:
        problems = list(_reference_problems(self))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # Lookups used by collectors, workers and reports.
    def mall(self, mall_id: str) -> MallConfig:
        for mall in self.malls:
            if mall.id == mall_id:
                return mall
        raise KeyError(f"unknown mall {mall_id!r}")

    def level(self, name: str) -> MerchantLevel:
        return next(lv for lv in self.levels if lv.name == name)

    def tariff(self, tariff_id: str) -> Tariff:
        return next(t for t in self.tariffs if t.id == tariff_id)

    def merchants(self) -> Iterator[tuple[MallConfig, Merchant]]:
        for mall in self.malls:
            for merchant in mall.merchants:
                yield mall, merchant

    def meters(self) -> Iterator[tuple[MallConfig, Meter]]:
        for mall in self.malls:
            for meter in mall.meters:
                yield mall, meter


def _duplicates(ids: list[str]) -> set[str]:
    seen: set[str] = set()
    return {i for i in ids if i in seen or seen.add(i)}  # type: ignore[func-returns-value]


def _reference_problems(p: Portfolio) -> Iterator[str]:
    tariff_ids = {t.id for t in p.tariffs}
    level_names = {lv.name for lv in p.levels}
    for label, ids in (
        ("tariffs", [t.id for t in p.tariffs]),
        ("levels", [lv.name for lv in p.levels]),
        ("malls", [m.id for m in p.malls]),
        ("merchants (portfolio-wide)", [x.id for m in p.malls for x in m.merchants]),
        ("meters (portfolio-wide)", [x.id for m in p.malls for x in m.meters]),
        ("circuits (portfolio-wide)", [c.id for m in p.malls for x in m.meters for c in x.circuits]),
    ):
        for dup in sorted(_duplicates(ids)):
            yield f"{label}: duplicate id {dup!r}"
    for mi, mall in enumerate(p.malls):
        where = f"malls[{mi}]"
        if mall.tariff not in tariff_ids:
            yield f"{where}.tariff: unknown tariff {mall.tariff!r}"
        areas = {a.id for a in mall.areas}
        gateways = {g.id for g in mall.gateways}
        merchants = {m.id for m in mall.merchants}
        meters = {m.id for m in mall.meters}
        for dup in sorted(_duplicates([f"{g.host}:{g.port}" for g in mall.gateways])):
            yield f"{where}.gateways: two gateways at {dup}"
        for label, ids in (("areas", [a.id for a in mall.areas]), ("gateways", [g.id for g in mall.gateways]),
                           ("pools", [x.id for x in mall.pools])):
            for dup in sorted(_duplicates(ids)):
                yield f"{where}.{label}: duplicate id {dup!r}"
        for xi, merchant in enumerate(mall.merchants):
            at = f"{where}.merchants[{xi}]"
            if merchant.area not in areas:
                yield f"{at}.area: unknown area {merchant.area!r}"
            if merchant.level not in level_names:
                yield f"{at}.level: unknown level {merchant.level!r}"
            if merchant.tariff is not None and merchant.tariff not in tariff_ids:
                yield f"{at}.tariff: unknown tariff {merchant.tariff!r}"
        units: set[tuple[str, int]] = set()
        for xi, meter in enumerate(mall.meters):
            at = f"{where}.meters[{xi}]"
            if meter.gateway not in gateways:
                yield f"{at}.gateway: unknown gateway {meter.gateway!r}"
            if (meter.gateway, meter.unit_id) in units:
                yield f"{at}.unit_id: unit {meter.unit_id} used twice on gateway {meter.gateway!r}"
            units.add((meter.gateway, meter.unit_id))
            if meter.account is not None and meter.account not in merchants:
                yield f"{at}.account: unknown merchant {meter.account!r} in mall {mall.id!r}"
            if meter.model not in known_models():
                yield f"{at}.model: unknown meter model {meter.model!r} (known: {sorted(known_models())})"
        if mall.main_meter is not None and mall.main_meter not in meters:
            yield f"{where}.main_meter: unknown meter {mall.main_meter!r}"
        owner = {m.id: m.account for m in mall.meters}
        pooled: dict[str, str] = {}
        for pi, pool in enumerate(mall.pools):
            at = f"{where}.pools[{pi}]"
            for meter_id in pool.meters:
                if meter_id not in meters:
                    yield f"{at}.meters: unknown meter {meter_id!r}"
                elif owner[meter_id] is not None:  # a merchant pays its own meter; sharing it bills twice
                    yield f"{at}.meters: meter {meter_id!r} belongs to merchant {owner[meter_id]!r}, not a common area"
                if meter_id in pooled:
                    yield f"{at}.meters: meter {meter_id!r} is already in pool {pooled[meter_id]!r}"
                pooled.setdefault(meter_id, pool.id)
            for merchant_id in [*pool.exclude, *pool.fixed_shares]:
                if merchant_id not in merchants:
                    yield f"{at}: unknown merchant {merchant_id!r}"


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def parse_portfolio(data: Any, source: str = "<config>") -> Portfolio:
    try:
        return Portfolio.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid portfolio config ({exc.error_count()} problem(s))"]
        for err in exc.errors():
            lines.append(f"  {_field_path(tuple(err['loc']))}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load_portfolio(path: str | Path) -> Portfolio:
    """A YAML file, or a directory with portfolio.yaml plus roster tables (docs/roster.md)."""
    path = Path(path)
    if path.is_dir():
        from pipelines.roster import load_tables  # roster imports this module

        return load_tables(path).portfolio()
    return parse_portfolio(read_yaml_mapping(path), str(path))


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors name the file (ConfigError)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read portfolio config ({exc.strerror})") from None
    try:
        # the C loader when libyaml is there: a 50-mall portfolio loads in a fraction of the time
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def dump_portfolio(portfolio: Portfolio | dict[str, Any], path: str | Path) -> None:
    data = portfolio.model_dump(mode="json", exclude_defaults=True) if isinstance(portfolio, Portfolio) else portfolio
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
