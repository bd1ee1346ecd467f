"""The frontend's nginx configuration, run by Debian's nginx on this machine against the stub
gateway on loopback: caching, stale serving, health-gated failover, streaming, limits, canary,
key version, and the helper scripts (probe, cache metrics, pre-warm).
"""

import concurrent.futures
import http.client
import json
import socket
import time

import pytest

from builder.site import load_site
from tests.frontend_rootfs import render_frontend_rootfs, stray_image_paths
from tests.host.nginx_fixtures import LOOPBACK, HostNginx, frontend_test_site
from tests.host.stub_gateway import generated_asset

OBSERVABILITY_HEADERS = ("X-Cache-Status", "X-Request-ID", "X-Served-By", "X-Upstream-Status",
                         "X-Upstream-Response-Time", "X-Gateway-State")
SERVED_FROM_CACHE = ("STALE", "UPDATING")


def expire(seconds: float = 2.1) -> None:
    """Wait until an entry cached with the tests' 1 s static TTL has expired: nginx counts
    validity in whole seconds, so "1 s" lasts up to 2."""
    time.sleep(seconds)


def mark_gateway_down(frontend: HostNginx) -> None:
    """Run the real probe until it has given its verdict (as its timer would, faster)."""
    for _ in range(frontend.site.frontend.probe_failures_to_down):
        frontend.run_script("okome-gateway-probe")
    assert frontend.gateway_down_flag.exists()


def assert_observable(response, node=socket.gethostname()) -> None:
    for header in OBSERVABILITY_HEADERS:
        assert response.headers[header], f"{header} missing on a {response.status}"
    assert response.headers["X-Served-By"] == node


# --- the configuration itself ---------------------------------------------------------------

def test_rendered_configuration_passes_nginx_t_and_stays_in_its_root(frontend):
    result = frontend.test_config()
    assert result.returncode == 0, result.stderr
    assert stray_image_paths(frontend.root) == []


def test_the_production_site_renders_a_configuration_nginx_accepts(tmp_path):
    # Only `nginx -t`: nothing is started, and nothing is sent to the production gateway.
    production = HostNginx(load_site("production"), tmp_path / "rootfs")
    render_frontend_rootfs(production.site, production.root)

    result = production.test_config()

    assert result.returncode == 0, result.stderr


def test_a_broken_template_value_fails_nginx_t_with_nginx_message(frontend):
    conf = frontend.root / "etc/nginx/conf.d/okome-frontend.conf"
    conf.write_text(conf.read_text().replace("proxy_cache_lock on;", "proxy_cache_lock maybe;"))
    result = frontend.test_config()
    assert result.returncode != 0
    assert "proxy_cache_lock" in result.stderr and "okome-frontend.conf" in result.stderr


# --- caching --------------------------------------------------------------------------------

def test_static_asset_is_a_miss_then_a_hit_served_without_the_gateway(frontend, stub_gateway):
    first = frontend.request("/static/app.js")
    second = frontend.request("/static/app.js")

    assert (first.status, first.headers["X-Cache-Status"]) == (200, "MISS")
    assert (second.status, second.headers["X-Cache-Status"]) == (200, "HIT")
    assert second.body == first.body == generated_asset("app.js")
    assert len(stub_gateway.requests_for("/static/app.js")) == 1
    assert first.headers["X-Upstream-Status"] == "200"
    assert float(first.headers["X-Upstream-Response-Time"]) < 1
    assert second.headers["X-Upstream-Status"] == "-"
    assert_observable(first)
    assert_observable(second)


def test_what_the_gateway_marks_cacheable_is_cached_and_the_rest_is_not(frontend, stub_gateway):
    marked = [frontend.request("/api/cacheable").headers["X-Cache-Status"] for _ in range(2)]
    unmarked = [frontend.request("/api/profile").headers["X-Cache-Status"] for _ in range(2)]

    assert marked == ["MISS", "HIT"]
    assert unmarked == ["MISS", "MISS"]
    assert len(stub_gateway.requests_for("/api/profile")) == 2


