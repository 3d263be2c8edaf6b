"""The portfolio config: validation names the bad field, the generator emits valid files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.generate import generate
from pipelines.portfolio import ConfigError, dump_portfolio, load_portfolio, parse_portfolio


def test_generator_is_valid_and_deterministic(tmp_path: Path) -> None:
    a, b = generate(2, 40, seed=3), generate(2, 40, seed=3)
    assert a == b
    path = tmp_path / "p.yaml"
    dump_portfolio(a, path)
    portfolio = load_portfolio(path)
    assert [m.id for m in portfolio.malls] == ["M01", "M02"]
    assert sum(1 for _ in portfolio.merchants()) == 80
    # every merchant has its meter, plus 3 common-area meters per mall
    assert sum(1 for _ in portfolio.meters()) == 80 + 6
    # gateway ports are unique across the portfolio (they are real loopback listeners)
    ports = [g.port for mall in portfolio.malls for g in mall.gateways]
    assert len(ports) == len(set(ports))


def test_field_error_names_the_field() -> None:
    data = generate(1, 5)
    data["malls"][0]["merchants"][2]["leased_area_m2"] = -1
    with pytest.raises(ConfigError) as err:
        parse_portfolio(data, "mall.yaml")
    assert "mall.yaml" in str(err.value)
    assert "malls[0].merchants[2].leased_area_m2" in str(err.value)


def test_unknown_reference_names_the_field() -> None:
    data = generate(1, 5)
    data["malls"][0]["meters"][1]["gateway"] = "GW-NOPE"
    with pytest.raises(ConfigError) as err:
        parse_portfolio(data, "mall.yaml")
    assert "malls[0].meters[1].gateway: unknown gateway 'GW-NOPE'" in str(err.value)


def test_unknown_time_zone_and_extra_field() -> None:
    data = generate(1, 3)
    data["malls"][0]["timezone"] = "Mars/Olympus"
    data["malls"][0]["merchants"][0]["colour"] = "red"
    with pytest.raises(ConfigError) as err:
        parse_portfolio(data)
    text = str(err.value)
    assert "malls[0].timezone" in text and "Mars/Olympus" in text
    assert "malls[0].merchants[0].colour" in text


def test_broken_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("malls: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_portfolio(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_portfolio(tmp_path / "missing.yaml")


def test_worker_refuses_a_broken_config_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.worker import main

    data = generate(1, 2)
    data["malls"][0]["merchants"][0]["area"] = "NOWHERE"
    path = tmp_path / "broken.yaml"
    dump_portfolio(data, path)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml" in err and "malls[0].merchants[0].area: unknown area 'NOWHERE'" in err
