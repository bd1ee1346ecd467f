"""Chaos scenarios on a running lab (builder/lab.py): each breaks one part of the cluster while a
client inside the lab network requests the VIP every 100 ms, checks that the cluster did the
right thing, and returns what the client saw. `okome-image lab chaos` and tests/boot/test_lab.py
run the same functions, so what the command shows is what the tests prove.
"""

import time
from collections.abc import Callable

from builder.lab import GATEWAY_MAX_AGE_S, Lab
from builder.machine import MachineError

# How long a repaired node is watched to make sure it does not take the VIP back (nopreempt):
# longer than the check's rise (2 s) plus the VRRP master-down interval (about 3.6 s).
NO_PREEMPT_WATCH_S = 10


def _holder_and_client_ready(lab: Lab, client) -> str:
    holder = lab.wait_for_one_holder()
    client.wait_for(lambda r: r["ok"] and r["node"] == holder, timeout=30)
    return holder


def _failover(lab: Lab, client, holder: str, since: float) -> dict:
    """Wait for the VIP to leave `holder` and for the client to be answered by the new one."""
    new_holder = lab.wait_for_one_holder(not_on=holder, timeout=60, stable_s=1)
    client.wait_for(lambda r: r["ok"] and r["node"] == new_holder, timeout=30)
    time.sleep(2)  # a few more answers after the move, to count any late failure
    return {"old_holder": holder, "new_holder": new_holder, **client.outage(since)}


def nginx_killed(lab: Lab) -> dict:
    """nginx killed on the VIP holder: the tracked check fails, the holder goes to FAULT, the
    peer takes the VIP. Then nginx is started again: the VIP stays where it is."""
    with lab.vip_client() as client:
        holder = _holder_and_client_ready(lab, client)
        since = time.time()
        lab[holder].succeed("systemctl kill --signal=SIGKILL nginx.service")
        report = _failover(lab, client, holder, since)
    lab[holder].succeed("systemctl start nginx.service")
    lab[holder].wait_until_succeeds("curl -fsS -o /dev/null http://127.0.0.1/okome/health")
    time.sleep(NO_PREEMPT_WATCH_S)
    holders = lab.vip_holders()
    if holders != [report["new_holder"]]:
        raise MachineError(f"after nginx came back on {holder}, the VIP is on {holders}, "
                           f"not only on {report['new_holder']} (nopreempt)")
    report["holder_after_repair"] = holders[0]
    return report


def link_cut(lab: Lab) -> dict:
    """The VIP holder's cable to the lab network pulled: its keepalived sees the carrier go
    (FAULT, VIP released) and the peer, hearing no adverts, takes the VIP. Then the cable is
    put back: exactly one node holds the VIP."""
    with lab.vip_client() as client:
        holder = _holder_and_client_ready(lab, client)
        since = time.time()
        lab.set_link(holder, False)
        try:
            report = _failover(lab, client, holder, since)
        finally:
            lab.set_link(holder, True)
    report["holder_after_restore"] = lab.wait_for_one_holder(timeout=60, stable_s=10)
    return report


