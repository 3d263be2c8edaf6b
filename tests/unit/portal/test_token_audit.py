"""Token issue and revocation are audited, best effort: a broker that does not answer never
costs the operator the token just made (the store is the authority)."""

import time
from pathlib import Path

import pytest

from pipelines.portal import main as portal_main


def test_token_issue_and_revoke_are_audited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    sent: list[dict] = []
    def fake(_producer: object, record: dict, on_delivery: object = None) -> None:
        sent.append(record)
        on_delivery(None, None)  # delivered

    monkeypatch.setattr("pipelines.audit.produce_audit", fake)
    store = str(tmp_path / "tokens.json")
    assert portal_main.token_main(["--store", store, "create", "--account", "M01-S0001"]) == 0
    token_id = capsys.readouterr().err.split()[2]
    assert portal_main.token_main(["--store", store, "revoke", token_id]) == 0
    assert [(r["action"], r["target"]) for r in sent] == [("token.issue", "merchant:M01-S0001"),
                                                          ("token.revoke", token_id)]
    assert all(r["principal"].startswith("local:") and token_id in r["detail"] for r in sent)


def test_an_unreachable_broker_warns_and_keeps_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MALLWATT_KAFKA", "127.0.0.1:9")  # nothing listens there
    store = str(tmp_path / "tokens.json")
    t0 = time.monotonic()
    assert portal_main.token_main(["--store", store, "create", "--mall", "M01"]) == 0
    assert time.monotonic() - t0 < 15
    out = capsys.readouterr()
    assert out.out.strip() and "not confirmed by Kafka" in out.err
    assert portal_main.token_main(["--store", store, "list"]) == 0
    assert "live" in capsys.readouterr().out
