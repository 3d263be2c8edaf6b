"""The power loop's state machine (pipelines/core/relay.py): desired vs observed, retries, alerts."""

from __future__ import annotations

from pipelines.core import relay
from pipelines.core.relay import CLOSED, OPEN, MeterRelay, RelayPolicy

P = RelayPolicy(ack_timeout_ms=60_000, backoff_ms=30_000, max_backoff_ms=600_000, max_attempts=3,
                give_up_attempts=5)
NOW = 1_784_080_800_000


def _outcome(rec: MeterRelay, status: str, after: str, ts: int, detail: str = "") -> dict:
    return {"command_id": rec.command_id, "status": status, "relay_after": after, "ts_ms": ts, "detail": detail}


def test_command_is_stamped_with_now_not_its_cause() -> None:
    rec, cmd = relay.start(None, "m1", "RECONNECT", "topup", "a:reconnect:p1:m1:reconnect", NOW + 600_000, NOW, P)
    assert (cmd.issued_at_ms, cmd.cause_ts_ms, cmd.attempt) == (NOW + 600_000, NOW, 1)
    assert rec.due_ms == NOW + 600_000 + P.ack_timeout_ms and relay.phase(rec, CLOSED) == "ready_to_reconnect"


def test_expired_reconnect_is_reissued_at_once_with_a_chained_id() -> None:
    rec, cmd = relay.start(None, "m1", "RECONNECT", "topup", "c1", NOW, NOW - 600_000, P)
    rec, cmds, alarms = relay.on_outcome(rec, "m1", _outcome(rec, "FAILED", "UNKNOWN", NOW + 100,
                                                             "expired: issued 600s ago"), CLOSED, NOW + 500, P)
    assert [(c.command_id, c.issued_at_ms, c.attempt, c.root_id) for c in cmds] == [("c1:r2", NOW + 500, 2, "c1")]
    assert [a.kind for a in alarms] == ["relay_retry"] and alarms[0].meter_id == "m1"
    # the retry's confirmation settles the meter: nothing pending
    rec, cmds, alarms = relay.on_outcome(rec, "m1", _outcome(rec, "CONFIRMED", "CLOSED", NOW + 900), CLOSED,
                                         NOW + 1000, P)
    assert not rec.pending and relay.phase(rec, CLOSED) == "connected" and not cmds and not alarms
    # a reading polled before the reconnect but billed after its confirmation changes nothing
    assert relay.observe(rec, "m1", OPEN, NOW + 800, None, CLOSED, NOW + 1100, P) == (rec, [], [])


def test_failed_trip_backs_off_then_retries_and_escalates() -> None:
    rec, _ = relay.start(None, "m1", "TRIP", "credit", "t1", NOW, NOW, P)
    rec, cmds, _ = relay.on_outcome(rec, "m1", _outcome(rec, "FAILED", "CLOSED", NOW + 10), OPEN, NOW + 20, P)
    assert not cmds and rec.due_ms == NOW + 20 + 30_000 and relay.phase(rec, OPEN) == "disconnecting"
    rec, cmds, _ = relay.due(rec, "m1", OPEN, NOW + 29_000, P)
    assert not cmds  # not yet
    kinds = []
    now = NOW + 50_000
    for attempt in (2, 3):
        rec, cmds, alarms = relay.due(rec, "m1", OPEN, now, P)
        assert [c.command_id for c in cmds] == [f"t1:r{attempt}"]
        kinds += [a.kind for a in alarms]
        rec, _, _ = relay.on_outcome(rec, "m1", _outcome(rec, "FAILED", "CLOSED", now + 10), OPEN, now + 20, P)
        now = rec.due_ms
    rec, cmds, alarms = relay.due(rec, "m1", OPEN, now, P)  # 3 attempts failed: the ops alert
    assert [a.kind for a in alarms] == ["tripped_but_drawing", "relay_retry"]
    assert alarms[0].meter_id == "m1" and alarms[0].severity == "CRITICAL"
    assert kinds == ["relay_retry", "relay_retry"]


