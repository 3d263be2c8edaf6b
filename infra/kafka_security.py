"""One typed source of Kafka connection settings for every client, and the secured local broker.

Every mallwatt Kafka client (confluent-kafka producers, consumers and admin clients; faust's
aiokafka) takes its settings from `KafkaSettings.from_env()`:

    MALLWATT_KAFKA              bootstrap servers of an external cluster (else the local broker)
    MALLWATT_KAFKA_SECURITY     PLAINTEXT (default) or SASL_SSL
    MALLWATT_KAFKA_USER         SCRAM-SHA-512 user name
    MALLWATT_KAFKA_PASSWORD     its password, or MALLWATT_KAFKA_PASSWORD_FILE (a file holding it)
    MALLWATT_KAFKA_CA           the CA certificate (PEM) the broker's certificate is checked against
    MALLWATT_KAFKA_CREDENTIALS  a JSON file with any of: security_protocol, username, password,
                                ca_file (what `mallwatt stack up --secure` writes per principal)

The password is never part of `repr()`, `describe()` or any log line: it only goes into the
client configuration dictionaries. `mallwatt stack up --secure` starts the local broker with
TLS (a CA generated under the data dir), SCRAM users per component and ACLs (`ACLS`); the
table is in docs/security.md.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra import topics as T

PLAINTEXT, SASL_SSL = "PLAINTEXT", "SASL_SSL"
MECHANISM = "SCRAM-SHA-512"


class KafkaSettingsError(ValueError):
    """A Kafka security setting is missing or malformed (the message names it, never its value)."""


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str
    security_protocol: str = PLAINTEXT
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never printed
    ca_file: str | None = None

    @classmethod
    def from_env(cls, bootstrap: str | None = None, env: dict[str, str] | None = None) -> KafkaSettings:
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        cred_file = env.get("MALLWATT_KAFKA_CREDENTIALS")
        if cred_file:
            try:
                values.update(json.loads(Path(cred_file).read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                raise KafkaSettingsError(f"MALLWATT_KAFKA_CREDENTIALS: cannot read {cred_file}: "
                                         f"{type(exc).__name__}") from None
        for key, name in (("security_protocol", "MALLWATT_KAFKA_SECURITY"), ("username", "MALLWATT_KAFKA_USER"),
                          ("password", "MALLWATT_KAFKA_PASSWORD"), ("ca_file", "MALLWATT_KAFKA_CA")):
            if env.get(name):
                values[key] = env[name]
        pw_file = env.get("MALLWATT_KAFKA_PASSWORD_FILE")
        if pw_file:
            try:
                values["password"] = Path(pw_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise KafkaSettingsError(f"MALLWATT_KAFKA_PASSWORD_FILE: cannot read {pw_file}: "
                                         f"{type(exc).__name__}") from None
        if bootstrap is None:
            from infra.broker import bootstrap_servers

            bootstrap = values.pop("bootstrap", None) or bootstrap_servers()
        values.pop("bootstrap", None)
        unknown = set(values) - {"security_protocol", "username", "password", "ca_file"}
        if unknown:
            raise KafkaSettingsError(f"MALLWATT_KAFKA_CREDENTIALS: unknown keys {sorted(unknown)}")
        settings = cls(bootstrap=bootstrap, **values)
        settings.check()
        return settings

    def check(self) -> None:
        protocol = self.security_protocol.upper()
        if protocol not in (PLAINTEXT, SASL_SSL):
            raise KafkaSettingsError(f"MALLWATT_KAFKA_SECURITY: {self.security_protocol!r} is not "
                                     f"{PLAINTEXT} or {SASL_SSL}")
        if protocol == SASL_SSL:
            if not self.username:
                raise KafkaSettingsError("MALLWATT_KAFKA_USER: required with SASL_SSL")
            if not self.password:
                raise KafkaSettingsError("MALLWATT_KAFKA_PASSWORD (or _PASSWORD_FILE): required with SASL_SSL")
            if self.ca_file and not Path(self.ca_file).is_file():
                raise KafkaSettingsError(f"MALLWATT_KAFKA_CA: no file {self.ca_file}")

    @property
    def secure(self) -> bool:
        return self.security_protocol.upper() == SASL_SSL

    def describe(self) -> dict[str, Any]:
        """What may be printed: everything but the password."""
        return {"bootstrap": self.bootstrap, "security_protocol": self.security_protocol.upper(),
                "username": self.username, "password": "***" if self.password else None, "ca_file": self.ca_file}

    def client_config(self, **extra: Any) -> dict[str, Any]:
        """A librdkafka (confluent-kafka) configuration: the connection part plus `extra`."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap}
        if self.secure:
            conf.update({"security.protocol": SASL_SSL, "sasl.mechanism": MECHANISM,
                         "sasl.username": self.username, "sasl.password": self.password,
                         "ssl.endpoint.identification.algorithm": "https"})
            if self.ca_file:
                conf["ssl.ca.location"] = self.ca_file
        conf.update(extra)
        return conf

    def faust_credentials(self) -> Any:
        """faust's broker_credentials (aiokafka), or None for PLAINTEXT."""
        if not self.secure:
            return None
        import faust

        context = ssl.create_default_context(cafile=self.ca_file)
        return faust.SASLCredentials(username=self.username, password=self.password, ssl_context=context,
                                     mechanism=MECHANISM)


