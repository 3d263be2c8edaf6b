"""infra.debian: the fast path when packages are there, and clear reasons when they cannot be installed."""

from __future__ import annotations

import shutil

import pytest

from infra import debian


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian machine")
def test_installed_packages_cost_nothing() -> None:
    assert debian.installed(["dpkg", "no-such-package-mallwatt"]) == {"dpkg": True, "no-such-package-mallwatt": False}
    assert debian.ensure_packages(["dpkg"]) == 0.0
    assert "dpkg" in debian._known_installed


def test_reasons_when_installing_is_impossible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debian, "installed", lambda names: dict.fromkeys(names, False))
    real_which = shutil.which
    monkeypatch.setattr(debian.shutil, "which", lambda name: None if name == "apt-get" else real_which(name))
    with pytest.raises(debian.DebianUnavailable, match="no apt-get"):
        debian.ensure_packages(["chromium-test-x"])
    monkeypatch.setattr(debian.shutil, "which", lambda name: None if name == "sudo" else "/usr/bin/" + name)
    monkeypatch.setattr(debian.os, "geteuid", lambda: 1000)
    with pytest.raises(debian.DebianUnavailable, match="not root and sudo is not installed"):
        debian.ensure_packages(["chromium-test-x"])
    assert debian.main(["chromium-test-x"]) == 1
