"""The portal's aiohttp application: JSON API under /api/v1, webhooks, the mobile page.

Thin shell: reads go to the read model (under its lock), money input goes through a provider's
verification and the payment sink; access, scoping and rate limits come from pipelines.portal.auth.
Logs carry method, path (no query string), status and the token id, never a token or a body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

from infra import topics as T
from infra.warehouse_endpoint import WarehouseError
from pipelines import metrics as M
from pipelines.bills.periods import PeriodOpen, parse_period
from pipelines.bills.render import render_html
from pipelines.bills.statements import StatementError
from pipelines.portal.auth import Principal, RateLimiter, TokenStore, bearer_token
from pipelines.portal.directory import Directory
from pipelines.portal.openapi import openapi
from pipelines.portal.payments import PaymentNotAcknowledged, PaymentSink
from pipelines.portal.preferences import (
    CHANNELS,
    LANGUAGES,
    PreferenceError,
    Preferences,
    threshold_limits,
    validate,
)
from pipelines.portal.preferences import MAX_BODY as PREFERENCES_MAX_BODY
from pipelines.portal.providers import HmacProvider, SimulatedProvider, WebhookError
from pipelines.portal.readmodel import ReadModel
from pipelines.portal.statements import Statements
from schemas import codec

log = logging.getLogger("mallwatt.portal")
STATIC = Path(__file__).parent / "static"
MAX_BODY = 16 * 1024  # webhook and API bodies; a provider notification is well under 2 KiB
CHECKOUT_TTL_MS = 15 * 60 * 1000
MAX_CHECKOUTS = 10_000


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Portal:
    model: ReadModel
    lock: threading.Lock
    directory: Directory
    tokens: TokenStore
    sink: PaymentSink
    providers: dict[str, HmacProvider]
    limiter: RateLimiter = field(default_factory=RateLimiter)
    webhook_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(rate=200, burst=400))
    clock: Callable[[], int] = _now_ms
    feed: Any = None  # pipelines.portal.feed.KafkaFeed, for /health
    checkouts: OrderedDict[str, tuple[str, int, int]] = field(default_factory=OrderedDict)
    base_url: str = ""  # where the simulated provider posts its notifications (set when serving)
    statements: Statements | None = None  # closed periods' statements (the warehouse); None: 501


KEY: web.AppKey[Portal] = web.AppKey("portal", Portal)
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)


def error(status: int, code: str, message: str, field_name: str | None = None) -> web.Response:
    return web.json_response({"error": code, "field": field_name, "message": message}, status=status)


@web.middleware
async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # aiohttp's own (404 route, 413 body too large, ...) as JSON
        response = error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
    who = request.get(PRINCIPAL)
    elapsed = time.perf_counter() - started
    log.info("%s %s %s %.1fms token=%s", request.method, request.path, response.status, elapsed * 1000,
             who.token_id if who else "-")
    # the route's pattern, never the path: account ids must not become label values
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    M.PORTAL_REQUESTS.labels(route, str(response.status)).inc()
    M.PORTAL_REQUEST_SECONDS.labels(route).observe(elapsed)
    return response


def authenticate(request: web.Request) -> Principal | web.Response:
    portal = request.app[KEY]
    principal = portal.tokens.authenticate(bearer_token(request.headers.get("Authorization")) or "")
    if principal is None:
        return error(401, "unauthorized", "a valid bearer token is required", "Authorization")
    request[PRINCIPAL] = principal
    if not portal.limiter.allow(principal.token_id, portal.clock() / 1000):
        return error(429, "rate_limited", "too many requests for this token; retry shortly")
    return principal


def account_access(request: web.Request) -> tuple[str, Principal] | web.Response:
    principal = authenticate(request)
    if isinstance(principal, web.Response):
        return principal
    portal, account = request.app[KEY], request.match_info["account"]
    if not principal.can_see(account, portal.directory.mall_of.get(account)):
        return error(403, "forbidden", "this token may not see that account", "account")
    if account not in portal.directory.mall_of:
        return error(404, "unknown_account", f"no account {account}", "account")
    return account, principal


def _guarded(fn: Callable[[Portal, str, web.Request], dict[str, Any]]
             ) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        access = account_access(request)
        if isinstance(access, web.Response):
            return access
        portal = request.app[KEY]
        with portal.lock:
            body = fn(portal, access[0], request)
        return web.json_response(body)
    return handler


def _balance(portal: Portal, account: str, _request: web.Request) -> dict[str, Any]:
    now = portal.clock()
    found = portal.model.balance(account, now)
    return found or {"account_id": account, "mall_id": portal.directory.mall_of[account], "balance_minor": None,
                     "balance_ts_ms": None, "as_of_ms": None, "relay": {"state": "unknown", "ts_ms": None,
                                                                        "reason": None}, "days_left": None}


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "20")
    return max(1, min(100, int(raw))) if raw.isdigit() else 20


def _activity(portal: Portal, account: str, request: web.Request) -> dict[str, Any]:
    return {"account_id": account, "entries": portal.model.activity(account, _limit(request))}


def _alerts(portal: Portal, account: str, _request: web.Request) -> dict[str, Any]:
    return {"account_id": account, "alerts": portal.model.alerts(account)}


def _usage(portal: Portal, account: str, request: web.Request) -> dict[str, Any]:
    if request.query.get("period", "today") == "month":
        return {"account_id": account, **portal.model.usage_month(account, portal.clock())}
    return {"account_id": account, **portal.model.usage_today(account, portal.clock())}


def _overview(portal: Portal, account: str, request: web.Request) -> dict[str, Any]:
    policy = portal.directory.policy_of.get(account)
    return {"balance": _balance(portal, account, request), "usage_today": _usage(portal, account, request),
            "activity": portal.model.activity(account, 15), "alerts": portal.model.alerts(account)[:5],
            "topup": {"min_minor": policy.min_topup if policy else 1,
                      "max_minor": policy.max_topup if policy else None,
                      "providers": sorted(portal.providers)}}


async def accounts(request: web.Request) -> web.Response:
    principal = authenticate(request)
    if isinstance(principal, web.Response):
        return principal
    directory = request.app[KEY].directory
    visible = ([principal.subject] if principal.role == "merchant" and principal.subject in directory.mall_of
               else directory.accounts_of_mall(principal.subject) if principal.role == "operator" else [])
    return web.json_response({"role": principal.role, "accounts": visible[:1000], "total": len(visible)})


def _policy_error(portal: Portal, account: str, amount: int) -> web.Response | None:
    if account not in portal.directory.mall_of:
        return error(404, "unknown_account", f"no account {account}", "account_id")
    policy = portal.directory.policy_of.get(account)
    if policy is not None and amount < policy.min_topup:
        return error(422, "amount_out_of_policy", f"amount_minor below the minimum top-up {policy.min_topup}",
                     "amount_minor")
    if policy is not None and policy.max_topup is not None and amount > policy.max_topup:
        return error(422, "amount_out_of_policy", f"amount_minor above the maximum top-up {policy.max_topup}",
                     "amount_minor")
    return None


async def webhook(request: web.Request) -> web.Response:
    portal, name = request.app[KEY], request.match_info["provider"]
    provider = portal.providers.get(name)
    if provider is None:
        return error(404, "unknown_provider", f"no provider {name}", "provider")
    if not portal.webhook_limiter.allow(name, portal.clock() / 1000):
        return error(429, "rate_limited", "too many notifications; retry shortly")
    body = await request.read()  # bounded by client_max_size: 413 beyond MAX_BODY
    try:
        note = provider.verify(request.headers, body, portal.clock())
    except WebhookError as exc:
        return web.json_response(exc.body(), status=exc.status)
    refused = _policy_error(portal, note.account_id, note.amount_minor)
    if refused is not None:
        provider.release(note.nonce)
        return refused
    try:
        acked_ms = await portal.sink.send(note.payment())
    except PaymentNotAcknowledged as exc:
        provider.release(note.nonce)  # the provider's retry must get through
        log.warning("webhook %s: payment %s not acknowledged by Kafka: %s", name, note.payment_id, exc)
        return error(503, "not_recorded", "the payment was not recorded; retry the notification")
    provider.confirm(note.nonce)
    return web.json_response({"status": "accepted", "payment_id": note.payment_id, "account_id": note.account_id,
                              "amount_minor": note.amount_minor, "acked_at_ms": acked_ms})


async def _json_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        data = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        return error(400, "bad_json", "body must be a JSON object")
    return data if isinstance(data, dict) else error(400, "bad_json", "body must be a JSON object")


async def checkout(request: web.Request) -> web.Response:
    """Start a top-up with a provider: the page then sends the merchant to checkout_url."""
    access = account_access(request)
    if isinstance(access, web.Response):
        return access
    portal, account = request.app[KEY], access[0]
    data = await _json_body(request)
    if isinstance(data, web.Response):
        return data
    amount = data.get("amount_minor")
    if type(amount) is not int or amount <= 0:
        return error(422, "invalid_field", "amount_minor must be a positive integer (minor units)", "amount_minor")
    refused = _policy_error(portal, account, amount)
    if refused is not None:
        return refused
    if "sim" not in portal.providers:
        return error(501, "no_checkout_provider", "no provider with a checkout page is configured", "provider")
    now = portal.clock()
    while portal.checkouts and (len(portal.checkouts) >= MAX_CHECKOUTS
                                or next(iter(portal.checkouts.values()))[2] < now):
        portal.checkouts.popitem(last=False)
    session = secrets.token_urlsafe(16)
    portal.checkouts[session] = (account, amount, now + CHECKOUT_TTL_MS)
    return web.json_response({"provider": "sim", "session": session, "checkout_url": f"/sim/checkout/{session}",
                              "pay_url": f"/sim/pay/{session}"})


async def sim_checkout_page(request: web.Request) -> web.Response:
    session = request.match_info["session"]
    found = request.app[KEY].checkouts.get(session)
    if found is None:
        return error(404, "unknown_session", "no such checkout session", "session")
    html = (STATIC / "sim_checkout.html").read_text().replace("{{AMOUNT}}", f"{found[1] // 100}.{found[1] % 100:02d}") \
        .replace("{{ACCOUNT}}", escape(found[0])).replace("{{SESSION}}", session)
    return web.Response(text=html, content_type="text/html")


async def sim_pay(request: web.Request) -> web.Response:
    """The simulated provider takes the payment and notifies the portal's webhook over HTTP,
    signed, exactly as a provider would; it answers with the webhook's answer."""
    portal = request.app[KEY]
    provider = portal.providers.get("sim")
    found = portal.checkouts.pop(request.match_info["session"], None)
    if not isinstance(provider, SimulatedProvider) or found is None:
        return error(404, "unknown_session", "no such checkout session", "session")
    account, amount, _ = found
    body, headers = provider.notification(account, amount, portal.clock())
    async with ClientSession() as client, client.post(f"{portal.base_url}/api/v1/webhooks/sim", data=body,
                                                      headers=headers) as answer:
        return web.json_response(await answer.json(), status=answer.status)


