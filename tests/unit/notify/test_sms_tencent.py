"""The Tencent Cloud SMS adapter against a local fake of the API that checks signatures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fake_tencent_sms import FakeTencentSms
from notify_helpers import alert, config_data

from pipelines.notify import Dispatcher, NotifyConfigError, Preferences, Recipient, parse_config
from pipelines.notify.journal import SendJournal
from pipelines.notify.sms_tencent import TencentSmsNotifier, TencentSmsSettings, render, yuan

SECRET_ID = "AKIDmallwattTEST0001"
SECRET_KEY = "sk-never-in-a-log-7f3a9c"
TZ = ZoneInfo("Asia/Shanghai")


def local_s(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=TZ).timestamp()


class Clock:
    def __init__(self, at: str = "2026-07-15 10:00") -> None:
        self.now = local_s(at)

    def __call__(self) -> float:
        return self.now


def settings(url: str, **over: Any) -> TencentSmsSettings:
    data: dict[str, Any] = {
        "endpoint": url, "sms_sdk_app_id": "1400006666", "sign_name": "万达广场",
        "templates": {
            "low_balance": {"zh-CN": {"id": "2001", "params": ["account_id", "balance_yuan"]},
                            "en": {"id": "2002", "params": ["account_id", "balance_yuan"]}},
            "credit_trip": {"zh-CN": {"id": "2011", "params": ["balance_yuan", "time"]}},
        },
        "backoff_s": 0.01, "retries": 3, "timeout_s": 1.0,
        "allow_loopback_http": True,  # the local fake API (outbound rules: docs/security.md)
    }
    data.update(over)
    return TencentSmsSettings.model_validate(data)


def low_balance(alert_id: str = "M1:low_balance:1000:e7", account: str = "M1") -> dict[str, Any]:
    a = alert(alert_id, account=account)
    a["details"] = {"balance": "987", "level": "1000"}
    return a


Scenario = Callable[[FakeTencentSms, Clock], Awaitable[None]]


def run(scenario: Scenario, script: list[str] | None = None, at: str = "2026-07-15 10:00") -> FakeTencentSms:
    clock = Clock(at)
    fake = FakeTencentSms({SECRET_ID: SECRET_KEY}, script=script or [], clock=clock)

    async def main() -> None:
        await fake.start()
        try:
            await scenario(fake, clock)
        finally:
            await fake.stop()

    asyncio.run(main())
    return fake


def notifier(fake: FakeTencentSms, clock: Clock, *, key: str = SECRET_KEY, prefs: dict[str, Preferences] | None = None,
             journal: SendJournal | None = None, **over: Any) -> TencentSmsNotifier:
    return TencentSmsNotifier("tencent", settings(fake.url, **over), secret_id=SECRET_ID, secret_key=key,
                              preferences=(prefs or {}).get if prefs is not None else None, clock=clock,
                              journal=journal)


def test_good_send_is_signed_and_templated() -> None:
    results = []

    async def scenario(fake: FakeTencentSms, clock: Clock) -> None:
        sms = notifier(fake, clock)
        results.append(await sms.send(low_balance(), Recipient("M1", "Tea", "+8613800000001", language="en")))
        await sms.close()

    fake = run(scenario)
    (result,) = results
    assert result.ok and result.attempts == 1 and result.extra["serial"] == "2640:000001", result
    assert fake.refused == [] and len(fake.accepted) == 1
    sent = fake.accepted[0]
    assert sent["PhoneNumberSet"] == ["+8613800000001"] and sent["TemplateId"] == "2002"  # English template
    assert sent["TemplateParamSet"] == ["M1", "9.87"] and sent["SignName"] == "万达广场"
    assert sent["SmsSdkAppId"] == "1400006666" and sent["SessionContext"] == "M1:low_balance:1000:e7|tencent|M1"


def test_bad_signature_is_refused_and_not_retried() -> None:
    results = []

    async def scenario(fake: FakeTencentSms, clock: Clock) -> None:
        sms = notifier(fake, clock, key="a-wrong-secret")
        results.append(await sms.send(low_balance(), Recipient("M1", phone="+8613800000001")))
        await sms.close()

    fake = run(scenario)
    assert fake.refused == ["AuthFailure.SignatureFailure"] and fake.accepted == []
    (result,) = results
    assert not result.ok and result.permanent and result.attempts == 1
    assert result.error is not None and result.error.startswith("AuthFailure.SignatureFailure")


def test_the_fake_checks_the_body_and_the_clock() -> None:
    """The fake's verification can fail: a changed body or a stale timestamp is refused."""
    from pipelines.notify import tc3

    fake = FakeTencentSms({SECRET_ID: SECRET_KEY}, clock=lambda: 1_800_000_000)
    body = b'{"PhoneNumberSet":["+8613800000001"]}'
    headers = tc3.sign_headers(SECRET_ID, SECRET_KEY, host="127.0.0.1:1", service="sms", action="SendSms",
                               version="2021-01-11", timestamp=1_800_000_000, payload=body)
    assert fake.verify(headers, body) is None
    assert fake.verify(headers, body.replace(b"01", b"02")) == "AuthFailure.SignatureFailure"
    assert fake.verify({**headers, "Host": "evil.example"}, body) == "AuthFailure.SignatureFailure"
    fake.clock = lambda: 1_800_000_000 + 301
    assert fake.verify(headers, body) == "AuthFailure.SignatureExpire"


