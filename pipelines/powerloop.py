"""The stream's side of the power loop (pipelines.core.relay): holds and relay loop state of
the accounts in one step, and the outbox items (relay commands, ops alerts) they cause.

Every relay command of the stream goes through here: a hold that opens or closes a meter
starts a command chain stamped with the step's explicit `now` (the newest Kafka message
timestamp of the step's input, or the timer's time); relay outcomes and the readings' relay
column are observations; the timer re-issues what is due. The state lives in the account's
Envelope (`holds`, `relays`), so a change and its commands are one changelog record.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import polars as pl

from infra import topics as T
from pipelines.core import relay
from pipelines.core.engine import next_day_start_ms
from pipelines.envelope import Envelope, OutboxItem
from pipelines.relaygate import Holds, set_hold
from schemas import codec


def policy_from_env(env: dict[str, str] | None = None) -> relay.RelayPolicy:
    """Retry settings; `MALLWATT_RELAY_<FIELD>` (e.g. MALLWATT_RELAY_BACKOFF_MS) overrides a default."""
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {}
    for name, default in _defaults():
        raw = env.get(f"MALLWATT_RELAY_{name.upper()}")
        if raw is not None:
            try:
                values[name] = type(default)(raw)
            except ValueError:
                raise ValueError(f"MALLWATT_RELAY_{name.upper()}={raw!r}: expected {type(default).__name__}") from None
    policy = relay.RelayPolicy(**values)
    if policy.max_attempts < 1 or policy.give_up_attempts < policy.max_attempts or policy.ack_timeout_ms < 1000:
        raise ValueError(f"relay policy out of range: {policy}")
    return policy


def _defaults() -> list[tuple[str, Any]]:
    p = relay.RelayPolicy()
    return [(f, getattr(p, f)) for f in relay.RelayPolicy.__slots__]  # type: ignore[attr-defined]


POLICY = policy_from_env()

Tagged = list[tuple[str, OutboxItem]]


class _Copies(dict[str, Any]):
    """Each key's holds (or loop records), copied from its envelope on first use: most accounts
    of a step change neither, and copying every touched account's cost a dict per account."""

    def __init__(self, envs: dict[str, Envelope], field: str) -> None:
        super().__init__()
        self._envs, self._field = envs, field

    def __missing__(self, key: str) -> Any:
        value = {m: list(v) for m, v in getattr(self._envs[key], self._field).items()}
        self[key] = value
        return value


