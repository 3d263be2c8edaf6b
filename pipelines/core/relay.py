"""A meter relay's desired vs observed state, reconciled: commands, retries, ops alerts. Pure.

The desired state has one owner: the account's relay holds (pipelines.relaygate): open while
any hold remains, closed otherwise. What the meter did is learnt from two sources, the
collectors' RelayOutcomes (after write and read-back) and the `relay` column of readings
(with `power_w`). A meter whose observation differs from its desired state gets its command
again with backoff: a fresh `issued_at` (the caller's explicit `now`, never a clock read here)
and a new command id chained to the first (`<root>:r<attempt>`), so a collector that refused
a stale command as expired, or a relay that did not switch, is retried. After
`max_attempts` an ops alert names the meter: `paid_but_dark` (should be closed, is not),
`tripped_but_drawing` (should be open, is not, or power flows), `meter_unreachable` (no
answer at all). Retries go on at the longest backoff up to `give_up_attempts`.

Per meter the state is one small record (last command, attempt count, last observation), kept
once the meter has been commanded or seen out of place: bounded per meter, no history.

States (docs/relay-state-machine.md):

| phase | desired | observed / command |
| --- | --- | --- |
| connected | closed | closed (or never commanded) |
| disconnecting | open | TRIP issued, not yet confirmed |
| disconnected | open | open (confirmed) |
| ready_to_reconnect | closed | RECONNECT issued, relay still open |
| stuck | any | gave up after `give_up_attempts` (ops alert raised) |
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

TRIP, RECONNECT = "TRIP", "RECONNECT"
OPEN, CLOSED, UNKNOWN = "open", "closed", "unknown"
#: `relay` column codes of ReadingBatch (schemas.readings.RELAY_CODES)
READING_CODES = {0: CLOSED, 1: OPEN}
#: RelayOutcome.relay_after
OUTCOME_POSITIONS = {"CLOSED": CLOSED, "OPEN": OPEN}
GAVE_UP = "GAVE_UP"
EXPIRED = "EXPIRED"


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    """Retry and alarm settings (all times in ms)."""

    ack_timeout_ms: int = 60_000  # no outcome and no matching observation by then: retry
    backoff_ms: int = 30_000  # first retry after a failed outcome; doubles per attempt
    max_backoff_ms: int = 600_000
    max_attempts: int = 3  # attempts before the ops alert
    give_up_attempts: int = 12  # attempts before the loop stops for this chain (stuck)
    drawing_w: float = 50.0  # power above this while desired open: drawing
    drawing_grace_ms: int = 30_000  # power readings this soon after a TRIP are not evidence yet


@dataclass(frozen=True, slots=True)
class MeterRelay:
    """One meter's loop state; stored as a list (`to_row`) inside the account's Envelope."""

    observed: str = UNKNOWN  # open | closed | unknown: the newest observation
    observed_ts: int = 0  # collector time of that observation
    command_id: str = ""  # the last command issued
    action: str = ""  # TRIP | RECONNECT
    reason: str = ""
    issued_at: int = 0
    cause_ts: int = 0
    attempt: int = 0
    root_id: str = ""  # the first command of the chain
    due_ms: int = -1  # when to look again (-1: nothing pending)
    status: str = ""  # last outcome of the current command ("" none yet), EXPIRED, GAVE_UP
    alerted: str = ""  # ops alert kind already raised for this chain ("" none)

    def to_row(self) -> list[Any]:
        return [self.observed, self.observed_ts, self.command_id, self.action, self.reason, self.issued_at,
                self.cause_ts, self.attempt, self.root_id, self.due_ms, self.status, self.alerted]

    @classmethod
    def from_row(cls, row: list[Any]) -> MeterRelay:
        return cls(*row)

    @property
    def pending(self) -> bool:
        return self.due_ms >= 0


@dataclass(frozen=True, slots=True)
class Command:
    """A relay command to publish (the shell adds mall, gateway and account)."""

    meter_id: str
    action: str
    reason: str
    command_id: str
    issued_at_ms: int
    cause_ts_ms: int
    attempt: int
    root_id: str


@dataclass(frozen=True, slots=True)
class Alarm:
    """An ops alert about one meter (the shell makes it an Alert record)."""

    kind: str  # relay_retry | paid_but_dark | tripped_but_drawing | meter_unreachable
    severity: str
    meter_id: str
    alert_id: str
    ts_ms: int
    message: str
    details: dict[str, str]


Result = tuple[MeterRelay | None, list[Command], list[Alarm]]


def desired_of(holds: list[str] | None) -> str:
    return OPEN if holds else CLOSED


def phase(rec: MeterRelay | None, desired: str) -> str:
    """The meter's phase in the state machine (see the module docstring)."""
    if rec is None:
        return "connected" if desired == CLOSED else "disconnected"
    if rec.status == GAVE_UP:
        return "stuck"
    if desired == OPEN:
        return "disconnecting" if rec.pending else "disconnected"
    return "ready_to_reconnect" if rec.pending else "connected"


