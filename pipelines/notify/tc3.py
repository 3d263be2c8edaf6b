"""TencentCloud API 3.0 request signing, "Signature v3" (TC3-HMAC-SHA256), as documented.

Pure functions, no I/O. The steps and names follow the documentation's four steps:

1. CanonicalRequest = method \\n "/" \\n query \\n CanonicalHeaders \\n SignedHeaders \\n
   lowercase hex SHA-256 of the body. CanonicalHeaders: each signed header as
   "key:value\\n", key and value lowercased and trimmed, sorted by key; content-type and
   host are required.
2. StringToSign = "TC3-HMAC-SHA256" \\n timestamp \\n CredentialScope \\n
   hex SHA-256 of the CanonicalRequest, where CredentialScope = "<UTC date>/<service>/tc3_request"
   and the date is the UTC date of the X-TC-Timestamp (not the local date).
3. SecretDate = HMAC_SHA256("TC3" + SecretKey, date); SecretService = HMAC(SecretDate, service);
   SecretSigning = HMAC(SecretService, "tc3_request"); Signature = hex HMAC(SecretSigning, StringToSign).
4. Authorization = "TC3-HMAC-SHA256 Credential=<SecretId>/<scope>, SignedHeaders=<list>,
   Signature=<hex>".

tests/unit/notify/test_tc3.py checks these functions against the documentation's worked
example (CVM DescribeInstances, timestamp 1551113065).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

ALGORITHM = "TC3-HMAC-SHA256"
JSON_CONTENT_TYPE = "application/json; charset=utf-8"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def canonical_headers(headers: Mapping[str, str], signed: Sequence[str]) -> str:
    """The signed headers as "key:value\\n" lines, lowercased and trimmed, sorted by key."""
    lowered = {k.strip().lower(): v for k, v in headers.items()}
    return "".join(f"{k}:{lowered[k].strip().lower()}\n" for k in sorted(signed))


def canonical_request(method: str, headers: Mapping[str, str], signed: Sequence[str], payload: bytes,
                      *, uri: str = "/", query: str = "") -> str:
    return "\n".join([method.upper(), uri, query, canonical_headers(headers, signed),
                      ";".join(sorted(signed)), sha256_hex(payload)])


def utc_date(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


def credential_scope(timestamp: int, service: str) -> str:
    return f"{utc_date(timestamp)}/{service}/tc3_request"


def string_to_sign(timestamp: int, scope: str, canonical: str) -> str:
    return "\n".join([ALGORITHM, str(timestamp), scope, sha256_hex(canonical.encode("utf-8"))])


def signature(secret_key: str, date: str, service: str, to_sign: str) -> str:
    secret_date = _hmac(("TC3" + secret_key).encode("utf-8"), date)
    secret_service = _hmac(secret_date, service)
    secret_signing = _hmac(secret_service, "tc3_request")
    return hmac.new(secret_signing, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def authorization(secret_id: str, scope: str, signed: Sequence[str], sig: str) -> str:
    return f"{ALGORITHM} Credential={secret_id}/{scope}, SignedHeaders={';'.join(sorted(signed))}, Signature={sig}"


def sign_headers(secret_id: str, secret_key: str, *, host: str, service: str, action: str, version: str,
                 timestamp: int, payload: bytes, region: str | None = None,
                 content_type: str = JSON_CONTENT_TYPE,
                 signed: Sequence[str] = ("content-type", "host", "x-tc-action")) -> dict[str, str]:
    """The headers of a signed POST: Authorization plus the common parameters (X-TC-*).

    X-TC-Action is signed too by default (as the official SDKs do), so a request cannot be
    replayed against another action; the documentation's minimum is content-type and host."""
    headers = {"Content-Type": content_type, "Host": host, "X-TC-Action": action,
               "X-TC-Timestamp": str(timestamp), "X-TC-Version": version}
    if region:
        headers["X-TC-Region"] = region
    scope = credential_scope(timestamp, service)
    canonical = canonical_request("POST", headers, signed, payload)
    sig = signature(secret_key, utc_date(timestamp), service, string_to_sign(timestamp, scope, canonical))
    headers["Authorization"] = authorization(secret_id, scope, signed, sig)
    return headers
