"""Tencent Cloud SMS (SendSms, API version 2021-01-11) as a notify provider: ``type: tencent_sms``.

One alert becomes one templated SMS: the template id comes from ``templates[kind][language]``
(Tencent sends only pre-approved templates, so every alert kind routed here needs one per
language), the phone, language, channels, quiet hours and time zone from the merchant's
Preferences (pipelines.notify.preferences) when a lookup is configured.

Requests are signed with TC3-HMAC-SHA256 (pipelines.notify.tc3). The secret key is read
from an environment variable and is never logged, printed or put in a result.

Delivery, per message key ``<alert_id>|<provider>|<recipient>`` (the dispatcher's target key):
- a key already sent is a duplicate: nothing is sent (the journal survives restarts);
- inside quiet hours (unless the severity is in ``quiet_bypass``) the rendered request is
  journaled as deferred and sent by ``tick()`` once the quiet period ends;
- throttling (RequestLimitExceeded*, HTTP 429) and server errors (InternalError, 5xx,
  connection refused) are retried ``retries`` times with backoff ``backoff_s * 2**n``
  (+-20 % jitter, at most ``max_backoff_s``): the API refused the request, so no message exists;
- a request whose answer is lost after it was sent (read timeout, dropped connection,
  InternalError.Timeout) is *not* retried: SendSms is not idempotent and a retry could be a
  second SMS. It is reported failed (dead-lettered by the service) with "outcome unknown";
- any other refusal (bad signature, unapproved template, blacklisted number, per-number
  frequency caps LimitExceeded.*) is permanent.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.notify import tc3
from pipelines.notify.base import Channel, DeliveryResult, Recipient
from pipelines.notify.config import NotifyConfigError, ProviderSettings, register_provider_type
from pipelines.notify.journal import SendJournal
from pipelines.notify.outbound import OutboundRefused, check_url, checked_session
from pipelines.notify.preferences import Preferences, PreferencesLookup, quiet_until_ms

log = logging.getLogger("mallwatt.notify.sms")

SERVICE = "sms"
ACTION = "SendSms"
VERSION = "2021-01-11"
RETRY_HTTP = frozenset({429, 500, 502, 503, 504})
# InternalError.Timeout: "timed out delivering the SMS" - it may have gone out; not retried.
AMBIGUOUS_CODES = frozenset({"InternalError.Timeout"})
DEFERRED_ROUNDS = 10  # tick() rounds (a minute apart) for a deferred message the API keeps refusing
TemplateParam = Literal["account_id", "mall_id", "meter_id", "balance_yuan", "level_yuan", "time", "date"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Template(_Model):
    id: Annotated[str, Field(pattern=r"^[0-9]{1,20}$")]  # an approved template's id
    params: list[TemplateParam] = Field(default_factory=list, max_length=10)  # {1}, {2}, ... in order


class TencentSmsSettings(ProviderSettings):
    type: Literal["tencent_sms"] = "tencent_sms"
    channel: Channel = Channel.SMS
    endpoint: Annotated[str, Field(pattern=r"^https?://[^/]+/?$")] = "https://sms.tencentcloudapi.com"
    region: str = "ap-guangzhou"
    secret_id_env: str = "TENCENTCLOUD_SECRET_ID"
    secret_key_env: str = "TENCENTCLOUD_SECRET_KEY"
    sms_sdk_app_id: Annotated[str, Field(pattern=r"^[0-9]{1,20}$")]
    sign_name: Annotated[str, Field(min_length=1, max_length=20)]  # the approved signature, e.g. "某某商场"
    templates: dict[str, dict[str, Template]] = Field(min_length=1)  # alert kind -> language -> template
    default_language: str = "zh-CN"  # used when the recipient's language has no template
    quiet_bypass: list[Literal["INFO", "WARNING", "CRITICAL"]] = Field(default_factory=lambda: ["CRITICAL"])
    default_tz: str = "Asia/Shanghai"  # when the lookup has no preferences for the account
    preferences: Annotated[str, Field(pattern=r"^[\w.]+:\w+$")] | None = None  # "module:callable" lookup
    journal_path: str | None = None  # persisted send journal (duplicates and deferrals survive restarts)
    journal_capacity: Annotated[int, Field(ge=1)] = 100_000
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    backoff_s: Annotated[float, Field(ge=0)] = 0.5
    max_backoff_s: Annotated[float, Field(ge=0)] = 30.0
    allow_loopback_http: bool = False  # tests only: an http endpoint on a loopback host (outbound.py)

    @model_validator(mode="after")
    def _outbound(self) -> TencentSmsSettings:
        try:
            check_url(self.endpoint, allow_loopback_http=self.allow_loopback_http)
        except OutboundRefused as exc:
            raise ValueError(f"endpoint: {exc}") from None
        return self

    def credentials(self) -> tuple[str, str]:
        values = []
        for field_name, env in (("secret_id_env", self.secret_id_env), ("secret_key_env", self.secret_key_env)):
            value = os.environ.get(env, "")
            if not value:
                raise NotifyConfigError(f"{field_name}: environment variable {env} is not set")
            values.append(value)
        return values[0], values[1]


def load_lookup(path: str) -> PreferencesLookup:
    module, _, name = path.partition(":")
    try:
        lookup = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise NotifyConfigError(f"preferences: cannot load {path!r} ({exc})") from None
    if not callable(lookup):
        raise NotifyConfigError(f"preferences: {path!r} is not callable")
    return lookup  # type: ignore[no-any-return]


def mask_phone(phone: str) -> str:
    """Enough of a number to tell messages apart in a log, not enough to call it."""
    return phone[:6] + "****" + phone[-2:] if len(phone) > 8 else "****"


def yuan(minor: str) -> str:
    """Minor units (fen) as an exact yuan string: "-1234" -> "-12.34"."""
    value = int(minor)
    sign = "-" if value < 0 else ""
    return f"{sign}{abs(value) // 100}.{abs(value) % 100:02d}"


class RenderError(ValueError):
    """An alert this provider cannot turn into a templated SMS; permanent."""


def render(alert: dict[str, Any], template: Template, tz: str) -> list[str]:
    """The template's parameters, in order, as strings (TemplateParamSet)."""
    details = alert.get("details") or {}
    local = datetime.fromtimestamp(alert["ts_ms"] / 1000, ZoneInfo(tz))
    out: list[str] = []
    for name in template.params:
        if name in ("balance_yuan", "level_yuan"):
            raw = details.get(name.removesuffix("_yuan"))
            if raw is None:
                raise RenderError(f"template {template.id} needs details.{name.removesuffix('_yuan')}")
            try:
                out.append(yuan(raw))
            except ValueError:
                raise RenderError(f"details.{name.removesuffix('_yuan')} is not an integer: {raw!r}") from None
        elif name == "time":
            out.append(local.strftime("%H:%M"))
        elif name == "date":
            out.append(local.strftime("%m-%d"))
        else:
            value = alert.get(name)
            if value is None:
                raise RenderError(f"template {template.id} needs {name}, the alert has none")
            out.append(str(value))
    return out