def test_no_answer_is_meter_unreachable_then_gives_up() -> None:
    rec, _ = relay.start(None, "m1", "RECONNECT", "topup", "r1", NOW, NOW, P)
    now, seen = NOW, []
    for _ in range(10):
        now = rec.due_ms if rec.due_ms >= 0 else now
        rec, cmds, alarms = relay.due(rec, "m1", CLOSED, now, P)
        seen += [a.kind for a in alarms if a.kind != "relay_retry"]
    assert seen == ["meter_unreachable"]  # once per chain
    assert rec.status == relay.GAVE_UP and relay.phase(rec, CLOSED) == "stuck" and rec.attempt == 5


def test_paid_but_dark_when_reconnect_reads_back_open() -> None:
    rec, _ = relay.start(None, "m1", "RECONNECT", "topup", "r1", NOW, NOW, P)
    now, kinds = NOW, []
    for _ in range(4):
        rec, _, _ = relay.on_outcome(rec, "m1", _outcome(rec, "FAILED", "OPEN", now + 10), CLOSED, now + 20, P)
        now = rec.due_ms
        rec, _, alarms = relay.due(rec, "m1", CLOSED, now, P)
        kinds += [a.kind for a in alarms if a.kind != "relay_retry"]
    assert kinds == ["paid_but_dark"]


def test_observations_reconcile_a_meter_at_rest() -> None:
    # nothing held, the meter reports OPEN (re-opened locally): a RECONNECT named by the observation
    rec, cmds, _ = relay.observe(None, "m1", OPEN, NOW, None, CLOSED, NOW + 5, P)
    assert [(c.action, c.reason, c.command_id) for c in cmds] == [("RECONNECT", "reconcile",
                                                                  f"m1:reconcile:{NOW}:reconnect")]
    # a matching observation at rest leaves no record
    assert relay.observe(None, "m1", CLOSED, NOW, 100.0, CLOSED, NOW, P) == (None, [], [])
    # an older observation than the one known changes nothing
    assert relay.observe(rec, "m1", CLOSED, NOW - 1, None, CLOSED, NOW + 6, P)[0] == rec


def test_power_while_desired_open_is_tripped_but_drawing() -> None:
    rec, _ = relay.start(None, "m1", "TRIP", "credit", "t1", NOW, NOW, P)
    rec, _, _ = relay.on_outcome(rec, "m1", _outcome(rec, "CONFIRMED", "OPEN", NOW + 10), OPEN, NOW + 20, P)
    assert not rec.pending and relay.phase(rec, OPEN) == "disconnected"  # confirmed: at rest
    # power within the grace after the command is not evidence; later it is
    rec, cmds, alarms = relay.observe(rec, "m1", OPEN, NOW + 40_000, 800.0, OPEN, NOW + 41_000, P)
    assert [a.kind for a in alarms] == ["tripped_but_drawing"] and [c.action for c in cmds] == ["TRIP"]
    rec, _, alarms = relay.observe(rec, "m1", OPEN, NOW + 50_000, 900.0, OPEN, NOW + 51_000, P)
    assert not alarms  # once per chain


def test_stale_outcome_of_a_superseded_chain_does_not_move_the_new_one() -> None:
    rec, _ = relay.start(None, "m1", "TRIP", "credit", "t1", NOW, NOW, P)
    old = rec
    rec, _ = relay.start(rec, "m1", "RECONNECT", "topup", "p1", NOW + 10, NOW + 10, P)
    rec2, cmds, _ = relay.on_outcome(rec, "m1", _outcome(old, "FAILED", "OPEN", NOW + 5), CLOSED, NOW + 20, P)
    assert not cmds and rec2 is not None and rec2.command_id == "p1" and rec2.due_ms == rec.due_ms


def test_record_round_trips_as_a_row() -> None:
    rec, _ = relay.start(None, "m1", "TRIP", "credit", "t1", NOW, NOW, P)
    assert MeterRelay.from_row(rec.to_row()) == rec
