"""Host-level fixtures of the frontend: the stub gateway, and Debian's nginx on this machine
running the frontend overlay rendered into a temporary root (see tests/frontend_rootfs.py).

Everything listens on 127.0.0.1 only: the site's gateway is replaced by the stub's address.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from builder.frontend_settings import FrontendSettings
from builder.site import Site
from tests.frontend_rootfs import read_env_file, render_frontend_rootfs
from tests.host.stub_gateway import LOOPBACK, StubGateway

NGINX = "/usr/sbin/nginx"

# Short enough that the tests wait seconds, not minutes; rate limits loose enough that only the
# tests about them reach them.
TEST_FRONTEND_SETTINGS = {
    "static_ttl_s": 1,
    "cache_connect_timeout_s": 1,
    "cache_read_timeout_s": 5,
    "stream_connect_timeout_s": 1,
    "probe_interval_s": 2,
    "probe_timeout_s": 1,
    "probe_failures_to_down": 2,
    "client_rate_per_s": 50,
    "client_burst": 50,
    "agent_rate_per_s": 5,
    "agent_burst": 5,
    "streams_per_agent": 2,
    "prewarm_pause_ms": 0,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def frontend_test_site(base: Site, gateway_port: int, listen_port: int, **frontend) -> Site:
    """`base` with the stub as its gateway, nginx on loopback, and the test settings."""
    gateway = base.gateway.model_copy(update={"host": IPv4Address(LOOPBACK), "port": gateway_port})
    settings = {**TEST_FRONTEND_SETTINGS, "listen_address": IPv4Address(LOOPBACK),
                "listen_port": listen_port, **frontend}
    # Validated again, as a site file would be: a test cannot run an impossible setting.
    frontend_settings = FrontendSettings.model_validate({**base.frontend.model_dump(), **settings})
    return base.model_copy(update={"gateway": gateway, "frontend": frontend_settings})


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    seconds: float

    def json(self) -> dict:
        return json.loads(self.body)


class HostNginx:
    """Debian's nginx running the rendered frontend configuration under `root`."""

    def __init__(self, site: Site, root: Path):
        self.site = site
        self.root = root
        self.port = site.frontend.listen_port
        self.process: subprocess.Popen | None = None

    @property
    def conf(self) -> Path:
        return self.root / "etc/nginx/nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.root / "var/log/nginx/error.log"

    @property
    def access_log(self) -> Path:
        return self.root / "var/log/nginx/okome-access.log"

    @property
    def cache_dir(self) -> Path:
        return self.root / "var/cache/nginx/okome"

    @property
    def gateway_down_flag(self) -> Path:
        return self.root / "run/okome/gateway-down"

    def test_config(self) -> subprocess.CompletedProcess:
        """`nginx -t` on the rendered configuration, as the image build runs it."""
        return subprocess.run([NGINX, "-t", "-c", self.conf, "-e", self.error_log],
                              capture_output=True, text=True)

    def start(self) -> "HostNginx":
        render_frontend_rootfs(self.site, self.root)
        self.process = subprocess.Popen(
            [NGINX, "-c", self.conf, "-e", self.error_log, "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.process.stderr.read()}")
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen on {self.port}: {self.error_log_text()}")

    def reload(self, site: Site) -> None:
        """Render `site` over the running configuration and reload, as `systemctl reload` would;
        returns once every process of the old configuration is gone."""
        self.site = site
        render_frontend_rootfs(site, self.root)
        old = self._children()
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = self._children()
            if children and not children & old:
                return
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not reload: {self.error_log_text()}")

    def _children(self) -> set[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return {int(pid) for pid in path.read_text().split()}

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def error_log_text(self) -> str:
        return self.error_log.read_text() if self.error_log.exists() else ""

    def request(self, path: str, method: str = "GET", headers: dict | None = None,
                body: bytes | None = None, timeout: float = 15) -> Response:
        """One request on a fresh connection; `seconds` covers the whole body."""
        started = time.monotonic()
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            content = response.read()
        finally:
            connection.close()
        return Response(response.status, response.headers, content,
                        time.monotonic() - started)

    def access_log_entries(self) -> list[dict]:
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines()]

    def script_environment(self, **overrides: str) -> dict[str, str]:
        """The helper scripts' settings as their units pass them, from the rendered file."""
        settings = read_env_file(self.root / "etc/okome/frontend.env")
        return {"PATH": os.environ["PATH"], **settings, **overrides}

    def run_script(self, name: str, **overrides: str) -> subprocess.CompletedProcess:
        """Run one of the overlay's scripts (okome-gateway-probe, ...) against this nginx."""
        script = self.root / "usr/local/sbin" / name
        result = subprocess.run([script], env=self.script_environment(**overrides),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{name} failed: {result.stderr}"
        return result


@pytest.fixture
def stub_gateway():
    gateway = StubGateway(interval=0.2).start()
    yield gateway
    gateway.stop()


@pytest.fixture
def start_frontend(stub_gateway, lab_site, tmp_path):
    """Returns a function FRONTEND-SETTINGS → running HostNginx in front of the stub."""
    started = []

    def start(**frontend) -> HostNginx:
        site = frontend_test_site(lab_site, stub_gateway.port, free_port(), **frontend)
        nginx = HostNginx(site, tmp_path / f"rootfs{len(started)}").start()
        started.append(nginx)
        return nginx

    yield start
    for nginx in started:
        nginx.stop()
        shutil.rmtree(nginx.root, ignore_errors=True)


@pytest.fixture
def frontend(start_frontend) -> HostNginx:
    return start_frontend()
