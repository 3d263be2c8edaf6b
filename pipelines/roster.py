"""A portfolio as a directory: rules in YAML, the roster as tables a lease/ERP system exports.

    portfolio.yaml            name, currency, tariffs, levels, malls (headers: id, name,
                              timezone, holidays, tariff, pools, main_meter)
    areas.csv|parquet         mall, id, name, floor
    gateways.csv|parquet      mall, id, host, port, timeout_s
    merchants.csv|parquet     mall, id, name, business_type, area, level, leased_area_m2, ...
    meters.csv|parquet        mall, id, model, gateway, unit_id, account, circuit, purpose, ...

Columns are validated at once (pipelines.roster_check) and references with joins, so
350,000 merchants load in about a second. See docs/roster.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import polars as pl
import yaml
from pydantic import Field, ValidationError, model_validator

from pipelines.core.models import Tariff
from pipelines.core.timeguard import TimeLimits
from pipelines.portfolio import (
    BillingSettings,
    ConfigError,
    MallConfig,
    MallHeader,
    MerchantLevel,
    Portfolio,
    _field_path,
    _Model,
    parse_portfolio,
    read_yaml_mapping,
)
from pipelines.roster_check import DTYPES, SPECS, check_columns, empty_table
from pipelines.roster_refs import reference_problems
from pipelines.security_config import SecurityConfig

RULES_FILE = "portfolio.yaml"
TABLES = ("areas", "gateways", "merchants", "meters")
FORMATS = ("csv", "parquet")
MAX_PROBLEMS = 50  # a broken export can fail on every row; the first few say what is wrong


class PortfolioRules(_Model):
    """portfolio.yaml of a table-form portfolio: everything but the roster."""

    name: str
    currency: Annotated[str, Field(min_length=3, max_length=3)] = "CNY"
    tariffs: list[Tariff] = Field(min_length=1)
    levels: list[MerchantLevel] = Field(default_factory=lambda: [MerchantLevel(name="standard")])
    malls: list[MallHeader] = Field(min_length=1)
    time: TimeLimits = Field(default_factory=TimeLimits)  # bounded time (docs/stream.md)
    billing: BillingSettings = Field(default_factory=BillingSettings)  # lateness, gap (docs/billing.md)
    security: SecurityConfig = Field(default_factory=SecurityConfig)  # operators, roles (docs/security.md)

    @model_validator(mode="after")
    def _references(self) -> PortfolioRules:
        problems = []
        for label, ids in (("tariffs", [t.id for t in self.tariffs]), ("levels", [lv.name for lv in self.levels]),
                           ("malls", [m.id for m in self.malls])):
            problems += [f"{label}: duplicate id {d!r}" for d in sorted({i for i in ids if ids.count(i) > 1})]
        tariffs = {t.id for t in self.tariffs}
        problems += [f"malls[{i}].tariff: unknown tariff {m.tariff!r}" for i, m in enumerate(self.malls)
                     if m.tariff not in tariffs]
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True)
class Roster:
    """The roster as frames (columns as in roster_check.SPECS, plus `_line` for messages)."""

    areas: pl.DataFrame
    gateways: pl.DataFrame
    merchants: pl.DataFrame
    meters: pl.DataFrame


@dataclass
class PortfolioConfig:
    """Rules plus roster frames: what build_context needs, without a pydantic model per row."""

    rules: PortfolioRules | Portfolio
    roster: Roster
    source: str
    _portfolio: Portfolio | None = field(default=None, repr=False)

    def portfolio(self) -> Portfolio:
        """The whole portfolio as models (collectors, bills, the warehouse); built once, on demand."""
        if self._portfolio is None:
            self._portfolio = _materialise(self)
        return self._portfolio


def table_path(folder: Path, table: str) -> Path | None:
    found = [folder / f"{table}.{ext}" for ext in FORMATS if (folder / f"{table}.{ext}").exists()]
    if len(found) > 1:
        raise ConfigError(f"{folder}: both {found[0].name} and {found[1].name}; keep one")
    return found[0] if found else None


def config_files(path: str | Path) -> list[Path]:
    """The files a portfolio is read from (their mtimes say whether it changed)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return [path / RULES_FILE] + [p for t in TABLES if (p := table_path(path, t)) is not None]


