"""Meter simulator: pymodbus TCP gateways on 127.0.0.1, several unit ids each.

Registers are encoded with the SAME profiles the collectors decode with. Simulated time
runs `speed` times faster than real time from `start_ms`; a background task integrates
power into the energy registers (they stop growing while the relay is open). Faults can
be injected per meter: counter rollover, reset/replacement, silence, garbage, delay.

State is kept per meter as plain floats and re-encoded into a dict of registers after
each step, so 200+ meters cost a few ms per tick on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import NoSuchIdException
from pymodbus.pdu import ExceptionResponse
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler

from collectors.decode import counter_wrap, encode_value
from collectors.loadshape import RATED_KW, SHAPES, sample_power_w
from collectors.profile import Profile, load_profile
from collectors.spec import DeviceSpec

log = logging.getLogger(__name__)

_FC_TABLE = {1: "coil", 5: "coil", 15: "coil", 2: "discrete",
             3: "holding", 6: "holding", 16: "holding", 23: "holding", 4: "input"}
MAX_STEP_S = 60.0  # integrate in sub-steps so TOU buckets and load shape stay accurate


def tou_period(local: datetime) -> str:
    """Guangdong-style commercial TOU (domain primer): the bucket a local time falls in."""
    h = local.hour
    if local.month in (7, 8, 9) and (h == 11 or 15 <= h < 17):
        return "sharp"
    if 10 <= h < 12 or 14 <= h < 19:
        return "peak"
    if h < 8:
        return "valley"
    return "flat"


@dataclass
class Faults:
    silent: bool = False  # no answer at all (a dead meter or a broken bus segment)
    delay_s: float = 0.0  # answer late; holds the bus like a slow meter would
    garbage: str | None = None  # "nan" or "negative"
    ignore_relay_writes: int = 0  # accept this many relay writes without switching (a stuck contactor)


@dataclass
class SimMeter:
    meter_id: str
    profile: Profile
    unit_id: int
    business: str = "retail"
    rated_kw: float = 6.0
    three_phase: bool = False
    seed: int = 0
    # true physical state (what an ideal meter measured), engineering units
    import_kwh: float = 0.0
    export_kwh: float = 0.0
    tou_kwh: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("sharp", "peak", "flat", "valley"), 0.0))
    power_w: float = 0.0
    voltage_v: float = 230.0
    power_factor: float = 0.95
    relay_closed: bool = True
    faults: Faults = field(default_factory=Faults)
    registers: dict[str, dict[int, int]] = field(default_factory=dict)
    relay_writes: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        if self.business not in SHAPES:
            raise ValueError(f"unknown business type {self.business!r}; known: {sorted(SHAPES)}")

    # --- physics -------------------------------------------------------------------
    def step(self, dt_s: float, local: datetime) -> None:
        hour = local.hour + local.minute / 60.0 + local.second / 3600.0
        if self.relay_closed:
            self.power_w = sample_power_w(self.business, self.rated_kw, hour, self._rng)
        else:
            self.power_w = 0.0
        self.voltage_v = 230.0 + self._rng.gauss(0.0, 1.5)
        kwh = self.power_w * dt_s / 3_600_000.0
        self.import_kwh += kwh
        self.tou_kwh[tou_period(local)] += kwh

    def values(self) -> dict[str, float]:
        """Canonical values the registers should show (before garbage faults)."""
        phases = 3 if self.three_phase else 1
        v = self.voltage_v
        current = self.power_w / (phases * v * self.power_factor) if self.power_w else 0.0
        return {
            "import_kwh": self.import_kwh, "export_kwh": self.export_kwh,
            "total_kwh": self.import_kwh + self.export_kwh,
            "tou_sharp_kwh": self.tou_kwh["sharp"], "tou_peak_kwh": self.tou_kwh["peak"],
            "tou_flat_kwh": self.tou_kwh["flat"], "tou_valley_kwh": self.tou_kwh["valley"],
            "tou_deep_valley_kwh": 0.0,
            "power_w": self.power_w,
            "power_l1_w": self.power_w / phases, "power_l2_w": self.power_w / phases,
            "power_l3_w": self.power_w / phases,
            "reactive_power_var": self.power_w * 0.33,
            "voltage_v": v, "voltage_l2_v": v, "voltage_l3_v": v,
            "current_a": current, "current_l2_a": current, "current_l3_a": current,
            "power_factor": self.power_factor if self.power_w else 1.0,
            "frequency_hz": 50.0,
        }

    # --- registers -----------------------------------------------------------------
    def encode(self) -> None:
        regs: dict[str, dict[int, int]] = {"holding": {}, "input": {}, "coil": {}}
        vals = self.values()
        garbage = self.faults.garbage
        for f in self.profile.fields:
            value = vals[f.name]
            if garbage == "negative" and f.is_counter:
                value = -abs(value) - 1.0
            if garbage == "nan":
                if f.type.startswith("float"):
                    words = encode_value(math.nan, f.type, f.order)
                else:
                    words = [0xFFFF] * f.words  # the usual "not available" marker
            else:
                words = encode_value(value, f.type, f.order, f.scale, f.offset,
                                     f.wrap if f.is_counter else None)
            table = regs[f.table]
            for i, w in enumerate(words):
                table[f.address + i] = w
        r = self.profile.relay
        if r is not None:
            regs[r.table][r.address] = r.closed if self.relay_closed else r.open
        self.registers = regs

    def read(self, table: str, address: int, count: int) -> list[int] | list[bool]:
        regs = self.registers.get(table, {})
        if table in ("coil", "discrete"):
            return [bool(regs.get(a, 0)) for a in range(address, address + count)]
        # reserved registers inside a merged read answer 0, as most meters do
        return [regs.get(a, 0) for a in range(address, address + count)]

    def write(self, table: str, address: int, values: Sequence[int | bool]) -> ExcCodes | None:
        r = self.profile.relay
        if r is None or table != r.table or address != r.address or len(values) != 1:
            return ExcCodes.ILLEGAL_ADDRESS
        v = int(values[0])
        if v not in (r.closed, r.open):
            return ExcCodes.ILLEGAL_VALUE
        if self.faults.ignore_relay_writes > 0:  # acknowledged, but the relay stays where it is
            self.faults.ignore_relay_writes -= 1
            return None
        self.relay_closed = v == r.closed
        self.relay_writes += 1
        if not self.relay_closed:
            self.power_w = 0.0  # a contactor drops the load at once, not at the next tick
        self.encode()
        return None

    # --- faults --------------------------------------------------------------------
    def inject_rollover(self, margin_kwh: float = 0.5) -> float:
        """Put the import counter just below its wrap value; returns the wrap value."""
        f = self.profile.field("import_kwh")
        wrap = counter_wrap(f.type, f.scale, f.wrap)
        if wrap is None:
            raise ValueError(f"{self.meter_id}: {f.type} import register does not roll over")
        self.import_kwh = wrap - margin_kwh
        self.encode()
        return wrap

    def inject_reset(self, to_kwh: float = 0.0) -> None:
        """Meter reset or replacement: every counter jumps to ~0."""
        self.import_kwh = to_kwh
        self.export_kwh = 0.0
        self.tou_kwh = dict.fromkeys(self.tou_kwh, 0.0)
        self.encode()


class _GatewayContext(ModbusServerContext):
    """Serves one gateway's meters; the bus lock makes requests one at a time."""

    def __init__(self, gateway: SimGateway) -> None:  # no super(): avoids deprecation noise
        self.gateway = gateway
        self.old_simulator = True
        self.simdevices = []
        self.bus = asyncio.Lock()

    def device_ids(self) -> list[int]:
        return list(self.gateway.meters)

    def _meter(self, device_id: int) -> SimMeter:
        m = self.gateway.meters.get(device_id)
        if m is None or m.faults.silent:
            raise NoSuchIdException(str(device_id))  # server drops it: the client times out
        return m

    async def async_getValues(self, device_id: int, func_code: int, address: int,
                              count: int = 1) -> list[int] | list[bool] | ExcCodes:
        m = self._meter(device_id)
        async with self.bus:
            if m.faults.delay_s:
                await asyncio.sleep(m.faults.delay_s)
            self.gateway.requests += 1
            return m.read(_FC_TABLE.get(func_code, "?"), address, count)

    async def async_setValues(self, device_id: int, func_code: int, address: int,
                              values: Sequence[int] | Sequence[bool]) -> ExcCodes | None:
        m = self._meter(device_id)
        async with self.bus:
            if m.faults.delay_s:
                await asyncio.sleep(m.faults.delay_s)
            return m.write(_FC_TABLE.get(func_code, "?"), address, values)


