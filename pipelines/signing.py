"""Ed25519 signatures on power commands: the stream signs relay commands, collectors verify.

A relay command carries `key_id` and `signature`: Ed25519 over the command's canonical form
(every other field, JSON with sorted keys and no spaces), so any change to a field breaks
it. Ed25519 is deterministic, so a command re-published after a restart carries the same
signature. The worker's forwarder signs at publish time (the only component holding the
private key; the billing core and replay stay free of keys), and a collector executes only a
command signed by a key it trusts: an unsigned, unknown-key or forged command is refused,
answered with a FAILED outcome that says why, and reported as a `command_refused` event.

Keys (docs/security.md):
    MALLWATT_RELAY_SIGNING_KEY   the worker's private key (PEM, PKCS8); default
                                 var/keys/relay-signer.pem, created once (0600) if missing
    MALLWATT_RELAY_VERIFY_KEYS   public keys (PEM files, comma-separated) collectors trust;
                                 default var/keys/relay-signer.pub.pem
`mallwatt keys new NAME` writes a key pair (the operators' keys are made the same way).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from infra.home import data_dir

KEY_DIR = data_dir("keys")  # infra.home: MALLWATT_HOME, the checkout's var/, or the user data folder
SIGNATURE_FIELDS = ("key_id", "signature")


class SigningKeyError(ValueError):
    """A key file is missing or malformed (the message names the file and the setting)."""


def canonical(record: dict[str, Any]) -> bytes:
    """The signed bytes: every field but the signature's own, in one fixed form."""
    body = {k: v for k, v in record.items() if k not in SIGNATURE_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id_of(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def public_key_text(public: Ed25519PublicKey) -> str:
    """The form the portfolio's `security.operators[].public_key` takes: ed25519:<base64 raw>."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode()


def _write_private(path: Path, data: bytes) -> None:
    """Write a whole key file or nothing: written to a temporary name, then linked into place,
    which fails (FileExistsError) if the key exists, so a key is never overwritten and a
    concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def new_key_pair(private_path: Path, public_path: Path | None = None) -> str:
    """Write a new private key (0600, refused if the file exists) and its public key; returns its id."""
    key = Ed25519PrivateKey.generate()
    _write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    public_path = public_path or private_path.with_suffix(".pub.pem")
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id_of(key.public_key())


def load_private(path: Path, setting: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"{setting}: cannot load a private key from {path} ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{setting}: {path} is not an Ed25519 private key")
    return key


def load_public(path: Path, setting: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"{setting}: cannot load a public key from {path} ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{setting}: {path} is not an Ed25519 public key")
    return key


class Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.key_id = key_id_of(key.public_key())

    def __repr__(self) -> str:
        return f"Signer({self.key_id})"  # never the key

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def sign(self, record: dict[str, Any]) -> dict[str, Any]:
        signature = self._key.sign(canonical(record))
        return {**record, "key_id": self.key_id, "signature": base64.b64encode(signature).decode()}


@dataclass(frozen=True)
class Verifier:
    keys: dict[str, Ed25519PublicKey]

    @classmethod
    def of(cls, *public_keys: Ed25519PublicKey) -> Verifier:
        return cls({key_id_of(k): k for k in public_keys})

    def problem(self, record: dict[str, Any]) -> str | None:
        """Why a record must not be trusted ("unsigned", "unknown_key", "bad_signature"), or None."""
        key_id, signature = record.get("key_id"), record.get("signature")
        if not key_id or not signature:
            return "unsigned"
        key = self.keys.get(key_id)
        if key is None:
            return "unknown_key"
        try:
            key.verify(base64.b64decode(signature, validate=True), canonical(record))
        except (InvalidSignature, ValueError):
            return "bad_signature"
        return None


def relay_signer(env: dict[str, str] | None = None) -> Signer:
    """The worker's signer: MALLWATT_RELAY_SIGNING_KEY, or the local key pair made on first use."""
    env = dict(os.environ if env is None else env)
    setting = "MALLWATT_RELAY_SIGNING_KEY"
    path = Path(env[setting]) if env.get(setting) else KEY_DIR / "relay-signer.pem"
    if not env.get(setting) and not path.exists():
        with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
            new_key_pair(path)
    return Signer(load_private(path, setting))


def relay_verifier(env: dict[str, str] | None = None) -> Verifier:
    """The keys collectors trust: MALLWATT_RELAY_VERIFY_KEYS, or the local signer's public key
    (made on first use, so a collector started before any worker still has the key to check)."""
    env = dict(os.environ if env is None else env)
    setting = "MALLWATT_RELAY_VERIFY_KEYS"
    if env.get(setting):
        return Verifier.of(*(load_public(Path(p.strip()), setting) for p in env[setting].split(",") if p.strip()))
    # The local pair (made here if there is none yet); the public key is taken from the
    # private one, so a collector never reads a public file another process is still writing.
    return Verifier.of(relay_signer(env).public_key)


def sign_relay_value(signer: Signer, value: bytes) -> bytes:
    """A RelayCommand message signed (its Avro re-encoded with key_id and signature)."""
    from schemas import codec

    return codec.encode("RelayCommand", signer.sign(codec.decode("RelayCommand", value)))


def add_operator_arguments(parser: Any) -> None:
    """--operator, --key and --config, as every signed operator command (power, topup, post) takes them."""
    from infra.home import data_dir

    parser.add_argument("--operator", default=os.environ.get("MALLWATT_OPERATOR", os.environ.get("USER", "")),
                        help="your operator id in the portfolio's security.operators (default $MALLWATT_OPERATOR)")
    parser.add_argument("--key", default=os.environ.get("MALLWATT_OPERATOR_KEY"),
                        help="your private key file (default $MALLWATT_OPERATOR_KEY)")
    parser.add_argument("--config", default=os.environ.get("MALLWATT_CONFIG", str(data_dir("portfolio.yaml"))),
                        help="portfolio config (default %(default)s)")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="mallwatt keys", description="Ed25519 key pairs for signed commands: "
                                     "the worker's relay-command key and operators' keys (docs/security.md).")
    sub = parser.add_subparsers(dest="action", required=True)
    new = sub.add_parser("new", help="write NAME.pem (private, 0600) and NAME.pub.pem; prints the key id")
    new.add_argument("name", help="file stem, e.g. ops-alice")
    new.add_argument("--dir", type=Path, default=KEY_DIR, help="folder (default %(default)s)")
    args = parser.parse_args(argv)
    private = args.dir / f"{args.name}.pem"
    try:
        key_id = new_key_pair(private)
    except FileExistsError:
        print(f"mallwatt keys: {private} exists; a key is never overwritten", flush=True)
        return 2
    public = load_private(private, "new key").public_key()
    print(json.dumps({"private_key": str(private), "public_key": str(private.with_suffix('.pub.pem')),
                      "key_id": key_id, "config_public_key": public_key_text(public)}))
    return 0