def test_answers_to_authenticated_requests_are_stored_only_when_public(frontend):
    auth = {"Authorization": "Bearer secret"}
    frontend.request("/api/cacheable?public=0", headers=auth)
    frontend.request("/api/cacheable", headers=auth)

    assert frontend.request("/api/cacheable?public=0").headers["X-Cache-Status"] == "MISS"
    assert frontend.request("/api/cacheable").headers["X-Cache-Status"] == "HIT"


def test_request_id_is_passed_through_or_generated(frontend, stub_gateway):
    given = frontend.request("/api/echo", headers={"X-Request-ID": "agent-7.req:42"})
    generated = frontend.request("/api/echo")
    hostile = frontend.request("/api/echo", headers={"X-Request-ID": "a b\"c"})

    assert given.headers["X-Request-ID"] == "agent-7.req:42"
    assert given.json()["headers"]["X-Request-ID"] == "agent-7.req:42"
    assert len(generated.headers["X-Request-ID"]) == 32
    assert generated.json()["headers"]["X-Request-ID"] == generated.headers["X-Request-ID"]
    assert hostile.headers["X-Request-ID"] != "a b\"c"


def test_access_log_is_structured_with_cache_status_and_timings(frontend):
    frontend.request("/static/log.js", headers={"X-Okome-Agent": "planner"})
    frontend.request("/static/log.js")

    entries = [e for e in frontend.access_log_entries() if e["uri"] == "/static/log.js"]
    assert [e["cache"] for e in entries] == ["MISS", "HIT"]
    assert entries[0]["agent"] == "planner"
    assert entries[0]["upstream_status"] == "200"
    assert float(entries[0]["upstream_response_time"]) >= 0
    assert entries[0]["request_id"] and isinstance(entries[0]["request_time"], float)


# --- outages --------------------------------------------------------------------------------

@pytest.mark.parametrize("outage", ["stopped", "blackholed"])
def test_stale_is_served_when_the_gateway_goes_away(frontend, stub_gateway, outage):
    fresh = frontend.request("/static/stale.js")
    frontend.request("/static/stale.js")
    expire()
    stub_gateway.stop() if outage == "stopped" else stub_gateway.blackhole()

    limit = frontend.site.frontend.cache_connect_timeout_s + 1
    for _ in range(3):
        stale = frontend.request("/static/stale.js")
        assert stale.status == 200
        assert stale.headers["X-Cache-Status"] in SERVED_FROM_CACHE
        assert stale.body == fresh.body
        assert stale.seconds < limit
        assert_observable(stale)


def test_an_uncached_path_during_an_outage_is_a_json_503_within_the_connect_timeout(
        frontend, stub_gateway):
    stub_gateway.blackhole()

    response = frontend.request("/static/never-cached.js")

    assert response.status == 503
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"] == "gateway_unavailable"
    assert response.seconds < frontend.site.frontend.cache_connect_timeout_s + 1
    assert_observable(response)


def test_probe_gates_the_gateway_down_and_one_good_probe_brings_it_back(frontend, stub_gateway):
    stub_gateway.health_up = False
    frontend.run_script("okome-gateway-probe")
    assert not frontend.gateway_down_flag.exists(), "one failed probe must not be enough"
    frontend.run_script("okome-gateway-probe")

    down = frontend.request("/okome/health")
    assert down.json()["gateway"] == "down" and down.headers["X-Gateway-State"] == "down"
    assert frontend.request("/v1/models").status == 503
    metrics = frontend.root / "var/lib/prometheus/node-exporter/okome_gateway.prom"
    assert "okome_gateway_up 0" in metrics.read_text()

    stub_gateway.health_up = True
    frontend.run_script("okome-gateway-probe")

    assert frontend.request("/okome/health").json()["gateway"] == "up"
    assert frontend.request("/v1/models").status == 200
    assert "okome_gateway_up 1" in metrics.read_text()


