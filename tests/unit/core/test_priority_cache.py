"""near_relay looks each (policy, flags) threshold up once: it must answer as the rule itself."""

from __future__ import annotations

import random

from pipelines.core import priority
from pipelines.core.models import WalletPolicy
from pipelines.core.priority import near_relay, relay_level
from pipelines.core.wallet import AccountState
from tests.unit.core.billing_helpers import make_ctx


def _by_the_rule(s: AccountState, ctx: object, margin: int) -> bool:
    """The module doc's rule, computed for the account alone."""
    if s.deferred or s.warn_pending:
        return True
    level = relay_level(s, ctx)  # type: ignore[arg-type]
    if level is None:
        return False
    alerts = [lv for lv in ctx.accounts[s.account_id].policy.alert_levels if lv > level]  # type: ignore[attr-defined]
    return s.balance <= (min(alerts) if alerts else level + margin)


def test_cached_thresholds_answer_as_the_rule() -> None:
    rng = random.Random(7)
    for _ in range(60):  # new policy objects each time: a reused id must not return another's threshold
        cutoff = rng.choice([0, -500, -3000])
        policy = WalletPolicy(alert_levels=rng.sample([8000, 5000, 2500, 1000, 200], rng.randint(0, 3)), cutoff=cutoff,
                              warning_trip_level=rng.choice([None, cutoff + 700, cutoff + 4000]),
                              protected=rng.random() < 0.2)
        ctx = make_ctx(policy=policy)
        for _ in range(40):
            s = AccountState(account_id="a1", balance=rng.randint(-5000, 10_000), warning_fired=rng.random() < 0.4,
                             relay=rng.choice(["connected", "tripped"]), trip_reason=rng.choice([None, "credit", "warning"]),
                             deferred=rng.random() < 0.05, warn_pending=rng.random() < 0.05)
            margin = rng.choice([priority.MARGIN_MINOR, 0, 250])
            assert near_relay(s, ctx, margin) == _by_the_rule(s, ctx, margin), (policy, s, margin)
