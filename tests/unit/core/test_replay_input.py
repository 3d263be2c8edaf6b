"""`mallwatt replay` names file, line and field for bad input and exits 2 without a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.core.replay import main

CFG = {"tariffs": [{"id": "t", "versions": [{"prices": {"flat": 1000}}]}], "malls": [{"mall_id": "m"}],
       "accounts": [{"account_id": "a1", "mall_id": "m", "tariff_id": "t"}],
       "circuits": [{"circuit_id": "c1", "account_id": "a1"}]}
GOOD = {"circuit_id": "c1", "meter_id": "m1", "ts_ms": 1_700_000_000_000, "import_kwh": 1.5}
PAY = {"payment_id": "p1", "account_id": "a1", "ts_ms": 1_700_000_000_000, "amount_minor": 500}


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], readings: list[str], payments: list[str] | None = None
        ) -> tuple[int, str]:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CFG))
    (tmp_path / "r.jsonl").write_text("\n".join(readings) + "\n")
    args = ["--config", str(tmp_path / "c.yaml"), "--readings", str(tmp_path / "r.jsonl"),
            "--out", str(tmp_path / "o")]
    if payments is not None:
        (tmp_path / "p.jsonl").write_text("\n".join(payments) + "\n")
        args += ["--payments", str(tmp_path / "p.jsonl")]
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def line(**kw: object) -> str:
    return json.dumps({**GOOD, **kw})


@pytest.mark.parametrize(("bad", "expected"), [
    ('{"circuit_id": "c1", ', "r.jsonl:2: not JSON"),
    ('{"circuit_id": "c1", "meter_id": "m1", "ts_ms": 1700000000000, "import_kwh": NaN}', "r.jsonl:2: NaN"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "import_kwh"}), "r.jsonl:2: missing field 'import_kwh'"),
    (line(ts_ms="2024-05-06T12:00:00Z"), "r.jsonl:2: ts_ms: expected epoch milliseconds (UTC) as an integer, "
                                         "got a string"),
    (line(import_kwh="12.5"), "r.jsonl:2: import_kwh: expected a number, got str"),
])
def test_bad_reading_line_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str,
                                   expected: str) -> None:
    code, err = run(tmp_path, capsys, [line(), bad, line(ts_ms=GOOD["ts_ms"] + 60_000)])
    assert code == 2
    assert expected in err


@pytest.mark.parametrize(("amount", "expected"), [
    (500.5, "p.jsonl:2: amount_minor: expected integer minor units (fen) as an integer, got float 500.5"),
    ("500", "p.jsonl:2: amount_minor: expected integer minor units (fen) as an integer, got a string"),
])
def test_non_integer_amount_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], amount: object,
                                     expected: str) -> None:
    code, err = run(tmp_path, capsys, [line()], [json.dumps(PAY), json.dumps({**PAY, "payment_id": "p2",
                                                                             "amount_minor": amount})])
    assert code == 2
    assert expected in err


def test_missing_column_in_parquet_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import polars as pl

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CFG))
    pl.DataFrame([GOOD]).drop("meter_id").write_parquet(tmp_path / "r.parquet")
    code = main(["--config", str(tmp_path / "c.yaml"), "--readings", str(tmp_path / "r.parquet"),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "r.parquet: missing column 'meter_id'" in capsys.readouterr().err
    code = main(["--config", str(tmp_path / "nope.yaml"), "--readings", str(tmp_path / "r.parquet"),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "nope.yaml: cannot read config" in capsys.readouterr().err


def test_good_files_still_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run(tmp_path, capsys, [line(), line(ts_ms=GOOD["ts_ms"] + 60_000, import_kwh=1.6)], [json.dumps(PAY)])
    assert code == 0
