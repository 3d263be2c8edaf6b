"""Ed25519 signatures on relay commands: any changed field, an unknown key or no signature is refused."""

import json
from pathlib import Path

import pytest

from pipelines.signing import (
    SigningKeyError,
    Verifier,
    main,
    new_key_pair,
    relay_signer,
    relay_verifier,
    sign_relay_value,
)
from schemas import codec

CMD = {"command_id": "c1", "action": "TRIP", "reason": "credit", "mall_id": "M01", "gateway_id": "G1",
       "meter_id": "MT1", "account_id": "A1", "issued_at_ms": 1_784_080_800_000, "cause_ts_ms": None,
       "requested_by": "pipeline"}


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    new_key_pair(tmp_path / "w.pem")
    new_key_pair(tmp_path / "other.pem")
    return {"MALLWATT_RELAY_SIGNING_KEY": str(tmp_path / "w.pem"),
            "MALLWATT_RELAY_VERIFY_KEYS": str(tmp_path / "w.pub.pem")}


def test_signed_command_verifies_and_survives_the_avro_round_trip(keys: dict[str, str]) -> None:
    signer, verifier = relay_signer(keys), relay_verifier(keys)
    value = sign_relay_value(signer, codec.encode("RelayCommand", CMD))
    decoded = codec.decode("RelayCommand", value)
    assert decoded["key_id"] == signer.key_id and verifier.problem(decoded) is None
    assert sign_relay_value(signer, codec.encode("RelayCommand", CMD)) == value  # deterministic: re-publish equal


@pytest.mark.parametrize("field", ["action", "meter_id", "gateway_id", "issued_at_ms", "account_id"])
def test_any_changed_field_breaks_the_signature(keys: dict[str, str], field: str) -> None:
    signed = relay_signer(keys).sign(CMD)
    changed = {**signed, field: {"action": "RECONNECT", "issued_at_ms": 1}.get(field, "X")}
    assert relay_verifier(keys).problem(changed) == "bad_signature"


def test_unsigned_and_unknown_key_are_refused(keys: dict[str, str], tmp_path: Path) -> None:
    verifier = relay_verifier(keys)
    assert verifier.problem(CMD) == "unsigned"
    assert verifier.problem({**CMD, "key_id": None, "signature": None}) == "unsigned"
    stranger = relay_signer({"MALLWATT_RELAY_SIGNING_KEY": str(tmp_path / "other.pem")})
    assert verifier.problem(stranger.sign(CMD)) == "unknown_key"
    assert verifier.problem({**relay_signer(keys).sign(CMD), "signature": "not base64!"}) == "bad_signature"
    assert Verifier({}).problem(relay_signer(keys).sign(CMD)) == "unknown_key"


def test_key_errors_name_the_setting_and_keys_are_never_overwritten(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="MALLWATT_RELAY_SIGNING_KEY"):
        relay_signer({"MALLWATT_RELAY_SIGNING_KEY": str(tmp_path / "missing.pem")})
    (tmp_path / "pub-as-private.pem").write_text("not a key")
    with pytest.raises(SigningKeyError, match="MALLWATT_RELAY_VERIFY_KEYS"):
        relay_verifier({"MALLWATT_RELAY_VERIFY_KEYS": str(tmp_path / "pub-as-private.pem")})
    new_key_pair(tmp_path / "k.pem")
    before = (tmp_path / "k.pem").read_bytes()
    with pytest.raises(FileExistsError):
        new_key_pair(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").read_bytes() == before
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0  # private key readable by its owner only
    assert "PRIVATE" not in repr(relay_signer({"MALLWATT_RELAY_SIGNING_KEY": str(tmp_path / "k.pem")}))


def test_keys_cli_writes_a_pair_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new", "ops-alice", "--dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["key_id"].startswith("ed25519:") and Path(out["public_key"]).exists()
    assert main(["new", "ops-alice", "--dir", str(tmp_path)]) == 2


def test_old_unsigned_commands_still_decode() -> None:
    import io

    import fastavro

    old = fastavro.parse_schema(json.loads((codec.HISTORY_DIR / "relay_command.v2.avsc").read_text()))
    buf = io.BytesIO()
    buf.write(b"\x02")  # written by version 2, before signatures
    fastavro.schemaless_writer(buf, old, CMD)
    decoded = codec.decode("RelayCommand", buf.getvalue())
    assert decoded == {**CMD, "key_id": None, "signature": None}
