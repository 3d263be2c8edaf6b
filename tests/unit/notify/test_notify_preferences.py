"""The notifier reads a merchant's saved alert preferences (pipelines.portal.preferences):
chosen channels, quiet hours in the mall's zone (CRITICAL passes), phone and language."""

from __future__ import annotations

import asyncio

from notify_helpers import FakeNotifier, alert, config_data

from pipelines.notify import Dispatcher, parse_config
from pipelines.notify.base import Channel
from pipelines.portal.preferences import Preferences

# alert() is at 2026-07-15 10:00 +08:00: inside 09:00-11:00 in Shanghai, 04:00 in Paris
QUIET = Preferences("M1", channels=("sms",), phone="+8613900000009", quiet_start="09:00", quiet_end="11:00",
                    language="en", updated_ms=1)


def make(prefs: dict[str, Preferences], mall_tz: str = "Asia/Shanghai") -> tuple[Dispatcher, dict[str, FakeNotifier]]:
    config = parse_config(config_data())
    channels = {"sms": Channel.SMS, "voice": Channel.VOICE, "ops": Channel.LOG}
    fakes = {name: FakeNotifier(name, channel=channels[name]) for name in config.providers}
    return Dispatcher.from_config(config, providers=fakes, preferences=prefs.get,
                                  mall_tz={"MALL1": mall_tz}), fakes


def test_quiet_hours_hold_a_warning_but_not_a_critical_alert() -> None:
    dispatcher, fakes = make({"M1": QUIET})
    held = asyncio.run(dispatcher.handle(alert("w1")))
    assert held.status == "held" and fakes["sms"].sent == [] and "quiet hours 09:00-11:00" in held.held[0]
    critical = asyncio.run(dispatcher.handle(alert("c1", kind="credit_trip", severity="CRITICAL")))
    # sms (chosen) goes out in quiet hours; voice was not chosen by the merchant
    assert fakes["sms"].sent == [("c1", "M1")] and fakes["voice"].sent == []
    assert any("channel voice not chosen" in h for h in critical.held)


def test_the_malls_zone_decides_and_merchants_without_preferences_are_unchanged() -> None:
    dispatcher, fakes = make({"M1": QUIET}, mall_tz="Europe/Paris")  # 04:00 there: not quiet
    assert asyncio.run(dispatcher.handle(alert("w1"))).status == "sent"
    dispatcher, fakes = make({})
    assert asyncio.run(dispatcher.handle(alert("w2"))).status == "sent" and fakes["sms"].sent == [("w2", "M1")]


def test_saved_phone_and_language_reach_the_provider() -> None:
    dispatcher, _ = make({"M1": QUIET, "M9": Preferences("M9", channels=("sms",), phone="+8613900000010")})
    recipient = dispatcher.router.recipients(alert(), "merchant")[0]
    assert (recipient.phone, recipient.language, recipient.name) == ("+8613900000009", "en", "Tea shop")
    # M9 is not in notify.yaml but saved a phone in the portal: it is a recipient
    assert [r.phone for r in dispatcher.router.recipients(alert(account="M9"), "merchant")] == ["+8613900000010"]