def _wait_for_gateway_state(lab: Lab, state: str, timeout: float = 60) -> float:
    """Seconds until the VIP's holder says the gateway is `state` (its probe's verdict)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if f'"gateway":"{state}"' in lab.http_via_vip()[1]:
            return round(time.monotonic() - started, 1)
        time.sleep(0.5)
    raise MachineError(f"the VIP's holder never saw the gateway {state} in {timeout:.0f} s")


def _expect(answer: dict, what: str, status: int, cache: str | None = None,
            under_s: float | None = None) -> None:
    """Raise, naming what was wanted and what came, unless `answer` is as wanted."""
    cache_status = answer["headers"].get("X-Cache-Status")
    wanted = [str(status)] + ([cache] if cache else []) + \
        ([f"under {under_s} s"] if under_s else [])
    if answer["status"] != status or (cache and cache_status != cache) or \
            (under_s and answer["seconds"] >= under_s):
        raise MachineError(f"{what}: {answer['status']}, X-Cache-Status {cache_status}, "
                           f"{answer['seconds']:.2f} s; wanted {', '.join(wanted)}")


def gateway_down(lab: Lab) -> dict:
    """The gateway stopped: through the VIP, a cached GET comes back STALE and an API call a fast
    503; the gateway back: fresh answers again."""
    path = "/api/cacheable?lab=gateway-down"
    _expect(lab.request(path), "a cacheable GET while the gateway is up", 200)
    time.sleep(GATEWAY_MAX_AGE_S + 1)  # the cached copy is now expired
    lab.stop_gateway()
    report = {"seconds_to_down": _wait_for_gateway_state(lab, "down")}
    try:
        stale = lab.request(path)
        _expect(stale, "a cached GET with the gateway down", 200, "STALE", under_s=1)
        api = lab.request("/v1/chat/completions")
        _expect(api, "an API call with the gateway down", 503, under_s=1)
        if '"gateway_unavailable"' not in api["body"]:
            raise MachineError(f"the 503 is not the frontend's own: {api['body']}")
        report.update(stale_s=round(stale["seconds"], 3), api_503_s=round(api["seconds"], 3))
    finally:
        lab.start_gateway()
    report["seconds_to_up"] = _wait_for_gateway_state(lab, "up")
    _expect(lab.request("/v1/echo"), "an API call with the gateway back", 200)
    # An expired entry is answered stale once more while nginx refreshes it in the background;
    # then it is fresh.
    deadline = time.monotonic() + 30
    while (answer := lab.request(path))["headers"].get("X-Cache-Status") not in ("HIT", "MISS"):
        if time.monotonic() > deadline:
            _expect(answer, "a cacheable GET with the gateway back", 200, "HIT")
        time.sleep(0.5)
    report["fresh_again"] = answer["headers"]["X-Cache-Status"]
    return report


# On the backend: redis answers its metrics user, whose password the node keeps for the exporter.
REDIS_PING = (". /etc/okome/redis-exporter.env && REDISCLI_AUTH=\"$REDIS_PASSWORD\" "
              "redis-cli --no-auth-warning --user metrics ping")


# Where a scenario asks only whether the frontends keep answering, a slow answer is an answer:
# three emulated guests share two cores, and a booting backend can slow a frontend's reply past
# the failover client's half second.
SERVING_TIMEOUT_S = 5


def _served_throughout(client, since: float) -> dict:
    """What the client saw from `since` on; raises if any request failed."""
    seen = client.outage(since)
    report = {"requests": seen["requests"], "failed": seen["failed"]}
    if seen["failed"] or not seen["requests"]:
        failures = [r for r in client.results if r["t"] >= since and not r["ok"]]
        raise MachineError(f"the VIP did not answer throughout: {report}; "
                           f"failures {failures[:5]}; last answers {client.results[-3:]}")
    return report


def backend_rebooted(lab: Lab) -> dict:
    """The backend rebooted cleanly: the frontends keep answering through the VIP all along (the
    gateway is the backend's only client; nothing on a frontend waits on it), and the backend
    comes back with redis answering."""
    backends = lab.of_role("backend")
    if not backends:
        raise MachineError("the lab has no backend node: okome-image lab up --node backend ...")
    backend = backends[0]
    with lab.vip_client(timeout_s=SERVING_TIMEOUT_S) as client:
        holder = _holder_and_client_ready(lab, client)
        since, started = time.time(), time.monotonic()
        lab.reboot(backend)
        seconds_down = round(time.monotonic() - started, 1)
        lab[backend].wait_for_ssh(timeout=300)
        lab[backend].wait_for_unit("redis-server.service")
        pong = lab[backend].succeed(REDIS_PING).strip()
        if pong != "PONG":
            raise MachineError(f"{backend}: redis answered {pong!r} to PING after the reboot")
        report = {"holder": holder, "backend_down_s": seconds_down,
                  "backend_back_s": round(time.monotonic() - started, 1),
                  **_served_throughout(client, since)}
    _expect(lab.request("/v1/echo"), "an API call after the backend's reboot", 200)
    return report


# tmpfs has no blocks reserved for root: this fills /var/log to the last byte.
FILL_LOG = ("dd if=/dev/zero of=/var/log/okome-chaos-fill bs=1M status=none 2>/dev/null; "
            "df --output=avail -B1 /var/log | tail -n 1")


def log_full(lab: Lab) -> dict:
    """/var/log (a size-capped tmpfs) filled to the last byte on the VIP holder: nginx cannot
    write its logs but keeps serving, cached and proxied alike; its check keeps passing, so the
    VIP stays where it is. Then the filler is removed."""
    with lab.vip_client(timeout_s=SERVING_TIMEOUT_S) as client:
        holder = _holder_and_client_ready(lab, client)
        since = time.time()
        try:
            free = int(lab[holder].succeed(FILL_LOG).split()[-1])
            if free != 0:
                raise MachineError(f"{holder}: /var/log still has {free} bytes free after dd")
            # Several check intervals, and enough requests for nginx to have tried to log.
            time.sleep(10)
            for path in ("/api/cacheable?lab=log-full", "/v1/echo"):
                _expect(lab.request(path), f"GET {path} with /var/log full", 200)
            holders = lab.vip_holders()
            report = {"holder": holder, "holders_while_full": holders,
                      **_served_throughout(client, since)}
        finally:
            lab[holder].succeed("rm -f /var/log/okome-chaos-fill")
    if holders != [holder]:
        raise MachineError(f"with /var/log full on {holder}, the VIP went to {holders}")
    lab[holder].succeed("systemctl is-active nginx.service")
    return report


SCENARIOS: dict[str, Callable[[Lab], dict]] = {
    "nginx-killed": nginx_killed,
    "link-cut": link_cut,
    "gateway-down": gateway_down,
    "backend-rebooted": backend_rebooted,
    "log-full": log_full,
}
