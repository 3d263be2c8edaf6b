"""pipelines/worker_metrics.py: the forwarder's counts and the worker's gauges."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import REGISTRY

from infra import topics as T
from pipelines import worker_metrics as W
from pipelines.core.wallet import AccountState
from pipelines.envelope import Envelope
from schemas import codec


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def command(command_id: str, action: str, issued: int, cause: int) -> bytes:
    return codec.encode("RelayCommand", {
        "command_id": command_id, "action": action, "reason": "credit", "mall_id": "M1", "gateway_id": "G1",
        "meter_id": "E1", "account_id": "A1", "issued_at_ms": issued, "cause_ts_ms": cause,
        "requested_by": "stream", "key_id": None, "signature": None})


def test_forwarder_counts_outputs_and_relay_commands_once_flushed() -> None:
    issued0 = value("mallwatt_relay_commands_total", action="TRIP", outcome="issued")
    retries0 = value("mallwatt_relay_command_retries_total", action="TRIP")
    latency0 = value("mallwatt_worker_reading_to_command_seconds_count")
    latency_sum0 = value("mallwatt_worker_reading_to_command_seconds_sum")
    ledger0 = value("mallwatt_worker_output_messages_total", topic=T.LEDGER)
    batches0 = value("mallwatt_forwarder_messages_total", topic=T.LEDGER)
    relay_out0 = value("mallwatt_worker_output_messages_total", topic=T.RELAY_COMMANDS)
    fm = W.ForwarderMetrics()
    fm.output(T.RELAY_COMMANDS, command("c1", "TRIP", 10_000, 8_000))
    fm.output(T.RELAY_COMMANDS, command("c1:r2", "TRIP", 20_000, 8_000))
    fm.batch(T.LEDGER, 700)
    fm.batch(T.LEDGER, 300)
    # relay commands are counted at once (rare); outputs wait for the flush
    assert value("mallwatt_relay_commands_total", action="TRIP", outcome="issued") == issued0 + 2
    assert value("mallwatt_relay_command_retries_total", action="TRIP") == retries0 + 1
    assert value("mallwatt_worker_reading_to_command_seconds_count") == latency0 + 2
    assert value("mallwatt_worker_reading_to_command_seconds_sum") == latency_sum0 + 2.0 + 12.0
    assert value("mallwatt_worker_output_messages_total", topic=T.LEDGER) == ledger0
    fm.flush(force=True)
    assert value("mallwatt_worker_output_messages_total", topic=T.LEDGER) == ledger0 + 1000  # entries
    assert value("mallwatt_forwarder_messages_total", topic=T.LEDGER) == batches0 + 2  # messages
    assert value("mallwatt_worker_output_messages_total", topic=T.RELAY_COMMANDS) == relay_out0 + 2
    fm.flush(force=True)  # nothing counted twice
    assert value("mallwatt_worker_output_messages_total", topic=T.LEDGER) == ledger0 + 1000


def test_state_gauges_from_the_newest_envelopes_of_this_generation() -> None:
    def env(balance: int, relays: dict[str, list[Any]]) -> Envelope:
        return Envelope(accounts={"A": AccountState("A", balance=balance)}, relays=relays)

    pending_trip = ["closed", 0, "c", "TRIP", "credit", 1, 1, 1, "c", 5_000, "", ""]
    open_after_reconnect = ["open", 0, "r", "RECONNECT", "topup", 1, 1, 1, "r", -1, "FAILED", ""]
    parsed = {"k1": (3, env(-5, {"E1": pending_trip})),
              "k2": (3, env(900, {"E2": open_after_reconnect})),
              "k3": (2, env(900, {"E3": open_after_reconnect}))}  # before the rebalance: not counted
    states = SimpleNamespace(data={b"k1": b"", b"k2": b"", b"k3": b""}, generation=3)
    holder = SimpleNamespace(current=lambda: SimpleNamespace(account_mall={"A": "M9"}))
    W.WorkerWatch(SimpleNamespace(), states, parsed, holder)._state()
    assert value("mallwatt_relay_commands_unconfirmed", action="TRIP") == 1
    assert value("mallwatt_relay_commands_unconfirmed", action="RECONNECT") == 0
    assert value("mallwatt_relay_paid_tripped_accounts", mall="M9") == 1
    assert value("mallwatt_worker_state_keys", table="accounts") == 3


def test_readiness_names_what_is_missing() -> None:
    recovery = SimpleNamespace(completed=SimpleNamespace(is_set=lambda: False), active_remaining_total=lambda: 42)
    app = SimpleNamespace(consumer=SimpleNamespace(assignment=lambda: set()), tables=SimpleNamespace(recovery=recovery),
                          rebalancing=False)
    watch = W.WorkerWatch(app, None, {})
    assert watch.readiness() == (False, "waiting for partition assignment")
    app.consumer.assignment = lambda: {("mallwatt.readings", 0)}
    assert watch.readiness() == (False, "recovering tables: 42 changelog message(s) behind")
    recovery.completed.is_set = lambda: True
    assert watch.readiness()[0] is False and "broker" in watch.readiness()[1]
    watch.broker_error = None
    assert watch.readiness() == (True, "ok")


def _gauges() -> dict[str, float]:
    return {**{f"unconfirmed:{a}": value("mallwatt_relay_commands_unconfirmed", action=a)
               for a in ("TRIP", "RECONNECT", "UNKNOWN")},
            **{f"tripped:{m}": value("mallwatt_relay_paid_tripped_accounts", mall=m) for m in ("M0", "M1", "M2")}}


def test_indexed_cache_reports_what_a_walk_of_every_envelope_reports() -> None:
    import random

    rnd = random.Random(5)
    rows = [["closed", 0, "c", "TRIP", "credit", 1, 1, 1, "c", 5_000, "", ""],
            ["open", 0, "r", "RECONNECT", "topup", 1, 1, 1, "r", -1, "FAILED", ""],
            ["open", 0, "r", "RECONNECT", "topup", 1, 1, 1, "r", 7_000, "", ""],
            ["closed", 0, "c", "", "credit", 1, 1, 1, "c", 9_000, "", ""]]

    def env(i: int) -> Envelope:
        relays = {f"E{j}": rnd.choice(rows) for j in range(rnd.choice([0, 0, 0, 1, 2]))}
        return Envelope(accounts={f"A{i}": AccountState(f"A{i}", balance=rnd.choice([-5, 0, 900]))}, relays=relays)

    malls = {f"A{i}": f"M{i % 3}" for i in range(300)}
    holder = SimpleNamespace(current=lambda: SimpleNamespace(account_mall=malls))
    plain: dict[str, tuple[int, Envelope]] = {}
    indexed = W.ParsedEnvelopes()
    for round_ in range(6):  # envelopes replaced with and without relay rows, some removed, a rebalance
        for _ in range(200):
            i = rnd.randrange(300)
            entry = (rnd.choice([3, 3, 3, 2]) if round_ >= 3 else 2, env(i))
            plain[f"A{i}"] = indexed[f"A{i}"] = entry
        for key in rnd.sample(sorted(plain), 10):
            del plain[key]
            indexed.pop(key) if round_ % 2 else indexed.__delitem__(key)
        assert indexed == plain
        assert indexed.relayed == {k for k, (_, e) in plain.items() if e.relays}
        states = SimpleNamespace(data={}, generation=3 if round_ >= 3 else 2)
        W.WorkerWatch(SimpleNamespace(), states, plain, holder)._state()
        walked = _gauges()
        for action in ("TRIP", "RECONNECT", "UNKNOWN"):  # the second call must set each figure itself
            W.M.RELAY_UNCONFIRMED.labels(action).set(-1)
        W.WorkerWatch(SimpleNamespace(), states, indexed, holder)._state()
        assert _gauges() == walked
        assert any(walked.values())
