"""The power loop in replay: relay commands, retries and ops alerts as the stream produced them.

`mallwatt replay --arrival-order --outcomes outcomes.parquet` (the relay outcomes topic as
`mallwatt export-input` writes it: each outcome with its partition, offset and message time)
runs the stream's own power loop (`pipelines.powerloop.PowerLoop` over `pipelines.core.relay`)
beside the billing replay. Its inputs, in arrival order, are what the worker's power loop saw:

- the wallet's TRIP/RECONNECT of each core call, gated through the relay holds at the time the
  stream issued them (`issue_time`: the message that carried their cause);
- the relay column (and power) of each readings message, at its message time;
- the relay outcomes, at their message times;
- the timer after every input, at the stream clock (the newest message time so far), as the
  worker's `power_timer` ticks between inputs.

Outputs: `relay_commands` (RelayCommand records) and `relay_alerts` (relay_retry, paid_but_dark,
tripped_but_drawing, meter_unreachable). Command ids and alert ids are the stream's exactly; the
issue times are the stream's when its timer ran between inputs (inputs sparser than
`MALLWATT_TICK_S` per worker), else they may be later there by up to one tick (docs/relay-state-machine.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import polars as pl

from infra import topics as T
from pipelines import powerloop
from pipelines.core import relay
from pipelines.envelope import Envelope, OutboxItem
from schemas import codec

OUTCOME_SCHEMA: dict[str, Any] = {
    "command_id": pl.String, "action": pl.String, "status": pl.String, "mall_id": pl.String, "gateway_id": pl.String,
    "meter_id": pl.String, "relay_after": pl.String, "attempts": pl.Int64, "ts_ms": pl.Int64, "detail": pl.String,
    "partition": pl.Int64, "offset": pl.Int64, "msg_ts_ms": pl.Int64}
RELAY_COMMAND_SCHEMA: dict[str, Any] = {
    "command_id": pl.String, "action": pl.String, "reason": pl.String, "mall_id": pl.String, "gateway_id": pl.String,
    "meter_id": pl.String, "account_id": pl.String, "issued_at_ms": pl.Int64, "cause_ts_ms": pl.Int64,
    "requested_by": pl.String}
RELAY_ALERT_SCHEMA: dict[str, Any] = {
    "alert_id": pl.String, "kind": pl.String, "severity": pl.String, "mall_id": pl.String, "account_id": pl.String,
    "meter_id": pl.String, "ts_ms": pl.Int64, "message": pl.String, "details": pl.String}
RELAY_OUTPUTS = ("relay_commands", "relay_alerts")

Sink = Callable[[str, pl.DataFrame], None]


def outcome_rows(outcomes: pl.DataFrame | None) -> list[dict[str, Any]]:
    """Outcomes in the order the worker read them: by message time, then partition and offset."""
    if outcomes is None or not outcomes.height:
        return []
    for name in ("meter_id", "command_id", "status", "ts_ms", "msg_ts_ms", "partition", "offset"):
        if name not in outcomes.columns:
            raise ValueError(f"outcomes: missing column {name!r} (mallwatt export-input writes outcomes.parquet)")
    frame = outcomes.sort("msg_ts_ms", "partition", "offset", maintain_order=True)
    return frame.to_dicts()


class RelayReplay:
    """The worker's power loop over replayed input (see the module doc). `ctx` is the stream's
    BillingContext (meters, gateways, routes)."""

    def __init__(self, ctx: Any, outcomes: pl.DataFrame | None, sink: Sink,
                 policy: relay.RelayPolicy | None = None) -> None:
        self.ctx, self.sink, self.policy = ctx, sink, policy or powerloop.POLICY
        self.envs: dict[str, Envelope] = {}  # account key -> holds and loop records only
        self.due: dict[str, int] = {}  # key -> earliest chain due (the worker's `due`)
        self.outcomes = outcome_rows(outcomes)
        self.next_outcome = 0
        self.clock = 0
        self.commands: list[dict[str, Any]] = []
        self.alerts: list[dict[str, Any]] = []

    # -- inputs, in arrival order ----------------------------------------------------------
    def call(self, readings: pl.DataFrame | None, payments: pl.DataFrame | None, commands: list[pl.DataFrame],
             now: int) -> None:
        """A core call's inputs and the wallet commands it (and the tick after it) gave: per
        instant, the commands issued then (gated through the holds), the relay column and
        power of the readings messages that arrived then, and the timer once all of that
        instant is in, as the worker's step and then its timer do."""
        issue = issue_times(readings, payments, now, self.ctx)
        events: list[tuple[int, int, int, Any]] = []
        for frame in commands:
            for row in frame.iter_rows(named=True):
                events.append((issue(row), 0, len(events), row))
        if readings is not None and readings.height and "msg_ts_ms" in readings.columns:
            msg = readings["msg"] if "msg" in readings.columns else pl.Series("msg", [0] * readings.height)
            framed = readings.with_columns(msg.alias("_msg"))
            for part in framed.partition_by("_msg", maintain_order=True):
                t = part["msg_ts_ms"][0]
                events.append((int(t) if t is not None else now, 1, len(events), part.drop("_msg")))
        if payments is not None and payments.height and "msg_ts_ms" in payments.columns:
            events += [(int(t), 2, len(events) + i, None) for i, t in enumerate(payments["msg_ts_ms"].to_list())
                       if t is not None]
        events.sort(key=lambda e: (e[0], e[1], e[2]))
        for i, (t, kind, _, value) in enumerate(events):
            self.arrived_by(t)
            if kind == 0:
                self._gate(value, t)
            elif kind == 1:
                self._observe(value, t)
            if i + 1 == len(events) or events[i + 1][0] != t:
                self._ticked(t)
        self._ticked(now)

    def _gate(self, row: dict[str, Any], now: int) -> None:
        from pipelines.billing import gate_wallet_commands

        loop = self._loop([self.ctx.bucket_of(row["account_id"])], now)
        self._emit(gate_wallet_commands(SimpleNamespace(commands=pl.DataFrame([row])), loop, self.ctx))  # type: ignore[arg-type]
        self._keep(loop)

    def _observe(self, message: pl.DataFrame, now: int) -> None:
        if "relay" not in message.columns or not message.height:
            return
        keys = {self.ctx.bucket_of(r.account_id) for m in message["meter_id"].unique().to_list()
                if (r := self.ctx.meter_route.get(m)) is not None}
        loop = self._loop(sorted(keys), now)
        self._emit(loop.observe(message, now))
        self._keep(loop)

    def arrived_by(self, t: int) -> None:
        """The outcomes that arrived before an input at `t`, each followed by the timer."""
        while self.next_outcome < len(self.outcomes) and (self.outcomes[self.next_outcome]["msg_ts_ms"] or 0) <= t:
            o = self.outcomes[self.next_outcome]
            self.next_outcome += 1
            route = self.ctx.meter_route.get(o["meter_id"])
            now = int(o["msg_ts_ms"] or 0)
            if route is not None:  # the stream dead-letters an outcome of an unknown meter
                key = self.ctx.bucket_of(route.account_id)
                loop = self._loop([key], now)
                self._emit(loop.outcome(route.account_id, o, now))
                self._keep(loop)
            self._ticked(now)

    def finish(self) -> None:
        """The outcomes after the last input; then the outputs are flushed."""
        self.arrived_by(1 << 62)
        self.flush()

    def flush(self) -> None:
        if self.commands:
            # every field of the record (a newer RelayCommand version's too), the known ones typed
            self.sink("relay_commands", pl.DataFrame(self.commands, schema_overrides=RELAY_COMMAND_SCHEMA,
                                                     infer_schema_length=None))
        if self.alerts:
            self.sink("relay_alerts", pl.DataFrame(
                [{**a, "details": json.dumps(a["details"], sort_keys=True)} for a in self.alerts],
                schema=RELAY_ALERT_SCHEMA))
        self.commands, self.alerts = [], []

    # -- the timer -------------------------------------------------------------------------
    def _ticked(self, t: int) -> None:
        """The worker's power_timer after an input: the stream clock is the newest message time."""
        self.clock = max(self.clock, t)
        for key in sorted(k for k, when in self.due.items() if when <= self.clock):
            loop = self._loop([key], self.clock)
            self._emit(loop.tick(self.clock))
            self._keep(loop)

    # -- plumbing --------------------------------------------------------------------------
    def _loop(self, keys: list[str], now: int) -> powerloop.PowerLoop:
        envs = {k: self.envs.get(k) or Envelope() for k in keys}
        return powerloop.PowerLoop(envs, self.ctx, now, lambda a: self.ctx.bucket_of(a), self.policy)

    def _keep(self, loop: powerloop.PowerLoop) -> None:
        for key in loop.envs:
            holds, relays = loop.holds_of(key), loop.relays_of(key)
            if holds or relays:
                self.envs[key] = Envelope(holds=holds, relays=relays)
            else:
                self.envs.pop(key, None)
            when = powerloop.next_due(self.envs[key]) if key in self.envs else None
            if when is None:
                self.due.pop(key, None)
            else:
                self.due[key] = when

    def _emit(self, tagged: list[tuple[str, OutboxItem]]) -> None:
        for _, item in tagged:
            if item.topic == T.RELAY_COMMANDS:
                self.commands.append(codec.decode("RelayCommand", item.value))
            elif item.topic == T.ALERTS:
                self.alerts.append(codec.decode("Alert", item.value))


