"""Poller, relay and simulator over real Modbus TCP on loopback (ephemeral ports)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from collectors.decode import counter_wrap
from collectors.poller import Poller, PollerConfig, PollEvent, PollResult
from collectors.profile import load_profile, load_profiles
from collectors.relay import CONFIRMED, TIMED_OUT, RelayController
from collectors.simulator import SimGateway, SimMeter, Simulator, apply_fault, build_portfolio

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

START_MS = 1_720_000_000_000  # 2024-07-03 17:46 in UTC+8: evening peak hours
FAST = PollerConfig(timeout_s=0.3, retries=1, retry_backoff_s=0.01, down_backoff_s=0.5,
                    down_backoff_max_s=1.0)


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro_fn())


def one_of_each(**kw) -> Simulator:
    """One gateway, one meter per bundled profile, unit ids 1..n."""
    meters = {}
    for u, name in enumerate(sorted(load_profiles()), start=1):
        three = "adl400" in name or "sdm630" in name or "dtsu" in name
        meters[u] = SimMeter(f"M-{name}", load_profile(name), u, "retail",
                             40.0 if three else 6.0, three, seed=u, import_kwh=1234.5 + u)
    return Simulator([SimGateway("GW-A", meters)], start_ms=START_MS, **kw)


def close_to(got: float, want: float, scale: float) -> bool:
    return math.isclose(got, want, rel_tol=2e-6, abs_tol=abs(scale) * 0.51 + 1e-9)


@pytest.mark.parametrize("client", ["lean", "pymodbus"])
def test_every_profile_decodes_to_the_simulated_values(client: str) -> None:
    async def body() -> None:
        sim = one_of_each(speed=0)
        await sim.start(drive=False)
        sim.advance(1800)  # half an hour of load so every value is non-trivial
        try:
            poller = Poller(sim.device_specs(), config=replace(FAST, client=client),
                            clock=sim.now_ms)
            results = await poller.poll_all_once()
            assert all(results), poller.stats()
            for r in results:
                assert r is not None
                m = sim.meters[r.meter_id]
                truth = m.values()
                assert r.ts_ms == sim.now_ms()
                assert r.flags == []
                for f in m.profile.fields:
                    assert close_to(r.values[f.name], truth[f.name], f.scale), (
                        r.meter_id, f.name, r.values[f.name], truth[f.name])
                assert r.values["import_kwh"] > 1234.5
                assert r.relay == ("CLOSED" if m.profile.relay else "UNKNOWN")
        finally:
            await sim.stop()
    run(body)


def test_merged_requests_read_the_same_values_as_single_reads() -> None:
    async def body() -> None:
        sim = one_of_each(speed=0)
        await sim.start(drive=False)
        sim.advance(600)
        try:
            merged = Poller(sim.device_specs(), config=FAST, clock=sim.now_ms)
            single = Poller(sim.device_specs(),
                            config=PollerConfig(timeout_s=0.3, merge=False), clock=sim.now_ms)
            a = {r.meter_id: r for r in await merged.poll_all_once() if r}
            b = {r.meter_id: r for r in await single.poll_all_once() if r}
            assert set(a) == set(b) == set(sim.meters)
            for mid in a:
                assert a[mid].values == b[mid].values
                assert a[mid].relay == b[mid].relay
            assert merged.stats()["requests"] < single.stats()["requests"]
            await merged.stop()
            await single.stop()
        finally:
            await sim.stop()
    run(body)


def _kinds(r: PollResult, field: str) -> set[str]:
    return {f.kind for f in r.flags if f.field == field}


def test_rollover_and_reset_are_flagged_not_hidden() -> None:
    async def body() -> None:
        sim = one_of_each(speed=0)
        await sim.start(drive=False)
        try:
            poller = Poller(sim.device_specs(), config=FAST, clock=sim.now_ms)
            ddsy, adl2 = sim.meters["M-acrel_ddsy1352"], sim.meters["M-acrel_adl400_v2"]
            wraps = {m.meter_id: m.inject_rollover(margin_kwh=0.3) for m in (ddsy, adl2)}
            assert wraps[ddsy.meter_id] == pytest.approx(42_949_672.96)
            assert wraps[adl2.meter_id] == 1_000_000.0
            before = {r.meter_id: r for r in await poller.poll_all_once() if r}
            for mid in wraps:
                assert before[mid].values["import_kwh"] > wraps[mid] - 1
            sim.advance(3600)  # an hour of load pushes both counters through the wrap
            after = {r.meter_id: r for r in await poller.poll_all_once() if r}
            for mid, wrap in wraps.items():
                r = after[mid]
                assert r.values["import_kwh"] < 100, r.values
                assert {"counter_decreased", "rollover_suspected"} <= _kinds(r, "import_kwh")
                # the truth kept counting: delta through the wrap equals the energy used
                expected = sim.meters[mid].import_kwh - before[mid].values["import_kwh"]
                delta = wrap - before[mid].values["import_kwh"] + r.values["import_kwh"]
                assert delta == pytest.approx(expected, abs=0.02)
            sdm = sim.meters["M-eastron_sdm120"]
            sdm.inject_reset()
            reset = {r.meter_id: r for r in await poller.poll_all_once() if r}
            assert {"counter_decreased", "reset_suspected"} <= _kinds(
                reset["M-eastron_sdm120"], "import_kwh")
            assert "rollover_suspected" not in _kinds(reset["M-eastron_sdm120"], "import_kwh")
            assert counter_wrap("float32", 1.0) is None
            # garbage registers
            apply_fault(sim, "nan:M-eastron_sdm630")
            apply_fault(sim, "negative:M-chint_dtsu666")
            apply_fault(sim, "nan:M-acrel_adl400")
            bad = {r.meter_id: r for r in await poller.poll_all_once() if r}
            assert "nan_register" in _kinds(bad["M-eastron_sdm630"], "import_kwh")
            assert "nan_register" in _kinds(bad["M-acrel_adl400"], "voltage_v")  # 0xFFFF
            assert "negative_register" in _kinds(bad["M-chint_dtsu666"], "import_kwh")
            # untouched meters stay clean
            assert bad["M-acrel_ddsy1352"].flags == []
        finally:
            await sim.stop()
    run(body)


def test_a_silent_device_does_not_delay_the_others() -> None:
    async def body() -> None:
        sim = build_portfolio(2, 4, speed=60, start_ms=START_MS)
        await sim.start()
        silent = "M-00001"  # on GW-000 next to three healthy meters
        sim.meters[silent].faults.silent = True
        events: list[PollEvent] = []
        polls: dict[str, list[float]] = {m: [] for m in sim.meters}
        interval = 0.25

        def on_result(r: PollResult) -> None:
            polls[r.meter_id].append(time.monotonic())

        poller = Poller(sim.device_specs(interval_s=interval), config=FAST,
                        clock=sim.now_ms, on_result=on_result, on_event=events.append)
        gateway_of = {d.meter_id: d.gateway_id for d in sim.device_specs()}
        try:
            duration = 3.0
            poller.start()
            await asyncio.sleep(duration)
            expected = duration / interval
            down = [e for e in events if e.kind == "device_down"]
            assert [e.meter_id for e in down] == [silent]
            assert polls[silent] == []
            for mid, ts in polls.items():
                if mid == silent:
                    continue
                # generous: the same-bus meters lose one timeout per back-off period
                assert len(ts) >= expected * 0.7, (mid, len(ts), expected)
                gaps = [b - a for a, b in zip(ts, ts[1:], strict=False)]
                extra = 2 * FAST.timeout_s + 0.2 if gateway_of[mid] == gateway_of[silent] else 0.15
                assert max(gaps) < interval + extra, (mid, max(gaps))
            # it answers again: reported and picked up within the (capped) back-off
            sim.meters[silent].faults.silent = False
            await asyncio.sleep(FAST.down_backoff_max_s + 0.6)
            assert any(e.kind == "device_up" and e.meter_id == silent for e in events)
            assert polls[silent], "revived device never polled"
            await poller.stop()
        finally:
            await sim.stop()
    run(body)


def test_trip_opens_relay_readback_confirms_and_energy_stops() -> None:
    async def body() -> None:
        sim = one_of_each(speed=0)
        await sim.start(drive=False)
        events: list[PollEvent] = []
        try:
            poller = Poller(sim.device_specs(), config=FAST, clock=sim.now_ms,
                            on_event=events.append)
            relay = RelayController(poller, timeout_s=5.0)
            for mid in ("M-acrel_ddsy1352", "M-acrel_adl400"):  # coil and holding register
                m = sim.meters[mid]
                sim.advance(600)
                _, st = poller.link_for(mid)
                r0 = await poller.poll_device(st)
                assert r0 is not None and r0.values["power_w"] > 0 and r0.relay == "CLOSED"
                out = await relay.execute(f"cmd-{mid}", mid, "TRIP")
                assert (out.status, out.relay_after, out.attempts) == (CONFIRMED, "OPEN", 1)
                assert m.relay_closed is False
                r1 = await poller.poll_device(st)
                assert r1 is not None and r1.relay == "OPEN" and r1.values["power_w"] == 0
                sim.advance(3600)
                r2 = await poller.poll_device(st)
                assert r2 is not None
                assert r2.values["import_kwh"] == r1.values["import_kwh"]  # stopped growing
                # repeated command id: same outcome, no second write
                writes = m.relay_writes
                again = await relay.execute(f"cmd-{mid}", mid, "TRIP")
                assert again.duplicate and again.status == CONFIRMED
                assert m.relay_writes == writes
                back = await relay.execute(f"re-{mid}", mid, "RECONNECT")
                assert back.status == CONFIRMED and back.relay_after == "CLOSED"
                sim.advance(600)
                r3 = await poller.poll_device(st)
                assert r3 is not None and r3.values["import_kwh"] > r2.values["import_kwh"]
            # a welded contactor: relay reads OPEN, power still flows -> alarm
            m = sim.meters["M-acrel_ddsy1352"]
            m.relay_closed, m.power_w = False, 3000.0
            m.encode()
            _, st = poller.link_for(m.meter_id)
            await poller.poll_device(st)
            alarms = [e for e in events if e.kind == "tripped_but_drawing"]
            assert [e.meter_id for e in alarms] == [m.meter_id]
            # a silent meter cannot confirm
            m.faults.silent = True
            out = await relay.execute("cmd-silent", m.meter_id, "RECONNECT")
            assert out.status == TIMED_OUT and out.relay_after == "UNKNOWN"
            await poller.stop()
        finally:
            await sim.stop()
    run(body)


def test_simulated_energy_follows_the_clock() -> None:
    async def body() -> None:
        sim = build_portfolio(1, 3, speed=3600, start_ms=START_MS, tick_s=0.05)
        await sim.start()
        try:
            poller = Poller(sim.device_specs(), config=FAST, clock=sim.now_ms)
            first = {r.meter_id: r for r in await poller.poll_all_once() if r}
            await asyncio.sleep(0.5)  # ~30 simulated minutes
            sim.pause()
            second = {r.meter_id: r for r in await poller.poll_all_once() if r}
            assert sim.now_ms() - START_MS >= 1200_000
            for mid, r in second.items():
                m = sim.meters[mid]
                assert r.values["import_kwh"] > first[mid].values["import_kwh"]
                assert close_to(r.values["import_kwh"], m.import_kwh,
                                m.profile.field("import_kwh").scale)
            await poller.stop()
        finally:
            await sim.stop()
    run(body)


def test_slow_device_is_flagged_and_still_read() -> None:
    async def body() -> None:
        sim = one_of_each(speed=0)
        await sim.start(drive=False)
        try:
            apply_fault(sim, "slow:M-eastron_sdm120:0.15")
            cfg = PollerConfig(timeout_s=1.0, slow_response_s=0.3)
            poller = Poller(sim.device_specs(), config=cfg, clock=sim.now_ms)
            got = {r.meter_id: r for r in await poller.poll_all_once() if r}
            slow = got["M-eastron_sdm120"]
            assert slow.requests >= 2  # 0.15 s per request, several requests per poll
            assert any(f.kind == "slow_response" for f in slow.flags)
            assert not any(f.kind == "slow_response" for f in got["M-acrel_adl400"].flags)
            await poller.stop()
        finally:
            await sim.stop()
    run(body)


def test_a_late_answer_is_not_taken_for_the_next_request() -> None:
    """A device answering after its timeout: the late frame (old transaction id) must be
    dropped, not decoded as the next device's registers, and the connection survives."""
    async def body() -> None:
        sim = one_of_each(speed=0)
        await sim.start(drive=False)
        sim.advance(900)
        try:
            apply_fault(sim, "slow:M-eastron_sdm120:0.5")
            cfg = PollerConfig(timeout_s=0.3, retries=0, down_backoff_s=60.0)
            poller = Poller(sim.device_specs(), config=cfg, clock=sim.now_ms)
            got = {r.meter_id: r for r in await poller.poll_all_once() if r}
            assert "M-eastron_sdm120" not in got  # timed out
            link = next(iter(poller.links.values()))
            for mid, r in got.items():
                truth = sim.meters[mid].values()
                for f in sim.meters[mid].profile.fields:
                    assert close_to(r.values[f.name], truth[f.name], f.scale), (mid, f.name)
            assert link._proto is not None and link._proto.stale >= 1
            assert link.up is True
            await poller.stop()
        finally:
            await sim.stop()
    run(body)
