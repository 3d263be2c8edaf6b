"""Synthetic portfolios of any size, for the demo, tests and benchmarks.

Deterministic for a given seed: the same arguments always give the same file.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

from pipelines.portfolio import dump_portfolio, parse_portfolio

METERS_PER_GATEWAY = 30  # one RS-485 bus at 9600 baud reads ~30 meters in ~3 s

# Guangdong commercial 2021 shape: valley 0-8, peak 10-12 and 14-19, flat otherwise;
# peak:flat:valley = 1.7 : 1 : 0.38; critical peak 11-12 and 15-17 in July-September.
GUANGDONG_HOURS = "VVVVVVVV FF PP FF PPPPP FFFFF"

BUSINESS_MIX: list[tuple[str, str, float, tuple[float, float]]] = [
    # business type, level, weight, leased area range (m2)
    ("retail", "standard", 0.45, (40, 200)),
    ("restaurant", "restaurant", 0.25, (80, 300)),
    ("services", "standard", 0.15, (30, 120)),
    ("supermarket", "anchor", 0.05, (1500, 4000)),
    ("cinema", "anchor", 0.05, (1200, 3000)),
    ("retail", "standard", 0.05, (20, 60)),
]
PURPOSE_BY_TYPE = {
    "retail": "lighting",
    "services": "sockets",
    "restaurant": "kitchen",
    "supermarket": "refrigeration",
    "cinema": "air_conditioning",
}
COMMON_METERS = [("hvac", "acrel_adl400", "hvac", 400.0), ("elevators", "eastron_sdm630", "elevator", 150.0),
                 ("lighting", "eastron_sdm630", "public_lighting", 80.0)]


class _MeterPlacer:
    """Puts meters on gateways, METERS_PER_GATEWAY to a bus, one loopback port per gateway."""

    def __init__(self, mall_id: str, first_port: int) -> None:
        self.mall_id, self.port = mall_id, first_port
        self.gateways: list[dict[str, Any]] = []
        self.meters: list[dict[str, Any]] = []
        self._unit = METERS_PER_GATEWAY

    def place(self, meter_id: str, model: str, account: str | None, purpose: str, max_kw: float) -> None:
        if self._unit >= METERS_PER_GATEWAY:
            self.gateways.append({"id": f"{self.mall_id}-GW{len(self.gateways) + 1:02d}",
                                  "host": "127.0.0.1", "port": self.port})
            self.port += 1
            self._unit = 0
        self._unit += 1
        self.meters.append({"id": meter_id, "model": model, "gateway": self.gateways[-1]["id"],
                            "unit_id": self._unit, "account": account, "max_kw": max_kw,
                            "circuits": [{"id": f"{meter_id}.1", "purpose": purpose}]})


def guangdong_tariff() -> dict[str, Any]:
    return {
        "id": "gd-commercial",
        "versions": [{
            "effective_from": "2021-01-01T00:00:00+08:00",
            "prices": {"peak": "136", "flat": "80", "valley": "30.4"},
            "weekday": [{"hours": GUANGDONG_HOURS}],
            "critical_peak": [{"months": [7, 8, 9], "hours": [11, 15, 16], "uplift_pct": "25"}],
            "standing_charge_per_day": 0,
        }],
    }


def levels() -> list[dict[str, Any]]:
    return [
        {"name": "standard", "max_power_w": 15000, "policy": {"alert_levels": [5000, 1000], "cutoff": 0}},
        {"name": "restaurant", "max_power_w": 60000,
         "policy": {"alert_levels": [20000, 5000], "cutoff": 0, "emergency_credit": 2000}},
        {"name": "anchor", "max_power_w": 250000,
         "policy": {"alert_levels": [100000, 30000], "cutoff": -50000,
                    "friendly": {"weekday_hours": [[22, 8]], "weekends": True, "holidays": True}}},
    ]


def generate(malls: int, stalls: int, *, seed: int = 7, base_port: int = 15020,
             low_balance_share: float = 0.2, mall_prefix: str = "M", validate: bool = True) -> dict[str, Any]:
    """A portfolio dict of `malls` malls with `stalls` merchants each (plus common meters).

    validate=False skips the pydantic check (minutes at 350,000 merchants) for a caller that
    validates another way: the table writer loads what it wrote with the column-wise loader."""
    if malls < 1 or stalls < 1:
        raise ValueError("--malls and --stalls must be at least 1")
    rng = random.Random(seed)
    weights = [w for _, _, w, _ in BUSINESS_MIX]
    port = base_port
    out_malls = []
    for m in range(1, malls + 1):
        mall_id = f"{mall_prefix}{m:02d}"
        merchants: list[dict[str, Any]] = []
        placer = _MeterPlacer(mall_id, port)
        floors = max(1, min(6, stalls // 40 + 1))
        areas = [{"id": f"{mall_id}-F{f}", "name": f"Floor {f}", "floor": f} for f in range(1, floors + 1)]
        for s in range(1, stalls + 1):
            btype, level, _, (lo, hi) = rng.choices(BUSINESS_MIX, weights)[0]
            merchant_id = f"{mall_id}-S{s:04d}"
            low = rng.random() < low_balance_share
            merchants.append({
                "id": merchant_id, "name": f"{btype.title()} {s}", "business_type": btype,
                "area": areas[(s - 1) % floors]["id"], "level": level,
                "leased_area_m2": round(rng.uniform(lo, hi), 1),
                "protected": btype == "services" and s % 50 == 3,
                # yuan 5..20 for a low account, 300..3000 otherwise, in fen
                "opening_balance_minor": rng.randint(500, 2000) if low else rng.randint(30000, 300000),
            })
            max_kw = {"restaurant": 60.0, "supermarket": 250.0, "cinema": 200.0}.get(btype, 15.0)
            # single-phase prepaid meters with a relay up to ~30 kW; three-phase above
            model = "acrel_ddsy1352" if max_kw <= 30 else "acrel_adl400"
            placer.place(f"{merchant_id}-E1", model, merchant_id, PURPOSE_BY_TYPE[btype], max_kw)
        for name, model, purpose, max_kw in COMMON_METERS:
            placer.place(f"{mall_id}-C-{name}", model, None, purpose, max_kw)
        port = placer.port
        out_malls.append({
            "id": mall_id, "name": f"Mall {m}", "timezone": "Asia/Shanghai",
            "holidays": ["2026-10-01", "2026-10-02", "2026-10-03", "2027-01-01"],
            "tariff": "gd-commercial", "areas": areas, "gateways": placer.gateways,
            "merchants": merchants, "meters": placer.meters,
            "pools": [{"id": f"{mall_id}-P-{name}", "name": f"Common {name}", "meters": [f"{mall_id}-C-{name}"],
                       "method": "area"} for name, *_ in COMMON_METERS],
        })
    portfolio = {"name": f"synthetic-{malls}x{stalls}", "currency": "CNY", "tariffs": [guangdong_tariff()],
                 "levels": levels(), "malls": out_malls}
    if validate:
        parse_portfolio(portfolio, "<generated>")  # the generator must never emit an invalid file
    return portfolio


def generate_tables(out: str | Path, malls: int, stalls: int, fmt: str = "csv", **kw: Any) -> Path:
    """The same portfolio as `generate`, written as a directory (portfolio.yaml plus tables) and
    checked by loading it back column-wise."""
    from pipelines.roster import load_tables, write_tables

    folder = write_tables(generate(malls, stalls, validate=False, **kw), out, fmt)
    load_tables(folder)  # the generator must never emit an invalid portfolio
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mallwatt generate",
        description="Write a synthetic portfolio config (malls, merchants, meters, gateways, tariffs).")
    parser.add_argument("--malls", type=int, default=1, help="number of malls (default 1)")
    parser.add_argument("--stalls", type=int, default=20, help="merchants per mall (default 20)")
    parser.add_argument("--seed", type=int, default=7, help="random seed; same seed, same file")
    parser.add_argument("--base-port", type=int, default=15020,
                        help="first loopback TCP port of the simulated Modbus gateways")
    parser.add_argument("--out", default="-", help="output YAML file, or directory for tables (default: stdout)")
    parser.add_argument("--format", choices=["yaml", "tables", "parquet"], default="yaml",
                        help="yaml: one file; tables: a directory with portfolio.yaml and CSV roster tables; "
                        "parquet: the same with Parquet tables (docs/roster.md)")
    args = parser.parse_args(argv)
    if args.format != "yaml":
        if args.out == "-":
            parser.error("--format tables/parquet needs --out DIRECTORY")
        try:
            generate_tables(args.out, args.malls, args.stalls, "parquet" if args.format == "parquet" else "csv",
                            seed=args.seed, base_port=args.base_port)
        except ValueError as exc:  # ConfigError included
            parser.error(str(exc))
        print(f"wrote {args.out}/: {args.malls} mall(s) x {args.stalls} stalls as tables", file=sys.stderr)
        return 0
    try:
        data = generate(args.malls, args.stalls, seed=args.seed, base_port=args.base_port)
    except ValueError as exc:
        parser.error(str(exc))
    if args.out == "-":
        import yaml
        yaml.safe_dump(data, sys.stdout, sort_keys=False)
    else:
        dump_portfolio(data, args.out)
        print(f"wrote {args.out}: {args.malls} mall(s) x {args.stalls} stalls", file=sys.stderr)
    return 0