def read_rules(path: Path) -> PortfolioRules:
    data = read_yaml_mapping(path)
    if "malls" in data and isinstance(data["malls"], list):
        for i, mall in enumerate(data["malls"]):
            inline = [k for k in ("areas", "gateways", "merchants", "meters") if isinstance(mall, dict) and k in mall]
            if inline:
                raise ConfigError(f"{path}: malls[{i}].{inline[0]}: in a portfolio directory the roster lives "
                                  f"in {inline[0]}.csv or {inline[0]}.parquet, not in {RULES_FILE}")
    try:
        return PortfolioRules.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: invalid portfolio rules ({exc.error_count()} problem(s))"]
        lines += [f"  {_field_path(tuple(err['loc']))}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def read_table(path: Path) -> tuple[pl.DataFrame, str]:
    """All columns as text plus `_line` (the CSV line; the Parquet row), and the word for it."""
    try:
        if path.suffix == ".csv":
            raw = pl.read_csv(path, infer_schema=False)
            first, word = 2, "line"  # line 1 is the header
        else:
            raw = pl.read_parquet(path)
            raw = raw.with_columns(pl.all().cast(pl.String))
            first, word = 1, "row"
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise ConfigError(f"{path}: cannot read table: {exc}") from None
    return raw.with_row_index("_line", offset=first).with_columns(pl.col("_line").cast(pl.Int64)), word


@dataclass
class TableFile:
    """One table as read and column-checked; kept by the holder while the file is unchanged."""

    frame: pl.DataFrame
    problems: pl.DataFrame
    label: str  # the file name in messages
    word: str  # line or row
    file_level: list[str]


def read_checked(folder: Path, table: str) -> TableFile:
    path = table_path(folder, table)
    if path is None:
        return TableFile(empty_table(table).with_columns(pl.lit(0, pl.Int64).alias("_line")),
                         pl.DataFrame(), f"{table}.csv", "line", [])
    raw, word = read_table(path)
    frame, problems, file_level = check_columns(table, raw)
    return TableFile(frame, problems, path.name, word, file_level)


def load_tables(path: str | Path, cache: dict[str, tuple[int, TableFile]] | None = None) -> PortfolioConfig:
    """A portfolio directory, validated. `cache` (table -> (mtime_ns, TableFile)) skips
    re-reading tables whose file did not change (the live reload)."""
    folder = Path(path)
    rules = read_rules(folder / RULES_FILE)
    files: dict[str, TableFile] = {}
    for table in TABLES:
        p = table_path(folder, table)
        mtime = p.stat().st_mtime_ns if p is not None else -1
        hit = cache.get(table) if cache is not None else None
        if hit is not None and hit[0] == mtime and hit[1].label == (p.name if p else f"{table}.csv"):
            files[table] = hit[1]
        else:
            files[table] = read_checked(folder, table)
            if cache is not None:
                cache[table] = (mtime, files[table])
    messages = [f"{f.label}: {m}" for f in files.values() for m in f.file_level]
    total = len(messages)
    if not messages:
        frames = {t: f.frame for t, f in files.items()}
        found = {t: f.problems for t, f in files.items() if f.problems.height}
        if not found:  # references only make sense between well-typed columns
            found, header = reference_problems(rules, frames, {t: f.word for t, f in files.items()})
            messages += [f"{RULES_FILE}: {m}" for m in header]
        total = len(messages) + sum(p.height for p in found.values())
        messages += _render(found, files)
    if messages:
        shown = messages[:MAX_PROBLEMS]
        more = f"\n  ... and {total - len(shown)} more" if total > len(shown) else ""
        raise ConfigError(f"{folder}: invalid portfolio ({total} problem(s))\n  " + "\n  ".join(shown) + more)
    return PortfolioConfig(rules, Roster(**{t: f.frame for t, f in files.items()}), str(folder))


def _render(found: dict[str, pl.DataFrame], files: dict[str, TableFile]) -> list[str]:
    out: list[tuple[int, int, str]] = []
    for ti, (table, probs) in enumerate(found.items()):
        f = files[table]
        for line, column, message in probs.sort("line", maintain_order=True).head(MAX_PROBLEMS).iter_rows():
            out.append((ti, line, f"{f.label}: {f.word} {line}: {column}: {message}"))
    return [m for _, _, m in sorted(out, key=lambda x: (x[0], x[1]))]


def load_config(path: str | Path, cache: dict[str, tuple[int, TableFile]] | None = None) -> PortfolioConfig:
    """Any portfolio (a YAML file or a directory) as rules plus roster frames."""
    path = Path(path)
    if path.is_dir():
        return load_tables(path, cache)
    from pipelines.portfolio import load_portfolio

    return config_from_portfolio(load_portfolio(path), str(path))


def config_from_portfolio(p: Portfolio, source: str = "<portfolio>") -> PortfolioConfig:
    """A validated Portfolio's roster as frames (YAML files and tests take this road)."""
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
    for mall in p.malls:
        rows["areas"] += [{"mall": mall.id, **a.model_dump()} for a in mall.areas]
        rows["gateways"] += [{"mall": mall.id, **g.model_dump()} for g in mall.gateways]
        rows["merchants"] += [{"mall": mall.id, **m.model_dump(mode="json")} for m in mall.merchants]
        rows["meters"] += [{"mall": mall.id, **_meter_row(m)} for m in mall.meters]
    frames = {t: pl.DataFrame(rows[t], schema=empty_table(t).schema).with_row_index("_line", offset=1)
              .with_columns(pl.col("_line").cast(pl.Int64)) for t in TABLES}
    return PortfolioConfig(p, Roster(**frames), source, p)


def _meter_row(meter: Any) -> dict[str, Any]:
    row = meter.model_dump(mode="json", exclude={"circuits"})
    return {**row, "circuit": meter.circuits[0].id, "purpose": meter.circuits[0].purpose.value}


def _materialise(config: PortfolioConfig) -> Portfolio:
    """Models from already validated rows (pydantic checks them once more, mall by mall)."""
    rules, roster = config.rules, config.roster
    by_mall = {t: {k[0]: g.drop("mall", "_line").to_dicts()
                   for k, g in getattr(roster, t).group_by("mall", maintain_order=True)} for t in TABLES}
    malls = []
    for mall in rules.malls:
        meters = [{**{k: v for k, v in m.items() if k not in ("circuit", "purpose")},
                   "circuits": [{"id": m["circuit"], "purpose": m["purpose"]}]}
                  for m in by_mall["meters"].get(mall.id, [])]
        data = {**{k: getattr(mall, k) for k in MallHeader.model_fields}, "areas": by_mall["areas"].get(mall.id, []),
                "gateways": by_mall["gateways"].get(mall.id, []),
                "merchants": by_mall["merchants"].get(mall.id, []), "meters": meters}
        try:
            malls.append(MallConfig.model_validate(data))
        except ValidationError as exc:  # not expected after the column checks: say where anyway
            raise ConfigError(f"{config.source}: mall {mall.id}: {exc}") from None
    return Portfolio.model_construct(name=rules.name, currency=rules.currency, tariffs=rules.tariffs,
                                     levels=rules.levels, malls=malls)


def write_tables(data: dict[str, Any] | Portfolio, folder: str | Path, fmt: str = "csv") -> Path:
    """A portfolio (dict as from pipelines.generate, or a model) as a directory of tables."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    if isinstance(data, Portfolio):
        data = data.model_dump(mode="json", exclude_defaults=True)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
    headers = []
    for mall in data["malls"]:
        for t in TABLES:
            for row in mall.get(t, []):
                if t == "meters":  # one circuit per meter (Meter.circuits has max_length=1)
                    circuit = row["circuits"][0]
                    row = {k: v for k, v in row.items() if k != "circuits"}
                    row.update(circuit=circuit["id"], purpose=circuit.get("purpose", "other"))
                if t == "merchants" and row.get("alert_levels") is not None:
                    row = {**row, "alert_levels": ";".join(str(x) for x in row["alert_levels"])}
                rows[t].append({"mall": mall["id"], **row})
        headers.append({k: v for k, v in mall.items() if k not in TABLES})
    rules = {k: v for k, v in data.items() if k != "malls"} | {"malls": headers}
    (folder / RULES_FILE).write_text(yaml.safe_dump(rules, sort_keys=False, allow_unicode=True), encoding="utf-8")
    for t in TABLES:
        for ext in FORMATS:
            (folder / f"{t}.{ext}").unlink(missing_ok=True)
        schema = {c.name: pl.String if c.kind == "ints" else DTYPES[c.kind] for c in SPECS[t]}  # "5000;1000"
        frame = pl.DataFrame(rows[t], schema=schema) if rows[t] else pl.DataFrame(schema=schema)
        frame.write_csv(folder / f"{t}.csv") if fmt == "csv" else frame.write_parquet(folder / f"{t}.parquet")
    return folder


__all__ = ["PortfolioConfig", "PortfolioRules", "Roster", "config_files", "config_from_portfolio", "load_config",
           "load_tables", "parse_portfolio", "write_tables"]