def _preferences_body(portal: Portal, account: str) -> dict[str, Any]:
    stored = portal.model.preferences.get(account)
    low, high = threshold_limits(portal.directory.policy_of.get(account))
    return {"account_id": account, "stored": stored is not None,
            "preferences": (stored or Preferences(account)).to_json(),
            "timezone": portal.directory.tz_of(account),
            "limits": {"channels": list(CHANNELS), "languages": list(LANGUAGES),
                       "low_balance_minor": {"min": low, "max": high}, "max_body_bytes": PREFERENCES_MAX_BODY}}


async def preferences_get(request: web.Request) -> web.Response:
    access = account_access(request)
    if isinstance(access, web.Response):
        return access
    portal = request.app[KEY]
    with portal.lock:
        return web.json_response(_preferences_body(portal, access[0]))


async def preferences_put(request: web.Request) -> web.Response:
    """Validate, write to mallwatt.alert-preferences and answer after Kafka's ack (the record
    is what survives a restart), then show it at once from the read model."""
    access = account_access(request)
    if isinstance(access, web.Response):
        return access
    portal, account = request.app[KEY], access[0]
    if (request.content_length or 0) > PREFERENCES_MAX_BODY:
        return error(413, "body_too_large", f"preferences are at most {PREFERENCES_MAX_BODY} bytes", "body")
    raw = await request.read()
    if len(raw) > PREFERENCES_MAX_BODY:
        return error(413, "body_too_large", f"preferences are at most {PREFERENCES_MAX_BODY} bytes", "body")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return error(400, "bad_json", "body must be a JSON object", "body")
    with portal.lock:
        current = portal.model.preferences.get(account)
    try:
        prefs = validate(data, account, portal.directory.policy_of.get(account), portal.clock(), current)
    except PreferenceError as exc:
        return error(422, "invalid_field", exc.message, exc.field)
    send_record = getattr(portal.sink, "send_record", None)
    if send_record is None:
        return error(501, "no_preferences_store", "this portal cannot store preferences")
    try:
        await send_record(T.ALERT_PREFERENCES, account, codec.encode("AlertPreferences", prefs.to_record()))
    except PaymentNotAcknowledged as exc:
        log.warning("preferences of %s not acknowledged by Kafka: %s", account, exc)
        return error(503, "not_recorded", "the preferences were not saved; retry")
    with portal.lock:
        portal.model.apply_preferences(prefs)
        return web.json_response(_preferences_body(portal, account))


