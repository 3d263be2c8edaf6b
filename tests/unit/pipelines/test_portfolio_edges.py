"""Config validation at the edge: each bad value is rejected naming its field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.generate import generate
from pipelines.payments_cli import MAX_TOPUP_UNITS, to_minor
from pipelines.portfolio import ConfigError, parse_portfolio

# generate() gives each mall three pools (pools[0..2]) over its common-area meters


def common(mall: dict) -> list[dict]:
    return [m for m in mall["meters"] if m.get("account") is None]


def merchant_meter(mall: dict) -> dict:
    return next(m for m in mall["meters"] if m.get("account"))


CASES: list[tuple[str, Callable[[dict], None], str]] = [
    ("duplicate area", lambda d: d["malls"][0]["areas"].append(dict(d["malls"][0]["areas"][0])),
     "malls[0].areas: duplicate id"),
    ("duplicate gateway", lambda d: d["malls"][0]["gateways"].append(
        {**d["malls"][0]["gateways"][0], "port": 65000}), "malls[0].gateways: duplicate id"),
    ("duplicate pool", lambda d: d["malls"][0]["pools"].append(
        {"id": "P1", "name": "x", "meters": [common(d["malls"][0])[1]["id"]]}) or d["malls"][0]["pools"].append(
        {"id": "P1", "name": "y", "meters": [common(d["malls"][0])[2]["id"]]}), "malls[0].pools: duplicate id 'P1'"),
    ("merchant meter in a pool", lambda d: d["malls"][0]["pools"].append(
        {"id": "P9", "name": "x", "meters": [merchant_meter(d["malls"][0])["id"]]}),
     "malls[0].pools[3].meters: meter 'M01-S0001-E1' belongs to merchant 'M01-S0001'"),
    ("meter in two pools", lambda d: d["malls"][0]["pools"].extend(
        [{"id": "P1", "name": "x", "meters": [common(d["malls"][0])[0]["id"]]},
         {"id": "P2", "name": "y", "meters": [common(d["malls"][0])[0]["id"]]}]),
     "malls[0].pools[4].meters: meter 'M01-C-hvac' is already in pool"),
    ("negative share", lambda d: d["malls"][0]["pools"].append(
        {"id": "P1", "name": "x", "meters": [common(d["malls"][0])[0]["id"]], "method": "fixed",
         "fixed_shares": {d["malls"][0]["merchants"][0]["id"]: -0.5}}), "malls[0].pools[3].fixed_shares.M01-S0001"),
    ("negative price adder", lambda d: d["tariffs"][0]["versions"][0].update(
        tiers=[{"upto_kwh": 100}, {"adder": -5}]), "tariffs[0].versions[0].tiers[1].adder"),
    ("unknown meter model", lambda d: d["malls"][0]["meters"][0].update(model="acme_9000"),
     "malls[0].meters[0].model: unknown meter model 'acme_9000'"),
    ("overflow opening balance", lambda d: d["malls"][0]["merchants"][0].update(opening_balance_minor=2**70),
     "malls[0].merchants[0].opening_balance_minor"),
    ("overflow debt", lambda d: d["malls"][0]["merchants"][0].update(opening_debt_minor=10**13),
     "malls[0].merchants[0].opening_debt_minor"),
    ("negative debt", lambda d: d["malls"][0]["merchants"][0].update(opening_debt_minor=-1),
     "malls[0].merchants[0].opening_debt_minor"),
    ("overflow price", lambda d: d["tariffs"][0]["versions"][0]["prices"].update(flat=10**12),
     "tariffs[0].versions[0].prices.flat"),
    ("infinite area", lambda d: d["malls"][0]["merchants"][0].update(leased_area_m2=float("inf")),
     "malls[0].merchants[0].leased_area_m2"),
    ("negative lateness", lambda d: d.update(billing={"lateness_ms": -1}), "billing.lateness_ms"),
]


@pytest.mark.parametrize(("name", "change", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_config_names_the_field(name: str, change: Callable[[dict], None], expected: str) -> None:
    data = generate(1, 4, seed=2)
    parse_portfolio(data)  # valid before the change
    change(data)
    with pytest.raises(ConfigError) as err:
        parse_portfolio(data, "mall.yaml")
    assert expected in str(err.value), str(err.value)


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "Infinity", "-5", "0", "0.00", "1e3", "5.001", "٥٠٠",
                                  "５００", "500 ", "", str(MAX_TOPUP_UNITS + 1), "+5"])
def test_topup_amount_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        to_minor(text)


def test_topup_amount_accepted() -> None:
    assert [to_minor(x) for x in ("500", "99.50", "0.01", str(MAX_TOPUP_UNITS))] == [50000, 9950, 1,
                                                                                   MAX_TOPUP_UNITS * 100]


def test_topup_prints_the_payment_id_before_sending(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import confluent_kafka
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from pipelines import payments_cli
    from pipelines.portfolio import dump_portfolio
    from pipelines.signing import public_key_text

    class Down:  # a broker that never confirms
        def __init__(self, *_a: object) -> None: ...
        def produce(self, *_a: object, **_k: object) -> None: ...
        def flush(self, _t: float) -> int:
            return 1

    monkeypatch.setattr(confluent_kafka, "Producer", Down)
    key = Ed25519PrivateKey.generate()
    (tmp_path / "fin.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    data = generate(1, 3, seed=1)
    data["security"] = {"operators": [{"id": "fin", "public_key": public_key_text(key.public_key()),
                                       "roles": ["finance"]}]}
    dump_portfolio(data, tmp_path / "p.yaml")
    assert payments_cli.main(["M01-S0001", "500", "--operator", "fin", "--key", str(tmp_path / "fin.pem"),
                              "--config", str(tmp_path / "p.yaml")]) == 1
    err = capsys.readouterr().err
    pid = err.split("payment id ", 1)[1].split()[0]
    assert pid.startswith("cli-") and f"retry with --payment-id {pid}" in err