def start(rec: MeterRelay | None, meter_id: str, action: str, reason: str, command_id: str, now_ms: int,
          cause_ts_ms: int, policy: RelayPolicy) -> tuple[MeterRelay, Command]:
    """A new command chain (the desired state changed): attempt 1, stamped `now_ms`."""
    base = rec or MeterRelay()
    new = replace(base, command_id=command_id, action=action, reason=reason, issued_at=now_ms,
                  cause_ts=cause_ts_ms, attempt=1, root_id=command_id, due_ms=now_ms + policy.ack_timeout_ms,
                  status="", alerted="")
    return new, _command(meter_id, new)


def on_outcome(rec: MeterRelay | None, meter_id: str, outcome: dict[str, Any], desired: str, now_ms: int,
               policy: RelayPolicy) -> Result:
    """A collector's RelayOutcome. Only the current command's outcome moves the chain; an older
    one (a superseded chain) still counts as an observation if it is the newest."""
    position = OUTCOME_POSITIONS.get(str(outcome.get("relay_after")))
    ts = int(outcome["ts_ms"])
    if rec is None or outcome["command_id"] != rec.command_id or not rec.pending:
        return observe(rec, meter_id, position, ts, None, desired, now_ms, policy)
    if position is not None and ts > rec.observed_ts:
        rec = replace(rec, observed=position, observed_ts=ts)
    status = str(outcome["status"])
    if status == "CONFIRMED" and rec.observed == desired:
        return _settled(rec, desired), [], []
    expired = status == "FAILED" and str(outcome.get("detail", "")).startswith("expired")
    if expired:  # refused as stale: a fresh command is due at once
        rec = replace(rec, status=EXPIRED, due_ms=now_ms)
    else:
        rec = replace(rec, status=status, due_ms=min(rec.due_ms, now_ms + backoff_ms(rec.attempt, policy)))
    return due(rec, meter_id, desired, now_ms, policy)


def observe(rec: MeterRelay | None, meter_id: str, position: str | None, ts_ms: int, power_w: float | None,
            desired: str, now_ms: int, policy: RelayPolicy) -> Result:
    """A relay position (and power) the meter reported at `ts_ms` (collector time)."""
    drawing = desired == OPEN and power_w is not None and power_w > policy.drawing_w
    if drawing:
        position = CLOSED  # power flows: whatever the relay register says, supply is on
    if position is None or (rec is not None and ts_ms <= rec.observed_ts):
        return rec, [], []
    if rec is None:
        if position == desired:
            return None, [], []
        rec = MeterRelay()
    rec = replace(rec, observed=position, observed_ts=ts_ms)
    alarms: list[Alarm] = []
    if drawing and rec.alerted != "tripped_but_drawing" and ts_ms > rec.issued_at + policy.drawing_grace_ms:
        rec = replace(rec, alerted="tripped_but_drawing")
        alarms.append(_alarm("tripped_but_drawing", rec, meter_id, ts_ms,
                             f"meter {meter_id} draws {power_w:.0f} W while its relay should be open", desired,
                             power_w=f"{power_w:.0f}"))
    if rec.pending or rec.status == GAVE_UP:
        return rec, [], alarms  # the chain's own timer decides (due)
    if position == desired:
        return _settled(rec, desired), [], alarms
    # at rest but the meter is not where it should be (re-closed by hand, local mode, a lost
    # command): a new chain, named by the observation so a replayed step names it the same
    action = TRIP if desired == OPEN else RECONNECT
    rec, cmd = start(rec, meter_id, action, "reconcile", f"{meter_id}:reconcile:{ts_ms}:{action.lower()}",
                     now_ms, ts_ms, policy)
    return rec, [cmd], alarms


