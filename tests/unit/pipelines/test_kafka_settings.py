"""One typed source of Kafka connection settings: errors name the setting, never the secret."""

import json
from pathlib import Path

import pytest

from infra.kafka_security import KafkaSettings, KafkaSettingsError, acls, secured

SECRET = "s3cret-Value-123"


def test_plaintext_by_default_and_extra_settings_kept() -> None:
    s = KafkaSettings.from_env("h:1", env={})
    assert not s.secure
    assert s.client_config(**{"group.id": "g"}) == {"bootstrap.servers": "h:1", "group.id": "g"}
    assert s.faust_credentials() is None


def test_sasl_ssl_from_a_credentials_file_and_the_password_is_never_printed(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    creds = tmp_path / "worker.json"
    creds.write_text(json.dumps({"security_protocol": "SASL_SSL", "username": "worker", "password": SECRET,
                                 "ca_file": str(ca)}))
    s = KafkaSettings.from_env("h:1", env={"MALLWATT_KAFKA_CREDENTIALS": str(creds)})
    conf = s.client_config()
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "worker" and conf["sasl.password"] == SECRET
    assert conf["ssl.ca.location"] == str(ca)
    assert SECRET not in repr(s) and SECRET not in json.dumps(s.describe())


def test_env_overrides_the_file_and_password_file_is_read(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(SECRET + "\n")
    s = KafkaSettings.from_env("h:1", env={"MALLWATT_KAFKA_SECURITY": "sasl_ssl", "MALLWATT_KAFKA_USER": "u",
                                           "MALLWATT_KAFKA_PASSWORD_FILE": str(pw)})
    assert s.secure and s.password == SECRET


@pytest.mark.parametrize(("env", "named"), [
    ({"MALLWATT_KAFKA_SECURITY": "SSL-ish"}, "MALLWATT_KAFKA_SECURITY"),
    ({"MALLWATT_KAFKA_SECURITY": "SASL_SSL", "MALLWATT_KAFKA_PASSWORD": SECRET}, "MALLWATT_KAFKA_USER"),
    ({"MALLWATT_KAFKA_SECURITY": "SASL_SSL", "MALLWATT_KAFKA_USER": "u"}, "MALLWATT_KAFKA_PASSWORD"),
    ({"MALLWATT_KAFKA_SECURITY": "SASL_SSL", "MALLWATT_KAFKA_USER": "u", "MALLWATT_KAFKA_PASSWORD": SECRET,
      "MALLWATT_KAFKA_CA": "/nonexistent/ca.pem"}, "MALLWATT_KAFKA_CA"),
    ({"MALLWATT_KAFKA_CREDENTIALS": "/nonexistent/creds.json"}, "MALLWATT_KAFKA_CREDENTIALS"),
])
def test_errors_name_the_setting_and_never_the_secret(env: dict[str, str], named: str) -> None:
    with pytest.raises(KafkaSettingsError) as info:
        KafkaSettings.from_env("h:1", env=env)
    assert named in str(info.value) and SECRET not in str(info.value)


def test_secured_keeps_the_literal_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLWATT_KAFKA_CREDENTIALS", raising=False)
    monkeypatch.delenv("MALLWATT_KAFKA_SECURITY", raising=False)
    assert secured({"bootstrap.servers": "x:9", "acks": "all"}) == {"bootstrap.servers": "x:9", "acks": "all"}


def test_acl_table_is_least_privilege() -> None:
    table = acls()
    assert table["analyst"] == []
    assert {(r, n, o) for r, n, _, o in table["gateway"]} == {("TOPIC", "mallwatt.payments", "WRITE"),
                                                            ("TOPIC", "mallwatt.payments", "DESCRIBE")}
    collector_writes = {n for r, n, _, o in table["collector"] if o == "WRITE"}
    assert "mallwatt.payments" not in collector_writes and "mallwatt.relay-commands" not in collector_writes