def issue_times(readings: pl.DataFrame | None, payments: pl.DataFrame | None, now: int, ctx: Any
                ) -> Callable[[dict[str, Any]], int]:
    """When the stream issued a wallet command of a core call: at the message time of what
    caused it (the stream's step time): a top-up's payment, a charge's reading; a deferred
    trip's friendly-period end at the first message at or after it (the timer fires on the
    clock); a day posting at the account's first reading message at or after the day's start
    (the timer waits for the account's readings). Else the call's newest time."""
    pays: dict[str, int] = {}
    if payments is not None and payments.height and "msg_ts_ms" in payments.columns:
        pays = {p: int(t) for p, t in zip(payments["payment_id"].to_list(), payments["msg_ts_ms"].to_list(),
                                          strict=True) if t is not None}
    by_reading: dict[tuple[str, int], int] = {}
    by_circuit: dict[str, list[tuple[int, int]]] = {}
    msg_times: list[int] = []
    if readings is not None and readings.height and "msg_ts_ms" in readings.columns:
        for c, ts, m in readings.select("circuit_id", "ts_ms", "msg_ts_ms").iter_rows():
            if m is None:
                continue
            by_reading.setdefault((c, ts), m)
            by_circuit.setdefault(c, []).append((ts, m))
            msg_times.append(m)
    circuits_of: dict[str, list[str]] = {}
    for c in by_circuit:
        route = ctx.circuit_meter.get(c)
        if route is not None:
            circuits_of.setdefault(route.account_id, []).append(c)

    def issue_time(row: dict[str, Any]) -> int:
        cause, account, at = str(row["cause_id"]), row["account_id"], int(row["cause_ts_ms"])
        if cause in pays:
            return pays[cause]
        prefix = f"{account}:chg:"
        if cause.startswith(prefix):
            circuit, end = cause[len(prefix):].rsplit(":", 4)[:2]
            hit = by_reading.get((circuit, int(end)))
            if hit is not None:
                return hit
        if cause.startswith(("friendly_end:", "timer:")):
            later = [m for m in msg_times if m >= at]
            return min(later) if later else now
        later = [m for c in circuits_of.get(account, []) for ts, m in by_circuit[c] if ts >= at]
        return min(later) if later else now
    return issue_time