def test_while_gated_down_cache_answers_at_once_and_api_gets_a_fast_503(frontend, stub_gateway):
    cached = frontend.request("/static/gated.js")
    expire()
    stub_gateway.blackhole()
    mark_gateway_down(frontend)

    stale = frontend.request("/static/gated.js")
    missing = frontend.request("/static/not-cached.js")
    api = frontend.request("/v1/chat/completions", method="POST", body=b'{"stream": true}',
                           headers={"Content-Type": "application/json"})

    assert stale.status == 200 and stale.body == cached.body
    assert stale.headers["X-Cache-Status"] in SERVED_FROM_CACHE
    assert stale.seconds < 0.3, "served stale without waiting for the gateway"
    interval = str(frontend.site.frontend.probe_interval_s)
    for response in (missing, api):
        assert response.status == 503
        assert response.seconds < 0.3
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["Retry-After"] == interval
        assert response.json()["error"] == "gateway_unavailable"
        assert response.headers["X-Gateway-State"] == "down"
        assert_observable(response)


# --- streaming ------------------------------------------------------------------------------

def read_event_stream(frontend: HostNginx, path: str, headers: dict) -> tuple:
    """POST `path`; returns (seconds to the response headers, response, [(seconds late, event)]).

    `seconds late` is the time between the stub writing an event and this client reading it.
    """
    started = time.monotonic()
    connection = http.client.HTTPConnection(LOOPBACK, frontend.port, timeout=10)
    connection.request("POST", path, body=b'{"stream": true}',
                       headers={"Content-Type": "application/json", **headers})
    response = connection.getresponse()
    header_seconds = time.monotonic() - started
    events = []
    while line := response.readline():
        if line.startswith(b"data: "):
            event = json.loads(line[len(b"data: "):])
            events.append((time.time() - event["sent"], event, time.monotonic() - started))
    connection.close()
    return header_seconds, response, events


@pytest.mark.parametrize("accept_encoding", [None, "gzip"])
@pytest.mark.parametrize("stream_path", ["/v1/chat/stream", "/api/ollama/stream"])
def test_events_are_passed_on_as_they_are_sent(frontend, stream_path, accept_encoding):
    headers = {"Accept-Encoding": accept_encoding} if accept_encoding else {}

    header_seconds, response, events = read_event_stream(
        frontend, f"{stream_path}?events=5&interval=0.2", headers)

    assert response.status == 200
    assert header_seconds < 1
    assert response.headers["Content-Encoding"] is None
    assert response.headers["X-Cache-Status"] == "NONE"
    assert [event["seq"] for _, event, _ in events] == list(range(5))
    assert events[0][2] < 1, "first event within a second"
    lateness = [late for late, _, _ in events]
    assert max(lateness) < 0.1, f"events held back: {lateness}"


def test_streams_are_capped_per_agent(frontend):
    agent = {"X-Okome-Agent": "planner", "Content-Type": "application/json"}
    cap = frontend.site.frontend.streams_per_agent
    open_streams = []
    for _ in range(cap):
        connection = http.client.HTTPConnection(LOOPBACK, frontend.port, timeout=10)
        connection.request("POST", "/v1/stream?events=10&interval=0.2", body=b"{}",
                           headers=agent)
        assert connection.getresponse().status == 200
        open_streams.append(connection)

    over = frontend.request("/v1/stream?events=1&interval=0", method="POST", body=b"{}",
                            headers=agent)
    other_agent = frontend.request("/v1/stream?events=1&interval=0", method="POST",
                                   body=b"{}", headers={"X-Okome-Agent": "reviewer"})
    for connection in open_streams:
        connection.close()

    assert over.status == 429 and over.headers["Retry-After"] == "1"
    assert other_agent.status == 200


def test_websocket_upgrade_and_keep_alive_reach_the_gateway_over_http_1_1(frontend):
    upgrade = frontend.request("/v1/echo", headers={"Upgrade": "websocket",
                                                    "Connection": "Upgrade"}).json()
    plain = frontend.request("/v1/echo").json()

    assert upgrade["version"] == plain["version"] == "HTTP/1.1"
    assert upgrade["headers"]["Upgrade"] == "websocket"
    assert upgrade["headers"]["Connection"].lower() == "upgrade"
    assert "Connection" not in plain["headers"], "an empty Connection keeps the gateway alive"


# --- limits ---------------------------------------------------------------------------------

