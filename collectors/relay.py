"""Relay control: write, read back, retry; idempotent per command id.

Commands go through the poller's gateway link, so a trip waits for the bus like any
other request instead of colliding with a poll on the same RS-485 line.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from dataclasses import dataclass

from collectors.link import LinkError
from collectors.poller import CLOSED, OPEN, UNKNOWN, Poller, PollResult

CONFIRMED, FAILED, TIMED_OUT = "CONFIRMED", "FAILED", "TIMED_OUT"
TRIP, RECONNECT = "TRIP", "RECONNECT"


@dataclass(frozen=True, slots=True)
class RelayOutcome:
    command_id: str
    meter_id: str
    action: str  # TRIP | RECONNECT
    status: str  # CONFIRMED | FAILED | TIMED_OUT
    relay_after: str  # CLOSED | OPEN | UNKNOWN
    attempts: int
    ts_ms: int
    detail: str = ""
    duplicate: bool = False  # True when returned from the executed-ids memory


def tripped_but_drawing(result: PollResult, threshold_w: float) -> str | None:
    """Alarm text if the relay reads OPEN while a circuit still draws > threshold_w."""
    if result.relay != OPEN:
        return None
    for cid, vals in result.circuits.items():
        p = vals.get("power_w", math.nan)
        if not math.isnan(p) and p > threshold_w:
            return f"relay OPEN but circuit {cid} draws {p:.0f} W (> {threshold_w:.0f} W)"
    return None


class RelayController:
    def __init__(self, poller: Poller, *, attempts: int = 3, timeout_s: float = 10.0,
                 readback_delay_s: float = 0.05, retry_backoff_s: float = 0.2,
                 verify_power: bool = True, remember: int = 10_000) -> None:
        self.poller = poller
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.readback_delay_s = readback_delay_s
        self.retry_backoff_s = retry_backoff_s
        self.verify_power = verify_power
        self._done: OrderedDict[str, RelayOutcome] = OrderedDict()
        self._remember = remember
        self._inflight: dict[str, asyncio.Future] = {}

    def outcome_of(self, command_id: str) -> RelayOutcome | None:
        return self._done.get(command_id)

    def remember_outcome(self, outcome: RelayOutcome) -> None:
        """Seed the executed-ids memory (from the persistent command log at start-up)."""
        self._done[outcome.command_id] = outcome
        self._done.move_to_end(outcome.command_id)
        while len(self._done) > self._remember:
            self._done.popitem(last=False)

    async def execute(self, command_id: str, meter_id: str, action: str) -> RelayOutcome:
        """Run a TRIP or RECONNECT once per command id; repeats return the first outcome."""
        if action not in (TRIP, RECONNECT):
            raise ValueError(f"unknown relay action {action!r}")
        if command_id in self._done:
            prev = self._done[command_id]
            return RelayOutcome(**{**_fields(prev), "duplicate": True})
        if command_id in self._inflight:  # a concurrent repeat waits for the first run
            prev = await asyncio.shield(self._inflight[command_id])
            return RelayOutcome(**{**_fields(prev), "duplicate": True})
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[command_id] = fut
        try:
            try:
                outcome = await asyncio.wait_for(self._run(command_id, meter_id, action),
                                                 self.timeout_s)
            except TimeoutError:
                outcome = RelayOutcome(command_id, meter_id, action, TIMED_OUT, UNKNOWN,
                                       self.attempts, self.poller.clock(),
                                       f"no confirmation within {self.timeout_s}s")
            self.remember_outcome(outcome)
            fut.set_result(outcome)
            return outcome
        finally:
            self._inflight.pop(command_id, None)
            if not fut.done():
                fut.cancel()

    async def _run(self, command_id: str, meter_id: str, action: str) -> RelayOutcome:
        clock = self.poller.clock
        if meter_id not in self.poller.devices:
            return RelayOutcome(command_id, meter_id, action, FAILED, UNKNOWN, 0, clock(),
                                "unknown meter")
        link, st = self.poller.link_for(meter_id)
        r = st.profile.relay
        if r is None:
            return RelayOutcome(command_id, meter_id, action, FAILED, UNKNOWN, 0, clock(),
                                f"profile {st.profile.model} has no relay")
        want = r.open if action == TRIP else r.closed
        want_state = OPEN if action == TRIP else CLOSED
        unit = st.spec.unit_id
        state, detail, timeouts = UNKNOWN, "", 0
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                await asyncio.sleep(self.retry_backoff_s * (2 ** (attempt - 2)))
            try:
                if r.table == "coil":
                    await link.request("write_coil", unit, r.address, bool(want))
                else:
                    await link.request("write_register", unit, r.address, want)
                await asyncio.sleep(self.readback_delay_s)
                raw = await link.request("read_coil" if r.table == "coil" else "read_holding",
                                         unit, r.address, 1)
            except LinkError as exc:
                timeouts += exc.timeout or exc.gateway
                detail = str(exc)
                continue
            v = int(raw[0])
            state = CLOSED if v == r.closed else OPEN if v == r.open else UNKNOWN
            if state == want_state:
                if self.verify_power and action == TRIP:
                    # a fresh poll runs the tripped_but_drawing check right away
                    await self.poller.poll_device(st)
                return RelayOutcome(command_id, meter_id, action, CONFIRMED, state, attempt,
                                    clock(), "read-back confirmed")
            detail = f"read back {v}, expected {want}"
        status = TIMED_OUT if timeouts == self.attempts else FAILED
        return RelayOutcome(command_id, meter_id, action, status, state, self.attempts,
                            clock(), detail)


def _fields(o: RelayOutcome) -> dict:
    return {k: getattr(o, k) for k in RelayOutcome.__slots__}


__all__ = ["RelayController", "RelayOutcome", "tripped_but_drawing",
           "CONFIRMED", "FAILED", "TIMED_OUT", "TRIP", "RECONNECT"]
