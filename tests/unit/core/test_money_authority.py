"""Who may move money by hand: signed postings and manual top-ups, role and account limits."""

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipelines.core.models import WalletPolicy
from pipelines.core.money_authority import (
    DEFAULT_ACCOUNT_MAX_ADJUSTMENT_MINOR,
    DEFAULT_ACCOUNT_MAX_TOPUP_MINOR,
    MoneyVerdict,
    decide_money,
    role_limit,
    sign_money,
)
from pipelines.security_config import SecurityConfig
from pipelines.signing import public_key_text
from schemas import codec

KEYS = {name: Ed25519PrivateKey.generate() for name in ("fin", "ops", "boss", "gone", "eve", "big")}
T0 = 1_784_080_800_000


def security() -> SecurityConfig:
    def op(who: str, *roles: str, **extra: object) -> dict:
        return {"id": who, "public_key": public_key_text(KEYS[who].public_key()), "roles": list(roles), **extra}

    return SecurityConfig(operators=[op("fin", "finance"), op("ops", "operator"), op("boss", "admin"),
                                     op("gone", "finance", disabled=True), op("big", "finance", "billing")],
                          roles={"billing": {"permissions": ["money.adjust"], "max_adjustment_minor": 5_000_000}})


def topup(amount: int = 50_000, provider: str = "cli", kind: str = "TOPUP") -> dict:
    return {"payment_id": "cli-1", "account_id": "A1", "kind": kind, "amount_minor": amount, "ts_ms": T0,
            "provider": provider, "reverses_payment_id": None}


def posting(amount: int = -20_000, kind: str = "adjustment") -> dict:
    return {"entry_id": "adj-1", "account_id": "A1", "mall_id": "M01", "kind": kind, "amount_minor": amount,
            "ts_ms": T0, "source_id": "ticket-7", "rate": None}


def verdict(record: dict, policy: WalletPolicy | None = None, known: bool = True) -> MoneyVerdict:
    return decide_money(record, security(), known_account=known, policy=policy).verdict


def test_a_signed_topup_within_limits_is_accepted_with_the_verified_signer() -> None:
    d = decide_money(sign_money(topup(), "fin", KEYS["fin"]), security(), known_account=True)
    assert d.verdict is MoneyVerdict.ACCEPTED and d.principal == "fin" and d.problem() is None


def test_the_signature_survives_avro_encoding_with_schema_defaults_filled_in() -> None:
    bare = {k: v for k, v in topup().items() if k not in ("provider", "reverses_payment_id")}
    signed = sign_money(bare, "fin", KEYS["fin"])
    assert verdict(codec.decode("Payment", codec.encode("Payment", signed))) is MoneyVerdict.ACCEPTED
    post = sign_money({k: v for k, v in posting().items() if k != "rate"}, "fin", KEYS["fin"])
    assert verdict(codec.decode("LedgerPosting", codec.encode("LedgerPosting", post))) is MoneyVerdict.ACCEPTED


def test_unsigned_manual_money_is_refused_but_a_provider_payment_needs_no_operator() -> None:
    assert verdict(topup()) is MoneyVerdict.UNSIGNED
    assert verdict({k: v for k, v in topup().items() if k != "provider"}) is MoneyVerdict.UNSIGNED  # "unknown"
    assert verdict(posting(kind="shared_cost")) is MoneyVerdict.UNSIGNED  # every posting is signed
    provider = decide_money(topup(provider="sim"), security(), known_account=True)
    assert provider.verdict is MoneyVerdict.PROVIDER and provider.accepted and provider.principal is None


def test_unknown_disabled_forged_and_relabelled_records_are_refused() -> None:
    assert verdict(sign_money(topup(), "eve", KEYS["eve"])) is MoneyVerdict.UNKNOWN_OPERATOR
    assert verdict(sign_money(topup(), "gone", KEYS["gone"])) is MoneyVerdict.UNKNOWN_OPERATOR  # a leaver
    signed = sign_money(topup(), "fin", KEYS["fin"])
    assert verdict({**signed, "amount_minor": 90_000}) is MoneyVerdict.BAD_SIGNATURE
    assert verdict({**signed, "account_id": "A2"}) is MoneyVerdict.BAD_SIGNATURE
    assert verdict({**signed, "operator_id": "boss"}) is MoneyVerdict.BAD_SIGNATURE  # claims another signer
    # a signed record relabelled as a provider payment is still checked, never waved through
    assert verdict({**signed, "provider": "sim"}) is MoneyVerdict.BAD_SIGNATURE
    assert verdict(sign_money(topup(), "fin", KEYS["eve"])) is MoneyVerdict.BAD_SIGNATURE
    assert verdict({**signed, "signature": "not base64!"}) is MoneyVerdict.BAD_SIGNATURE


