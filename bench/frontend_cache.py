"""Benchmark of the frontend's nginx configuration on this machine, loopback only (not a test).

1. Cache HIT throughput: wrk against the frontend serving a cached asset, and against a plain
   nginx serving the same file from disk. The ratio is what the cache path costs (lookup,
   headers, maps, the JSON access log) compared with the cheapest thing nginx can do.
2. SSE added delay: events from the stub gateway, read through the frontend and read from the
   stub directly; the difference is what the proxy adds to each event.

Run from the repository root:  .venv/bin/python -m bench.frontend_cache
Needs Debian's nginx and wrk (apt-get install nginx-light wrk).
"""

import argparse
import http.client
import json
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from builder.site import load_site
from tests.host.nginx_fixtures import NGINX, HostNginx, free_port, frontend_test_site
from tests.host.stub_gateway import LOOPBACK, StubGateway, generated_asset

ASSET = "bench.js"

# The same process and connection settings as the frontend's nginx.conf, serving from disk.
STATIC_NGINX_CONF = """\
worker_processes auto;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    include /etc/nginx/mime.types;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    access_log {root}/access.log;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen {address}:{port};
        root {root}/html;
    }}
}}
"""


def wrk_requests_per_second(url: str, threads: int, connections: int, seconds: int) -> float:
    result = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", url],
                            capture_output=True, text=True, check=True)
    if "Non-2xx" in result.stdout:
        raise RuntimeError(f"wrk saw errors from {url}:\n{result.stdout}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))


def start_static_nginx(root: Path, body: bytes) -> tuple[subprocess.Popen, int]:
    (root / "html/static").mkdir(parents=True)
    (root / "html/static" / ASSET).write_bytes(body)
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(STATIC_NGINX_CONF.format(root=root, address=LOOPBACK, port=port))
    process = subprocess.Popen([NGINX, "-c", conf, "-e", root / "error.log", "-g",
                                "daemon off; user root;"])
    time.sleep(0.5)
    return process, port


def event_lateness(port: int, path: str) -> list[float]:
    """Seconds between the stub writing each event and this client reading it."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    connection.request("POST", path, body=b"{}", headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    lateness = []
    while line := response.readline():
        if line.startswith(b"data: "):
            lateness.append(time.time() - json.loads(line[6:])["sent"])
    connection.close()
    return lateness


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--streams", type=int, default=5, help="SSE streams per side")
    parser.add_argument("--events", type=int, default=40, help="events per stream")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between events")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="okome-bench-"))
    gateway = StubGateway().start()
    # Limits out of the way: wrk is one client sending as fast as it can.
    site = frontend_test_site(load_site("lab"), gateway.port, free_port(),
                              client_rate_per_s=1_000_000, client_burst=1_000_000,
                              static_ttl_s=3600)
    frontend = HostNginx(site, work / "frontend").start()
    static, static_port = start_static_nginx(work / "static", generated_asset(ASSET))
    try:
        path = f"/static/{ASSET}"
        frontend.request(path)
        status = frontend.request(path).headers["X-Cache-Status"]
        assert status == "HIT", f"the asset is not cached: {status}"

        hit = wrk_requests_per_second(f"http://{LOOPBACK}:{frontend.port}{path}", args.threads,
                                      args.connections, args.seconds)
        plain = wrk_requests_per_second(f"http://{LOOPBACK}:{static_port}{path}", args.threads,
                                        args.connections, args.seconds)

        stream = f"/v1/stream?events={args.events}&interval={args.interval}"
        proxied, direct = [], []
        for _ in range(args.streams):
            proxied += event_lateness(frontend.port, stream)
            direct += event_lateness(gateway.port, stream)
    finally:
        static.send_signal(signal.SIGTERM)
        static.wait()
        frontend.stop()
        gateway.stop()
        shutil.rmtree(work, ignore_errors=True)

    size_kib = len(generated_asset(ASSET)) // 1024
    print(f"cache HIT ({size_kib} KiB asset, wrk -t{args.threads} -c{args.connections} "
          f"-d{args.seconds}s):")
    print(f"  frontend cache HIT   {hit:10.0f} req/s")
    print(f"  plain nginx static   {plain:10.0f} req/s")
    print(f"  ratio HIT/static     {hit / plain:10.2f}")
    print(f"SSE ({args.streams} streams x {args.events} events, {args.interval * 1000:.0f} ms "
          f"apart), delay from the stub writing an event to the client reading it:")
    for name, values in (("through the frontend", proxied), ("stub directly", direct)):
        print(f"  {name:20} median {statistics.median(values) * 1000:6.2f} ms   "
              f"p99 {percentile(values, 0.99) * 1000:6.2f} ms   max {max(values) * 1000:6.2f} ms")
    added = statistics.median(proxied) - statistics.median(direct)
    print(f"  added by the proxy   median {added * 1000:6.2f} ms   ratio frontend/direct "
          f"{statistics.median(proxied) / statistics.median(direct):6.2f}")


if __name__ == "__main__":
    main()
