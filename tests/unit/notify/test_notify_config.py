"""notify.yaml validation: errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from notify_helpers import config_data

from pipelines.notify import (
    NotifyConfigError,
    ProviderSettings,
    load_config,
    parse_config,
    register_provider_type,
)
from pipelines.notify.config import PROVIDER_TYPES, build_providers
from pipelines.notify.providers import WebhookNotifier


def error(data: dict) -> str:
    with pytest.raises(NotifyConfigError) as exc:
        parse_config(data, "notify.yaml")
    return str(exc.value)


def test_valid_config_builds_providers() -> None:
    config = parse_config(config_data())
    assert set(build_providers(config)) == {"sms", "voice", "ops"}


def test_errors_name_the_field() -> None:
    bad = config_data()
    bad["rate_limit"] = {"per_hour": -1}
    assert "rate_limit.per_hour" in error(bad)
    bad = config_data()
    bad["routes"][1]["min_severity"] = "LOUD"
    assert "routes[1].min_severity" in error(bad)
    bad = config_data()
    bad["routes"][0]["providers"] = ["nope"]
    assert "routes[0].providers: unknown provider 'nope'" in error(bad)
    bad = config_data()
    bad["providers"]["hook"] = {"type": "webhook", "url": "ftp://x", "secret": "s" * 32}
    assert "providers.hook.url" in error(bad)
    bad["providers"]["hook"] = {"type": "webhook", "url": "http://x"}
    assert "providers.hook: Value error, give exactly one of secret / secret_env" in error(bad)
    bad["providers"]["hook"] = {"type": "carrier-pigeon"}
    assert "providers.hook.type: unknown provider type 'carrier-pigeon'" in error(bad)
    bad = config_data(extra_key=1)
    assert "extra_key" in error(bad)


def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    data = config_data()
    data["providers"]["hook"] = {"type": "webhook", "url": "https://hooks.example.com/x",
                                 "secret_env": "NOTIFY_TEST_SECRET"}
    config = parse_config(data)
    with pytest.raises(NotifyConfigError, match="NOTIFY_TEST_SECRET"):
        build_providers(config)
    monkeypatch.setenv("NOTIFY_TEST_SECRET", "abc")
    with pytest.raises(NotifyConfigError, match="NOTIFY_TEST_SECRET.*has 3 bytes; at least 32"):
        build_providers(config)
    monkeypatch.setenv("NOTIFY_TEST_SECRET", "k" * 32)
    assert isinstance(build_providers(config)["hook"], WebhookNotifier)


LONG = "0123456789abcdef" * 2  # 32 bytes


@pytest.mark.parametrize(("entry", "words"), [
    ({"url": "http://hooks.example.com/x", "secret": LONG}, "plain http is refused"),
    ({"url": "http://hooks.example.com/x", "secret": LONG, "allow_loopback_http": True},
     "only to a loopback host"),
    ({"url": "https://169.254.169.254/latest/meta-data", "secret": LONG}, "link-local"),
    ({"url": "https://10.1.2.3/x", "secret": LONG}, "private"),
    ({"url": "https://[fd00::1]/x", "secret": LONG}, "private"),
    ({"url": "https://[::1]/x", "secret": LONG}, "loopback"),
    ({"url": "https://localhost/x", "secret": LONG}, "loopback"),
    ({"url": "https://user:pw@hooks.example.com/x", "secret": LONG}, "credentials in the URL"),
    ({"url": "https://hooks.example.com/x", "secret": "short"}, "providers.hook.secret"),
    ({"url": "https://hooks.example.com/x", "secret": ""}, "at least 32 bytes"),
])
def test_webhook_destinations_and_secrets_are_checked_at_load(entry: dict, words: str) -> None:
    data = config_data()
    data["providers"]["hook"] = {"type": "webhook", **entry}
    assert words in error(data)


def test_loopback_http_only_with_the_test_flag_and_secret_never_printed() -> None:
    data = config_data()
    data["providers"]["hook"] = {"type": "webhook", "url": "http://127.0.0.1:9/x", "secret": LONG,
                                 "allow_loopback_http": True}
    config = parse_config(data)
    settings = config.provider_settings()["hook"]
    assert LONG not in repr(settings) and LONG not in str(config) and LONG not in repr(config)
    assert isinstance(build_providers(config)["hook"], WebhookNotifier)


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(NotifyConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "notify.yaml"
    path.write_text("providers: [")
    with pytest.raises(NotifyConfigError, match="not valid YAML"):
        load_config(path)


def test_plugin_provider_type() -> None:
    class PagerSettings(ProviderSettings):
        type: str = "pager"
        number: str

    made: list[str] = []

    def factory(name: str, s: PagerSettings) -> object:
        made.append(s.number)
        return object()

    register_provider_type("pager", PagerSettings, factory)  # type: ignore[arg-type]
    try:
        data = config_data()
        data["providers"]["pg"] = {"type": "pager", "channel": "voice"}
        assert "providers.pg.number" in error(data)
        data["providers"]["pg"]["number"] = "42"
        build_providers(parse_config(data))
        assert made == ["42"]
    finally:
        PROVIDER_TYPES.pop("pager")


ROOT = Path(__file__).resolve().parents[3]


def test_the_documented_example_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    import yaml

    doc = (ROOT / "docs" / "alerts-and-load-control.md").read_text()
    section = doc.split("### notify.yaml", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    config = parse_config(yaml.safe_load(block.group(1)), "doc example")
    assert {"sms-gateway", "voice-gateway", "app-push", "ops-log"} == set(config.providers)
    monkeypatch.setenv("MALLWATT_SMS_SECRET", "x" * 32)
    monkeypatch.setenv("MALLWATT_VOICE_SECRET", "y" * 32)
    assert len(build_providers(config)) == 4


def test_documented_load_policies_parse() -> None:
    import re

    import yaml

    from pipelines.loadcontrol import LoadPolicy

    doc = (ROOT / "docs" / "alerts-and-load-control.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", doc.split("### Policy settings", 1)[1], re.S)
    assert block is not None
    policies = {k: LoadPolicy.model_validate(v) for k, v in yaml.safe_load(block.group(1)).items()}
    assert policies["dormitory"].restore == "manual" and policies["standard"].banned[0].min_pf == 0.95


def test_cli_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from pipelines.notify.service import main

    good = tmp_path / "notify.yaml"
    good.write_text(yaml.safe_dump(config_data()))
    assert main(["--config", str(good), "--check"]) == 0
    assert "ok (3 provider(s)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config_data(rate_limit={"per_hour": 0})))
    assert main(["--config", str(bad), "--check"]) == 2
    assert "rate_limit.per_hour" in capsys.readouterr().err