def _no_statements() -> web.Response:
    return error(501, "no_statements", "this portal serves no statements (no warehouse configured)")


async def statements_list(request: web.Request) -> web.Response:
    access = account_access(request)
    if isinstance(access, web.Response):
        return access
    portal, account = request.app[KEY], access[0]
    if portal.statements is None:
        return _no_statements()
    tz, now = portal.directory.tz_of(account), portal.clock()
    return await _blocking(lambda: web.json_response(portal.statements.periods(account, tz, now)))  # type: ignore[union-attr]


async def statement_one(request: web.Request) -> web.Response:
    """One closed period's statement, as `mallwatt bills statement` makes it (json or html)."""
    access = account_access(request)
    if isinstance(access, web.Response):
        return access
    portal, account, label = request.app[KEY], access[0], request.match_info["period"]
    source = portal.statements
    if source is None:
        return _no_statements()
    try:
        parse_period(label)
    except ValueError as exc:
        return error(422, "invalid_field", str(exc), "period")
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "html"):
        return error(422, "invalid_field", "format must be json or html", "format")
    directory = portal.directory

    def build() -> web.Response:
        doc = source.statement(account, directory.mall_of[account], directory.tz_of(account), label,
                               merchant_name=directory.name_of.get(account, ""), currency=directory.currency)
        if fmt == "html":
            return web.Response(text=render_html(doc), content_type="text/html")
        return web.json_response(doc)
    return await _blocking(build)


