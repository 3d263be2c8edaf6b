"""A local fake of Tencent Cloud SMS SendSms (aiohttp on 127.0.0.1) for the adapter's tests.

It verifies each request's TC3-HMAC-SHA256 signature from the raw request as received,
written here from the documentation independently of pipelines.notify.tc3 (so a bug in the
client's signer is not mirrored here), answers as the API does (HTTP 200, ``Response.Error``
on failure) and can be scripted to throttle, fail or time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web


def _error(code: str, message: str) -> web.Response:
    return web.json_response({"Response": {"Error": {"Code": code, "Message": message}, "RequestId": "fake"}})


@dataclass
class FakeTencentSms:
    secrets: dict[str, str]  # SecretId -> SecretKey
    script: list[str] = field(default_factory=list)  # per request: ok | throttle | http503 | internal | hang
    clock: Any = time.time
    accepted: list[dict[str, Any]] = field(default_factory=list)  # the messages "sent"
    refused: list[str] = field(default_factory=list)  # error codes answered
    requests: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> FakeTencentSms:
        app = web.Application()
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        self._release.set()  # a hanging answer ends with the fake
        if self._runner is not None:
            await self._runner.cleanup()

    def verify(self, headers: Any, body: bytes) -> str | None:
        """None if the request is signed as documented, else the API's error code."""
        auth = headers.get("Authorization", "")
        algorithm, _, rest = auth.partition(" ")
        if algorithm != "TC3-HMAC-SHA256":
            return "AuthFailure.InvalidAuthorization"
        try:
            parts = dict(p.strip().split("=", 1) for p in rest.split(","))
            secret_id, date, service, terminal = parts["Credential"].split("/")
            signed = parts["SignedHeaders"].split(";")
            given = parts["Signature"]
            timestamp = int(headers["X-TC-Timestamp"])
        except (ValueError, KeyError):
            return "AuthFailure.InvalidAuthorization"
        if terminal != "tc3_request" or service != "sms" or not {"content-type", "host"} <= set(signed):
            return "AuthFailure.InvalidAuthorization"
        if signed != sorted(signed):
            return "AuthFailure.SignatureFailure"
        if abs(self.clock() - timestamp) > 300:
            return "AuthFailure.SignatureExpire"
        if date != datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d"):
            return "AuthFailure.SignatureFailure"
        if secret_id not in self.secrets:
            return "AuthFailure.SecretIdNotFound"
        received = {k.lower(): v for k, v in headers.items()}
        if any(h not in received for h in signed):
            return "AuthFailure.SignatureFailure"
        canonical_headers = "".join(f"{h}:{received[h].strip().lower()}\n" for h in signed)
        canonical = (f"POST\n/\n\n{canonical_headers}\n{';'.join(signed)}\n"
                     f"{hashlib.sha256(body).hexdigest()}")
        to_sign = (f"TC3-HMAC-SHA256\n{timestamp}\n{date}/{service}/tc3_request\n"
                   f"{hashlib.sha256(canonical.encode()).hexdigest()}")
        key = ("TC3" + self.secrets[secret_id]).encode()
        for part in (date, service, "tc3_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        return None if hmac.compare_digest(expected, given) else "AuthFailure.SignatureFailure"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests += 1
        step = self.script[self.requests - 1] if self.requests <= len(self.script) else "ok"
        problem = self.verify(request.headers, body)
        if problem is None and request.headers.get("X-TC-Action") != "SendSms":
            problem = "InvalidAction"
        if problem is None and request.headers.get("X-TC-Version") != "2021-01-11":
            problem = "NoSuchVersion"
        if problem is not None:
            self.refused.append(problem)
            return _error(problem, "The provided credentials could not be validated.")
        if step == "throttle":
            self.refused.append("RequestLimitExceeded")
            return _error("RequestLimitExceeded", "Your current request times equals to `100` in a second")
        if step == "http503":
            self.refused.append("HTTP 503")
            return web.Response(status=503, text="busy")
        if step == "internal":
            self.refused.append("InternalError")
            return _error("InternalError", "internal error")
        payload = json.loads(body)
        for name in ("PhoneNumberSet", "SmsSdkAppId", "TemplateId"):
            if not payload.get(name):
                self.refused.append("MissingParameter")
                return _error("MissingParameter", f"missing {name}")
        if step == "hang":  # the message goes out, the answer never arrives in time
            self.accepted.append(payload)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), 10)
            return web.Response(status=504)
        self.accepted.append(payload)
        serial = f"2640:{len(self.accepted):06d}"
        return web.json_response({"Response": {"SendStatusSet": [{
            "SerialNo": serial, "PhoneNumber": payload["PhoneNumberSet"][0], "Fee": 1,
            "SessionContext": payload.get("SessionContext", ""), "Code": "Ok", "Message": "send success",
            "IsoCode": "CN"}], "RequestId": f"fake-{self.requests}"}})