def kafka_config(bootstrap: str | None = None, **extra: Any) -> dict[str, Any]:
    """The confluent-kafka configuration every component uses: `bootstrap` (default: the
    configured cluster) with the configured security settings, plus `extra`."""
    return KafkaSettings.from_env(bootstrap).client_config(**extra)


# --- the local secured broker -------------------------------------------------------------

#: SCRAM principals of the local secured stack, one per component (docs/security.md).
PRINCIPALS = ("admin", "worker", "collector", "gateway", "operator", "finance", "sink", "notifier", "portal", "watch",
              "analyst")

_R, _W, _D, _ALL = "READ", "WRITE", "DESCRIBE", "ALL"


def _topic(name: str, *ops: str, prefixed: bool = False) -> list[tuple[str, str, str, str]]:
    return [("TOPIC", name, "PREFIXED" if prefixed else "LITERAL", op) for op in ops]


def _group(name: str, prefixed: bool = True) -> list[tuple[str, str, str, str]]:
    return [("GROUP", name, "PREFIXED" if prefixed else "LITERAL", _R)]


def acls(app_id: str = "mallwatt-billing") -> dict[str, list[tuple[str, str, str, str]]]:
    """(resource type, name, pattern, operation) allowed per principal; admin is a super user.
    Least privilege: collectors write readings, outcomes and their events and read relay
    commands (and readings, to check their spool); the payment gateway writes payments only;
    operators write operator commands and postings only; analysts get nothing on Kafka (they
    read the warehouse)."""
    return {
        "worker": _topic("mallwatt.", _R, _W, _D, prefixed=True) + _topic(app_id, _ALL, prefixed=True)
        + _group(app_id),
        "collector": _topic(T.READINGS, _R, _W, _D) + _topic(T.RELAY_OUTCOMES, _W, _D)
        + _topic(T.COLLECTOR_EVENTS, _W, _D) + _topic(T.RELAY_COMMANDS, _R, _D)
        + _group("mallwatt-collector") + _group("mallwatt-spool-check", prefixed=False),
        "gateway": _topic(T.PAYMENTS, _W, _D),
        "operator": _topic(T.OPERATOR_COMMANDS, _W, _D) + _topic(T.POSTINGS, _W, _D) + _topic(T.AUDIT, _W, _D),
        # manual top-ups and postings, operator-signed (pipelines.core.money_authority)
        "finance": _topic(T.PAYMENTS, _W, _D) + _topic(T.POSTINGS, _W, _D) + _topic(T.AUDIT, _W, _D),
        "sink": _topic("mallwatt.", _R, _D, prefixed=True) + _group("mallwatt-sink"),
        "notifier": _topic(T.ALERTS, _R, _D) + _topic(T.ALERT_PREFERENCES, _R, _D) + _group("mallwatt-notify"),
        "portal": _topic(T.LEDGER, _R, _D) + _topic(T.ALERTS, _R, _D) + _topic(T.INTERVALS, _R, _D)
        + _topic(T.RELAY_COMMANDS, _R, _D) + _topic(T.ALERT_PREFERENCES, _R, _W, _D)
        + _topic(T.PAYMENTS, _W, _D) + _topic(T.AUDIT, _W, _D) + _group("mallwatt-portal"),
        "watch": _topic(T.COLLECTOR_EVENTS, _R, _D) + _topic(T.READINGS, _R, _D) + _topic(T.ALERTS, _R, _W, _D)
        + _group("mallwatt-watch"),
        "analyst": [],
    }


