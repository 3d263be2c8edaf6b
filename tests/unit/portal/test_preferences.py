"""Alert preferences: validation with the field named, the API (scoping, body limit, Kafka
ack before 2xx), the compacted-topic record surviving a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from infra import topics as T
from pipelines.core.models import WalletPolicy
from pipelines.portal.app import Portal
from pipelines.portal.payments import PaymentNotAcknowledged
from pipelines.portal.preferences import (
    PreferenceError,
    Preferences,
    threshold_limits,
    validate,
)
from pipelines.portal.readmodel import ReadModel
from schemas import codec
from tests.unit.portal.test_app import NOW, auth, run

POLICY = WalletPolicy(min_topup=1000, max_topup=100_000, cutoff=-2000)
GOOD = {"channels": ["sms", "app_push"], "phone": "+8613800138000", "quiet_hours": {"start": "22:00", "end": "07:30"},
        "low_balance_minor": 3000, "language": "en"}


@pytest.mark.parametrize(("change", "field"), [
    ({"channels": ["fax"]}, "channels"), ({"channels": "sms"}, "channels"),
    ({"phone": "13800138000"}, "phone"), ({"phone": None}, "phone"),  # sms without a phone
    ({"quiet_hours": {"start": "25:00", "end": "07:00"}}, "quiet_hours.start"),
    ({"quiet_hours": {"start": "22:00", "end": "22:00"}}, "quiet_hours.end"),
    ({"quiet_hours": "22-7"}, "quiet_hours"),
    ({"low_balance_minor": -2000}, "low_balance_minor"),  # at the trip point: too late to warn
    ({"low_balance_minor": 100_001}, "low_balance_minor"), ({"low_balance_minor": 30.5}, "low_balance_minor"),
    ({"language": "fr"}, "language"), ({"colour": "red"}, "colour"),
])
def test_each_bad_field_is_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(PreferenceError) as caught:
        validate({**GOOD, **change}, "A", POLICY, NOW)
    assert caught.value.field == field


def test_policy_limits_and_partial_update() -> None:
    assert threshold_limits(POLICY) == (1, 100_000)  # an overdraft account: still a positive threshold
    assert threshold_limits(WalletPolicy()) == (1, 1_000_000)
    first = validate(GOOD, "A", POLICY, NOW)
    assert first.channels == ("sms", "app_push") and first.quiet_start == "22:00" and first.updated_ms == NOW
    second = validate({"language": "zh-CN"}, "A", POLICY, NOW, first)  # only the language changes
    assert second.language == "zh-CN" and second.phone == first.phone and second.updated_ms == NOW + 1
    cleared = validate({"quiet_hours": None, "low_balance_minor": None}, "A", POLICY, NOW, second)
    assert cleared.quiet_start is None and cleared.low_balance_minor is None


class RecordingSink:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, bytes]] = []
        self.down = False

    async def send(self, payment: dict[str, Any]) -> int:
        return NOW

    async def send_record(self, topic: str, key: str, value: bytes) -> int:
        if self.down:
            raise PaymentNotAcknowledged("broker away")
        self.records.append((topic, key, value))
        return NOW


def test_api_get_put_scoping_limits_and_restart(tmp_path: Path) -> None:
    async def scenario(client: TestClient, portal: Portal, tok: dict[str, str]) -> None:
        sink = portal.sink = RecordingSink()
        url = "/api/v1/accounts/M01-S0001/preferences"
        fresh = await (await client.get(url, headers=auth(tok["s1"]))).json()
        assert fresh["stored"] is False and fresh["limits"]["low_balance_minor"] == {"min": 1, "max": 100_000}
        assert (await client.put(url, json=GOOD)).status == 401
        assert (await client.put(url, json=GOOD, headers=auth("mwp_00000000_wrong"))).status == 401
        assert (await client.put(url, json=GOOD, headers=auth(tok["s2"]))).status == 403  # other merchant's
        assert (await client.get(url, headers=auth(tok["s2"]))).status == 403
        bad = await client.put(url, json={**GOOD, "language": "fr"}, headers=auth(tok["s1"]))
        assert bad.status == 422 and (await bad.json())["field"] == "language"
        big = await client.put(url, data=b'{"language": "' + b"x" * 4096 + b'"}', headers=auth(tok["s1"]))
        assert big.status == 413 and (await big.json())["field"] == "body"
        assert (await client.put(url, data=b"{nope", headers=auth(tok["s1"]))).status == 400
        sink.down = True  # Kafka away: nothing saved, nothing shown, 503
        assert (await client.put(url, json=GOOD, headers=auth(tok["s1"]))).status == 503
        assert "M01-S0001" not in portal.model.preferences
        sink.down = False
        saved = await client.put(url, json=GOOD, headers=auth(tok["s1"]))
        body = await saved.json()
        assert saved.status == 200 and body["stored"] and body["preferences"]["quiet_hours"] == {
            "start": "22:00", "end": "07:30"}
        assert (await (await client.get(url, headers=auth(tok["op1"]))).json())["preferences"]["language"] == "en"
        topic, key, value = sink.records[-1]
        assert (topic, key) == (T.ALERT_PREFERENCES, "M01-S0001")
        # a restarted portal rebuilds them from the compacted topic's record alone
        restarted = ReadModel()
        restarted.apply_preferences(Preferences.from_record(codec.decode("AlertPreferences", value)))
        assert restarted.preferences["M01-S0001"] == portal.model.preferences["M01-S0001"]
        # an older record replayed later does not win
        older = Preferences("M01-S0001", language="zh-CN", updated_ms=1)
        assert not restarted.apply_preferences(older)
        assert restarted.preferences["M01-S0001"].language == "en"
    run(tmp_path, scenario)