@pytest.mark.parametrize("failure", ["throttle", "http503", "internal"])
def test_throttled_then_retried_once_gives_one_message(failure: str) -> None:
    results = []

    async def scenario(fake: FakeTencentSms, clock: Clock) -> None:
        sms = notifier(fake, clock)
        results.append(await sms.send(low_balance(), Recipient("M1", phone="+8613800000001")))
        await sms.close()

    fake = run(scenario, script=[failure, "ok"])
    (result,) = results
    assert result.ok and result.attempts == 2
    assert fake.requests == 2 and len(fake.accepted) == 1 and len(fake.refused) == 1


def test_retries_are_bounded() -> None:
    results = []

    async def scenario(fake: FakeTencentSms, clock: Clock) -> None:
        sms = notifier(fake, clock, retries=2)
        results.append(await sms.send(low_balance(), Recipient("M1", phone="+8613800000001")))
        # the key failed (not sent): a later delivery of the same alert tries again, and succeeds
        results.append(await sms.send(low_balance(), Recipient("M1", phone="+8613800000001")))
        await sms.close()

    fake = run(scenario, script=["throttle"] * 3)
    first, second = results
    assert not first.ok and not first.permanent and first.attempts == 3
    assert second.ok and len(fake.accepted) == 1


def test_lost_answer_is_not_retried() -> None:
    """SendSms is not idempotent: a request that may have gone out is never sent again."""
    results = []

    async def scenario(fake: FakeTencentSms, clock: Clock) -> None:
        sms = notifier(fake, clock, timeout_s=0.3)
        results.append(await sms.send(low_balance(), Recipient("M1", phone="+8613800000001")))
        results.append(await sms.send(low_balance(), Recipient("M1", phone="+8613800000001")))
        await sms.close()

    fake = run(scenario, script=["hang"])
    first, again = results
    assert not first.ok and first.permanent and "outcome unknown" in (first.error or "")
    assert not again.ok and again.attempts == 0  # the journal says unknown: not resent
    assert fake.requests == 1 and len(fake.accepted) == 1


