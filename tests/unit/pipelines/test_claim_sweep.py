"""The claim sweep forgets claims past the horizon in bounded slices, never the whole store at once."""

from pipelines.claiming import ClaimSweeper, encode_claim
from pipelines.core.claims import CLAIM_HORIZON_DAYS, DAY_MS, Claim

NEWEST_MS = 1_800_000_000_000
OLD_MS = NEWEST_MS - (CLAIM_HORIZON_DAYS + 1) * DAY_MS
RECENT_MS = NEWEST_MS - (CLAIM_HORIZON_DAYS - 1) * DAY_MS


def _store(old: int, recent: int) -> dict[bytes, bytes]:
    store = {}
    for i in range(old):
        store[f"pay:old{i}".encode()] = encode_claim(Claim("A1", "topup", 100, OLD_MS), [])
    for i in range(recent):
        store[f"pay:new{i}".encode()] = encode_claim(Claim("A1", "topup", 100, RECENT_MS), [])
    return store


def _sweeper(store: dict[bytes, bytes], budget: int, interval_s: float = 3600.0) -> ClaimSweeper:
    return ClaimSweeper(lambda: iter(list(store)), store.get, lambda k: store.pop(k, None), budget=budget,
                        pass_interval_s=interval_s)


def test_a_pass_forgets_exactly_the_expired_claims_in_budgeted_slices() -> None:
    store = _store(old=25, recent=30)
    sweeper = _sweeper(store, budget=10)
    forgotten = [sweeper.tick(NEWEST_MS, generation=1, now_s=t) for t in range(6)]
    assert sum(forgotten) == 25 and max(forgotten) <= 10
    assert sorted(store) == sorted(f"pay:new{i}".encode() for i in range(30))
    assert sweeper.passes_done == 1


def test_no_new_pass_before_the_interval_and_one_after_it() -> None:
    store = _store(old=3, recent=2)
    sweeper = _sweeper(store, budget=100, interval_s=60)
    assert sweeper.tick(NEWEST_MS, 1, now_s=0) == 3
    store[b"pay:late"] = encode_claim(Claim("A2", "topup", 5, OLD_MS), [])
    assert sweeper.tick(NEWEST_MS, 1, now_s=30) == 0  # the pass ended; the next waits its interval
    assert b"pay:late" in store
    assert sweeper.tick(NEWEST_MS, 1, now_s=61) == 1
    assert b"pay:late" not in store


def test_a_rebalance_ends_the_pass_and_nothing_happens_before_any_claim_time() -> None:
    store = _store(old=20, recent=0)
    sweeper = _sweeper(store, budget=5, interval_s=0)
    assert sweeper.tick(0, 1, now_s=0) == 0  # no claim seen yet: no "now" to measure from
    assert sweeper.tick(NEWEST_MS, 1, now_s=0) == 5
    assert sweeper.tick(NEWEST_MS, 2, now_s=1) == 5  # new generation: a fresh iterator, still bounded
    assert len(store) == 10
