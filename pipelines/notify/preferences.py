"""A merchant's notification preferences, as the notifier reads them, and quiet hours.

The portal owns the preferences (the merchant edits them on the page); the notifier only
reads them through a lookup callable, so this module is the interface between the two:

    PreferencesLookup = Callable[[str], Preferences | None]   # account id -> preferences

A lookup returns None for an account without preferences; the notifier then uses the
notify.yaml contact (phone, language), the provider's default time zone and no quiet
hours. It is called once per delivery, synchronously, so it must be fast (an in-memory
read) and must not raise; a lookup that raises is treated as "no preferences" and logged.

Quiet hours are local wall-clock times in the mall's time zone: start 22:00, end 07:00
means 22:00 to 07:00 the next morning; start == end means none. A message due inside
them is held until the end (a non-existent or repeated local time on a DST change
resolves as zoneinfo's fold=0 does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

DEFAULT_CHANNELS = frozenset({"sms"})


@dataclass(frozen=True)
class Preferences:
    account_id: str
    phone: str | None = None  # E.164, e.g. "+8613800000001"; None: the notify.yaml contact's
    channels: frozenset[str] = DEFAULT_CHANNELS  # Channel values the merchant accepts ("sms", "voice", ...)
    quiet_start: time | None = None  # local time in ``tz``; both or neither
    quiet_end: time | None = None
    language: str | None = None  # "zh-CN" | "en"; None: the contact's
    tz: str = "Asia/Shanghai"  # the mall's IANA time zone (from the portfolio)
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if (self.quiet_start is None) != (self.quiet_end is None):
            raise ValueError(f"preferences of {self.account_id}: quiet_start and quiet_end go together")
        ZoneInfo(self.tz)  # an unknown zone fails here, naming itself


PreferencesLookup = Callable[[str], "Preferences | None"]


def quiet_until_ms(now_ms: int, start: time | None, end: time | None, tz: str) -> int | None:
    """When the quiet period containing ``now_ms`` ends (epoch ms), or None outside one."""
    if start is None or end is None or start == end:
        return None
    zone = ZoneInfo(tz)
    local = datetime.fromtimestamp(now_ms / 1000, zone)
    t = local.time().replace(tzinfo=None)
    if start < end:
        inside = start <= t < end
        end_day = local.date()
    else:  # wraps midnight: inside after start tonight, or before end this morning
        inside = t >= start or t < end
        end_day = local.date() + timedelta(days=1) if t >= start else local.date()
    if not inside:
        return None
    return int(datetime.combine(end_day, end, zone).timestamp() * 1000)


def parse_hhmm(value: str, field_name: str) -> time:
    """"HH:MM" -> time; the error names the field."""
    try:
        hours, minutes = value.split(":")
        return time(int(hours), int(minutes))
    except ValueError:
        raise ValueError(f"{field_name}: expected HH:MM, got {value!r}") from None