def due(rec: MeterRelay | None, meter_id: str, desired: str, now_ms: int, policy: RelayPolicy) -> Result:
    """Timer: if the chain's time has come, settle it (observed as desired since the command),
    or re-issue the command with a fresh id and time, raising the ops alert after max_attempts."""
    if rec is None or not rec.pending or now_ms < rec.due_ms:
        return rec, [], []
    if rec.observed == desired and rec.observed_ts >= rec.issued_at:
        return _settled(rec, desired), [], []
    alarms: list[Alarm] = []
    kind = escalation(rec, desired)
    if rec.attempt >= policy.max_attempts and rec.alerted != kind:
        alarms.append(_alarm(kind, replace(rec, alerted=kind), meter_id, now_ms,
                             f"meter {meter_id}: relay not {desired} after {rec.attempt} attempts "
                             f"(last {rec.action} {rec.command_id}: {rec.status or 'no outcome'})", desired))
        rec = replace(rec, alerted=kind)
    if rec.attempt >= policy.give_up_attempts:
        return replace(rec, status=GAVE_UP, due_ms=-1), [], alarms
    attempt = rec.attempt + 1
    action = TRIP if desired == OPEN else RECONNECT
    previous = rec.command_id
    rec = replace(rec, command_id=f"{rec.root_id}:r{attempt}", action=action, issued_at=now_ms, attempt=attempt,
                  due_ms=now_ms + policy.ack_timeout_ms, status="")
    alarms.append(_alarm("relay_retry", rec, meter_id, now_ms,
                         f"meter {meter_id}: {action} re-issued (attempt {attempt}) after {previous}", desired,
                         previous=previous))
    return rec, [_command(meter_id, rec)], alarms


def escalation(rec: MeterRelay, desired: str) -> str:
    """Which ops alert a chain that failed `max_attempts` times raises."""
    if rec.status in ("", "TIMED_OUT") and rec.observed_ts < rec.issued_at:
        return "meter_unreachable"  # no answer since the last command
    return "paid_but_dark" if desired == CLOSED else "tripped_but_drawing"


def backoff_ms(attempt: int, policy: RelayPolicy) -> int:
    return min(policy.max_backoff_ms, policy.backoff_ms * (2 ** max(0, min(attempt - 1, 20))))


def _settled(rec: MeterRelay, desired: str) -> MeterRelay:
    """Nothing pending. The record stays (one per meter ever commanded: bounded): its
    observation time keeps a reading polled before the command, but billed after its
    confirmation, from looking like a meter that switched back by itself."""
    return replace(rec, due_ms=-1, status="CONFIRMED" if rec.observed == desired else rec.status)


def _command(meter_id: str, rec: MeterRelay) -> Command:
    return Command(meter_id, rec.action, rec.reason, rec.command_id, rec.issued_at, rec.cause_ts, rec.attempt,
                   rec.root_id)


def _alarm(kind: str, rec: MeterRelay, meter_id: str, ts_ms: int, message: str, desired: str,
           **extra: str) -> Alarm:
    severity = "WARNING" if kind == "relay_retry" else "CRITICAL"
    # one alert per chain and kind (retries: per attempt), so a replayed step names it the same
    suffix = f":{rec.attempt}" if kind == "relay_retry" else ""
    details = {"command_id": rec.command_id, "root_id": rec.root_id, "attempt": str(rec.attempt),
               "desired": desired, "observed": rec.observed, "last_status": rec.status, **extra}
    return Alarm(kind, severity, meter_id, f"{rec.root_id}:{kind}{suffix}", ts_ms, message, details)
