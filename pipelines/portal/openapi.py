"""The OpenAPI 3.1 document of the portal's API (served at /api/v1/openapi.json)."""

from __future__ import annotations

from typing import Any

_ERR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_ACCOUNT = [{"name": "account", "in": "path", "required": True, "schema": {"type": "string"}}]


def _get(summary: str, params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"get": {"summary": summary, "security": [{"bearer": []}], "parameters": _ACCOUNT + (params or []),
                    "responses": {"200": {"description": "ok"}, "401": _ERR, "403": _ERR, "404": _ERR, "429": _ERR}}}


def openapi() -> dict[str, Any]:
    base = "/api/v1/accounts/{account}"
    return {
        "openapi": "3.1.0",
        "info": {"title": "mallwatt merchant portal", "version": "1",
                 "description": "Live balance, usage and top-ups of prepaid mall electricity. Money in integer "
                                "minor units (fen); energy in Wh and as kWh decimal strings."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "merchant or mall-operator token (mallwatt portal token)"}},
            "schemas": {"Error": {"type": "object", "required": ["error", "message"], "properties": {
                "error": {"type": "string"}, "field": {"type": ["string", "null"]}, "message": {"type": "string"}}},
                "PreferencesInput": {"type": "object", "additionalProperties": False,
                                     "description": "at most 2 KiB; sms and voice need a phone",
                                     "properties": {
                    "channels": {"type": "array", "maxItems": 3,
                                 "items": {"enum": ["sms", "voice", "app_push"]}},
                    "phone": {"type": ["string", "null"], "pattern": "^\\+[1-9][0-9]{6,14}$"},
                    "quiet_hours": {"type": ["object", "null"], "required": ["start", "end"],
                                    "description": "local time of the mall; may span midnight",
                                    "properties": {"start": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
                                                   "end": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}}},
                    "low_balance_minor": {"type": ["integer", "null"],
                                          "description": "within limits.low_balance_minor of GET (policy)"},
                    "language": {"enum": ["zh-CN", "en"]}}}},
        },
        "paths": {
            "/api/v1/health": {"get": {"summary": "service and feed state", "responses": {"200": {"description": "ok"}}}},
            "/api/v1/accounts": {"get": {"summary": "accounts this token may see", "security": [{"bearer": []}],
                                         "responses": {"200": {"description": "ok"}, "401": _ERR}}},
            f"{base}/balance": _get("balance, its as-of time, relay state and estimated days left"),
            f"{base}/activity": _get("recent ledger entries (top-ups, charges, postings), newest first",
                                     [{"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 100}}]),
            f"{base}/alerts": _get("recent alerts, newest first"),
            f"{base}/usage": _get("usage by hour and TOU period (today) or by day (month)",
                                  [{"name": "period", "in": "query", "schema": {"enum": ["today", "month"]}}]),
            f"{base}/overview": _get("everything the mobile page shows, in one call"),
            f"{base}/statements": _get("closed months with a statement, newest first (at most 24), and the ledger "
                                       "watermark (complete_until_ms) that closes them"),
            f"{base}/statements/{{period}}": {"get": {
                **_get("the statement of one closed period, as `mallwatt bills statement` makes it: opening, "
                       "lines (each with its ledger entry ids), closing")["get"],
                "parameters": _ACCOUNT + [
                    {"name": "period", "in": "path", "required": True,
                     "schema": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}(-[0-9]{2})?$"},
                     "description": "YYYY-MM (month) or YYYY-MM-DD (day), in the mall's time zone"},
                    {"name": "format", "in": "query", "schema": {"enum": ["json", "html"], "default": "json"}}],
                "responses": {"200": {"description": "the statement document"}, "401": _ERR, "403": _ERR,
                              "404": _ERR, "409": {**_ERR, "description": "period_open: not closed yet"},
                              "422": _ERR, "429": _ERR, "501": _ERR, "503": _ERR}}},
            f"{base}/preferences": {
                "get": {**_get("alert preferences (defaults when none saved) and the limits they must respect")["get"]},
                "put": {"summary": "save alert preferences; answered after Kafka acknowledged the record "
                                   "(mallwatt.alert-preferences, compacted); fields left out keep their value",
                        "security": [{"bearer": []}], "parameters": _ACCOUNT,
                        "requestBody": {"content": {"application/json": {"schema": {
                            "$ref": "#/components/schemas/PreferencesInput"}}}},
                        "responses": {"200": {"description": "saved"}, "400": _ERR, "401": _ERR, "403": _ERR,
                                      "413": _ERR, "422": _ERR, "429": _ERR, "503": _ERR}}},
            f"{base}/checkout": {"post": {
                "summary": "start a top-up with the (simulated) provider", "security": [{"bearer": []}],
                "parameters": _ACCOUNT,
                "requestBody": {"content": {"application/json": {"schema": {
                    "type": "object", "required": ["amount_minor"],
                    "properties": {"amount_minor": {"type": "integer", "minimum": 1}}}}}},
                "responses": {"200": {"description": "checkout session"}, "403": _ERR, "422": _ERR}}},
            "/api/v1/webhooks/{provider}": {"post": {
                "summary": "a payment provider's signed notification of a paid top-up",
                "description": "Headers X-Signature-Timestamp (epoch s, within 5 min), X-Signature-Nonce (8-64 "
                               "chars, single use), X-Signature: hex HMAC-SHA256 of timestamp\\nnonce\\nbody. "
                               "Answered 200 only after Kafka acknowledged the payment.",
                "parameters": [{"name": "provider", "in": "path", "required": True, "schema": {"type": "string"}}],
                "requestBody": {"content": {"application/json": {"schema": {
                    "type": "object", "required": ["transaction_id", "account_id", "amount_minor"],
                    "properties": {"transaction_id": {"type": "string"}, "account_id": {"type": "string"},
                                   "amount_minor": {"type": "integer", "minimum": 1},
                                   "currency": {"type": "string", "default": "CNY"},
                                   "paid_at_ms": {"type": "integer"}}}}}},
                "responses": {"200": {"description": "recorded"}, "401": _ERR, "404": _ERR, "409": _ERR,
                              "413": _ERR, "422": _ERR, "429": _ERR, "503": _ERR}}},
        },
    }
