"""Per-agent budgets against a real redis-server: exact under concurrency, per fixed window."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from okome_cache import Budgets, KeyKind, budget_key


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_budget_is_exact_under_concurrency(cache, inspector):
    budgets = Budgets(cache, clock=FakeClock(1_000_000.5))
    start = threading.Barrier(40)

    def spend_ten(_):
        start.wait()
        return [budgets.spend_requests("agent-1", limit=150, window_seconds=60).allowed
                for _ in range(10)]

    with ThreadPoolExecutor(40) as pool:
        decisions = [allowed for batch in pool.map(spend_ten, range(40)) for allowed in batch]

    assert decisions.count(True) == 150
    assert decisions.count(False) == 250
    counter = budget_key(KeyKind.RATE_BUDGET, "agent-1", "60s@999960")
    assert inspector.get(cache.redis_key(counter)) == b"150"


def test_a_refused_spend_takes_nothing(cache):
    budgets = Budgets(cache, clock=FakeClock(500.0))
    assert budgets.spend_writes("agent-2", limit=5, window_seconds=10, cost=3).allowed
    refused = budgets.spend_writes("agent-2", limit=5, window_seconds=10, cost=3)
    assert not refused.allowed and refused.used == 3
    last = budgets.spend_writes("agent-2", limit=5, window_seconds=10, cost=2)
    assert last.allowed and last.used == 5 and last.enforced


def test_a_new_window_starts_a_new_budget_and_the_old_one_expires_with_its_window(
        cache, inspector):
    clock = FakeClock(1_000_010.0)
    budgets = Budgets(cache, clock=clock)
    first = budgets.spend_requests("agent-3", limit=1, window_seconds=60)
    assert first.allowed and first.resets_in == pytest.approx(10.0)
    assert not budgets.spend_requests("agent-3", limit=1, window_seconds=60).allowed

    counter = cache.redis_key(budget_key(KeyKind.RATE_BUDGET, "agent-3", "60s@999960"))
    assert 0 < inspector.pttl(counter) <= 10_000

    clock.now = 1_000_020.0
    assert budgets.spend_requests("agent-3", limit=1, window_seconds=60).allowed


def test_agents_and_budget_kinds_are_counted_apart(cache):
    budgets = Budgets(cache, clock=FakeClock(42.0))
    assert budgets.spend_requests("a", limit=1, window_seconds=60).allowed
    assert budgets.spend_writes("a", limit=1, window_seconds=60).allowed
    assert budgets.spend_requests("b", limit=1, window_seconds=60).allowed
    assert not budgets.spend_requests("a", limit=1, window_seconds=60).allowed


def test_a_zero_budget_allows_nothing_and_bad_arguments_are_bugs(cache):
    budgets = Budgets(cache)
    assert not budgets.spend_requests("a", limit=0, window_seconds=60).allowed
    with pytest.raises(ValueError):
        budgets.spend_requests("a", limit=10, window_seconds=0)
    with pytest.raises(ValueError):
        budgets.spend_requests("a", limit=10, window_seconds=60, cost=0)