def test_permissions_follow_the_roles() -> None:
    assert verdict(sign_money(topup(), "ops", KEYS["ops"])) is MoneyVerdict.NOT_PERMITTED  # power only
    assert verdict(sign_money(posting(), "ops", KEYS["ops"])) is MoneyVerdict.NOT_PERMITTED
    d = decide_money(sign_money(posting(), "ops", KEYS["ops"]), security(), known_account=True)
    assert d.principal == "ops" and "money.adjust" in d.problem()


def test_role_limits_bound_topups_and_adjustments_by_absolute_amount() -> None:
    assert verdict(sign_money(topup(1_000_000), "fin", KEYS["fin"])) is MoneyVerdict.ACCEPTED  # finance: 1,000,000
    assert verdict(sign_money(topup(1_000_001), "fin", KEYS["fin"])) is MoneyVerdict.ABOVE_ROLE_LIMIT
    assert verdict(sign_money(posting(-100_000), "fin", KEYS["fin"])) is MoneyVerdict.ACCEPTED
    assert verdict(sign_money(posting(-100_001), "fin", KEYS["fin"])) is MoneyVerdict.ABOVE_ROLE_LIMIT
    assert verdict(sign_money(posting(100_001), "fin", KEYS["fin"])) is MoneyVerdict.ABOVE_ROLE_LIMIT
    reversal = {**topup(200_000, kind="REVERSAL"), "reverses_payment_id": "cli-0"}
    assert verdict(sign_money(reversal, "fin", KEYS["fin"])) is MoneyVerdict.ABOVE_ROLE_LIMIT  # money.adjust
    # the largest limit among the signer's permitted roles; admin has none (the account's still holds)
    assert role_limit(security(), "big", "money.adjust", "max_adjustment_minor") == 5_000_000
    assert verdict(sign_money(posting(-5_000_000, "shared_cost"), "big", KEYS["big"])) is MoneyVerdict.ACCEPTED
    assert verdict(sign_money(posting(-9_000_000), "boss", KEYS["boss"])) is MoneyVerdict.ACCEPTED


def test_account_limits_come_from_the_wallet_policy_else_the_defaults() -> None:
    big_topup = sign_money(topup(DEFAULT_ACCOUNT_MAX_TOPUP_MINOR + 1), "boss", KEYS["boss"])
    assert verdict(big_topup) is MoneyVerdict.ABOVE_ACCOUNT_LIMIT
    assert verdict(sign_money(topup(DEFAULT_ACCOUNT_MAX_TOPUP_MINOR), "boss", KEYS["boss"])) is MoneyVerdict.ACCEPTED
    big_post = sign_money(posting(-DEFAULT_ACCOUNT_MAX_ADJUSTMENT_MINOR - 1), "boss", KEYS["boss"])
    assert verdict(big_post) is MoneyVerdict.ABOVE_ACCOUNT_LIMIT
    policy = WalletPolicy(max_topup=30_000, max_adjustment=10_000)
    assert verdict(sign_money(topup(30_001), "fin", KEYS["fin"]), policy) is MoneyVerdict.ABOVE_ACCOUNT_LIMIT
    assert verdict(sign_money(posting(-10_001), "fin", KEYS["fin"]), policy) is MoneyVerdict.ABOVE_ACCOUNT_LIMIT
    assert verdict(sign_money(posting(-10_000), "fin", KEYS["fin"]), policy) is MoneyVerdict.ACCEPTED


def test_an_unknown_account_is_refused_before_anything_else() -> None:
    d = decide_money(topup(provider="sim"), security(), known_account=False)
    assert d.verdict is MoneyVerdict.UNKNOWN_ACCOUNT and "account_id 'A1'" in d.problem()