class PowerLoop:
    """Holds and loop records of a step's envelopes (copied on first use: the inputs stay
    untouched). `holds.get(key, env.holds)` is the key's result (no copy when unchanged)."""

    def __init__(self, envs: dict[str, Envelope], ctx: Any, now_ms: int | None, bucket_of: Callable[[str], str],
                 policy: relay.RelayPolicy | None = None) -> None:
        self.ctx, self.now_ms, self.bucket_of = ctx, now_ms, bucket_of
        self.policy = policy or POLICY
        self.envs = envs
        self.holds: dict[str, Holds] = _Copies(envs, "holds")
        self.relays: dict[str, dict[str, list[Any]]] = _Copies(envs, "relays")

    def holds_of(self, key: str) -> Holds:
        return self.holds.get(key, self.envs[key].holds)

    def relays_of(self, key: str) -> dict[str, list[Any]]:
        return self.relays.get(key, self.envs[key].relays)

    def now(self, cause_ts_ms: int) -> int:
        """The issue time: the step's explicit now; tools without one fall back to the cause."""
        return self.now_ms if self.now_ms is not None else cause_ts_ms

    def _rec(self, key: str, meter: str) -> relay.MeterRelay | None:
        row = self.relays_of(key).get(meter)
        return relay.MeterRelay.from_row(row) if row is not None else None

    def _put(self, key: str, meter: str, rec: relay.MeterRelay | None) -> None:
        row = None if rec is None else rec.to_row()
        if self.relays_of(key).get(meter) == row:
            return  # unchanged: no copy
        if row is None:
            self.relays[key].pop(meter, None)
        else:
            self.relays[key][meter] = row

    def desired(self, key: str, meter: str) -> str:
        return relay.desired_of(self.holds_of(key).get(meter))

    def gate(self, account: str, meters: list[str], hold: str, on: bool, cause_id: str, reason: str | None,
             cause_ts_ms: int, requested_by: str) -> Tagged:
        """Set or clear a hold; a meter whose relay must change starts a command chain."""
        key = self.bucket_of(account)
        items: Tagged = []
        for g in set_hold(self.holds[key], meters, hold, on, cause_id, reason):
            rec, cmd = relay.start(self._rec(key, g.meter_id), g.meter_id, g.action, g.reason, g.command_id,
                                   self.now(cause_ts_ms), cause_ts_ms, self.policy)
            self._put(key, g.meter_id, rec)
            items.append((key, self.command_item(cmd, account, requested_by)))
        return items

    def outcome(self, account: str, outcome: dict[str, Any], now_ms: int) -> Tagged:
        key, meter = self.bucket_of(account), outcome["meter_id"]
        rec, cmds, alarms = relay.on_outcome(self._rec(key, meter), meter, outcome, self.desired(key, meter),
                                             now_ms, self.policy)
        return self._apply(key, meter, account, rec, cmds, alarms)

    def observe(self, readings: pl.DataFrame, now_ms: int) -> Tagged:
        """The relay column (and power) of a step's readings. Only rows that can matter are
        looked at: meters with a hold or a loop record, and meters reporting OPEN."""
        if "relay" not in readings.columns or not readings.height:
            return []
        watched = [m for key, env in self.envs.items() if env.holds or env.relays or key in self.holds
                   for m in (*self.holds_of(key), *self.relays_of(key))]
        cond = pl.col("relay") == 1
        if watched:
            cond = cond | pl.col("meter_id").is_in(watched)
        cols = ["meter_id", "ts_ms", "relay"] + (["power_w"] if "power_w" in readings.columns else [])
        rows = readings.select(cols).filter(cond)
        if not rows.height:
            return []
        rows = rows.sort("ts_ms").group_by("meter_id", maintain_order=True).last()
        items: Tagged = []
        for row in rows.iter_rows(named=True):
            route = self.ctx.meter_route.get(row["meter_id"])
            if route is None:
                continue
            key, meter = self.bucket_of(route.account_id), row["meter_id"]
            if key not in self.envs:
                continue
            power = row.get("power_w")
            power = None if power is None or power != power else float(power)  # NaN: not measured
            rec, cmds, alarms = relay.observe(self._rec(key, meter), meter, relay.READING_CODES.get(row["relay"]),
                                              int(row["ts_ms"]), power, self.desired(key, meter), now_ms,
                                              self.policy)
            items += self._apply(key, meter, route.account_id, rec, cmds, alarms)
        return items

    def tick(self, now_ms: int) -> Tagged:
        """Re-issue or settle every chain whose time has come."""
        items: Tagged = []
        for key in self.envs:
            for meter in list(self.relays_of(key)):
                route = self.ctx.meter_route.get(meter)
                account = route.account_id if route else key
                rec, cmds, alarms = relay.due(self._rec(key, meter), meter, self.desired(key, meter), now_ms,
                                              self.policy)
                items += self._apply(key, meter, account, rec, cmds, alarms)
        return items

    def _apply(self, key: str, meter: str, account: str, rec: relay.MeterRelay | None, cmds: list[relay.Command],
               alarms: list[relay.Alarm]) -> Tagged:
        self._put(key, meter, rec)
        items: Tagged = [(key, self.command_item(c, account, "pipeline")) for c in cmds
                         if c.meter_id in self.ctx.meter_route]
        items += [(key, self.alert_item(a, account)) for a in alarms]
        return items

    def command_item(self, cmd: relay.Command, account: str | None, requested_by: str) -> OutboxItem:
        route = self.ctx.meter_route[cmd.meter_id]
        record = {"command_id": cmd.command_id, "action": cmd.action, "reason": cmd.reason,
                  "mall_id": route.mall_id, "gateway_id": route.gateway_id, "meter_id": cmd.meter_id,
                  "account_id": account, "issued_at_ms": cmd.issued_at_ms, "cause_ts_ms": cmd.cause_ts_ms,
                  "requested_by": requested_by if cmd.attempt == 1 else f"{requested_by}:retry"}
        return OutboxItem(T.RELAY_COMMANDS, route.gateway_id.encode(), codec.encode("RelayCommand", record))

    def alert_item(self, alarm: relay.Alarm, account: str) -> OutboxItem:
        route = self.ctx.meter_route.get(alarm.meter_id)
        record = {"alert_id": alarm.alert_id, "kind": alarm.kind, "severity": alarm.severity,
                  "mall_id": route.mall_id if route else "unknown", "account_id": account,
                  "meter_id": alarm.meter_id, "ts_ms": alarm.ts_ms, "message": alarm.message,
                  "details": alarm.details}
        return OutboxItem(T.ALERTS, account.encode(), codec.encode("Alert", record))