def test_duplicates_are_suppressed_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "sms-journal.jsonl"
    results = []

    async def scenario(fake: FakeTencentSms, clock: Clock) -> None:
        for _ in range(2):  # a restart: a new notifier on the same journal file
            sms = notifier(fake, clock, journal=SendJournal(path))
            for _ in range(2):
                results.append(await sms.send(low_balance(), Recipient("M1", phone="+8613800000001")))
            await sms.close()
        sms = notifier(fake, clock, journal=SendJournal(path))
        results.append(await sms.send(low_balance("M1:low_balance:1000:e8"), Recipient("M1", phone="+8613800000001")))
        await sms.close()

    fake = run(scenario)
    assert all(r.ok for r in results)
    assert [r.extra.get("duplicate", False) for r in results] == [False, True, True, True, False]
    assert len(fake.accepted) == 2 and fake.requests == 2
    assert oct(path.stat().st_mode & 0o777) == "0o600"  # phone numbers inside


def test_quiet_hours_defer_until_their_end(tmp_path: Path) -> None:
    prefs = {"M1": Preferences("M1", phone="+8613900000009", quiet_start=time(22, 0), quiet_end=time(7, 0),
                               language="zh-CN", tz="Asia/Shanghai")}
    path = tmp_path / "journal.jsonl"
    seen: dict[str, Any] = {}

    async def scenario(fake: FakeTencentSms, clock: Clock) -> None:
        sms = notifier(fake, clock, prefs=prefs, journal=SendJournal(path))
        seen["deferred"] = await sms.send(low_balance(), Recipient("M1", phone="+8613800000001"))
        seen["again"] = await sms.send(low_balance(), Recipient("M1", phone="+8613800000001"))
        trip = alert("M1:credit_trip:e9", kind="credit_trip", severity="CRITICAL")
        trip["details"], trip["ts_ms"] = {"balance": "-5"}, int(clock.now * 1000)
        seen["critical"] = await sms.send(trip, Recipient("M1"))  # CRITICAL bypasses quiet hours
        await sms.close()
        seen["at_night"] = len(fake.accepted)
        sms = notifier(fake, clock, prefs=prefs, journal=SendJournal(path))  # a restart in the night
        clock.now = local_s("2026-07-16 06:59")
        seen["tick_early"] = await sms.tick()
        clock.now = local_s("2026-07-16 07:00")
        seen["tick_due"] = await sms.tick()
        seen["tick_after"] = await sms.tick()
        seen["late_repeat"] = await sms.send(low_balance(), Recipient("M1", phone="+8613800000001"))
        await sms.close()

    fake = run(scenario, at="2026-07-15 23:30")
    deferred = seen["deferred"]
    assert deferred.ok and deferred.attempts == 0
    assert deferred.extra["deferred_until_ms"] == int(local_s("2026-07-16 07:00") * 1000)
    assert seen["again"].ok and seen["again"].extra["deferred_until_ms"] == deferred.extra["deferred_until_ms"]
    assert seen["critical"].ok and seen["critical"].attempts == 1
    assert seen["at_night"] == 1  # only the CRITICAL one went out at night
    assert (seen["tick_early"], seen["tick_due"], seen["tick_after"]) == (0, 1, 0)
    assert seen["late_repeat"].extra.get("duplicate") is True
    assert len(fake.accepted) == 2
    morning = fake.accepted[1]
    assert morning["PhoneNumberSet"] == ["+8613900000009"]  # the preference's phone, not the contact's
    assert morning["TemplateId"] == "2001" and morning["TemplateParamSet"] == ["M1", "9.87"]
    trip_sms = fake.accepted[0]
    assert trip_sms["TemplateId"] == "2011" and trip_sms["TemplateParamSet"] == ["-0.05", "23:30"]


def test_channel_off_and_missing_template() -> None:
    prefs = {"M1": Preferences("M1", phone="+8613900000009", channels=frozenset({"voice"}))}
    results = []

    async def scenario(fake: FakeTencentSms, clock: Clock) -> None:
        sms = notifier(fake, clock, prefs=prefs)
        results.append(await sms.send(low_balance(), Recipient("M1", phone="+8613800000001")))
        results.append(await sms.send(alert("x", kind="overload", account="M2"), Recipient("M2", phone="+86138")))
        results.append(await sms.send(low_balance(account="M3"), Recipient("M3")))
        await sms.close()

    fake = run(scenario)
    off, no_template, no_phone = results
    assert off.ok and "channel off" in off.extra["skipped"]
    assert not no_template.ok and no_template.permanent and "no template for alert kind 'overload'" in (no_template.error or "")
    assert not no_phone.ok and no_phone.error == "no phone number"
    assert fake.requests == 0


