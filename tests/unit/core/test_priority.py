"""Which accounts a step bills first (pipelines.core.priority)."""

from __future__ import annotations

from pipelines.core.models import WalletPolicy
from pipelines.core.priority import MARGIN_MINOR, near_relay, relay_level
from pipelines.core.wallet import AccountState
from tests.unit.core.billing_helpers import make_ctx


def _near(policy: WalletPolicy, **state: object) -> bool:
    return near_relay(AccountState(account_id="a1", **state), make_ctx(policy=policy))  # type: ignore[arg-type]


def test_an_account_at_or_below_its_lowest_alert_level_is_near() -> None:
    policy = WalletPolicy(alert_levels=[5000, 1000], cutoff=0)
    assert _near(policy, balance=1000) and _near(policy, balance=3) and _near(policy, balance=-5)
    assert not _near(policy, balance=1001) and not _near(policy, balance=4000)


def test_the_alert_level_counts_only_above_the_relay_level() -> None:
    # the warning trip at 2000 comes before the 1000 alert: the 5000 alert is the one above it
    policy = WalletPolicy(alert_levels=[5000, 1000], warning_trip_level=2000, cutoff=0)
    assert _near(policy, balance=4500)
    assert not _near(policy, balance=4500, warning_fired=True)  # then the cut-off is next: 1000
    assert _near(policy, balance=900, warning_fired=True)


def test_without_alert_levels_a_margin_above_the_relay_level() -> None:
    policy = WalletPolicy(alert_levels=[], cutoff=-500)
    assert _near(policy, balance=-500 + MARGIN_MINOR) and not _near(policy, balance=-500 + MARGIN_MINOR + 1)


def test_no_relay_level_to_reach_is_not_near_unless_a_trip_waits() -> None:
    protected = WalletPolicy(alert_levels=[1000], protected=True)
    assert relay_level(AccountState(account_id="a1"), make_ctx(policy=protected)) is None
    assert not _near(protected, balance=0)
    assert _near(protected, balance=50_000, deferred=True)
    plain = WalletPolicy(alert_levels=[1000])
    assert not _near(plain, balance=-10, relay="tripped", trip_reason="credit")  # already open
    assert _near(plain, balance=50_000, warn_pending=True)
