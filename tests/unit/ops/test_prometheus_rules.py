"""infra/prometheus/rules.yml and its promtool unit tests."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import pipelines.metrics  # noqa: F401  (declares the families)

PROM = Path(__file__).resolve().parents[3] / "infra" / "prometheus"
REQUIRED = {  # the list: lag growing, no readings from a gateway or mall, dead letters
    "MallwattConsumerLagGrowing", "MallwattGatewayDown", "MallwattNoReadingsFromMall",
    "MallwattDeadLettersRising", "MallwattRelayCommandUnconfirmed",
    "MallwattPaidMerchantStillTripped", "MallwattWatermarkStale", "MallwattProcessDown",
}


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROM / "rules.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def declared() -> set[str]:
    names = {"up"}
    for family in REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def test_rules_are_complete_and_read_declared_metrics() -> None:
    got = rules()
    names = [r["alert"] for r in got]
    assert len(names) == len(set(names)) and set(names) >= REQUIRED
    metrics = declared()
    for r in got:
        assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        assert "$value" not in str(r["annotations"])  # tests state annotations exactly
        used = set(re.findall(r"\b(mallwatt_\w+|up)(?=[{\[\s)]|$)", r["expr"]))
        assert used and used <= metrics, (r["alert"], used - metrics)


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    doc = yaml.safe_load((PROM / "rules_test.yml").read_text())
    assert doc["rule_files"] == ["rules.yml"]
    firing: set[str] = set()
    for test in doc["tests"]:
        cases = test["alert_rule_test"]
        for case in cases:
            if case["exp_alerts"]:
                firing.add(case["alertname"])
                for alert in case["exp_alerts"]:
                    assert alert["exp_labels"]["severity"] and alert["exp_annotations"]["summary"]
        quiet = any(not c["exp_alerts"] for c in cases) or all(
            len(c["exp_alerts"]) < len(test["input_series"]) for c in cases)
        assert quiet, test["name"]  # some input must not fire
        for series in test["input_series"]:
            assert re.fullmatch(r"\w+\{.*\}", series["series"]), series
            assert re.fullmatch(r"[-+x\d. _]+", series["values"]), series
    assert firing == {r["alert"] for r in rules()}


def promtool() -> str:
    """MALLWATT_PROMTOOL, else Debian's (package prometheus, installed by the project's own
    infra.monitoring.ensure_installed when missing, like chromium for the page test)."""
    if os.environ.get("MALLWATT_PROMTOOL"):
        return os.environ["MALLWATT_PROMTOOL"]
    from infra.monitoring import MonitoringError, ensure_installed

    try:
        return ensure_installed()["promtool"]
    except MonitoringError as exc:
        pytest.skip(f"promtool cannot be installed here: {exc}")


@pytest.mark.timeout(1800)  # a fresh machine installs the package first (apt-get)
def test_promtool_checks_and_unit_tests_pass() -> None:
    tool = promtool()
    for args in (["check", "rules", "rules.yml"], ["test", "rules", "rules_test.yml"]):
        proc = subprocess.run([tool, *args], cwd=PROM, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
