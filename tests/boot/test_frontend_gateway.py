"""The booted frontend against a stub gateway in the lab network: cache, probe gating, headers,
metrics. The stub runs on the host's loopback; QEMU forwards the lab gateway address to it."""

import json
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.boot


def get(frontend, path, headers=None, timeout=30):
    """(status, headers, body, seconds) of a request to the guest's port 80."""
    request = urllib.request.Request(f"http://127.0.0.1:{frontend.host_ports[80]}{path}",
                                     headers=headers or {})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read(), \
                time.monotonic() - started
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read(), time.monotonic() - started


def wait_for_gateway_state(frontend, state, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, headers, body, _ = get(frontend, "/okome/health")
        if json.loads(body)["gateway"] == state:
            return time.monotonic() - (deadline - timeout)
        time.sleep(0.5)
    raise AssertionError(f"the frontend never saw the gateway {state}")


def test_probe_timer_runs_from_boot(frontend):
    frontend.wait_for_unit("okome-gateway-probe.timer")
    frontend.wait_until_succeeds("test -s /var/lib/prometheus/node-exporter/okome_gateway.prom")


def test_cacheable_get_is_a_miss_then_a_hit_with_the_observability_headers(frontend):
    status, headers, _, _ = get(frontend, "/static/boot-test.js")
    assert status == 200 and headers["X-Cache-Status"] == "MISS"
    status, headers, _, _ = get(frontend, "/static/boot-test.js",
                                headers={"X-Request-ID": "boot-test-1"})
    assert status == 200 and headers["X-Cache-Status"] == "HIT"
    assert headers["X-Served-By"] == "frontend-a"
    assert headers["X-Request-ID"] == "boot-test-1"


def test_streaming_path_passes_through(frontend, stub_gateway):
    for _ in range(2):
        status, headers, body, _ = get(frontend, "/v1/echo")
        assert status == 200 and json.loads(body)["path"] == "/v1/echo"
        assert headers["X-Cache-Status"] == "NONE"  # never looked up in the cache
    assert len(stub_gateway.requests_for("/v1/echo")) >= 2


def test_gateway_outage_serves_stale_and_fast_503_then_recovers(frontend, stub_gateway):
    assert get(frontend, "/api/cacheable")[0] == 200
    time.sleep(stub_gateway.cacheable_max_age + 1)  # the cached copy is now expired

    stub_gateway.stop()
    try:
        wait_for_gateway_state(frontend, "down")
        status, headers, _, seconds = get(frontend, "/api/cacheable")
        assert status == 200 and headers["X-Cache-Status"] == "STALE"
        assert seconds < 1

        status, headers, body, seconds = get(frontend, "/v1/chat/completions")
        assert status == 503 and json.loads(body)["error"] == "gateway_unavailable"
        assert int(headers["Retry-After"]) > 0
        assert seconds < 1

        metrics = frontend.succeed("cat /var/lib/prometheus/node-exporter/okome_gateway.prom")
        assert "okome_gateway_up 0" in metrics
    finally:
        stub_gateway.start()

    wait_for_gateway_state(frontend, "up")
    status, _, body, _ = get(frontend, "/v1/echo")
    assert status == 200
