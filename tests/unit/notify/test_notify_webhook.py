"""WebhookNotifier against a local aiohttp server: signature, retries, permanent failures."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from notify_helpers import alert

from pipelines.notify import Recipient, WebhookNotifier, verify
from pipelines.notify.providers import SIGNATURE_HEADER, TIMESTAMP_HEADER

SECRET = b"s3cret"


async def serve(statuses: list[int]) -> tuple[web.AppRunner, str, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append({"body": body, "headers": dict(request.headers)})
        return web.Response(status=statuses[min(len(seen), len(statuses)) - 1])

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/hook", seen


def test_signed_post_and_retry_on_503() -> None:
    async def main() -> None:
        runner, url, seen = await serve([503, 200])
        notifier = WebhookNotifier("hook", url, SECRET, retries=2, backoff_s=0.01)
        result = await notifier.send(alert("w1"), Recipient("M1", "Tea", "+86138"))
        await notifier.close()
        await runner.cleanup()
        assert result.ok and result.attempts == 2 and result.status == 200
        assert len(seen) == 2
        req = seen[-1]
        assert verify(SECRET, req["headers"][TIMESTAMP_HEADER], req["body"], req["headers"][SIGNATURE_HEADER])
        assert not verify(b"wrong", req["headers"][TIMESTAMP_HEADER], req["body"], req["headers"][SIGNATURE_HEADER])
        payload = json.loads(req["body"])
        assert payload["alert"]["alert_id"] == "w1" and payload["recipient"]["phone"] == "+86138"
        assert req["headers"]["Idempotency-Key"] == "w1:hook:M1"

    asyncio.run(main())


def test_client_error_is_permanent_and_not_retried() -> None:
    async def main() -> None:
        runner, url, seen = await serve([400])
        notifier = WebhookNotifier("hook", url, SECRET, retries=3, backoff_s=0.01)
        result = await notifier.send(alert("w2"), Recipient("M1"))
        await notifier.close()
        await runner.cleanup()
        assert not result.ok and result.permanent and result.status == 400 and len(seen) == 1

    asyncio.run(main())


def test_unreachable_endpoint_gives_up_after_retries() -> None:
    async def main() -> None:
        runner, url, _ = await serve([200])
        await runner.cleanup()  # nothing listens on that port any more
        notifier = WebhookNotifier("hook", url, SECRET, retries=2, backoff_s=0.01, timeout_s=1)
        result = await notifier.send(alert("w3"), Recipient("M1"))
        await notifier.close()
        assert not result.ok and result.attempts == 3 and not result.permanent and result.error

    asyncio.run(main())


def test_verify_rejects_stale_timestamps() -> None:
    from pipelines.notify import sign

    body = b"{}"
    sig = sign(SECRET, "1000", body)
    assert verify(SECRET, "1000", body, sig, now=1100)
    assert not verify(SECRET, "1000", body, sig, now=2000)
    assert not verify(SECRET, "not-a-number", body, sig)
