"""The notifier's preferences lookup (pipelines.notify.preferences.PreferencesLookup), backed
by what merchants save in the portal: the compacted topic mallwatt.alert-preferences.

In notify.yaml, on a provider that reads preferences (tencent_sms):

    preferences: "pipelines.portal.notify_lookup:lookup"

The first call starts a background thread (the portal's own KafkaFeed on that one topic,
MALLWATT_KAFKA or the dev broker) and, if MALLWATT_CONFIG names the portfolio, loads the
malls' time zones for the quiet hours; until they are in, the lookup answers None (the
notify.yaml contact) or the default zone. Every call is then a dict read: fast, never raises.
"""

from __future__ import annotations

import logging
import os
import threading

from pipelines.notify.preferences import Preferences as NotifierPreferences
from pipelines.notify.preferences import parse_hhmm
from pipelines.portal.preferences import Preferences
from pipelines.portal.readmodel import ReadModel

log = logging.getLogger(__name__)
DEFAULT_TZ = "Asia/Shanghai"


def to_notifier(prefs: Preferences, tz: str) -> NotifierPreferences:
    """The portal's record as the notifier reads it (quiet hours as times in the mall's zone)."""
    quiet = (None, None) if prefs.quiet_start is None or prefs.quiet_end is None else (
        parse_hhmm(prefs.quiet_start, "quiet_start"), parse_hhmm(prefs.quiet_end, "quiet_end"))
    return NotifierPreferences(prefs.account_id, phone=prefs.phone, channels=frozenset(prefs.channels),
                               quiet_start=quiet[0], quiet_end=quiet[1], language=prefs.language, tz=tz)


class PreferenceBook:
    """account id -> the notifier's Preferences, from a read model the feed keeps current."""

    def __init__(self, model: ReadModel, mall_of: dict[str, str] | None = None,
                 mall_tz: dict[str, str] | None = None, default_tz: str = DEFAULT_TZ) -> None:
        self.model, self.default_tz = model, default_tz
        self.mall_of, self.mall_tz = mall_of or {}, mall_tz or {}

    def __call__(self, account_id: str) -> NotifierPreferences | None:
        prefs = self.model.preferences.get(account_id)
        if prefs is None:
            return None
        return to_notifier(prefs, self.mall_tz.get(self.mall_of.get(account_id, ""), self.default_tz))


_book: PreferenceBook | None = None
_start = threading.Lock()


def _follow(book: PreferenceBook) -> None:
    from infra import topics as T
    from infra.broker import bootstrap_servers
    from pipelines.portal.feed import KafkaFeed

    KafkaFeed(bootstrap_servers(), book.model, threading.Lock(), topics=(T.ALERT_PREFERENCES,)).start()
    config = os.environ.get("MALLWATT_CONFIG")
    if config:
        try:
            from pipelines.portal.directory import load_directory

            directory = load_directory(config, T.default_partitions())
            book.mall_of, book.mall_tz = directory.mall_of, directory.mall_tz
        except Exception:  # noqa: BLE001 - zones are a refinement: the default zone stays
            log.exception("notify lookup: cannot load the malls' zones from %s; using %s", config, book.default_tz)


def lookup(account_id: str) -> NotifierPreferences | None:
    global _book
    if _book is None:
        with _start:
            if _book is None:
                book = PreferenceBook(ReadModel())
                threading.Thread(target=_follow, args=(book,), name="notify-preferences", daemon=True).start()
                _book = book
    return _book(account_id)