def next_due(env: Envelope, ctx: Any = None) -> int | None:
    """The earliest time the timer has work for this account: a relay chain's due time, 0 (every
    tick) while a trip waits for a friendly period to end, or (with the BillingContext `ctx`) the
    start of a local day the account's readings have reached but its wallet has not posted yet
    (standing charge, debt schedule: `day_due`)."""
    # plain loops, no lists: this runs for every account a step writes
    best: int | None = None
    for row in env.relays.values():
        due = row[9]
        if due >= 0 and (best is None or due < best):
            best = due
    for s in env.accounts.values():
        if s.deferred or s.warn_pending:
            best = 0 if best is None else min(best, 0)
            break
    if ctx is not None:
        day = day_due(env, ctx.rating)
        if day is not None and (best is None or day < best):
            best = day
    return best


def day_due(env: Envelope, rating: Any) -> int | None:
    """The start of the earliest local day an account of `env` has to post by the timer: one
    its billed readings have reached (0 Wh readings move no wallet) and its wallet has not.
    None while the readings are still before it: their next state write looks again."""
    billed: int | None = None
    for c in env.circuits.values():
        ts = c.last_ts_ms
        if ts is not None and (billed is None or ts > billed):
            billed = ts
    if billed is None:
        return None
    best: int | None = None
    tz_of = _zones(rating)
    for s in env.accounts.values():
        # timer_due_ms(s, rating), with the account's zone from one dict (this runs for every
        # account a step writes)
        tz = tz_of.get(s.account_id)
        if tz is None or s.standing_day is None:
            continue
        day = next_day_start_ms(s.standing_day, tz)
        if day <= billed and (best is None or day < best):
            best = day
    return best


_ZONES: tuple[Any, dict[str, str]] = (None, {})  # (the rating context, account -> its mall's zone)


def _zones(rating: Any) -> dict[str, str]:
    """Each account of the rating context with its mall's time zone (built once per context)."""
    global _ZONES
    built, tz_of = _ZONES  # one read: a thread never pairs one context with another's zones
    if built is not rating:
        zone = {m: x.tz for m, x in rating.malls.items()}
        tz_of = {a: zone[r.mall_id] for a, r in rating.accounts.items()}
        _ZONES = (rating, tz_of)
    return tz_of


def wallet_due(env: Envelope, rating: Any, now_ms: int) -> bool:
    """Whether engine.tick has anything to do for `env` at `now_ms`."""
    if any(s.deferred or s.warn_pending for s in env.accounts.values()):
        return True
    day = day_due(env, rating)
    return day is not None and day <= now_ms
