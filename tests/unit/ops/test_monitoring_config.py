"""infra/monitoring.py: the files `stack up --monitoring` writes, checked by Debian's promtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from infra import monitoring as mon

COMPONENTS = ["collector", "forwarder", "notify", "portal", "sink", "watch", "worker"]


def config(tmp_path: Path, **env: str) -> mon.MonitoringConfig:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MALLWATT_MONITORING_DIR", str(tmp_path))
        for k, v in env.items():
            mp.setenv(k, v)
        return mon.MonitoringConfig.from_env()


def test_one_job_per_component_named_as_the_rules_expect(tmp_path: Path) -> None:
    cfg = config(tmp_path, MALLWATT_PROMETHEUS_PORT="19590", MALLWATT_SCRAPE_INTERVAL="2s")
    doc = mon.scrape_config(cfg, COMPONENTS)
    assert [j["job_name"] for j in doc["scrape_configs"]] == [f"mallwatt-{c}" for c in COMPONENTS]
    assert doc["global"]["scrape_interval"] == doc["global"]["evaluation_interval"] == "2s"
    assert doc["global"]["scrape_timeout"] == "2s"  # never longer than the interval
    assert doc["rule_files"] == [str(tmp_path / "rules.yml")]
    assert cfg.prometheus_url == "http://127.0.0.1:19590"
    assert mon.targets("worker", 9464) == [{"targets": ["127.0.0.1:9464"], "labels": {"component": "worker"}}]


def test_bad_settings_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(mon.MonitoringError, match="MALLWATT_ALERT_FOR"):
        config(tmp_path, MALLWATT_ALERT_FOR="soon")
    with pytest.raises(mon.MonitoringError, match="MALLWATT_ALERTMANAGER_PORT"):
        config(tmp_path, MALLWATT_ALERTMANAGER_PORT="x")


def test_alert_for_override_changes_every_for_and_nothing_else() -> None:
    original = yaml.safe_load(mon.rules_text(None))
    short = yaml.safe_load(mon.rules_text("3s"))
    rules = [r for g in original["groups"] for r in g["rules"]]
    fast = [r for g in short["groups"] for r in g["rules"]]
    assert len(rules) == len(fast) > 5
    assert {r["for"] for r in fast} == {"3s"} and {r["for"] for r in rules} != {"3s"}
    assert [r["expr"] for r in rules] == [r["expr"] for r in fast]


def test_alertmanager_webhook_only_when_given(tmp_path: Path) -> None:
    assert "webhook_configs" not in mon.alertmanager_config(config(tmp_path))["receivers"][0]
    hooked = mon.alertmanager_config(config(tmp_path, MALLWATT_ALERT_WEBHOOK="http://127.0.0.1:1/hook"))
    assert hooked["receivers"][0]["webhook_configs"][0]["url"] == "http://127.0.0.1:1/hook"


@pytest.mark.timeout(1800)  # a fresh machine installs the packages first (apt-get)
def test_written_files_pass_promtool_and_amtool(tmp_path: Path) -> None:
    try:
        tools = mon.ensure_installed()
    except mon.MonitoringError as exc:
        pytest.skip(str(exc))
    cfg = config(tmp_path, MALLWATT_ALERT_FOR="5s", MALLWATT_ALERT_WEBHOOK="http://127.0.0.1:1/hook")
    (tmp_path / "targets").mkdir()
    (tmp_path / "rules.yml").write_text(mon.rules_text(cfg.alert_for))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(mon.scrape_config(cfg, COMPONENTS)))
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(mon.alertmanager_config(cfg)))
    for args in ([tools["promtool"], "check", "config", "prometheus.yml"],
                 ["amtool", "check-config", "alertmanager.yml"]):
        proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