async def _blocking(fn: Callable[[], web.Response]) -> web.Response:
    """A warehouse call on a worker thread (the event loop keeps serving balances), with the
    bills' errors as answers."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, fn)
    except PeriodOpen as exc:
        return error(409, "period_open", str(exc), "period")
    except StatementError as exc:
        log.error("statement does not add up: %s", exc)
        return error(500, "statement_does_not_add_up", str(exc), "period")
    except WarehouseError as exc:
        log.warning("statements: warehouse unavailable: %s", exc)
        return error(503, "warehouse_unavailable", "statements are unavailable; retry later")


async def health(request: web.Request) -> web.Response:
    portal = request.app[KEY]
    feed = portal.feed
    return web.json_response({"status": "ok", "accounts_known": len(portal.directory.mall_of),
                              "accounts_seen": len(portal.model.accounts),
                              "feed": None if feed is None else {"caught_up": feed.caught_up.is_set(),
                                                                 "messages": feed.messages,
                                                                 "bad_messages": feed.bad_messages}})


async def openapi_json(_request: web.Request) -> web.Response:
    return web.json_response(openapi())


async def page(_request: web.Request) -> web.Response:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def build_app(portal: Portal) -> web.Application:
    app = web.Application(middlewares=[middleware], client_max_size=MAX_BODY)
    app[KEY] = portal
    base = "/api/v1/accounts/{account}"
    app.router.add_get("/api/v1/openapi.json", openapi_json)
    app.router.add_get("/api/v1/health", health)
    app.router.add_get("/api/v1/accounts", accounts)
    app.router.add_get(f"{base}/balance", _guarded(_balance))
    app.router.add_get(f"{base}/activity", _guarded(_activity))
    app.router.add_get(f"{base}/alerts", _guarded(_alerts))
    app.router.add_get(f"{base}/usage", _guarded(_usage))
    app.router.add_get(f"{base}/overview", _guarded(_overview))
    app.router.add_post(f"{base}/checkout", checkout)
    app.router.add_get(f"{base}/preferences", preferences_get)
    app.router.add_put(f"{base}/preferences", preferences_put)
    app.router.add_get(f"{base}/statements", statements_list)
    app.router.add_get(f"{base}/statements/{{period}}", statement_one)
    app.router.add_post("/api/v1/webhooks/{provider}", webhook)
    app.router.add_get("/sim/checkout/{session}", sim_checkout_page)
    app.router.add_post("/sim/pay/{session}", sim_pay)
    app.router.add_get("/", page)
    app.router.add_get("/m", page)
    return app
