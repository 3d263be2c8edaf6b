"""Webhook signature verification: good, bad signature, stale timestamp, replayed nonce, fields."""

from __future__ import annotations

import json

import pytest

from pipelines.portal.providers import (
    NONCE_HEADER,
    SIG_HEADER,
    TS_HEADER,
    HmacProvider,
    SimulatedProvider,
    WebhookError,
)

NOW = 1_784_080_800_000
SECRET = b"0123456789abcdef-secret"


def body(**over: object) -> bytes:
    return json.dumps({"transaction_id": "tx-1", "account_id": "M01-S0001", "amount_minor": 5000,
                       "paid_at_ms": NOW, **over}).encode()


def test_good_signature_gives_the_payment() -> None:
    provider = HmacProvider("acme", SECRET)
    raw = body()
    note = provider.verify(provider.sign(raw, NOW, nonce="nonce-0001"), raw, NOW + 1000)
    assert (note.payment_id, note.account_id, note.amount_minor, note.ts_ms) == ("acme:tx-1", "M01-S0001", 5000, NOW)
    assert note.payment()["kind"] == "TOPUP" and note.payment()["provider"] == "acme"


def test_bad_signature_tampered_body_and_other_secret() -> None:
    provider = HmacProvider("acme", SECRET)
    headers = provider.sign(body(), NOW)
    with pytest.raises(WebhookError) as exc:
        provider.verify(headers, body(amount_minor=500000), NOW)
    assert (exc.value.status, exc.value.code, exc.value.field) == (401, "bad_signature", SIG_HEADER)
    forged = HmacProvider("acme", b"another-secret-0123456").sign(body(), NOW)
    with pytest.raises(WebhookError, match="signature"):
        provider.verify(forged, body(), NOW)
    with pytest.raises(WebhookError) as missing:
        provider.verify({k: v for k, v in headers.items() if k != SIG_HEADER}, body(), NOW)
    assert missing.value.code == "missing_signature"


@pytest.mark.parametrize("skew_ms", [-301_000, 301_000])
def test_stale_or_future_timestamp_is_refused(skew_ms: int) -> None:
    provider = HmacProvider("acme", SECRET)
    headers = provider.sign(body(paid_at_ms=NOW + skew_ms), NOW + skew_ms)
    with pytest.raises(WebhookError) as exc:
        provider.verify(headers, body(paid_at_ms=NOW + skew_ms), NOW)
    assert (exc.value.code, exc.value.field) == ("stale_timestamp", TS_HEADER)
    # inside the window it passes
    ok = provider.sign(body(), NOW - 299_000)
    assert provider.verify(ok, body(), NOW).amount_minor == 5000


def test_replayed_nonce_is_refused_until_released() -> None:
    provider = HmacProvider("acme", SECRET)
    raw = body()
    headers = provider.sign(raw, NOW, nonce="nonce-0001")
    note = provider.verify(headers, raw, NOW)
    with pytest.raises(WebhookError) as exc:
        provider.verify(headers, raw, NOW + 1000)
    assert (exc.value.status, exc.value.code, exc.value.field) == (409, "replayed_nonce", NONCE_HEADER)
    # a produce that failed releases the nonce: the provider's retry goes through
    provider.release(note.nonce)
    assert provider.verify(headers, raw, NOW + 2000).payment_id == "acme:tx-1"


def test_nonce_expires_after_the_window() -> None:
    provider = HmacProvider("acme", SECRET, window_ms=1000)
    provider.nonces.reserve("nonce-0001", NOW)
    provider.nonces.reserve("nonce-0001", NOW + 2001)  # expired: the timestamp check refuses it anyway


@pytest.mark.parametrize(("over", "field"), [
    ({"amount_minor": 0}, "amount_minor"), ({"amount_minor": "50"}, "amount_minor"),
    ({"amount_minor": True}, "amount_minor"), ({"amount_minor": 12.5}, "amount_minor"),
    ({"transaction_id": ""}, "transaction_id"), ({"transaction_id": "a b"}, "transaction_id"),
    ({"account_id": None}, "account_id"), ({"currency": "USD"}, "currency"),
    ({"paid_at_ms": NOW - 3_600_000}, "paid_at_ms"),
])
def test_bad_fields_are_named_and_release_the_nonce(over: dict, field: str) -> None:
    provider = HmacProvider("acme", SECRET)
    raw = body(**over)
    headers = provider.sign(raw, NOW, nonce="nonce-0002")
    with pytest.raises(WebhookError) as exc:
        provider.verify(headers, raw, NOW)
    assert (exc.value.status, exc.value.field) == (422, field)
    fixed = body()
    assert provider.verify(provider.sign(fixed, NOW, nonce="nonce-0002"), fixed, NOW).amount_minor == 5000


def test_simulated_provider_signs_like_a_provider() -> None:
    sim = SimulatedProvider()
    raw, headers = sim.notification("M01-S0002", 10000, NOW, transaction_id="t-9")
    assert headers[TS_HEADER] == str(NOW // 1000)
    assert sim.verify(headers, raw, NOW).payment_id == "sim:t-9"
    with pytest.raises(WebhookError, match="signature"):
        HmacProvider("sim", b"not-the-sim-secret-123").verify(headers, raw, NOW)
