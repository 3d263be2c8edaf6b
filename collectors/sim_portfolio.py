"""A meter simulator laid out exactly as a portfolio config describes one mall.

Same gateways, ports, unit ids and meter models as the config, so the real collector
polls it as it would poll the real mall.
"""

from __future__ import annotations

import random

from collectors.loadshape import RATED_KW
from collectors.profile import load_profile
from collectors.simulator import THREE_PHASE, SimGateway, SimMeter, Simulator
from pipelines.portfolio import MallConfig, Portfolio

# What a circuit purpose or business type looks like to the load-shape library.
SHAPE_BY_PURPOSE = {"hvac": "hvac", "elevator": "elevator", "public_lighting": "lighting",
                    "lighting": "lighting", "air_conditioning": "hvac"}
SHAPE_BY_BUSINESS = {"restaurant": "restaurant", "retail": "retail", "cinema": "cinema",
                     "supermarket": "supermarket", "services": "retail", "common": "lighting"}


def mall_simulator(portfolio: Portfolio, mall_id: str, *, speed: float = 1.0, start_ms: int | None = None,
                   seed: int = 1, start_kwh: float = 1000.0) -> Simulator:
    mall: MallConfig = portfolio.mall(mall_id)
    business = {m.id: m.business_type.value for m in mall.merchants}
    rng = random.Random(seed)
    gateways: dict[str, SimGateway] = {g.id: SimGateway(g.id, {}, host=g.host, port=g.port) for g in mall.gateways}
    for n, meter in enumerate(mall.meters):
        purpose = meter.circuits[0].purpose.value
        if meter.account is not None:
            shape = SHAPE_BY_BUSINESS.get(business.get(meter.account, "retail"), "retail")
        else:
            shape = SHAPE_BY_PURPOSE.get(purpose, "lighting")
        three_phase = meter.model in THREE_PHASE
        rated = RATED_KW[shape] * rng.uniform(0.6, 1.2)
        # stay inside what the meter and the config's physical limit allow
        rated = min(rated, meter.max_kw * 0.8, 30.0 if not three_phase else rated)
        gateways[meter.gateway].meters[meter.unit_id] = SimMeter(
            meter.id, load_profile(meter.model), meter.unit_id, shape, rated, three_phase,
            seed=seed * 100_003 + n, import_kwh=round(start_kwh * rng.uniform(0.5, 2.0), 2))
    return Simulator(list(gateways.values()), speed=speed, start_ms=start_ms)


def main(argv: list[str] | None = None) -> int:
    """`mallwatt simulate`: a portfolio mall with --config, else the generic simulator's options."""
    import argparse
    import asyncio
    import contextlib
    import json
    import sys
    from datetime import datetime

    args_in = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in args_in:
        from collectors.simulator import main as generic_main

        return generic_main(args_in)
    parser = argparse.ArgumentParser(
        prog="mallwatt simulate",
        description="Simulate one mall of a portfolio over Modbus TCP on loopback: the config's "
        "gateways (ports), unit ids and meter models, with daily load shapes and accelerated time. "
        "Without --config, the generic simulator's options apply (see `mallwatt simulate --help`).")
    parser.add_argument("--config", required=True, help="portfolio config (YAML)")
    parser.add_argument("--mall", help="mall id (default: the first mall)")
    parser.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second")
    parser.add_argument("--start", help="simulated start, ISO-8601 (default now)")
    parser.add_argument("--seconds", type=float, default=0.0, help="run time in real seconds; 0 = until Ctrl-C")
    args = parser.parse_args(args_in)
    from pipelines.portfolio import ConfigError, load_portfolio

    try:
        portfolio = load_portfolio(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    mall_id = args.mall or portfolio.malls[0].id
    start_ms = int(datetime.fromisoformat(args.start).timestamp() * 1000) if args.start else None

    async def run() -> None:
        sim = mall_simulator(portfolio, mall_id, speed=args.speed, start_ms=start_ms)
        await sim.start()
        print(json.dumps({"mall": mall_id, "meters": len(sim.meters),
                          "gateways": {g.name: g.port for g in sim.gateways}}), flush=True)
        try:
            if args.seconds > 0:
                await asyncio.sleep(args.seconds)
            else:
                await asyncio.Event().wait()
        finally:
            await sim.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0
