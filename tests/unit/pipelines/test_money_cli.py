"""`mallwatt topup` and `mallwatt post` at the edge: signed by the operator's key, unknown accounts
and amounts above the role's or account's limit refused before anything is produced."""

import json
from pathlib import Path

import confluent_kafka
import pytest

from pipelines import payments_cli, postings_cli
from pipelines.core.money_authority import MoneyVerdict, decide_money
from pipelines.generate import generate
from pipelines.portfolio import dump_portfolio, parse_portfolio
from pipelines.signing import main as keys_main
from schemas import codec

T0 = 1_784_080_800_000


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> dict:
    keys = {}
    for who in ("fin", "ops"):
        assert keys_main(["new", who, "--dir", str(tmp_path)]) == 0
        keys[who] = json.loads(capsys.readouterr().out)["config_public_key"]
    data = generate(1, 3, seed=1, mall_prefix="Q")
    data["security"] = {"operators": [{"id": "fin", "public_key": keys["fin"], "roles": ["finance"]},
                                      {"id": "ops", "public_key": keys["ops"], "roles": ["operator"]}]}
    config = tmp_path / "portfolio.yaml"
    dump_portfolio(data, config)
    sent: list[tuple[str, bytes]] = []

    class Broker:  # records what would be produced
        def __init__(self, *_a: object) -> None: ...
        def produce(self, topic: str, key: bytes, partition: int, value: bytes) -> None:
            sent.append((topic, value))
        def flush(self, _t: float) -> int:
            return 0

    monkeypatch.setattr(confluent_kafka, "Producer", Broker)
    portfolio = parse_portfolio(data)
    account = next(m.id for m in portfolio.malls[0].merchants)
    return {"config": str(config), "dir": tmp_path, "sent": sent, "portfolio": portfolio, "account": account,
            "mall": portfolio.malls[0].id}


def topup(setup: dict, account: str, amount: str, who: str = "fin", *extra: str) -> int:
    return payments_cli.main([account, amount, "--operator", who, "--key", str(setup["dir"] / f"{who}.pem"),
                              "--config", setup["config"], "--ts-ms", str(T0), *extra])


def test_a_topup_is_signed_and_passes_the_workers_check(setup: dict) -> None:
    assert topup(setup, setup["account"], "500") == 0
    [(topic, value)] = setup["sent"]
    payment = codec.decode("Payment", value)
    assert (payment["provider"], payment["operator_id"], payment["amount_minor"]) == ("cli", "fin", 50_000)
    d = decide_money(payment, setup["portfolio"].security, known_account=True)
    assert d.verdict is MoneyVerdict.ACCEPTED and d.principal == "fin"


def test_unknown_account_limits_permission_and_missing_key_are_refused_before_sending(
        setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert topup(setup, "Q01-NOBODY", "5") == 2
    assert "account_id 'Q01-NOBODY' is not in the config" in capsys.readouterr().err
    assert topup(setup, setup["account"], "10000.01") == 2  # finance: max_topup_minor 1,000,000
    assert "above_role_limit" in capsys.readouterr().err
    assert topup(setup, setup["account"], "5", "ops") == 2
    assert "not_permitted" in capsys.readouterr().err
    assert payments_cli.main([setup["account"], "5", "--operator", "fin", "--config", setup["config"]]) == 2
    assert "--key" in capsys.readouterr().err
    assert setup["sent"] == []


def _posting(setup: dict, entry: str, account: str, amount: int) -> str:
    return json.dumps({"entry_id": entry, "account_id": account, "mall_id": setup["mall"], "kind": "adjustment",
                       "amount_minor": amount, "ts_ms": T0, "source_id": "ticket-9"})


def post(setup: dict, lines: list[str], who: str = "fin") -> int:
    path = setup["dir"] / "postings.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return postings_cli.main([str(path), "--operator", who, "--key", str(setup["dir"] / f"{who}.pem"),
                              "--config", setup["config"]])


def test_postings_are_signed_and_a_bad_line_refuses_the_whole_file(setup: dict,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    good = _posting(setup, "adj-1", setup["account"], -2_000)
    assert post(setup, [good, "", _posting(setup, "adj-2", "Q01-NOBODY", 100),
                        _posting(setup, "adj-3", setup["account"], 100_001)]) == 2
    err = capsys.readouterr().err
    assert "postings.jsonl:3: unauthorized (unknown_account)" in err and "account_id 'Q01-NOBODY'" in err
    assert "postings.jsonl:4: unauthorized (above_role_limit)" in err and "nothing published" in err
    assert setup["sent"] == []
    assert post(setup, [good]) == 0
    [(_, value)] = setup["sent"]
    posting = codec.decode("LedgerPosting", value)
    assert decide_money(posting, setup["portfolio"].security, known_account=True).principal == "fin"
