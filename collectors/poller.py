"""Polling engine: many gateways concurrently, one request at a time per gateway.

Each gateway runs one scheduler task over its devices (earliest due first). A device
that stops answering costs one timeout per back-off period, not one per interval: it is
reported (`device_down`), skipped for a growing back-off, probed with a single attempt
and reported again (`device_up`) when it answers. Other gateways never wait for it.

Results go to `on_result` (sync or async callable) and to any `results()` stream.
Counter anomalies are flagged, never hidden or corrected: billing decides what to do.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from collectors.decode import counter_wrap
from collectors.link import TABLE_FC, GatewayLink, LinkError
from collectors.plan import BlockCodec, ReadBlock, compile_blocks, plan_profile, single_reads
from collectors.profile import NON_NEGATIVE, FieldDef, Profile, load_profile
from collectors.spec import DeviceSpec

CLOSED, OPEN, UNKNOWN = "CLOSED", "OPEN", "UNKNOWN"


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class Flag:
    kind: str  # nan_register | negative_register | counter_decreased | rollover_suspected |
    #            reset_suspected | slow_response
    field: str
    circuit: str
    detail: str = ""


@dataclass(slots=True)
class PollResult:
    meter_id: str
    gateway_id: str
    ts_ms: int  # clock() when the poll started
    values: dict[str, float]  # canonical values of the meter's first circuit
    circuits: dict[str, dict[str, float]]  # circuit id -> canonical values
    relay: str  # CLOSED | OPEN | UNKNOWN (UNKNOWN also when the model has no relay)
    flags: list[Flag] = field(default_factory=list)
    latency_ms: float = 0.0
    requests: int = 0


@dataclass(slots=True)
class PollEvent:
    kind: str  # device_down | device_up | gateway_down | gateway_up | tripped_but_drawing
    ts_ms: int
    gateway_id: str
    meter_id: str | None = None
    detail: str = ""


@dataclass
class PollerConfig:
    timeout_s: float = 1.0
    retries: int = 1  # extra attempts per request while the device is healthy
    retry_backoff_s: float = 0.05  # doubled per attempt
    down_backoff_s: float = 5.0  # first skip period of a dead device, doubled per miss
    down_backoff_max_s: float = 120.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    slow_response_s: float = 0.5  # poll latency that earns a slow_response flag
    tripped_power_w: float = 50.0  # OPEN relay drawing more than this raises an alarm
    merge: bool = True  # False: one request per field (diagnostics, tests)
    pause_between_s: float = 0.0  # quiet time between requests (slow RS-485 converters)
    queue_size: int = 10_000
    client: str = "lean"  # "lean" (collectors.link) | "pymodbus" (for comparison)


@dataclass(eq=False)
class DeviceState:
    spec: DeviceSpec
    profile: Profile
    blocks: list[ReadBlock]
    next_due: float = 0.0
    down: bool = False
    backoff_s: float = 0.0
    drawing_alarm: bool = False
    polls_ok: int = 0
    polls_failed: int = 0
    # compiled once per device (add_device): the hot path only indexes flat lists
    codecs: list[BlockCodec] = field(default_factory=list)
    fields: tuple[FieldDef, ...] = ()  # flat value order: blocks' fields concatenated
    names: tuple[str, ...] = ()
    cids: tuple[str, ...] = ()  # circuit id of each flat value
    groups: tuple[tuple[str, tuple[int, ...], tuple[str, ...]], ...] = ()
    main_cid: str = ""
    counter_idx: tuple[int, ...] = ()
    nonneg_idx: tuple[int, ...] = ()
    previous: list[float] = field(default_factory=list)  # last good value per counter
    relay_fc: int = 0  # 0: no relay
    relay_addr: int = 0

    def compile(self) -> None:
        self.codecs = compile_blocks(self.blocks)
        self.fields = tuple(f for c in self.codecs for f in c.block.fields)
        self.names = tuple(f.name for f in self.fields)
        self.cids = tuple(self.spec.circuit_id(f.circuit) for f in self.fields)
        order = list(dict.fromkeys(self.cids))
        self.groups = tuple(
            (cid, idx, tuple(self.names[i] for i in idx))
            for cid in order for idx in [tuple(i for i, c in enumerate(self.cids) if c == cid)])
        self.main_cid = self.spec.circuit_id(self.profile.circuits[0])
        self.counter_idx = tuple(i for i, f in enumerate(self.fields) if f.is_counter)
        self.nonneg_idx = tuple(i for i, f in enumerate(self.fields) if f.name in NON_NEGATIVE)
        self.previous = [math.nan] * len(self.counter_idx)
        r = self.profile.relay
        if r is not None:
            self.relay_fc, self.relay_addr = TABLE_FC[r.table], r.address


class Poller:
    def __init__(self, devices: Iterable[DeviceSpec], *, config: PollerConfig | None = None,
                 clock: Callable[[], int] = wall_clock_ms,
                 on_result: Callable[[PollResult], object] | None = None,
                 on_event: Callable[[PollEvent], object] | None = None) -> None:
        self.config = config or PollerConfig()
        self.clock = clock
        self.on_result = on_result
        self.on_event = on_event
        self.links: dict[tuple[str, int], GatewayLink] = {}
        self.devices: dict[str, DeviceState] = {}
        self._by_link: dict[tuple[str, int], list[DeviceState]] = {}
        self._tasks: list[asyncio.Task] = []
        self._queues: list[asyncio.Queue] = []
        self._pending: set[asyncio.Task] = set()
        self._stopping = False
        self.dropped = 0
        if logging.getLogger("pymodbus").level == logging.NOTSET:
            # its per-timeout errors duplicate our device_down events
            logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        for spec in devices:
            self.add_device(spec)

    # --- setup ---------------------------------------------------------------------
    def add_device(self, spec: DeviceSpec) -> None:
        if spec.meter_id in self.devices:
            raise ValueError(f"duplicate meter id {spec.meter_id}")
        profile = load_profile(spec.profile)
        blocks = plan_profile(profile) if self.config.merge else single_reads(profile.fields)
        st = DeviceState(spec, profile, blocks)
        st.compile()
        key = spec.gateway_key
        if key not in self.links:
            name = spec.gateway_name
            link_cls = GatewayLink
            if self.config.client == "pymodbus":
                from collectors.link_pymodbus import PymodbusLink
                link_cls = PymodbusLink
            elif self.config.client != "lean":
                raise ValueError(f"unknown Modbus client {self.config.client!r}")
            self.links[key] = link_cls(
                spec.host, spec.port, name, timeout_s=self.config.timeout_s,
                reconnect_min_s=self.config.reconnect_min_s,
                reconnect_max_s=self.config.reconnect_max_s,
                on_state=lambda kind, detail, n=name: self._emit(PollEvent(
                    kind, self.clock(), n, None, detail)))
            self._by_link[key] = []
        self._by_link[key].append(st)
        self.devices[spec.meter_id] = st

    def link_for(self, meter_id: str) -> tuple[GatewayLink, DeviceState]:
        st = self.devices[meter_id]
        return self.links[st.spec.gateway_key], st

    # --- delivery ------------------------------------------------------------------
    def _deliver(self, cb: Callable | None, item: object) -> None:
        if cb is not None:
            out = cb(item)
            if inspect.isawaitable(out):
                t = asyncio.ensure_future(out)
                self._pending.add(t)
                t.add_done_callback(self._pending.discard)

    def _emit(self, event: PollEvent) -> None:
        self._deliver(self.on_event, event)

    def _publish(self, result: PollResult) -> None:
        self._deliver(self.on_result, result)
        for q in self._queues:
            if q.full():
                q.get_nowait()
                self.dropped += 1
            q.put_nowait(result)

    async def results(self) -> AsyncIterator[PollResult]:
        """Stream of poll results from now on (bounded: the oldest are dropped if slow)."""
        q: asyncio.Queue = asyncio.Queue(self.config.queue_size)
        self._queues.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._queues.remove(q)

    # --- one poll ------------------------------------------------------------------
    async def _read(self, link: GatewayLink, st: DeviceState, fc: int, address: int,
                    count: int) -> tuple[bytes, int]:
        try:  # the common case first: one attempt, no retry bookkeeping
            data = await link.read(fc, st.spec.unit_id, address, count)
        except LinkError as exc:
            if exc.gateway or st.down or not self.config.retries:
                raise  # retrying a dead gateway per device only delays the rest
            last = exc
        else:
            if self.config.pause_between_s:
                await asyncio.sleep(self.config.pause_between_s)
            return data, 1
        for i in range(1, 1 + self.config.retries):
            await asyncio.sleep(self.config.retry_backoff_s * (2 ** (i - 1)))
            try:
                data = await link.read(fc, st.spec.unit_id, address, count)
            except LinkError as exc:
                last = exc
                if exc.gateway:
                    break
                continue
            if self.config.pause_between_s:
                await asyncio.sleep(self.config.pause_between_s)
            return data, i + 1
        raise last

    async def poll_device(self, st: DeviceState) -> PollResult | None:
        """Poll one device now; updates its health state; returns None if it failed."""
        link = self.links[st.spec.gateway_key]
        loop = asyncio.get_running_loop()
        ts_ms = self.clock()
        t0 = loop.time()
        values: list[float] = []
        requests = 0
        relay = UNKNOWN
        try:
            for c in st.codecs:
                data, n = await self._read(link, st, c.fc, c.address, c.count)
                requests += n
                values += c.decode(data)
            if st.relay_fc:
                data, n = await self._read(link, st, st.relay_fc, st.relay_addr, 1)
                requests += n
                v = data[0] & 1 if st.relay_fc == 1 else (data[0] << 8) | data[1]
                r = st.profile.relay
                assert r is not None
                relay = CLOSED if v == r.closed else OPEN if v == r.open else UNKNOWN
        except LinkError as exc:
            self._mark_failed(st, str(exc))
            return None
        latency = loop.time() - t0
        result = self._build(st, ts_ms, values, relay, latency, requests)
        if st.down:
            self._emit(PollEvent("device_up", ts_ms, link.name, st.spec.meter_id,
                                 f"answered after {st.polls_failed} failed polls"))
            st.down = False
            st.backoff_s = 0.0
        st.polls_ok += 1
        if relay == OPEN or st.drawing_alarm:
            self._check_drawing(st, result, link.name)
        self._publish(result)
        return result

    def _mark_failed(self, st: DeviceState, detail: str) -> None:
        st.polls_failed += 1
        now = asyncio.get_running_loop().time()
        if not st.down:
            st.down = True
            st.backoff_s = self.config.down_backoff_s
            self._emit(PollEvent("device_down", self.clock(), st.spec.gateway_name,
                                 st.spec.meter_id, detail))
        else:
            st.backoff_s = min(st.backoff_s * 2, self.config.down_backoff_max_s)
        st.next_due = now + st.backoff_s

    def _build(self, st: DeviceState, ts_ms: int, values: list[float], relay: str,
               latency: float, requests: int) -> PollResult:
        if len(st.groups) == 1:
            circuits = {st.main_cid: dict(zip(st.names, values, strict=True))}
        else:
            circuits = {cid: {n: values[i] for i, n in zip(idx, names, strict=True)}
                        for cid, idx, names in st.groups}
        flags: list[Flag] = []
        total = sum(values)
        # NaN/inf anywhere makes the sum NaN/inf; a negative needs a look at the minimum
        bad = total - total != 0 or (st.nonneg_idx and min(
            values[i] for i in st.nonneg_idx) < 0)
        skip: set[int] = set()
        if bad:
            nonneg = set(st.nonneg_idx)
            for i, v in enumerate(values):
                if math.isnan(v) or math.isinf(v):
                    flags.append(Flag("nan_register", st.names[i], st.cids[i], repr(v)))
                    skip.add(i)
                elif v < 0 and i in nonneg:
                    flags.append(Flag("negative_register", st.names[i], st.cids[i], repr(v)))
                    skip.add(i)
        prev = st.previous
        for j, i in enumerate(st.counter_idx):
            v = values[i]
            if i in skip:
                continue  # garbage never becomes the baseline
            p = prev[j]
            prev[j] = v
            if v < p:  # False while p is NaN (no baseline yet)
                self._counter_flags(st, i, p, v, flags)
        if latency > self.config.slow_response_s:
            flags.append(Flag("slow_response", "", st.main_cid, f"{latency:.3f}s"))
        return PollResult(st.spec.meter_id, st.spec.gateway_name, ts_ms,
                          circuits.get(st.main_cid, {}), circuits, relay, flags,
                          latency * 1000.0, requests)

    @staticmethod
    def _counter_flags(st: DeviceState, i: int, prev: float, v: float,
                       flags: list[Flag]) -> None:
        f, name, cid = st.fields[i], st.names[i], st.cids[i]
        flags.append(Flag("counter_decreased", name, cid, f"{prev!r} -> {v!r}"))
        wrap = counter_wrap(f.type, f.scale, f.wrap)
        # through the wrap, the implied delta is small: a rollover, not a reset
        if wrap is not None and (wrap - prev) + v < 0.01 * wrap:
            flags.append(Flag("rollover_suspected", name, cid,
                              f"wrap at {wrap!r}, delta {(wrap - prev) + v:.4f}"))
        else:
            flags.append(Flag("reset_suspected", name, cid, f"{prev!r} -> {v!r}"))

    def _check_drawing(self, st: DeviceState, result: PollResult, gateway: str) -> None:
        from collectors.relay import tripped_but_drawing
        alarm = tripped_but_drawing(result, self.config.tripped_power_w)
        if alarm and not st.drawing_alarm:  # once per episode, re-armed when it clears
            self._emit(PollEvent("tripped_but_drawing", result.ts_ms, gateway,
                                 st.spec.meter_id, alarm))
        st.drawing_alarm = bool(alarm)

    # --- scheduling ----------------------------------------------------------------
    async def _run_gateway(self, key: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        devices = self._by_link[key]
        start = loop.time()
        heap: list[tuple[float, int, DeviceState]] = []
        for i, st in enumerate(devices):  # spread the first polls over one interval
            st.next_due = start + st.spec.interval_s * i / len(devices)
            heap.append((st.next_due, i, st))
        heapq.heapify(heap)
        while not self._stopping:
            due, i, st = heap[0]
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            ok = await self.poll_device(st) is not None
            if ok:
                # keep the cadence; if we fell behind, poll again as soon as possible
                st.next_due = max(due + st.spec.interval_s, loop.time())
            heapq.heapreplace(heap, (st.next_due, i, st))

    def start(self) -> None:
        if self._tasks:
            raise RuntimeError("poller already running")
        self._stopping = False
        self._tasks = [asyncio.create_task(self._run_gateway(k), name=f"gw-{k[0]}:{k[1]}")
                       for k in self._by_link]

    async def stop(self) -> None:
        # Python 3.11's wait_for can swallow a cancel that races with a completed
        # request, so the loops also check a flag and are cancelled until they end.
        self._stopping = True
        pending = set(self._tasks)
        while pending:
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        for t in self._tasks:
            if not t.cancelled() and t.exception() is not None:
                logging.getLogger(__name__).error("gateway task failed", exc_info=t.exception())
        self._tasks = []
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        for link in self.links.values():
            await link.close()

    async def run(self, duration_s: float | None = None) -> None:
        """Poll until cancelled, or for `duration_s` seconds, then close connections."""
        self.start()
        try:
            if duration_s is None:
                await asyncio.gather(*self._tasks)
            else:
                await asyncio.sleep(duration_s)
        finally:
            await self.stop()

    async def poll_all_once(self) -> list[PollResult | None]:
        """Every device once: gateways in parallel, devices of a gateway in sequence."""
        async def one_gateway(devs: list[DeviceState]) -> list[PollResult | None]:
            return [await self.poll_device(d) for d in devs]
        per_gw = await asyncio.gather(*(one_gateway(d) for d in self._by_link.values()))
        return [r for rs in per_gw for r in rs]

    def stats(self) -> dict[str, int]:
        return {
            "devices": len(self.devices),
            "gateways": len(self.links),
            "down": sum(d.down for d in self.devices.values()),
            "polls_ok": sum(d.polls_ok for d in self.devices.values()),
            "polls_failed": sum(d.polls_failed for d in self.devices.values()),
            "requests": sum(link.requests for link in self.links.values()),
            "dropped": self.dropped,
        }
