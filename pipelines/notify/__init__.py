"""Alert notifications: providers (log, webhook, Tencent Cloud SMS), routing, dedup, rate limits.

    from pipelines.notify import Dispatcher, load_config
    dispatcher = Dispatcher.from_config(load_config("notify.yaml"))
    outcome = await dispatcher.handle(alert)   # alert: a decoded Alert record

The Kafka service is pipelines.notify.service (`mallwatt notify --config notify.yaml`).
"""

from pipelines.notify.base import Channel, DeliveryResult, Notifier, Recipient
from pipelines.notify.config import (
    NotifyConfig,
    NotifyConfigError,
    ProviderSettings,
    load_config,
    parse_config,
    register_provider_type,
)
from pipelines.notify.dedup import Dedup
from pipelines.notify.dispatch import Dispatcher, Outcome, Router, Target
from pipelines.notify.preferences import Preferences, PreferencesLookup
from pipelines.notify.providers import LogNotifier, NonceCache, WebhookNotifier, sign, verify
from pipelines.notify.ratelimit import RateLimiter
from pipelines.notify.sms_tencent import TencentSmsNotifier  # registers provider type "tencent_sms"

__all__ = ["Channel", "DeliveryResult", "Notifier", "Recipient", "NotifyConfig", "NotifyConfigError",
           "ProviderSettings", "load_config", "parse_config", "register_provider_type", "Dedup", "Dispatcher",
           "Outcome", "Router", "Target", "LogNotifier", "WebhookNotifier", "sign", "verify", "NonceCache",
           "RateLimiter", "Preferences", "PreferencesLookup", "TencentSmsNotifier"]
