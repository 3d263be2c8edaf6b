"""TC3-HMAC-SHA256 against the documentation's worked example, and quiet hours."""

from __future__ import annotations

from datetime import datetime, time
from zoneinfo import ZoneInfo

import pytest

from pipelines.notify import tc3
from pipelines.notify.preferences import Preferences, parse_hhmm, quiet_until_ms

# The documentation's example: CVM DescribeInstances, POST, timestamp 1551113065.
DOC_PAYLOAD = b'{"Limit": 1, "Filters": [{"Values": ["\\u672a\\u547d\\u540d"], "Name": "instance-name"}]}'
DOC_HEADERS = {"Content-Type": "application/json; charset=utf-8", "Host": "cvm.tencentcloudapi.com"}


def test_signature_matches_the_documented_example() -> None:
    assert tc3.sha256_hex(DOC_PAYLOAD) == "35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
    canonical = tc3.canonical_request("POST", DOC_HEADERS, ["content-type", "host"], DOC_PAYLOAD)
    assert canonical == ("POST\n/\n\ncontent-type:application/json; charset=utf-8\n"
                         "host:cvm.tencentcloudapi.com\n\ncontent-type;host\n"
                         "35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064")
    assert tc3.sha256_hex(canonical.encode()) == "5ffe6a04c0664d6b969fab9a13bdab201d63ee709638e2749d62a09ca18d7031"
    scope = tc3.credential_scope(1551113065, "cvm")
    assert scope == "2019-02-25/cvm/tc3_request"  # UTC date; it is already the 26th in UTC+8
    to_sign = tc3.string_to_sign(1551113065, scope, canonical)
    sig = tc3.signature("Gu5t9xGARNpq86cd98joQYCN3EXAMPLE", "2019-02-25", "cvm", to_sign)
    assert sig == "72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
    headers = tc3.sign_headers("AKIDEXAMPLE", "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE", host="cvm.tencentcloudapi.com",
                               service="cvm", action="DescribeInstances", version="2017-03-12",
                               timestamp=1551113065, payload=DOC_PAYLOAD, region="ap-guangzhou",
                               signed=("content-type", "host"))
    assert headers["Authorization"] == ("TC3-HMAC-SHA256 Credential=AKIDEXAMPLE/2019-02-25/cvm/tc3_request, "
                                        "SignedHeaders=content-type;host, Signature=" + sig)
    assert headers["X-TC-Timestamp"] == "1551113065" and headers["X-TC-Region"] == "ap-guangzhou"


def test_signing_the_action_changes_the_signature() -> None:
    common = dict(host="sms.tencentcloudapi.com", service="sms", action="SendSms", version="2021-01-11",
                  timestamp=1551113065, payload=b"{}")
    with_action = tc3.sign_headers("id", "key", **common)  # type: ignore[arg-type]
    without = tc3.sign_headers("id", "key", signed=("content-type", "host"), **common)  # type: ignore[arg-type]
    assert "SignedHeaders=content-type;host;x-tc-action" in with_action["Authorization"]
    assert with_action["Authorization"].split("Signature=")[1] != without["Authorization"].split("Signature=")[1]


def _ms(local: str, tz: str = "Asia/Shanghai") -> int:
    return int(datetime.fromisoformat(local).replace(tzinfo=ZoneInfo(tz)).timestamp() * 1000)


@pytest.mark.parametrize(("now", "until"), [
    ("2026-07-15 23:30", "2026-07-16 07:00"),  # after start: ends tomorrow morning
    ("2026-07-16 06:59", "2026-07-16 07:00"),  # before end: ends this morning
    ("2026-07-16 07:00", None),  # the end itself is outside
    ("2026-07-15 21:59", None),
    ("2026-07-15 22:00", "2026-07-16 07:00"),
])
def test_quiet_hours_across_midnight(now: str, until: str | None) -> None:
    got = quiet_until_ms(_ms(now), time(22, 0), time(7, 0), "Asia/Shanghai")
    assert got == (None if until is None else _ms(until))


def test_quiet_hours_within_a_day_and_in_the_malls_zone() -> None:
    assert quiet_until_ms(_ms("2026-07-15 13:00"), time(12, 0), time(14, 0), "Asia/Shanghai") == _ms("2026-07-15 14:00")
    # 13:00 in Shanghai is 06:00 in Paris: the window is read in the zone given
    assert quiet_until_ms(_ms("2026-07-15 13:00"), time(12, 0), time(14, 0), "Europe/Paris") is None
    assert quiet_until_ms(_ms("2026-07-15 13:00"), None, None, "Asia/Shanghai") is None
    assert quiet_until_ms(_ms("2026-07-15 13:00"), time(8, 0), time(8, 0), "Asia/Shanghai") is None


def test_preferences_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="quiet_start and quiet_end go together"):
        Preferences("M1", quiet_start=time(22, 0))
    with pytest.raises(Exception, match="Mars"):
        Preferences("M1", tz="Mars/Olympus")
    with pytest.raises(ValueError, match="quiet_end: expected HH:MM"):
        parse_hhmm("7am", "quiet_end")
    assert parse_hhmm("07:30", "quiet_end") == time(7, 30)
