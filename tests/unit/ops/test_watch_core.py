"""collector_offline alerts from collector events and silence (pure core)."""

from __future__ import annotations

from typing import Any

from pipelines.core.collector_watch import (
    WatchConfig,
    WatchState,
    observe_batch,
    observe_event,
    open_episodes,
    restore,
    tick,
)
from schemas import codec

CFG = WatchConfig(silent_after_ms=60_000)
T0 = 1_784_080_800_000


def ev(kind: str, ts: int, gateway: str | None = None, cid: str = "M01", mall: str = "M01") -> dict[str, Any]:
    return {"event_id": f"{cid}/{kind}/{ts}", "collector_id": cid, "mall_id": mall, "gateway_id": gateway,
            "meter_id": None, "kind": kind, "ts_ms": ts, "detail": "connect refused"}


def run(inputs: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    st, out = WatchState(), []
    for what, x in inputs:
        if what == "event":
            out += observe_event(st, CFG, x)
        elif what == "batch":
            out += observe_batch(st, CFG, x[0], None, x[1])
        else:
            out += tick(st, CFG, x)
    return out


def test_gateway_down_opens_one_alert_per_episode_and_up_resolves_it() -> None:
    out = run([("event", ev("started", T0)),
               ("event", ev("gateway_down", T0 + 1000, "GW1")),
               ("event", ev("gateway_down", T0 + 5000, "GW1")),  # same episode: no second alert
               ("event", ev("gateway_up", T0 + 9000, "GW1")),
               ("event", ev("gateway_down", T0 + 20_000, "GW1"))])  # a new episode
    assert [(a["alert_id"], a["severity"], a["details"]["state"]) for a in out] == [
        ("collector_offline:M01:GW1:1784080801000", "CRITICAL", "open"),
        ("collector_offline:M01:GW1:1784080801000:resolved", "INFO", "resolved"),
        ("collector_offline:M01:GW1:1784080820000", "CRITICAL", "open")]
    assert all(a["kind"] == "collector_offline" and a["mall_id"] == "M01" for a in out)
    for a in out:  # every alert is a valid Alert record
        assert codec.decode("Alert", codec.encode("Alert", a)) == a


def test_spool_growing_is_an_episode_until_drained() -> None:
    out = run([("event", ev("spool_growing", T0)), ("event", ev("spool_growing", T0 + 10)),
               ("event", ev("spool_drained", T0 + 50_000))])
    assert [a["alert_id"] for a in out] == ["collector_offline:M01:spool:1784080800000",
                                            "collector_offline:M01:spool:1784080800000:resolved"]
    assert out[0]["severity"] == "WARNING"


def test_silence_longer_than_configured_raises_one_alert_naming_the_gateways() -> None:
    inputs: list[tuple[str, Any]] = [
        ("event", ev("device_down", T0, "GW2")), ("batch", ("M01", T0 + 10_000)),
        ("tick", T0 + 70_000),  # 60 s after the last batch: not yet (strictly longer)
        ("tick", T0 + 70_001), ("tick", T0 + 90_000),  # opened once
        ("batch", ("M01", T0 + 95_000)),  # back
        ("tick", T0 + 100_000)]
    out = run(inputs)
    assert [a["alert_id"] for a in out] == ["collector_offline:M01:silent:1784080810000",
                                            "collector_offline:M01:silent:1784080810000:resolved"]
    assert out[0]["details"]["gateways"] == "GW2" and out[0]["ts_ms"] == T0 + 70_000
    assert run(inputs) == out  # deterministic: a replay gives the same alerts


def test_silence_ids_do_not_depend_on_when_the_clock_ticks() -> None:
    a = run([("batch", ("C1", T0)), ("tick", T0 + 61_000)])
    b = run([("batch", ("C1", T0)), ("tick", T0 + 3_600_000)])
    assert a == b


def test_limits_and_open_counts() -> None:
    st = WatchState()
    cfg = WatchConfig(silent_after_ms=1, max_collectors=2)
    for i in range(5):
        observe_batch(st, cfg, f"C{i}", "M", T0)
    assert len(st.collectors) == 2 and st.dropped == 3
    observe_event(st, cfg, ev("gateway_down", T0, "GW1", cid="C0", mall="M"))
    tick(st, cfg, T0 + 10)
    assert open_episodes(st) == {"gateway_down": 1, "spool_growing": 0, "silent": 2}


def test_restored_episodes_are_not_repeated_and_resolve_under_their_id() -> None:
    first = WatchState()
    out = observe_event(first, CFG, ev("gateway_down", T0, "GW1"))
    observe_batch(first, CFG, "M01", "M01", T0 + 1000)
    out += tick(first, CFG, T0 + 200_000)
    assert len(out) == 2
    # a new watcher that only sees an old event (the batch is outside its readings window)
    second = WatchState()
    for a in out:
        restore(second, CFG, a)
    assert observe_event(second, CFG, ev("gateway_down", T0, "GW1")) == []  # replayed event
    assert tick(second, CFG, T0 + 400_000) == []  # still the same silent episode
    back = observe_event(second, CFG, ev("gateway_up", T0 + 500_000, "GW1"))
    assert [a["alert_id"] for a in back] == [out[1]["alert_id"] + ":resolved",
                                             out[0]["alert_id"] + ":resolved"]
    third = WatchState()
    for a in out + back:
        restore(third, CFG, a)
    assert third.episodes == {}