class _Handler(ServerRequestHandler):
    """pymodbus' handler reads self.last_pdu after awaiting the datastore, so a delayed
    answer could carry the next request's transaction id. Capture the PDU first."""

    def handle_later(self) -> None:
        pdu, addr = self.last_pdu, self.last_addr
        if pdu is not None:
            task = asyncio.ensure_future(self._handle(pdu, addr))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _handle(self, pdu, addr) -> None:
        try:
            response = await pdu.datastore_update(self.server.context, pdu.dev_id)
        except NoSuchIdException:
            return
        except Exception:  # a simulator bug must not kill the connection
            log.exception("simulated datastore failed")
            response = ExceptionResponse(pdu.function_code, ExcCodes.DEVICE_FAILURE)
        response.transaction_id = pdu.transaction_id
        response.dev_id = pdu.dev_id
        if self.transport:
            self.server_send(response, addr)


class _Server(ModbusTcpServer):
    def callback_new_connection(self):
        return _Handler(self, self.trace_packet, self.trace_pdu, self.trace_connect)


@dataclass
class SimGateway:
    name: str
    meters: dict[int, SimMeter]
    host: str = "127.0.0.1"
    port: int = 0  # 0: ephemeral, filled in by start()
    requests: int = 0
    server: _Server | None = None


