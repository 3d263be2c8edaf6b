"""Meter register maps as data: one YAML file per model/firmware in collectors/profiles/.

A new meter model is a new YAML file; no code changes. Validation errors name the file
and the field so a typo in a profile is found before a collector starts polling.
"""

from __future__ import annotations

from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from collectors.decode import DATA_TYPES, ORDERS, is_integer, word_count

PROFILE_DIR = Path(__file__).parent / "profiles"

Table = Literal["holding", "input", "coil", "discrete"]
_FC_TABLE = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}

# canonical name -> (unit after scaling, is a cumulative counter)
CANONICAL: dict[str, tuple[str, bool]] = {
    "import_kwh": ("kWh", True),
    "export_kwh": ("kWh", True),
    "total_kwh": ("kWh", True),
    "tou_sharp_kwh": ("kWh", True),
    "tou_peak_kwh": ("kWh", True),
    "tou_flat_kwh": ("kWh", True),
    "tou_valley_kwh": ("kWh", True),
    "tou_deep_valley_kwh": ("kWh", True),
    "power_w": ("W", False),
    "power_l1_w": ("W", False),
    "power_l2_w": ("W", False),
    "power_l3_w": ("W", False),
    "reactive_power_var": ("var", False),
    "voltage_v": ("V", False),
    "voltage_l2_v": ("V", False),
    "voltage_l3_v": ("V", False),
    "current_a": ("A", False),
    "current_l2_a": ("A", False),
    "current_l3_a": ("A", False),
    "power_factor": ("", False),
    "frequency_hz": ("Hz", False),
}
# never negative on a healthy meter; a negative reading is flagged, not dropped
NON_NEGATIVE = {n for n, (_, counter) in CANONICAL.items() if counter} | {
    "voltage_v", "voltage_l2_v", "voltage_l3_v", "frequency_hz",
}


class ProfileError(ValueError):
    """A profile file is unreadable or invalid; the message names the file and field."""


class FieldDef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="canonical name, see CANONICAL")
    table: Literal["holding", "input"]
    address: int = Field(ge=0, le=0xFFFF)
    type: str = "float32"
    order: str = "ABCD"
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    circuit: str = "main"
    wrap: float | None = Field(default=None, gt=0,
                               description="engineering value at which the counter rolls over")

    @model_validator(mode="before")
    @classmethod
    def _function_code(cls, data: object) -> object:
        # accept `function_code: 3` as an alternative spelling of `table: holding`
        if isinstance(data, dict) and "function_code" in data:
            data = dict(data)
            fc = data.pop("function_code")
            if fc not in (3, 4):
                raise ValueError(f"function_code {fc} cannot hold a measured value (use 3 or 4)")
            if "table" in data and data["table"] != _FC_TABLE[fc]:
                raise ValueError(f"function_code {fc} contradicts table {data['table']!r}")
            data["table"] = _FC_TABLE[fc]
        return data

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str) -> str:
        if v not in CANONICAL:
            raise ValueError(f"unknown canonical name {v!r}; known: {sorted(CANONICAL)}")
        return v

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in DATA_TYPES:
            raise ValueError(f"unknown type {v!r}; known: {list(DATA_TYPES)}")
        return v

    @field_validator("order")
    @classmethod
    def _known_order(cls, v: str) -> str:
        v = v.upper()
        if v not in ORDERS:
            raise ValueError(f"unknown order {v!r}; known: {list(ORDERS)}")
        return v

    @field_validator("scale")
    @classmethod
    def _nonzero_scale(cls, v: float) -> float:
        if v == 0:
            raise ValueError("scale must not be 0")
        return v

    @model_validator(mode="after")
    def _unit_matches(self) -> FieldDef:
        expected = CANONICAL[self.name][0]
        if self.unit != expected:
            raise ValueError(
                f"unit {self.unit!r} does not match {self.name} (expects {expected!r} after "
                "scaling; put the conversion in `scale`)")
        return self

    @property
    def words(self) -> int:
        return word_count(self.type)

    @property
    def is_counter(self) -> bool:
        return CANONICAL[self.name][1]


