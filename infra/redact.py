"""One redaction helper for everything mallwatt prints or logs.

Settings hold credentials in URLs and DSNs (MALLWATT_CLICKHOUSE=https://user:pass@host),
in query parameters (?password=...) and in named fields (secret, password, token). Any
text about to be printed or logged goes through `redact`; structured settings through
`redact_mapping`. `install_log_redaction()` makes every log record of the process pass
through `redact` (the `mallwatt` entry point calls it).

Redaction keeps what helps an operator (scheme, user, host, port, path, the name of the
environment variable holding a secret) and replaces only the secret with `***`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"

# scheme://user:password@host -> scheme://user:***@host. The password runs to the last
# '@' before the host (a password may itself contain '@').
_URL_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):(?P<pw>[^\s/]*)@")
# Not "credentials": `stack up --secure` prints the *path* of each principal's credentials
# file on purpose; a credentials mapping is walked and its password masked by name.
_SECRET_WORDS = r"password|passwd|pwd|secret|secret_key|token|access_token|api_key|apikey|private_key|sasl_password|sasl\.password|sasl\.jaas\.config"
# ?password=...&token=... in URLs
_QUERY_SECRET = re.compile(rf"(?P<head>[?&;](?:{_SECRET_WORDS}|key|sig|signature)=)[^&\s#]*", re.IGNORECASE)
# password=..., "secret": "...", token: ... in free text and dumps. Not secret_env /
# password_file (their values name where the secret is, which helps and is not secret).
_KEY_VALUE = re.compile(
    rf"(?P<head>(?<![A-Za-z0-9_.])[\"']?(?:{_SECRET_WORDS})[\"']?(?![A-Za-z0-9_])\s*[=:]\s*)"
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s,;}&)]+)",
    re.IGNORECASE)
_SECRET_KEY_NAME = re.compile(rf"(?:^|[_.-])(?:{_SECRET_WORDS})$", re.IGNORECASE)


def redact(text: object) -> str:
    """`text` with every credential replaced by *** (URLs, DSNs, query params, key=value)."""
    out = str(text)
    out = _URL_USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", out)
    out = _QUERY_SECRET.sub(lambda m: f"{m.group('head')}{MASK}", out)

    def _value(m: re.Match[str]) -> str:
        value = m.group("value")
        quote = value[0] if value[:1] in "\"'" else ""
        return f"{m.group('head')}{quote}{MASK}{quote}"

    return _KEY_VALUE.sub(_value, out)


def redact_url(url: str | None) -> str | None:
    return None if url is None else redact(url)


def is_secret_key(name: str) -> bool:
    """secret, password, MALLWATT_HMAC_SECRET, sasl.password...; not secret_env/password_file."""
    return bool(_SECRET_KEY_NAME.search(name))


def redact_mapping(value: Any) -> Any:
    """A copy of nested settings with secret-named values masked and strings redacted."""
    if isinstance(value, dict):
        return {k: (MASK if is_secret_key(str(k)) and v not in (None, "") else redact_mapping(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_mapping(v) for v in value)
    if isinstance(value, str):
        return redact(value)
    return value


class _RedactingFactory:
    """Wraps the log record factory: the message is formatted and redacted at creation,
    so every handler (also ones configured later) sees only the redacted text."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string is logging's problem, not ours
            return record
        record.msg, record.args = redact(message), None
        return record


def install_log_redaction() -> None:
    """Idempotent: route every log record of this process through `redact`."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(factory))
