"""WebhookNotifier against a local aiohttp server: signature, retries, permanent failures,
and the outbound rules (https, public addresses after DNS, no redirects, long secrets)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from notify_helpers import alert

from pipelines.notify import NonceCache, Recipient, WebhookNotifier, sign, verify
from pipelines.notify.outbound import OutboundRefused, address_problem, check_url
from pipelines.notify.providers import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER

SECRET = b"k" * 32
LOOPBACK = {"allow_loopback_http": True}  # the explicit test flag: http to 127.0.0.1 only


async def serve(statuses: list[int], location: str = "") -> tuple[web.AppRunner, str, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append({"body": body, "headers": dict(request.headers), "path": request.path})
        status = statuses[min(len(seen), len(statuses)) - 1]
        return web.Response(status=status, headers={"Location": location} if location else None)

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_post("/elsewhere", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/hook", seen


def test_signed_post_and_retry_on_503() -> None:
    async def main() -> None:
        runner, url, seen = await serve([503, 200])
        notifier = WebhookNotifier("hook", url, SECRET, retries=2, backoff_s=0.01, **LOOPBACK)
        result = await notifier.send(alert("w1"), Recipient("M1", "Tea", "+86138"))
        await notifier.close()
        await runner.cleanup()
        assert result.ok and result.attempts == 2 and result.status == 200
        assert len(seen) == 2
        req = seen[-1]
        h = req["headers"]
        assert verify(SECRET, h[TIMESTAMP_HEADER], h[NONCE_HEADER], req["body"], h[SIGNATURE_HEADER])
        assert not verify(b"w" * 32, h[TIMESTAMP_HEADER], h[NONCE_HEADER], req["body"], h[SIGNATURE_HEADER])
        assert seen[0]["headers"][NONCE_HEADER] != h[NONCE_HEADER]  # a fresh nonce per attempt
        payload = json.loads(req["body"])
        assert payload["alert"]["alert_id"] == "w1" and payload["recipient"]["phone"] == "+86138"
        assert req["headers"]["Idempotency-Key"] == "w1:hook:M1"

    asyncio.run(main())


def test_client_error_is_permanent_and_not_retried() -> None:
    async def main() -> None:
        runner, url, seen = await serve([400])
        notifier = WebhookNotifier("hook", url, SECRET, retries=3, backoff_s=0.01, **LOOPBACK)
        result = await notifier.send(alert("w2"), Recipient("M1"))
        await notifier.close()
        await runner.cleanup()
        assert not result.ok and result.permanent and result.status == 400 and len(seen) == 1

    asyncio.run(main())


def test_unreachable_endpoint_gives_up_after_retries() -> None:
    async def main() -> None:
        runner, url, _ = await serve([200])
        await runner.cleanup()  # nothing listens on that port any more
        notifier = WebhookNotifier("hook", url, SECRET, retries=2, backoff_s=0.01, timeout_s=1, **LOOPBACK)
        result = await notifier.send(alert("w3"), Recipient("M1"))
        await notifier.close()
        assert not result.ok and result.attempts == 3 and not result.permanent and result.error

    asyncio.run(main())


NONCE = "n" * 32


def test_verify_rejects_stale_timestamps() -> None:
    body = b"{}"
    sig = sign(SECRET, "1000", NONCE, body)
    assert verify(SECRET, "1000", NONCE, body, sig, now=1100)
    assert not verify(SECRET, "1000", NONCE, body, sig, now=2000)
    assert not verify(SECRET, "not-a-number", NONCE, body, sig)


def test_signature_binds_timestamp_nonce_and_body_and_replays_are_refused() -> None:
    body = b'{"a":1}'
    sig = sign(SECRET, "1000", NONCE, body)
    assert not verify(SECRET, "1001", NONCE, body, sig, now=1000)  # another time
    assert not verify(SECRET, "1000", "m" * 32, body, sig, now=1000)  # another nonce
    assert not verify(SECRET, "1000", NONCE, b'{"a":2}', sig, now=1000)  # another body
    assert not verify(SECRET, "1000", "short", body, sign(SECRET, "1000", "short", body), now=1000)
    nonces = NonceCache(max_age_s=300)
    assert verify(SECRET, "1000", NONCE, body, sig, now=1000, nonces=nonces)
    assert not verify(SECRET, "1000", NONCE, body, sig, now=1001, nonces=nonces)  # the replay


@pytest.mark.parametrize("secret", [b"", b"s3cret", b"x" * 31])
def test_short_secrets_are_refused(secret: bytes) -> None:
    with pytest.raises(OutboundRefused, match="at least 32"):
        WebhookNotifier("hook", "https://hooks.example.com/x", secret)


@pytest.mark.parametrize(("url", "flag", "words"), [
    ("http://hooks.example.com/x", False, "plain http is refused"),
    ("http://127.0.0.1:8080/x", False, "plain http is refused"),
    ("http://hooks.example.com/x", True, "only to a loopback host"),
    ("http://10.0.0.5/x", True, "only to a loopback host"),
    ("ftp://hooks.example.com/x", False, "scheme 'ftp'"),
    ("https://169.254.169.254/latest/meta-data/", False, "link-local"),
    ("https://[fe80::1]/x", False, "link-local"),
    ("https://[fd00::1]/x", False, "private"),
    ("https://192.168.1.10/x", False, "private"),
    ("https://100.64.0.1/x", False, "not publicly routable"),
    ("https://[::1]/x", False, "loopback"),
    ("https://127.0.0.1/x", False, "loopback"),
    ("https://[::ffff:169.254.169.254]/x", False, "link-local"),
    ("https://0.0.0.0/x", False, "not a unicast address"),
    ("https://u:p@hooks.example.com/x", False, "credentials"),
])
def test_destinations_refused_before_any_request(url: str, flag: bool, words: str) -> None:
    with pytest.raises(OutboundRefused, match=words):
        check_url(url, allow_loopback_http=flag)
    with pytest.raises(OutboundRefused):
        WebhookNotifier("hook", url, SECRET, allow_loopback_http=flag)


def test_public_https_and_flagged_loopback_are_accepted() -> None:
    assert check_url("https://hooks.example.com/x").port == 443
    assert check_url("https://8.8.8.8:8443/x").port == 8443
    assert check_url("http://127.0.0.1:9/x", allow_loopback_http=True).host == "127.0.0.1"
    assert check_url("http://[::1]:9/x", allow_loopback_http=True).host == "::1"
    import ipaddress

    assert address_problem(ipaddress.ip_address("64:ff9b::808:808")) is None  # NAT64 of 8.8.8.8
    assert address_problem(ipaddress.ip_address("64:ff9b::a9fe:a9fe"))  # NAT64 of 169.254.169.254
    assert address_problem(ipaddress.ip_address("2002:a9fe:a9fe::1"))  # 6to4 of 169.254.169.254


def _resolving_to(*ips: str) -> Any:
    async def lookup(host: str, port: int) -> list[tuple[int, str]]:
        import socket

        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip) for ip in ips]
    return lookup


@pytest.mark.parametrize("ips", [
    ("169.254.169.254",),
    ("93.184.216.34", "10.0.0.1"),  # one bad address refuses the host
    ("fd00::1",),
    ("::1",),
    ("127.0.0.1",),
])
def test_names_resolving_to_inner_addresses_are_refused_after_dns(ips: tuple[str, ...]) -> None:
    async def main() -> None:
        notifier = WebhookNotifier("hook", "https://hooks.example.com/x", SECRET, retries=2, backoff_s=0.01,
                                   lookup=_resolving_to(*ips))
        result = await notifier.send(alert("d1"), Recipient("M1"))
        await notifier.close()
        assert not result.ok and result.permanent and result.attempts == 1
        assert "refusing to send there" in (result.error or "")
        assert "/x" not in (result.error or "")  # messages name scheme, host and port only

    asyncio.run(main())


def test_loopback_name_resolving_elsewhere_is_refused_even_with_the_test_flag() -> None:
    async def main() -> None:
        runner, url, seen = await serve([200])
        port = url.split(":")[2].split("/")[0]
        notifier = WebhookNotifier("hook", f"http://localhost:{port}/hook", SECRET, retries=0,
                                   lookup=_resolving_to("127.0.0.1", "169.254.169.254"), **LOOPBACK)
        result = await notifier.send(alert("d2"), Recipient("M1"))
        ok = WebhookNotifier("hook", f"http://localhost:{port}/hook", SECRET, retries=0,
                             lookup=_resolving_to("127.0.0.1"), **LOOPBACK)
        good = await ok.send(alert("d3"), Recipient("M1"))
        await notifier.close()
        await ok.close()
        await runner.cleanup()
        assert not result.ok and result.permanent and "link-local" in (result.error or "")
        assert good.ok and len(seen) == 1

    asyncio.run(main())


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_not_followed(status: int) -> None:
    async def main() -> None:
        runner, url, seen = await serve([status], location="/elsewhere")
        notifier = WebhookNotifier("hook", url, SECRET, retries=2, backoff_s=0.01, **LOOPBACK)
        result = await notifier.send(alert("r1"), Recipient("M1"))
        await notifier.close()
        await runner.cleanup()
        assert not result.ok and result.permanent and result.status == status
        assert "redirects are not followed" in (result.error or "")
        assert [r["path"] for r in seen] == ["/hook"]  # /elsewhere never requested

    asyncio.run(main())
