"""What the portal saves is what the SMS adapter reads (pipelines.notify.preferences)."""

from __future__ import annotations

from datetime import time

from pipelines.notify.preferences import quiet_until_ms
from pipelines.notify.sms_tencent import load_lookup
from pipelines.portal.notify_lookup import PreferenceBook
from pipelines.portal.preferences import Preferences, validate
from pipelines.portal.readmodel import ReadModel
from schemas import codec

T0 = 1_784_080_800_000  # 2026-07-15 10:00 in Shanghai


def test_saved_record_becomes_the_notifiers_preferences_in_the_malls_zone() -> None:
    saved = validate({"channels": ["sms"], "phone": "+8613800138000", "language": "en",
                      "quiet_hours": {"start": "09:30", "end": "11:00"}}, "M01-S0001", None, T0)
    model = ReadModel()  # as the feed rebuilds it from the compacted topic
    model.apply_preferences(Preferences.from_record(codec.decode("AlertPreferences",
                                                                 codec.encode("AlertPreferences", saved.to_record()))))
    book = PreferenceBook(model, {"M01-S0001": "M01"}, {"M01": "Asia/Shanghai"})
    prefs = book("M01-S0001")
    assert prefs is not None and (prefs.phone, prefs.language, prefs.tz) == ("+8613800138000", "en", "Asia/Shanghai")
    assert prefs.channels == frozenset({"sms"}) and (prefs.quiet_start, prefs.quiet_end) == (time(9, 30), time(11))
    assert quiet_until_ms(T0, prefs.quiet_start, prefs.quiet_end, prefs.tz) == T0 + 3_600_000
    assert book("M01-S0002") is None  # nothing saved: the notify.yaml contact applies


def test_notify_yaml_can_name_the_lookup() -> None:
    assert callable(load_lookup("pipelines.portal.notify_lookup:lookup"))
