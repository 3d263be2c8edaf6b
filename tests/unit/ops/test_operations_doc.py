"""docs/operations.md lists every declared metric and every alert rule."""

from __future__ import annotations

from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import pipelines.metrics  # noqa: F401

ROOT = Path(__file__).resolve().parents[3]


def test_every_metric_and_rule_is_documented() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    for family in REGISTRY.collect():
        if family.name.startswith("mallwatt_"):
            name = family.name + ("_total" if family.type == "counter" else "")
            assert f"`{name}`" in doc, name
    rules = yaml.safe_load((ROOT / "infra" / "prometheus" / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert f"| {rule['alert']} |" in doc, rule["alert"]
