"""When redis is stopped, slow or refuses a command, callers still get computed values, fast."""

import socket
import threading
import time

import pytest

from okome_cache import Budgets, model_meta_key, tools_key
from okome_cache.agents import AgentKeys


def test_with_redis_stopped_calls_return_computed_values_quickly(make_cache, own_redis_server):
    cache = make_cache(own_redis_server)
    key = tools_key("1")
    assert cache.get_or_compute(key, lambda: "cached") == "cached"
    own_redis_server.stop()

    started = time.monotonic()
    values = [cache.get_or_compute(key, lambda: "computed") for _ in range(200)]
    elapsed = time.monotonic() - started

    assert values == ["computed"] * 200
    assert elapsed < 1.0
    assert cache.get(key, default="miss") == "miss"
    assert cache.set(key, "x") is False and cache.delete(key) is False
    assert AgentKeys(cache).lookup("agent", lambda: "from source") == "from source"
    decision = Budgets(cache).spend_requests("agent", limit=0, window_seconds=60)
    assert decision.allowed and not decision.enforced and decision.used is None


def test_the_cache_is_used_again_once_redis_is_back(make_cache, own_redis_server):
    cache = make_cache(own_redis_server, retry_after=0.2)
    own_redis_server.stop()
    assert cache.get_or_compute(tools_key("1"), lambda: "computed") == "computed"

    own_redis_server.start()
    time.sleep(0.3)
    assert cache.set(tools_key("1"), "stored")
    assert cache.get(tools_key("1")) == "stored"


@pytest.fixture
def silent_server():
    """A TCP port on 127.0.0.1 that accepts connections and never answers: a hung redis."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    listener.close()


def test_a_hung_redis_costs_one_timeout_then_is_bypassed(make_cache, silent_server):
    cache = make_cache(port=silent_server, timeout=0.1, retry_after=5.0)

    started = time.monotonic()
    assert cache.get_or_compute(model_meta_key("m"), lambda: "first") == "first"
    first_call = time.monotonic() - started

    started = time.monotonic()
    values = [cache.get_or_compute(model_meta_key("m"), lambda: "next") for _ in range(100)]
    later_calls = time.monotonic() - started

    assert first_call < 0.5
    assert values == ["next"] * 100 and later_calls < 0.1


def test_a_refused_command_degrades_without_raising(make_cache, metrics_login):
    read_only = make_cache(**metrics_login)
    assert read_only.get_or_compute(tools_key("1"), lambda: "computed") == "computed"
    assert read_only.set(tools_key("1"), "x") is False
    assert Budgets(read_only).spend_writes("a", limit=1, window_seconds=60).enforced is False
