"""Who may switch power: signatures, permissions, approval and life-safety, decided by the worker."""

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipelines.core.authority import Verdict, decide, sign_order
from pipelines.security_config import SecurityConfig
from pipelines.signing import public_key_text

KEYS = {name: Ed25519PrivateKey.generate() for name in ("alice", "bob", "carol", "eve", "fin")}


def security(**extra: object) -> SecurityConfig:
    ops = [{"id": "alice", "public_key": public_key_text(KEYS["alice"].public_key()), "roles": ["operator"]},
           {"id": "bob", "public_key": public_key_text(KEYS["bob"].public_key()), "roles": ["operator"]},
           {"id": "carol", "public_key": public_key_text(KEYS["carol"].public_key()), "roles": ["operator"],
            "disabled": True},
           {"id": "fin", "public_key": public_key_text(KEYS["fin"].public_key()), "roles": ["finance"]}]
    return SecurityConfig(operators=ops, **extra)


def command(scope: str = "METER", target: str = "MT1", reason: str = "inspection", signers: tuple[str, ...] = ("alice",),
            keys: dict | None = None) -> dict:
    order = {"order_id": "op-1", "action": "POWER_OFF", "scope": scope, "target_id": target, "reason": reason,
             "ts_ms": 1_784_080_800_000}
    keys = keys or KEYS
    sigs = [sign_order(order, who, keys[who]) for who in signers]
    return {**order, "command_id": "op-1:MT1", "mall_id": "M01", "operator": "free text", "meter_id": "MT1",
            "account_id": "A1", "signatures": sigs}


def verdict(cmd: dict, purpose: str | None = "lighting", in_scope: bool = True, sec: SecurityConfig | None = None
            ) -> Verdict:
    return decide(cmd, sec or security(), meter_purpose=purpose, in_scope=in_scope).verdict


def test_a_signed_meter_order_by_an_operator_is_accepted_with_the_verified_principal() -> None:
    d = decide(command(), security(), meter_purpose="lighting", in_scope=True)
    assert d.accepted and d.principals == ("alice",) and d.problem() is None


def test_unsigned_unknown_disabled_and_forged_orders_are_refused() -> None:
    assert verdict({**command(), "signatures": []}) is Verdict.UNSIGNED
    assert verdict(command(signers=("eve",))) is Verdict.UNKNOWN_OPERATOR
    assert verdict(command(signers=("carol",))) is Verdict.UNKNOWN_OPERATOR  # disabled: a leaver
    forged = {**command(), "reason": "changed after signing"}
    assert verdict(forged) is Verdict.BAD_SIGNATURE
    wrong_key = command(signers=("alice",), keys={**KEYS, "alice": KEYS["eve"]})
    assert verdict(wrong_key) is Verdict.BAD_SIGNATURE
    assert "bad_signature" in decide(forged, security(), meter_purpose=None, in_scope=True).problem()


def test_permissions_reason_and_scope() -> None:
    assert verdict(command(signers=("fin",))) is Verdict.NOT_PERMITTED  # finance may not switch power
    assert verdict(command(reason="  ")) is Verdict.NO_REASON
    assert verdict(command(), in_scope=False) is Verdict.OUT_OF_SCOPE


@pytest.mark.parametrize("scope", ["AREA", "MALL"])
def test_wide_orders_need_a_second_operator_and_skip_life_safety(scope: str) -> None:
    assert verdict(command(scope, "M01")) is Verdict.NEEDS_APPROVAL
    assert verdict(command(scope, "M01", signers=("alice", "alice"))) is Verdict.SELF_APPROVAL
    assert verdict(command(scope, "M01", signers=("alice", "fin"))) is Verdict.NEEDS_APPROVAL  # no power.approve
    assert verdict(command(scope, "M01", signers=("alice", "bob"))) is Verdict.ACCEPTED
    for purpose in ("elevator", "fire", "emergency_lighting"):
        assert verdict(command(scope, "M01", signers=("alice", "bob")), purpose=purpose) is Verdict.LIFE_SAFETY


def test_a_meter_order_may_switch_a_life_safety_circuit_and_approval_scopes_are_configurable() -> None:
    assert verdict(command(), purpose="elevator") is Verdict.ACCEPTED  # maintenance of that one meter
    assert verdict(command("ACCOUNT", "A1"), sec=security(approval_scopes=["ACCOUNT", "AREA", "MALL"])) \
        is Verdict.NEEDS_APPROVAL


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="unknown role 'wizard'"):
        SecurityConfig(operators=[{"id": "x", "public_key": public_key_text(KEYS["bob"].public_key()),
                                   "roles": ["wizard"]}])
    with pytest.raises(ValueError, match="public_key"):
        SecurityConfig(operators=[{"id": "x", "public_key": "ssh-rsa AAAA", "roles": ["operator"]}])
    with pytest.raises(ValueError, match="unknown permissions"):
        SecurityConfig(roles={"ops": {"permissions": ["power.everything"]}})