class RelayDef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    table: Literal["holding", "coil"]
    address: int = Field(ge=0, le=0xFFFF)
    closed: int = 1
    open: int = 0

    @model_validator(mode="after")
    def _distinct(self) -> RelayDef:
        if self.closed == self.open:
            raise ValueError("relay closed and open values must differ")
        if self.table == "coil" and {self.closed, self.open} != {0, 1}:
            raise ValueError("a coil relay uses values 0 and 1")
        return self


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    vendor: str = ""
    description: str = ""
    max_gap: int = Field(default=8, ge=0, le=124,
                         description="unused registers a merged read may span")
    max_registers: int = Field(default=125, ge=1, le=125)
    fields: tuple[FieldDef, ...] = Field(min_length=1)
    relay: RelayDef | None = None

    @model_validator(mode="after")
    def _no_clash(self) -> Profile:
        seen: dict[tuple[str, str], int] = {}
        used: dict[tuple[str, int], str] = {}
        for i, f in enumerate(self.fields):
            key = (f.circuit, f.name)
            if key in seen:
                raise ValueError(f"fields[{i}] ({f.name}): duplicate of fields[{seen[key]}] "
                                 f"on circuit {f.circuit!r}")
            seen[key] = i
            for a in range(f.address, f.address + f.words):
                if (f.table, a) in used:
                    raise ValueError(f"fields[{i}] ({f.name}): register {f.table} {a:#06x} "
                                     f"overlaps {used[(f.table, a)]}")
                used[(f.table, a)] = f.name
        if self.relay and self.relay.table == "holding" and ("holding", self.relay.address) in used:
            raise ValueError(f"relay register {self.relay.address:#06x} overlaps "
                             f"{used[('holding', self.relay.address)]}")
        return self

    def field(self, name: str, circuit: str = "main") -> FieldDef:
        for f in self.fields:
            if f.name == name and f.circuit == circuit:
                return f
        raise KeyError(f"{self.model}: no field {name!r} on circuit {circuit!r}")

    @property
    def circuits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.circuit for f in self.fields))


def _describe(err: dict, raw: dict) -> str:
    loc = list(err["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    if len(loc) >= 2 and loc[0] == "fields" and isinstance(loc[1], int):
        try:
            name = raw["fields"][loc[1]].get("name", "?")
        except (KeyError, IndexError, TypeError, AttributeError):
            name = "?"
        rest = ".".join(str(p) for p in loc[2:])
        where = f"fields[{loc[1]}] ({name})" + (f".{rest}" if rest else "")
    return f"{where}: {err['msg']}"


def parse_profile(raw: object, source: str) -> Profile:
    """Validate a profile dict; errors are ProfileError naming `source` and the field."""
    if not isinstance(raw, dict):
        raise ProfileError(f"{source}: top level must be a mapping")
    try:
        return Profile.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, raw) for e in exc.errors()]
        raise ProfileError(f"{source}: " + "; ".join(lines)) from None


def load_profile_file(path: str | Path) -> Profile:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"{path}: {exc}") from None
    profile = parse_profile(raw, str(path))
    if profile.model != path.stem:
        raise ProfileError(f"{path}: model {profile.model!r} must equal the file name "
                           f"{path.stem!r}")
    return profile


@cache
def load_profile(name: str) -> Profile:
    """A bundled profile by model name (e.g. "eastron_sdm120") or a path to a YAML file."""
    if name.endswith((".yaml", ".yml")):
        return load_profile_file(name)
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ProfileError(f"no profile {name!r} in {PROFILE_DIR}; known: {known}")
    return load_profile_file(path)


def load_profiles(directory: str | Path | None = None) -> dict[str, Profile]:
    d = Path(directory) if directory else PROFILE_DIR
    return {p.stem: load_profile_file(p) for p in sorted(d.glob("*.yaml"))}


#: A float register has no natural wrap; its counter rolls over with the meter's display,
#: which for the float32 models we know shows 99,999.99 kWh. Used only when a profile declares
#: no ``wrap`` for a float counter.
FLOAT_COUNTER_WRAP_KWH = Decimal("100000")
DEFAULT_RESOLUTION_KWH = Decimal("0.01")


def counter_wrap(f: FieldDef) -> tuple[Decimal, Decimal]:
    """(largest register value in kWh, register resolution in kWh) of an energy counter: the
    one place billing learns when a meter's register rolls over.

    A declared ``wrap`` wins; an integer register wraps at its raw range times its scale
    (uint32 x0.01 -> 42,949,672.95; a signed int32 counts up to 2^31 - 1, so x0.01 ->
    21,474,836.47); a float register at FLOAT_COUNTER_WRAP_KWH."""
    scale = Decimal(str(f.scale))
    resolution = abs(scale) if is_integer(f.type) else DEFAULT_RESOLUTION_KWH
    if f.wrap is not None:
        modulus = Decimal(str(f.wrap))
    elif is_integer(f.type):
        bits = 16 * f.words
        modulus = (1 << (bits if f.type.startswith("uint") else bits - 1)) * abs(scale)
    else:
        modulus = FLOAT_COUNTER_WRAP_KWH
    return modulus - resolution, resolution


@cache
def register_limits(model: str, name: str = "import_kwh", circuit: str = "main") -> tuple[Decimal, Decimal]:
    """`counter_wrap` of a bundled profile's billed counter (cached: one parse per model)."""
    return counter_wrap(load_profile(model).field(name, circuit))


@cache
def known_models() -> frozenset[str]:
    """Names of the bundled profiles (the meter models a portfolio may use)."""
    return frozenset(p.stem for p in PROFILE_DIR.glob("*.yaml"))
