"""Routing, dedup, rate limits and the dispatcher, with fake providers and an injected clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from notify_helpers import FakeNotifier, alert, config_data

from pipelines.notify import Dedup, Dispatcher, RateLimiter, Router, parse_config


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path: Path | None = None, **over: object) -> tuple[Dispatcher, dict[str, FakeNotifier], Clock]:
    data = config_data(**over)
    if tmp_path is not None:
        data["dedup"] = {"capacity": 100, "path": str(tmp_path / "dedup.txt")}
    config = parse_config(data)
    fakes = {name: FakeNotifier(name) for name in config.providers}
    clock = Clock()
    return Dispatcher.from_config(config, clock=clock, providers=fakes), fakes, clock


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_routing_by_kind_severity_and_audience() -> None:
    router = Router(parse_config(config_data()))

    def targets(a: dict) -> set[tuple[str, str]]:
        return {(t.provider, t.recipient.key) for t in router.targets(a)}

    assert targets(alert(kind="low_balance", severity="WARNING")) == {("sms", "M1")}
    # CRITICAL also rings the merchant's phone (voice), once per provider even if routes overlap
    assert targets(alert(kind="credit_trip", severity="CRITICAL")) == {("sms", "M1"), ("voice", "M1")}
    assert targets(alert(kind="relay_mismatch", severity="CRITICAL")) == {("voice", "M1"), ("ops", "ops:MALL1")}
    # no account and no ops contact for the mall: nobody to tell
    assert targets(alert(kind="collector_offline", account=None, mall="MALL9")) == set()
    assert targets(alert(kind="low_balance", account="UNKNOWN")) == set()
    assert targets(alert(kind="meter_fault", severity="INFO")) == set()


def test_route_restricted_to_malls() -> None:
    data = config_data(routes=[{"kinds": ["*"], "malls": ["MALL2"], "providers": ["sms"]}])
    router = Router(parse_config(data))
    assert router.targets(alert(mall="MALL1")) == []
    assert [t.provider for t in router.targets(alert(mall="MALL2"))] == ["sms"]


def test_duplicate_alert_id_is_sent_once() -> None:
    d, fakes, _ = make()
    first = run(d.handle(alert("a1")))
    again = run(d.handle(alert("a1")))
    assert (first.status, again.status) == ("sent", "duplicate")
    assert fakes["sms"].sent == [("a1", "M1")]


def test_duplicates_inside_one_batch_collapse() -> None:
    d, fakes, _ = make()
    outcomes = run(d.handle_many([alert("a1"), alert("a2", account="M2"), alert("a1")]))
    assert [o.status for o in outcomes] == ["sent", "sent", "duplicate"]
    assert sorted(fakes["sms"].sent) == [("a1", "M1"), ("a2", "M2")]


def test_a_repeat_retries_only_the_targets_that_failed() -> None:
    d, fakes, _ = make()
    fakes["voice"].fail = {"t1"}
    first = run(d.handle(alert("t1", kind="credit_trip", severity="CRITICAL")))
    assert first.status == "partial" and [r.provider for r in first.failures] == ["voice"]
    fakes["voice"].fail = set()
    second = run(d.handle(alert("t1", kind="credit_trip", severity="CRITICAL")))
    assert second.status == "sent" and second.already_delivered == 1
    assert fakes["sms"].sent == [("t1", "M1")] and fakes["voice"].sent == [("t1", "M1"), ("t1", "M1")]


def test_dedup_persists_across_restarts(tmp_path: Path) -> None:
    d, fakes, _ = make(tmp_path)
    run(d.handle(alert("p1")))
    run(d.close())
    d2, fakes2, _ = make(tmp_path)
    assert run(d2.handle(alert("p1"))).status == "duplicate"
    assert fakes2["sms"].sent == []
    run(d2.close())


def test_dedup_lru_is_bounded_and_file_compacts(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    dedup = Dedup(capacity=3, path=path)
    for i in range(10):
        dedup.add(f"k{i}")
    assert len(dedup) == 3 and "k9" in dedup and "k0" not in dedup
    dedup.close()
    assert len(path.read_text().splitlines()) <= 6  # compacted at 2 x capacity
    assert "k9" in Dedup(capacity=3, path=path) and "k5" not in Dedup(capacity=3, path=path)


def test_rate_limit_per_merchant_with_refill() -> None:
    d, fakes, clock = make()  # 2 per hour, burst 2
    statuses = [run(d.handle(alert(f"r{i}"))).status for i in range(3)]
    assert statuses == ["sent", "sent", "rate_limited"]
    # another merchant has its own bucket
    assert run(d.handle(alert("other", account="M2"))).status == "sent"
    clock.t += 1800  # half an hour refills one token (2 per hour)
    assert run(d.handle(alert("r3"))).status == "sent"
    assert run(d.handle(alert("r4"))).status == "rate_limited"
    # a rate-limited alert is not remembered: if re-published later it may still go out
    clock.t += 1800
    assert run(d.handle(alert("r2"))).status == "sent"


def test_critical_bypasses_the_limit_by_default() -> None:
    d, _, _ = make()
    for i in range(2):
        run(d.handle(alert(f"w{i}")))
    assert run(d.handle(alert("w9"))).status == "rate_limited"
    crit = [run(d.handle(alert(f"c{i}", kind="credit_trip", severity="CRITICAL"))).status for i in range(10)]
    assert crit == ["sent"] * 10


def test_critical_can_have_its_own_budget() -> None:
    d, _, _ = make(rate_limit={"per_hour": 1, "burst": 1, "critical": {"per_hour": 3}})
    crit = [run(d.handle(alert(f"c{i}", kind="credit_trip", severity="CRITICAL"))).status for i in range(4)]
    assert crit == ["sent", "sent", "sent", "rate_limited"]
    # the critical budget is separate: the normal one is still full
    assert run(d.handle(alert("n1"))).status == "sent"


def test_token_bucket_directly() -> None:
    clock = Clock()
    rl = RateLimiter(per_hour=60, burst=1, clock=clock)
    assert rl.allow("m", "INFO") and not rl.allow("m", "INFO")
    clock.t += 59
    assert not rl.allow("m", "INFO")
    clock.t += 1
    assert rl.allow("m", "WARNING")


def test_a_raising_provider_is_a_failed_result_not_a_crash() -> None:
    d, fakes, _ = make()

    async def boom(alert: dict, recipient: object) -> None:
        raise RuntimeError("provider bug")

    fakes["sms"].send = boom  # type: ignore[method-assign]
    outcome = run(d.handle(alert("x1")))
    assert outcome.status == "failed" and "provider bug" in (outcome.failures[0].error or "")
    assert run(d.handle(alert("x1"))).status == "failed"  # not remembered as delivered


def test_no_route() -> None:
    d, fakes, _ = make()
    assert run(d.handle(alert("n", kind="meter_fault", severity="INFO"))).status == "no_route"
    assert all(not f.sent for f in fakes.values())


@pytest.mark.parametrize("kind", ["low_balance"])
def test_log_notifier_writes_a_structured_line(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    d = Dispatcher.from_config(parse_config(config_data()))
    with caplog.at_level("INFO", logger="mallwatt.notify"):
        run(d.handle(alert("l1", kind=kind)))
    assert any('"event": "notification"' in r.message and '"alert_id": "l1"' in r.message for r in caplog.records)
    assert d.providers["sms"].history[-1]["to"] == "M1"  # type: ignore[attr-defined]
