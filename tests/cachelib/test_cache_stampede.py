"""Get, set and get-or-compute against a real redis-server: one computation per missing key."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from okome_cache import (
    KeyKind,
    agent_keys_key,
    content_hash,
    health_key,
    model_meta_key,
    planner_key,
    rag_key,
    tools_key,
    ttl_range,
)
from okome_cache.agents import AgentKeys

REPO = content_hash("repo")


class CountingCompute:
    """A slow computation that counts how often it runs."""

    def __init__(self, value, seconds: float = 0.0):
        self.value, self.seconds, self.calls = value, seconds, 0
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls += 1
        time.sleep(self.seconds)
        return self.value


def all_at_once(callers: int, call):
    """Run `call` in `callers` threads released together; their results, in order."""
    start = threading.Barrier(callers)

    def one(_):
        start.wait()
        return call()

    with ThreadPoolExecutor(callers) as pool:
        return list(pool.map(one, range(callers)))


def test_values_round_trip_as_json(cache):
    key = model_meta_key("qwen2.5")
    assert cache.get(key) is None and cache.get(key, default="none") == "none"
    assert cache.set(key, {"context": 32768, "tags": ["code"], "ok": True})
    assert cache.get(key) == {"context": 32768, "tags": ["code"], "ok": True}
    assert cache.delete(key) and cache.get(key) is None


def test_a_value_that_is_not_json_is_the_callers_bug(cache):
    with pytest.raises(TypeError):
        cache.set(tools_key("1"), object())


def test_many_callers_missing_one_key_cause_exactly_one_computation(cache):
    compute = CountingCompute({"plan": ["step"]}, seconds=0.3)
    key = planner_key("qwen2.5", "same prompt", "default", REPO)

    results = all_at_once(32, lambda: cache.get_or_compute(key, compute))

    assert compute.calls == 1
    assert results == [{"plan": ["step"]}] * 32
    assert cache.get(key) == {"plan": ["step"]}


def test_later_callers_read_the_stored_value(cache):
    compute = CountingCompute([1, 2, 3])
    key = tools_key("2.0")
    assert [cache.get_or_compute(key, compute) for _ in range(5)] == [[1, 2, 3]] * 5
    assert compute.calls == 1


def test_a_failing_computation_reaches_its_caller_and_frees_the_key(cache):
    key = tools_key("broken")

    def fail():
        raise RuntimeError("gateway said no")

    with pytest.raises(RuntimeError, match="gateway said no"):
        cache.get_or_compute(key, fail)
    started = time.monotonic()
    assert cache.get_or_compute(key, CountingCompute("fine")) == "fine"
    assert time.monotonic() - started < 0.5, "the lock of the failed computation was left held"


def test_a_key_near_expiry_is_recomputed_once_while_others_get_the_previous_value(
        cache, inspector):
    key = tools_key("3.0")
    name = cache.redis_key(key)
    inspector.set(name, '"previous"', px=int(ttl_range(KeyKind.TOOLS).refresh_window * 500))
    compute = CountingCompute("next", seconds=0.5)

    def timed():
        started = time.monotonic()
        return cache.get_or_compute(key, compute), time.monotonic() - started

    results = all_at_once(16, timed)

    assert compute.calls == 1
    values = [value for value, _ in results]
    assert values.count("next") == 1 and values.count("previous") == 15
    assert all(seconds < 0.3 for value, seconds in results if value == "previous")
    assert cache.get(key) == "next"
    assert inspector.ttl(name) >= ttl_range(KeyKind.TOOLS).low - 1


def test_a_waiter_gives_up_after_its_bound_and_computes_itself(cache):
    key = rag_key("repo", content_hash("chunk"))
    slow = CountingCompute("slow", seconds=1.0)
    holder = threading.Thread(target=cache.get_or_compute, args=(key, slow))
    holder.start()
    time.sleep(0.1)

    started = time.monotonic()
    quick = CountingCompute("quick")
    assert cache.get_or_compute(key, quick, wait_seconds=0.2) == "quick"
    assert time.monotonic() - started < 0.5
    assert quick.calls == 1
    holder.join()


def test_a_lock_left_by_a_dead_holder_lapses_and_one_waiter_takes_over(make_cache, inspector):
    cache = make_cache(lock_seconds=0.3)
    key = model_meta_key("orphan")
    inspector.set(f"okome:v{cache.namespace_version}:lock:{key.path}", "dead-holder", px=300)
    compute = CountingCompute("recovered", seconds=0.1)

    results = all_at_once(8, lambda: cache.get_or_compute(key, compute))

    assert compute.calls == 1
    assert results == ["recovered"] * 8


def test_a_foreign_value_is_treated_as_missing(cache, inspector):
    key = tools_key("foreign")
    inspector.set(cache.redis_key(key), b"\xff not json", ex=60)
    assert cache.get(key) is None
    assert cache.get_or_compute(key, CountingCompute("mine")) == "mine"


@pytest.mark.parametrize("key", [
    model_meta_key("m"), planner_key("m", "p", "t", REPO), rag_key("r", content_hash("c")),
    tools_key("1"), health_key("frontend-a")], ids=lambda key: key.kind.value)
def test_stored_ttls_fall_inside_the_tables_range(cache, inspector, key):
    cache.set(key, "v")
    ttl = inspector.ttl(cache.redis_key(key))
    row = ttl_range(key.kind)
    assert row.low - 1 <= ttl <= row.high


def test_ttls_of_keys_written_together_are_spread(cache, inspector):
    ttls = set()
    for i in range(50):
        key = planner_key("m", f"prompt {i}", "t", REPO)
        cache.get_or_compute(key, lambda: "answer")
        ttls.add(inspector.ttl(cache.redis_key(key)))
    assert len(ttls) > 25


def test_bumping_the_namespace_version_invalidates_everything(make_cache, inspector):
    old = make_cache(namespace_version=900)
    new = make_cache(namespace_version=901)
    key = model_meta_key("m")
    old.set(key, "old")
    assert new.get(key) is None
    assert new.get_or_compute(key, lambda: "new") == "new"
    assert old.get(key) == "old"
    assert inspector.get("okome:v901:model_meta:m") == b'"new"'


def test_agent_keys_load_once_never_expire_and_can_be_forgotten(cache, inspector):
    agents = AgentKeys(cache)
    load = CountingCompute({"keys": ["k1"]}, seconds=0.2)

    assert all_at_once(8, lambda: agents.lookup("agent-7", load)) == [{"keys": ["k1"]}] * 8
    assert load.calls == 1
    assert inspector.ttl(cache.redis_key(agent_keys_key("agent-7"))) == -1

    assert agents.store("agent-7", {"keys": ["k2"]})
    assert agents.lookup("agent-7", load) == {"keys": ["k2"]}
    assert agents.forget("agent-7")
    assert agents.lookup("agent-7", CountingCompute("reloaded")) == "reloaded"