def secure_dir(data_dir: Path) -> Path:
    return data_dir / "secure"


def credentials_file(data_dir: Path, principal: str) -> Path:
    return secure_dir(data_dir) / "credentials" / f"{principal}.json"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def ensure_credentials(data_dir: Path) -> dict[str, str]:
    """A random password per principal, created once and kept (0600) under the data dir; the
    JSON file per principal is what a component's MALLWATT_KAFKA_CREDENTIALS points to."""
    out: dict[str, str] = {}
    ca = str(secure_dir(data_dir) / "ca.pem")
    for principal in PRINCIPALS:
        path = credentials_file(data_dir, principal)
        if path.exists():
            out[principal] = json.loads(path.read_text(encoding="utf-8"))["password"]
            continue
        out[principal] = secrets.token_urlsafe(24)
        _write_private(path, json.dumps({"security_protocol": SASL_SSL, "username": principal,
                                         "password": out[principal], "ca_file": ca}, indent=1))
    return out


def ensure_certificates(data_dir: Path, host: str = "127.0.0.1", days: int = 825) -> tuple[Path, Path]:
    """A local CA (ca.pem) and the broker's key and certificate chain signed by it
    (broker.pem: key then certificate, Kafka's PEM keystore), created once."""
    folder = secure_dir(data_dir)
    ca_pem, broker_pem = folder / "ca.pem", folder / "broker.pem"
    if ca_pem.exists() and broker_pem.exists():
        return ca_pem, broker_pem
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallwatt local CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        alt.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        alt.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallwatt-broker")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_private(broker_pem, key_pem.decode() + cert.public_bytes(pem).decode())
    _write_private(ca_pem, ca_cert.public_bytes(pem).decode())
    return ca_pem, broker_pem


def broker_properties(data_dir: Path, host: str, port: int, ctrl_port: int) -> dict[str, str]:
    """server.properties entries of the secured listener. The controller listener stays
    PLAINTEXT on loopback: KRaft cannot authenticate controllers with SCRAM (the credentials
    live in the metadata the controller serves), so the broker's own controller requests come
    as User:ANONYMOUS, which is therefore a super user on that loopback-only port."""
    passwords = ensure_credentials(data_dir)
    _, broker_pem = ensure_certificates(data_dir, host)
    admin = passwords["admin"]
    jaas = ('org.apache.kafka.common.security.scram.ScramLoginModule required '
            f'username="admin" password="{admin}";')
    return {
        "listeners": f"SASL_SSL://{host}:{port},CONTROLLER://{host}:{ctrl_port}",
        "advertised.listeners": f"SASL_SSL://{host}:{port}",
        "inter.broker.listener.name": "SASL_SSL",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL",
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": jaas,
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(broker_pem),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(secure_dir(data_dir) / "ca.pem"),
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": "User:admin;User:ANONYMOUS",
    }


def scram_format_args(data_dir: Path) -> list[str]:
    """kafka-storage format arguments that create every principal's SCRAM credential, so the
    broker can authenticate its own inter-broker connection on first start."""
    out: list[str] = []
    for principal, password in ensure_credentials(data_dir).items():
        out += ["--add-scram", f"{MECHANISM}=[name={principal},password={password}]"]
    return out


def apply_acls(settings: KafkaSettings, app_id: str = "mallwatt-billing", timeout_s: float = 30.0) -> int:
    """Create the ACL table on the cluster (idempotent: an existing binding is created again
    as a no-op). Returns how many bindings were requested."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
    )
    from confluent_kafka.admin import ResourceType as RT

    bindings = [AclBinding(RT[rtype], name, ResourcePatternType[pattern], f"User:{principal}", "*",
                           AclOperation[op], AclPermissionType.ALLOW)
                for principal, rules in acls(app_id).items() for rtype, name, pattern, op in rules]
    if not bindings:
        return 0
    admin = AdminClient(settings.client_config())
    for future in admin.create_acls(bindings, request_timeout=timeout_s).values():
        future.result(timeout=timeout_s)
    return len(bindings)


def secured(conf: dict[str, Any]) -> dict[str, Any]:
    """A librdkafka configuration that names its own "bootstrap.servers", with the configured
    security settings added (for call sites that build their configuration in one literal)."""
    rest = {k: v for k, v in conf.items() if k != "bootstrap.servers"}
    return KafkaSettings.from_env(conf["bootstrap.servers"]).client_config(**rest)