def test_render_is_exact() -> None:
    assert [yuan(v) for v in ("0", "5", "-5", "123456", "-100")] == ["0.00", "0.05", "-0.05", "1234.56", "-1.00"]
    s = settings("http://127.0.0.1:1")
    a = low_balance()
    a["ts_ms"] = int(local_s("2026-07-15 08:05") * 1000)
    assert render(a, s.templates["credit_trip"]["zh-CN"], "Asia/Shanghai") == ["9.87", "08:05"]


def test_secret_never_in_logs_results_or_config_errors(caplog: pytest.LogCaptureFixture,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    results = []

    async def scenario(fake: FakeTencentSms, clock: Clock) -> None:
        sms = notifier(fake, clock)
        results.append(await sms.send(low_balance(), Recipient("M1", phone="+8613800000001")))
        results.append(repr(sms))
        await sms.close()
        wrong = notifier(fake, clock, key=SECRET_KEY + "x")
        results.append(await wrong.send(low_balance("other"), Recipient("M1", phone="+8613800000001")))
        await wrong.close()

    run(scenario, script=["throttle"])
    monkeypatch.setenv("MW_TEST_SMS_ID", SECRET_ID)
    monkeypatch.delenv("MW_TEST_SMS_KEY", raising=False)
    provider = {"type": "tencent_sms", "sms_sdk_app_id": "1400006666", "sign_name": "万达广场",
                "secret_id_env": "MW_TEST_SMS_ID", "secret_key_env": "MW_TEST_SMS_KEY",
                "templates": {"low_balance": {"zh-CN": {"id": "2001"}}}}
    with pytest.raises(NotifyConfigError, match="secret_key_env: environment variable MW_TEST_SMS_KEY is not set"):
        Dispatcher.from_config(parse_config(config_data(providers={"sms": provider, "voice": {"type": "log"},
                                                                   "ops": {"type": "log"}})))
    out = capsys.readouterr()
    text = caplog.text + out.out + out.err + repr(results)
    assert SECRET_KEY not in text and "+8613800000001" not in caplog.text
    assert "retry in" in caplog.text  # the log did record the throttled attempt


def test_notify_yaml_builds_the_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MW_TEST_SMS_ID", SECRET_ID)
    monkeypatch.setenv("MW_TEST_SMS_KEY", SECRET_KEY)
    provider = {"type": "tencent_sms", "sms_sdk_app_id": "1400006666", "sign_name": "万达广场",
                "secret_id_env": "MW_TEST_SMS_ID", "secret_key_env": "MW_TEST_SMS_KEY",
                "preferences": "tests_prefs_absent:lookup",
                "templates": {"low_balance": {"zh-CN": {"id": "2001", "params": ["balance_yuan"]}}}}
    data = config_data(providers={"sms": provider, "voice": {"type": "log"}, "ops": {"type": "log"}})
    with pytest.raises(NotifyConfigError, match="preferences: cannot load 'tests_prefs_absent:lookup'"):
        Dispatcher.from_config(parse_config(data))
    provider["preferences"] = "pipelines.notify.preferences:parse_hhmm"  # any importable callable
    dispatcher = Dispatcher.from_config(parse_config(data))
    assert isinstance(dispatcher.providers["sms"], TencentSmsNotifier)
    bad = {**provider, "templates": {"low_balance": {"zh-CN": {"id": "SMS_123"}}}}
    with pytest.raises(NotifyConfigError, match=r"providers\.sms\.templates\.low_balance\.zh-CN\.id"):
        parse_config(config_data(providers={"sms": bad, "voice": {"type": "log"}, "ops": {"type": "log"}}))
    asyncio.run(dispatcher.close())


def test_through_the_dispatcher_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatcher's own dedup and the adapter's journal together: one SMS per alert."""
    outcomes = []

    async def scenario(fake: FakeTencentSms, clock: Clock) -> None:
        data = config_data()
        config = parse_config(data)
        sms = notifier(fake, clock, journal=SendJournal(tmp_path / "j.jsonl"))
        from pipelines.notify.base import Channel
        from pipelines.notify.providers import LogNotifier
        dispatcher = Dispatcher.from_config(config, providers={"sms": sms, "voice": LogNotifier("voice", Channel.VOICE),
                                                               "ops": LogNotifier("ops")})
        outcomes.extend(await dispatcher.handle_many([low_balance(), low_balance()]))
        outcomes.append(await dispatcher.handle(low_balance()))
        assert await dispatcher.tick() == 0
        await dispatcher.close()

    fake = run(scenario, script=["throttle"])
    assert [o.status for o in outcomes] == ["sent", "duplicate", "duplicate"]
    assert len(fake.accepted) == 1 and fake.requests == 2


def test_a_deferred_message_throttled_at_its_due_time_stays_deferred() -> None:
    prefs = {"M1": Preferences("M1", phone="+8613900000009", quiet_start=time(22, 0), quiet_end=time(7, 0))}
    seen: dict[str, Any] = {}

    async def scenario(fake: FakeTencentSms, clock: Clock) -> None:
        sms = notifier(fake, clock, prefs=prefs, retries=1)
        assert (await sms.send(low_balance(), Recipient("M1"))).extra["deferred_until_ms"]
        clock.now = local_s("2026-07-16 07:00")
        seen["first"] = await sms.tick()  # throttled twice: retries exhausted
        seen["state"] = sms.journal.state("M1:low_balance:1000:e7|tencent|M1")
        seen["same_minute"] = await sms.tick()
        clock.now += 60
        seen["a_minute_later"] = await sms.tick()
        await sms.close()

    fake = run(scenario, script=["throttle", "throttle"], at="2026-07-15 23:30")
    assert (seen["first"], seen["state"], seen["same_minute"], seen["a_minute_later"]) == (1, "deferred", 0, 1)
    assert len(fake.accepted) == 1 and fake.requests == 3


@pytest.mark.parametrize(("endpoint", "flag", "words"), [
    ("http://sms.tencentcloudapi.com", False, "plain http is refused"),
    ("http://127.0.0.1:9", False, "plain http is refused"),
    ("https://169.254.169.254", False, "link-local"),
    ("https://10.0.0.8", False, "private"),
    ("http://sms.tencentcloudapi.com", True, "only to a loopback host"),
])
def test_endpoint_follows_the_outbound_rules(endpoint: str, flag: bool, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        settings(endpoint, allow_loopback_http=flag)
    assert settings("https://sms.tencentcloudapi.com", allow_loopback_http=False).endpoint.startswith("https://")


def test_a_redirect_is_not_followed() -> None:
    from aiohttp import web

    seen: list[str] = []
    results = []

    async def main() -> None:
        async def handler(request: web.Request) -> web.Response:
            seen.append(request.path)
            return web.Response(status=302, headers={"Location": "/elsewhere"})

        app = web.Application()
        app.router.add_post("/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        sms = TencentSmsNotifier("tencent", settings(url), secret_id=SECRET_ID, secret_key=SECRET_KEY,
                                 clock=Clock())
        results.append(await sms.send(low_balance(), Recipient("M1", phone="+8613800000001")))
        await sms.close()
        await runner.cleanup()

    asyncio.run(main())
    (result,) = results
    assert not result.ok and result.permanent and result.status == 302
    assert seen == ["/"]  # /elsewhere was never requested
