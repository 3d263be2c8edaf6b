"""The one redaction helper: credentials never printed, everything else kept."""

from __future__ import annotations

import logging

import pytest

from infra.redact import MASK, install_log_redaction, is_secret_key, redact, redact_mapping

PW = "Hunter2-very-secret"


@pytest.mark.parametrize(("text", "kept"), [
    (f"https://analyst:{PW}@ch.example.com:8443/mallwatt", "https://analyst:***@ch.example.com:8443/mallwatt"),
    (f"http://default:{PW}@127.0.0.1:8123", "http://default:***@127.0.0.1:8123"),
    (f"clickhouse://u:p@ss{PW}@host/db", "clickhouse://u:***@host/db"),  # '@' inside the password
    (f"warehouse: https://u:{PW}@h:1/db (idle)", "warehouse: https://u:***@h:1/db (idle)"),
    (f"https://h/x?user=a&password={PW}&db=m", "https://h/x?user=a&password=***&db=m"),
    (f"https://h/x?token={PW}", "https://h/x?token=***"),
    (f"password={PW} other=1", "password=*** other=1"),
    (f'{{"secret": "{PW}", "url": "https://h"}}', '{"secret": "***", "url": "https://h"}'),
    (f"sasl.password: {PW}", "sasl.password: ***"),
    ("secret_env: MALLWATT_SMS_SECRET", "secret_env: MALLWATT_SMS_SECRET"),  # where, not what
    ("https://ch.example.com:8443/db", "https://ch.example.com:8443/db"),
    ("kafka: 127.0.0.1:19092", "kafka: 127.0.0.1:19092"),
])
def test_redact(text: str, kept: str) -> None:
    assert redact(text) == kept
    assert PW not in redact(text)


def test_redact_mapping_masks_secret_keys_and_urls_inside_values() -> None:
    data = {"hook": {"type": "webhook", "secret": PW, "secret_env": None, "url": "https://h/x"},
            "MALLWATT_HMAC_SECRET": PW, "warehouse": f"https://u:{PW}@h/db", "list": [f"token={PW}"],
            "password_file": "/etc/mallwatt/pw"}
    out = redact_mapping(data)
    assert PW not in repr(out)
    assert out["hook"]["secret"] == MASK and out["hook"]["url"] == "https://h/x"
    assert out["password_file"] == "/etc/mallwatt/pw" and out["hook"]["secret_env"] is None
    assert is_secret_key("sasl.password") and is_secret_key("MALLWATT_HMAC_SECRET")
    assert not is_secret_key("secret_env") and not is_secret_key("tokenizer")
    # stack up --secure prints where each principal's credentials file is, not what it holds
    printed = redact_mapping({"credentials": "var/kafka-secure/secure/PRINCIPAL.json",
                              "client": {"username": "worker", "password": PW}})
    assert printed == {"credentials": "var/kafka-secure/secure/PRINCIPAL.json",
                       "client": {"username": "worker", "password": MASK}}


def test_log_records_are_redacted_for_every_handler(caplog: pytest.LogCaptureFixture) -> None:
    before = logging.getLogRecordFactory()
    try:
        install_log_redaction()
        install_log_redaction()  # idempotent
        with caplog.at_level(logging.INFO, logger="mallwatt.test"):
            logging.getLogger("mallwatt.test").info("connecting to %s", f"https://u:{PW}@h:8443/db")
    finally:
        logging.setLogRecordFactory(before)  # other tests inspect record.args
    assert caplog.messages == ["connecting to https://u:***@h:8443/db"]
    assert PW not in caplog.text
