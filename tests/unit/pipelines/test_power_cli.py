"""`mallwatt power`: dry run, signed meter orders, proposals that wait for a second operator."""

import json
from pathlib import Path

import pytest

from pipelines import power_cli
from pipelines.core.authority import decide
from pipelines.generate import generate
from pipelines.portfolio import dump_portfolio, parse_portfolio
from pipelines.signing import load_private
from pipelines.signing import main as keys_main


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> dict:
    ids = {}
    for who in ("alice", "bob"):
        assert keys_main(["new", who, "--dir", str(tmp_path)]) == 0
        ids[who] = json.loads(capsys.readouterr().out)["config_public_key"]
    data = generate(1, 3, seed=1, mall_prefix="P")
    data["security"] = {"operators": [{"id": w, "public_key": k, "roles": ["operator"]} for w, k in ids.items()]}
    config = tmp_path / "portfolio.yaml"
    dump_portfolio(data, config)
    sent: list[dict] = []
    monkeypatch.setattr(power_cli, "_produce", lambda cmds: sent.extend(cmds) or True)
    audits: list[dict] = []
    monkeypatch.setattr(power_cli, "_audit", audits.append)
    return {"config": str(config), "dir": tmp_path, "sent": sent, "audits": audits, "portfolio": parse_portfolio(data),
            "mall": data["malls"][0]["id"]}


def run(setup: dict, *args: str) -> int:
    return power_cli.main([*args, "--config", setup["config"], "--orders-dir", str(setup["dir"] / "orders")])


def test_dry_run_lists_meters_and_the_life_safety_left_out(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(setup, "off", "--mall", setup["mall"], "--reason", "drill", "--dry-run") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["skipped_life_safety"] and all(s["purpose"] == "elevator" for s in out["skipped_life_safety"])
    assert not set(out["meters"]) & {s["meter"] for s in out["skipped_life_safety"]}
    assert setup["sent"] == []


def test_a_meter_order_is_signed_and_accepted_by_the_worker_rule(setup: dict) -> None:
    meter = setup["portfolio"].malls[0].meters[0]
    key = str(setup["dir"] / "alice.pem")
    assert run(setup, "off", "--meter", meter.id, "--reason", "fault", "--operator", "alice", "--key", key) == 0
    [cmd] = setup["sent"]
    d = decide(cmd, setup["portfolio"].security, meter_purpose="sockets", in_scope=True)
    assert d.accepted and d.principals == ("alice",)


def test_a_mall_order_waits_for_a_second_operator(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob = str(setup["dir"] / "alice.pem"), str(setup["dir"] / "bob.pem")
    assert run(setup, "off", "--mall", setup["mall"], "--reason", "drill", "--operator", "alice", "--key", alice) == 0
    assert setup["sent"] == []  # nothing sent before the approval
    order_id = capsys.readouterr().out.split(":")[0]
    assert run(setup, "approve", order_id, "--operator", "alice", "--key", alice) == 2  # not by the proposer
    assert run(setup, "approve", order_id, "--operator", "bob", "--key", bob) == 0
    assert setup["sent"] and all(decide(c, setup["portfolio"].security, meter_purpose="sockets", in_scope=True)
                                 .principals == ("alice", "bob") for c in setup["sent"])
    assert (setup["dir"] / "orders" / f"{order_id}.sent.json").exists()
    assert [(a["action"], a["principal"]) for a in setup["audits"]] == [("power.proposed", "alice"),
                                                                        ("power.approved", "bob")]


def test_errors_name_the_missing_key_and_reason(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    meter = setup["portfolio"].malls[0].meters[0]
    assert run(setup, "off", "--meter", meter.id, "--reason", "x", "--operator", "alice") == 2
    assert "--key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(setup, "off", "--meter", meter.id, "--reason", " ")
    assert load_private(setup["dir"] / "alice.pem", "t") is not None