def test_a_burst_gets_429_with_retry_after_while_health_stays_200(frontend):
    agent = {"X-Okome-Agent": "flood"}
    burst = frontend.site.frontend.agent_burst + 10

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: frontend.request("/api/profile", headers=agent),
                                  range(burst)))
        health = [frontend.request("/okome/health", headers=agent) for _ in range(burst)]
        gateway_health = frontend.request("/health", headers=agent)

    limited = [r for r in responses if r.status == 429]
    assert limited, "the burst was never limited"
    assert {r.status for r in responses} <= {200, 429}
    assert all(r.headers["Retry-After"] == "1" for r in limited)
    assert limited[0].json()["error"] == "rate_limited"
    assert_observable(limited[0])
    assert {r.status for r in health} == {200}
    assert gateway_health.status == 200


# --- cache policy ---------------------------------------------------------------------------

def test_key_version_bump_misses_without_touching_the_disk(frontend, stub_gateway):
    frontend.request("/static/versioned.js")
    assert frontend.request("/static/versioned.js").headers["X-Cache-Status"] == "HIT"
    files_before = sorted(p for p in frontend.cache_dir.rglob("*") if p.is_file())

    bumped = frontend.site.frontend.cache_key_version + 1
    frontend.reload(frontend_test_site(frontend.site, stub_gateway.port, frontend.port,
                                       cache_key_version=bumped))

    assert sorted(p for p in frontend.cache_dir.rglob("*") if p.is_file()) == files_before
    assert frontend.request("/static/versioned.js").headers["X-Cache-Status"] == "MISS"
    assert frontend.request("/static/versioned.js").headers["X-Cache-Status"] == "HIT"


def test_canary_policy_by_header_or_cookie_is_named_in_the_response(frontend, stub_gateway):
    frontend.request("/static/canary.js")
    settings = frontend.site.frontend

    bypass = frontend.request("/static/canary.js", headers={settings.canary_header: "bypass"})
    refresh = frontend.request("/static/canary.js",
                               headers={"Cookie": f"{settings.canary_cookie}=refresh"})
    normal = frontend.request("/static/canary.js")

    assert (bypass.headers["X-Cache-Status"], bypass.headers["X-Cache-Policy"]) == \
        ("BYPASS", "bypass")
    assert (refresh.headers["X-Cache-Status"], refresh.headers["X-Cache-Policy"]) == \
        ("BYPASS", "refresh")
    assert normal.headers["X-Cache-Status"] == "HIT" and normal.headers["X-Cache-Policy"] is None
    assert len(stub_gateway.requests_for("/static/canary.js")) == 3


# --- helper scripts -------------------------------------------------------------------------

def test_cache_metrics_count_the_access_log_incrementally(frontend):
    metrics = frontend.root / "var/lib/prometheus/node-exporter/okome_cache.prom"
    frontend.request("/static/metrics.js")
    frontend.request("/static/metrics.js")
    frontend.run_script("okome-cache-metrics")
    first = metrics.read_text()

    frontend.request("/static/metrics.js")
    frontend.run_script("okome-cache-metrics")
    second = metrics.read_text()

    assert 'okome_cache_requests_total{status="MISS"} 1' in first
    assert 'okome_cache_requests_total{status="HIT"} 1' in first
    assert "okome_cache_hit_ratio 0.5000" in first
    assert 'okome_cache_requests_total{status="HIT"} 2' in second
    assert 'okome_cache_requests_total{status="MISS"} 1' in second


def test_prewarm_refreshes_the_most_requested_cacheable_urls(frontend, stub_gateway):
    for _ in range(3):
        frontend.request("/static/popular.js")
    frontend.request("/static/rare.js")
    expire()

    frontend.run_script("okome-prewarm", OKOME_PREWARM_TOP="1")

    deadline = time.monotonic() + 3
    while len(stub_gateway.requests_for("/static/popular.js")) < 2:
        assert time.monotonic() < deadline, "the popular URL was not refreshed"
        time.sleep(0.05)
    assert len(stub_gateway.requests_for("/static/rare.js")) == 1
    assert frontend.request("/static/popular.js").headers["X-Cache-Status"] == "HIT"


def test_prewarm_does_nothing_while_the_gateway_is_down(frontend, stub_gateway):
    frontend.request("/static/popular.js")
    stub_gateway.health_up = False
    mark_gateway_down(frontend)

    result = frontend.run_script("okome-prewarm")

    assert "down" in result.stdout
    assert len(stub_gateway.requests_for("/static/popular.js")) == 1