class Simulator:
    """A set of simulated gateways sharing one simulated clock."""

    def __init__(self, gateways: list[SimGateway], *, speed: float = 1.0,
                 start_ms: int | None = None, tick_s: float = 0.2,
                 tz: timezone = timezone(timedelta(hours=8))) -> None:
        self.gateways = gateways
        self.speed = speed
        self.tick_s = tick_s
        self.tz = tz
        self._sim_ms = float(start_ms if start_ms is not None else time.time() * 1000)
        self._driver: asyncio.Task | None = None
        self._paused = False
        self.meters: dict[str, SimMeter] = {}
        for gw in gateways:
            for m in gw.meters.values():
                if m.meter_id in self.meters:
                    raise ValueError(f"duplicate meter id {m.meter_id}")
                self.meters[m.meter_id] = m
                m.encode()

    # --- clock ---------------------------------------------------------------------
    def now_ms(self) -> int:
        """Simulated epoch ms the registers currently reflect."""
        return int(self._sim_ms)

    def advance(self, sim_seconds: float) -> None:
        """Integrate every meter over `sim_seconds` of simulated time."""
        remaining = sim_seconds
        while remaining > 1e-9:
            dt = min(MAX_STEP_S, remaining)
            local = datetime.fromtimestamp(self._sim_ms / 1000.0, UTC).astimezone(self.tz)
            for m in self.meters.values():
                m.step(dt, local)
            self._sim_ms += dt * 1000.0
            remaining -= dt
        for m in self.meters.values():
            m.encode()

    def pause(self) -> None:
        """Freeze simulated time (tests read registers that do not move under them)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    async def _drive(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            if not self._paused and self.speed > 0:
                self.advance((now - last) * self.speed)
            last = now

    # --- servers -------------------------------------------------------------------
    async def start(self, drive: bool = True) -> None:
        for gw in self.gateways:
            gw.server = _Server(_GatewayContext(gw), address=(gw.host, gw.port),
                                ignore_missing_devices=True)
            await gw.server.serve_forever(background=True)
            gw.port = gw.server.transport.sockets[0].getsockname()[1]
        if drive:
            self._driver = asyncio.create_task(self._drive(), name="sim-driver")

    async def stop(self) -> None:
        if self._driver:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None
        for gw in self.gateways:
            if gw.server:
                await gw.server.shutdown()
                gw.server = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def device_specs(self, interval_s: float = 1.0) -> list[DeviceSpec]:
        """DeviceSpecs pointing the poller at these gateways (after start())."""
        return [DeviceSpec(m.meter_id, m.profile.model, gw.host, gw.port, unit, interval_s,
                           gateway_id=gw.name)
                for gw in self.gateways for unit, m in gw.meters.items()]

    def total_requests(self) -> int:
        return sum(gw.requests for gw in self.gateways)


DEFAULT_MIX: tuple[tuple[str, str], ...] = (
    # (profile, business): a mall's typical stall/common-area meter mix
    ("acrel_ddsy1352", "retail"), ("acrel_ddsy1352", "restaurant"),
    ("eastron_sdm120", "retail"), ("acrel_adl400", "supermarket"),
    ("eastron_sdm630", "cinema"), ("chint_dtsu666", "hvac"),
    ("acrel_ddsy1352", "restaurant"), ("eastron_sdm120", "lighting"),
    ("acrel_adl400", "elevator"), ("acrel_ddsy1352", "retail"),
)
THREE_PHASE = {"eastron_sdm630", "chint_dtsu666", "acrel_adl400", "acrel_adl400_v2"}


def build_portfolio(n_gateways: int, meters_per_gateway: int, *, seed: int = 1,
                    mix: Sequence[tuple[str, str]] = DEFAULT_MIX, start_kwh: float = 1000.0,
                    **sim_kwargs: object) -> Simulator:
    """Gateways GW-000.. with meters M-00000.. (unit ids 1..n), profiles from `mix`."""
    rng = random.Random(seed)
    gateways = []
    n = 0
    for g in range(n_gateways):
        meters = {}
        for u in range(1, meters_per_gateway + 1):
            prof_name, business = mix[n % len(mix)]
            rated = RATED_KW[business] * rng.uniform(0.6, 1.4)
            if prof_name not in THREE_PHASE:
                rated = min(rated, 10.0)  # a single-phase stall supply tops out near 60 A
            m = SimMeter(f"M-{n:05d}", load_profile(prof_name), u, business, rated,
                         prof_name in THREE_PHASE, seed=seed * 100_003 + n,
                         import_kwh=start_kwh * rng.uniform(0.5, 2.0))
            meters[u] = m
            n += 1
        gateways.append(SimGateway(f"GW-{g:03d}", meters))
    return Simulator(gateways, **sim_kwargs)  # type: ignore[arg-type]


def apply_fault(sim: Simulator, spec: str) -> None:
    """`kind:meter_id[:arg]`: rollover[:margin_kwh], reset, silent, nan, negative, slow:delay_s,
    stuck_relay[:writes] (the next `writes` relay writes are acknowledged but do nothing)."""
    kind, _, rest = spec.partition(":")
    meter_id, _, arg = rest.partition(":")
    if meter_id not in sim.meters:
        raise ValueError(f"fault {spec!r}: unknown meter {meter_id!r}")
    m = sim.meters[meter_id]
    if kind == "rollover":
        m.inject_rollover(float(arg) if arg else 0.5)
    elif kind == "reset":
        m.inject_reset()
    elif kind == "silent":
        m.faults.silent = True
    elif kind in ("nan", "negative"):
        m.faults.garbage = kind
        m.encode()
    elif kind == "slow":
        m.faults.delay_s = float(arg or 0.5)
    elif kind == "stuck_relay":
        m.faults.ignore_relay_writes = int(arg or 3)
    else:
        raise ValueError(f"fault {spec!r}: unknown kind {kind!r}")


def _parse_start(text: str | None) -> int | None:
    if not text:
        return None
    if text.isdigit():
        return int(text)
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def main(argv: Sequence[str] | None = None) -> int:
    """`mallwatt simulate`: run simulated gateways until interrupted (or --duration)."""
    p = argparse.ArgumentParser(prog="mallwatt simulate", description=__doc__.split("\n")[0])
    p.add_argument("--gateways", type=int, default=2)
    p.add_argument("--meters-per-gateway", type=int, default=10)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--base-port", type=int, default=0,
                   help="first TCP port (gateway i listens on base+i); 0 = ephemeral")
    p.add_argument("--speed", type=float, default=1.0,
                   help="simulated seconds per real second")
    p.add_argument("--start", help="simulated start time: epoch ms or ISO-8601 (default now)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fault", action="append", default=[], metavar="KIND:METER[:ARG]",
                   help="rollover[:margin_kwh] | reset | silent | nan | negative | slow:delay_s")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run; 0 = forever")
    p.add_argument("--specs-out", help="write the device list (JSON) to this file")
    args = p.parse_args(argv)

    async def run() -> None:
        sim = build_portfolio(args.gateways, args.meters_per_gateway, seed=args.seed,
                              speed=args.speed, start_ms=_parse_start(args.start))
        for i, gw in enumerate(sim.gateways):
            gw.host = args.host
            gw.port = args.base_port + i if args.base_port else 0
        for f in args.fault:
            apply_fault(sim, f)
        await sim.start()
        devices = [{"meter_id": d.meter_id, "profile": d.profile, "host": d.host,
                    "port": d.port, "unit_id": d.unit_id, "gateway_id": d.gateway_id}
                   for d in sim.device_specs()]
        if args.specs_out:
            with open(args.specs_out, "w") as fh:
                json.dump(devices, fh)
        print(json.dumps({"gateways": [[g.name, g.host, g.port] for g in sim.gateways],
                          "meters": len(devices), "sim_start_ms": sim.now_ms()}), flush=True)
        try:
            if args.duration > 0:
                await asyncio.sleep(args.duration)
            else:
                await asyncio.Event().wait()
        finally:
            await sim.stop()

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