class TencentSmsNotifier:
    """The Notifier for Tencent Cloud SMS. ``clock`` is epoch seconds (quiet hours, X-TC-Timestamp)."""

    def __init__(self, name: str, settings: TencentSmsSettings, *, secret_id: str, secret_key: str,
                 preferences: PreferencesLookup | None = None, clock: Callable[[], float] = time.time,
                 journal: SendJournal | None = None) -> None:
        self.name = name
        self.channel = settings.channel
        self.settings = settings
        self._secret_id = secret_id
        self._secret_key = secret_key
        self._lookup = preferences
        self._clock = clock
        self.journal = journal or SendJournal(settings.journal_path, settings.journal_capacity)
        self._url = settings.endpoint.rstrip("/") + "/"
        self._host = urlsplit(settings.endpoint).netloc
        self._session: aiohttp.ClientSession | None = None
        self.stats = {"sent": 0, "deferred": 0, "duplicate": 0, "failed": 0, "requests": 0}

    def __repr__(self) -> str:  # never the secret
        return f"TencentSmsNotifier(name={self.name!r}, endpoint={self.settings.endpoint!r})"

    # -- the Notifier protocol ------------------------------------------------------------------
    async def send(self, alert: dict[str, Any], recipient: Recipient) -> DeliveryResult:
        key = f"{alert['alert_id']}|{self.name}|{recipient.key}"
        state = self.journal.state(key)
        if state in ("sent", "deferred"):
            self.stats["duplicate"] += state == "sent"
            return self._result(recipient, True, attempts=0, duplicate=state == "sent",
                                deferred_until_ms=(self.journal.get(key) or {}).get("due_ms"))
        if state in ("sending", "unknown"):
            return self._result(recipient, False, attempts=0, permanent=True,
                                error="outcome of an earlier request unknown; not resent to avoid a duplicate SMS")
        prefs = self._preferences(recipient)
        if prefs is not None and str(self.channel) not in prefs.channels:
            return self._result(recipient, True, attempts=0, skipped="channel off in the merchant's preferences")
        phone = (prefs.phone if prefs else None) or recipient.phone
        if not phone:
            return self._result(recipient, False, attempts=0, permanent=True, error="no phone number")
        language = (prefs.language if prefs else None) or recipient.language
        tz = prefs.tz if prefs else self.settings.default_tz
        try:
            template_id, params = self._template(alert, language, tz)
        except RenderError as exc:
            return self._result(recipient, False, attempts=0, permanent=True, error=str(exc))
        request = {"phone": phone, "template_id": template_id, "params": params, "context": key}
        now_ms = int(self._clock() * 1000)
        if prefs is not None and alert["severity"] not in self.settings.quiet_bypass:
            due = quiet_until_ms(now_ms, prefs.quiet_start, prefs.quiet_end, prefs.tz)
            if due is not None:
                self.journal.put(key, "deferred", sync=True, due_ms=due, request=request,
                                 recipient=recipient.key, at_ms=now_ms)
                self.stats["deferred"] += 1
                log.info("sms %s to %s deferred by quiet hours until %d", alert["alert_id"], mask_phone(phone), due)
                return self._result(recipient, True, attempts=0, deferred_until_ms=due)
        return await self._deliver(key, request, recipient.key)

    async def tick(self, now_s: float | None = None) -> int:
        """Send the deferred messages that are due; returns how many were attempted."""
        now_ms = int((self._clock() if now_s is None else now_s) * 1000)
        due = [r for r in self.journal.deferred() if r["due_ms"] <= now_ms]
        for record in due:
            result = await self._deliver(record["key"], record["request"], record["recipient"])
            rounds = record.get("rounds", 0) + 1
            if not result.ok and not result.permanent and rounds < DEFERRED_ROUNDS:
                # throttled at the end of the night (every merchant's reminder is due at once):
                # keep it deferred a minute rather than drop it after one round of retries
                self.journal.put(record["key"], "deferred", sync=True, due_ms=now_ms + 60_000, rounds=rounds,
                                 request=record["request"], recipient=record["recipient"])
            elif not result.ok:  # no Kafka message to dead-letter at this point: the log says it
                log.warning("deferred sms %s failed for good: %s", record["key"].split("|")[0], result.error)
        return len(due)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.journal.close()

    # -- internals --------------------------------------------------------------------------------
    def _preferences(self, recipient: Recipient) -> Preferences | None:
        if self._lookup is None or recipient.key.startswith("ops:"):
            return None
        try:
            return self._lookup(recipient.key)
        except Exception:  # a broken lookup must not stop deliveries: use the contact
            log.exception("preferences lookup failed for %s", recipient.key)
            return None

    def _template(self, alert: dict[str, Any], language: str, tz: str) -> tuple[str, list[str]]:
        by_language = self.settings.templates.get(alert["kind"])
        if not by_language:
            raise RenderError(f"no template for alert kind {alert['kind']!r}")
        template = by_language.get(language) or by_language.get(self.settings.default_language)
        if template is None:
            raise RenderError(f"no template for {alert['kind']!r} in {language!r} or {self.settings.default_language!r}")
        return template.id, render(alert, template, tz)

    def _result(self, recipient: Recipient | str, ok: bool, *, attempts: int, status: int | None = None,
                error: str | None = None, permanent: bool = False, **extra: Any) -> DeliveryResult:
        return DeliveryResult(self.name, recipient if isinstance(recipient, str) else recipient.key, ok=ok,
                              attempts=attempts, status=status, error=error, permanent=permanent,
                              extra={k: v for k, v in extra.items() if v is not None})

    def _body(self, request: dict[str, Any]) -> bytes:
        payload = {"PhoneNumberSet": [request["phone"]], "SmsSdkAppId": self.settings.sms_sdk_app_id,
                   "SignName": self.settings.sign_name, "TemplateId": request["template_id"],
                   "TemplateParamSet": request["params"], "SessionContext": request["context"][:500]}
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    async def _deliver(self, key: str, request: dict[str, Any], recipient_key: str) -> DeliveryResult:
        if self._session is None or self._session.closed:
            self._session = checked_session(aiohttp.ClientTimeout(
                total=self.settings.timeout_s, connect=min(self.settings.timeout_s, 3.0)),
                allow_loopback=self.settings.allow_loopback_http)
        body = self._body(request)
        phone = mask_phone(request["phone"])
        error, status, attempt = "", None, 0
        for attempt in range(1, self.settings.retries + 2):
            timestamp = int(self._clock())
            headers = tc3.sign_headers(self._secret_id, self._secret_key, host=self._host, service=SERVICE,
                                       action=ACTION, version=VERSION, region=self.settings.region,
                                       timestamp=timestamp, payload=body)
            self.journal.put(key, "sending", sync=True, attempt=attempt, recipient=recipient_key)
            self.stats["requests"] += 1
            verdict, status, error, serial = await self._post(body, headers)
            if verdict == "ok":
                self.journal.put(key, "sent", serial=serial, recipient=recipient_key)
                self.stats["sent"] += 1
                log.info("sms %s to %s sent (serial %s, attempt %d)", key.split("|")[0], phone, serial, attempt)
                return self._result(recipient_key, True, attempts=attempt, status=status, serial=serial)
            if verdict == "unknown":
                self.journal.put(key, "unknown", error=error, recipient=recipient_key)
                self.stats["failed"] += 1
                return self._result(recipient_key, False, attempts=attempt, status=status, permanent=True,
                                    error=f"outcome unknown ({error}); not retried to avoid a duplicate SMS")
            if verdict == "permanent":
                self.journal.put(key, "failed", error=error, recipient=recipient_key)
                self.stats["failed"] += 1
                log.warning("sms %s to %s refused: %s", key.split("|")[0], phone, error)
                return self._result(recipient_key, False, attempts=attempt, status=status, permanent=True,
                                    error=error)
            self.journal.put(key, "refused", error=error, recipient=recipient_key)
            if attempt <= self.settings.retries:
                delay = min(self.settings.max_backoff_s, self.settings.backoff_s * 2 ** (attempt - 1))
                log.info("sms %s to %s: %s; retry in %.2fs", key.split("|")[0], phone, error, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        self.journal.put(key, "failed", error=error, recipient=recipient_key)
        self.stats["failed"] += 1
        return self._result(recipient_key, False, attempts=attempt, status=status, error=error)

    async def _post(self, body: bytes, headers: dict[str, str]) -> tuple[str, int | None, str, str | None]:
        """(verdict, HTTP status, error, serial): verdict ok | retry | permanent | unknown."""
        assert self._session is not None
        try:
            async with self._session.post(self._url, data=body, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                raw = await resp.read()
        except OutboundRefused as exc:  # refused before connecting: nothing was sent
            return "permanent", None, str(exc), None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            return "retry", None, f"cannot connect: {type(exc).__name__}", None  # nothing was sent
        except (aiohttp.ClientError, TimeoutError) as exc:
            return "unknown", None, f"{type(exc).__name__}", None
        if status in RETRY_HTTP:
            return "retry", status, f"HTTP {status}", None
        try:
            response = json.loads(raw)["Response"]
        except (ValueError, KeyError, TypeError):
            return ("unknown" if 200 <= status < 300 else "permanent"), status, f"HTTP {status}: not a Tencent Cloud answer", None
        if "Error" in response:
            return classify(response["Error"].get("Code", ""), status, response["Error"].get("Message", ""))
        statuses = response.get("SendStatusSet") or []
        if len(statuses) != 1:
            return "unknown", status, f"expected one SendStatus, got {len(statuses)}", None
        code = statuses[0].get("Code", "")
        if code == "Ok":
            return "ok", status, "", statuses[0].get("SerialNo")
        return classify(code, status, statuses[0].get("Message", ""))


def classify(code: str, status: int, message: str) -> tuple[str, int, str, None]:
    """An error code's verdict: throttling and internal errors retry, a lost outcome is unknown."""
    error = f"{code}: {message[:200]}"
    if code in AMBIGUOUS_CODES:
        return "unknown", status, error, None
    if code.startswith("RequestLimitExceeded") or code == "InternalError":
        return "retry", status, error, None
    return "permanent", status, error, None


def build(name: str, settings: TencentSmsSettings) -> TencentSmsNotifier:
    secret_id, secret_key = settings.credentials()
    lookup = load_lookup(settings.preferences) if settings.preferences else None
    ZoneInfo(settings.default_tz)
    return TencentSmsNotifier(name, settings, secret_id=secret_id, secret_key=secret_key, preferences=lookup)


register_provider_type("tencent_sms", TencentSmsSettings, build)
