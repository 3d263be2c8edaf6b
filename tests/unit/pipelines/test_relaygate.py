"""Relay holds: the relay closes only when no reason to hold it open remains."""

from __future__ import annotations

from pipelines.relaygate import set_hold


def test_operator_hold_survives_credit_release() -> None:
    holds: dict[str, list[str]] = {}
    assert [(c.action, c.reason) for c in set_hold(holds, ["m1"], "credit", True, "c1")] == [("TRIP", "credit")]
    # the operator switches off a meter already open for credit: no second TRIP is sent
    assert set_hold(holds, ["m1"], "operator", True, "o1") == []
    # the top-up clears the credit hold, but the operator's hold keeps the relay open
    assert set_hold(holds, ["m1"], "credit", False, "p1") == []
    assert holds == {"m1": ["operator"]}
    # the operator's "on" is the last hold: now it reconnects
    cmds = set_hold(holds, ["m1"], "operator", False, "o2")
    assert [(c.meter_id, c.action, c.reason, c.command_id) for c in cmds] == [
        ("m1", "RECONNECT", "operator", "o2:m1:reconnect")]
    assert holds == {}


def test_operator_on_does_not_restore_an_account_out_of_credit() -> None:
    holds: dict[str, list[str]] = {}
    set_hold(holds, ["m1", "m2"], "operator", True, "o1")
    set_hold(holds, ["m1", "m2"], "credit", True, "c1")
    assert set_hold(holds, ["m1", "m2"], "operator", False, "o2") == []
    assert holds == {"m1": ["credit"], "m2": ["credit"]}


def test_repeated_hold_is_idempotent() -> None:
    holds: dict[str, list[str]] = {}
    assert len(set_hold(holds, ["m1"], "overload", True, "x")) == 1
    assert set_hold(holds, ["m1"], "overload", True, "y") == []
    assert set_hold(holds, ["m9"], "overload", False, "z") == []  # releasing what was never held
