"""A merchant's alert preferences: channels, phone, quiet hours, low-balance threshold, language.

Pure: validation (every error names its field) and the record kept on the compacted topic
`mallwatt.alert-preferences` (key: account id, schema AlertPreferences). The portal writes a
record and answers only after Kafka acknowledged it; the portal's feed rebuilds the latest
record per account from the topic, and so does the notifier's lookup
(pipelines.portal.notify_lookup), which hands them to the SMS adapter as
pipelines.notify.preferences.Preferences: quiet hours are decided there, once.

Quiet hours are local wall-clock times in the mall's zone, "HH:MM" to "HH:MM", and may span
midnight (22:00-07:00).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from pipelines.core.models import WalletPolicy

CHANNELS = ("sms", "voice", "app_push")
LANGUAGES = ("zh-CN", "en")
MAX_BODY = 2048  # a preferences document is ~200 bytes
DEFAULT_THRESHOLD_CAP = 1_000_000  # 10,000.00: the highest threshold when the policy has no max top-up
_HHMM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")
_PHONE = re.compile(r"\+[1-9]\d{6,14}")  # E.164
FIELDS = ("channels", "phone", "quiet_start", "quiet_end", "low_balance_minor", "language")


class PreferenceError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class Preferences:
    account_id: str
    channels: tuple[str, ...] = ()  # none chosen: no merchant channel (the operators' log still)
    phone: str | None = None
    quiet_start: str | None = None  # "HH:MM" local time of the mall; None with quiet_end: no quiet hours
    quiet_end: str | None = None
    low_balance_minor: int | None = None  # None: the policy's alert levels only
    language: str = "zh-CN"
    updated_ms: int = 0

    def to_record(self) -> dict[str, Any]:
        """The AlertPreferences record (schemas/alert_preferences.avsc)."""
        return {**asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Preferences:
        return cls(**{**{k: record[k] for k in ("account_id", "updated_ms")},
                      **{k: record.get(k) for k in FIELDS if record.get(k) is not None},
                      "channels": tuple(record.get("channels") or ())})

    def to_json(self) -> dict[str, Any]:
        return {**self.to_record(), "quiet_hours": None if self.quiet_start is None else
                {"start": self.quiet_start, "end": self.quiet_end}}


def threshold_limits(policy: WalletPolicy | None) -> tuple[int, int]:
    """The low-balance threshold a merchant may choose: positive and above the trip point (an alert at or
    below it would come after the power is off), at most the largest top-up the policy allows
    (or DEFAULT_THRESHOLD_CAP)."""
    policy = policy or WalletPolicy()
    low = max(policy.cutoff + 1, 1)
    high = policy.max_topup if policy.max_topup is not None else DEFAULT_THRESHOLD_CAP
    return low, max(low, high)


def validate(data: Any, account_id: str, policy: WalletPolicy | None, now_ms: int,
             current: Preferences | None = None) -> Preferences:
    """A PUT body -> Preferences. Fields left out keep their current value (a PUT of only
    `language` changes only the language); unknown fields are refused."""
    if not isinstance(data, dict):
        raise PreferenceError("body", "must be a JSON object")
    unknown = sorted(set(data) - set(FIELDS) - {"quiet_hours"})
    if unknown:
        raise PreferenceError(unknown[0], f"unknown field (known: {', '.join((*FIELDS[:2], 'quiet_hours', *FIELDS[4:]))})")
    base = current or Preferences(account_id)
    out: dict[str, Any] = {k: getattr(base, k) for k in FIELDS}
    if "channels" in data:
        channels = data["channels"]
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels) or len(channels) > 3:
            raise PreferenceError("channels", f"must be a list of up to 3 of {', '.join(CHANNELS)}")
        bad = [c for c in channels if c not in CHANNELS]
        if bad:
            raise PreferenceError("channels", f"unknown channel {bad[0]!r} (known: {', '.join(CHANNELS)})")
        out["channels"] = tuple(dict.fromkeys(channels))
    if "phone" in data:
        phone = data["phone"]
        if phone is not None and (not isinstance(phone, str) or not _PHONE.fullmatch(phone)):
            raise PreferenceError("phone", "must be an E.164 number such as +8613800138000, or null")
        out["phone"] = phone
    if "quiet_hours" in data:
        out["quiet_start"], out["quiet_end"] = _quiet(data["quiet_hours"])
    if "low_balance_minor" in data:
        value = data["low_balance_minor"]
        low, high = threshold_limits(policy)
        if value is not None and (type(value) is not int or not low <= value <= high):
            raise PreferenceError("low_balance_minor", f"must be an integer (minor units) from {low} to {high}, "
                                                       "or null")
        out["low_balance_minor"] = value
    if "language" in data:
        if data["language"] not in LANGUAGES:
            raise PreferenceError("language", f"must be one of {', '.join(LANGUAGES)}")
        out["language"] = data["language"]
    if ("sms" in out["channels"] or "voice" in out["channels"]) and not out["phone"]:
        raise PreferenceError("phone", "sms and voice need a phone number")
    return Preferences(account_id, updated_ms=max(now_ms, base.updated_ms + 1), **out)


def _quiet(value: Any) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict) or set(value) != {"start", "end"}:
        raise PreferenceError("quiet_hours", 'must be {"start": "HH:MM", "end": "HH:MM"} or null')
    for name in ("start", "end"):
        if not isinstance(value[name], str) or not _HHMM.fullmatch(value[name]):
            raise PreferenceError(f"quiet_hours.{name}", "must be a local time HH:MM (00:00-23:59)")
    if value["start"] == value["end"]:
        raise PreferenceError("quiet_hours.end", "must differ from start (null for no quiet hours)")
    return value["start"], value["end"]
