"""The backend's redis, as rendered for the lab site, run by Debian's redis-server on loopback.

The rendered config is used as it is, except for the lines that name the node's paths and its
port, which are moved into a temporary directory. The memory limit is made by the image's own
okome-redis-memory script, from a small fake /proc/meminfo, so that filling the cache past it
takes a moment; the addresses by its okome-redis-listen script, as on a card without identity
(loopback only); the ACL comes from render_redis_acl with throwaway passwords.
"""

import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from builder.overlay import render_overlay
from builder.redis_acl import (
    GATEWAY_USER,
    METRICS_USER,
    render_exporter_credentials,
    render_redis_acl,
)
from builder.site import load_site
from okome_cache.testing import LocalRedisServer, free_port

FAKE_MEMTOTAL_KIB = 16384
# What redis.conf includes: files the boot units write.
MAXMEMORY_CONF = "/run/okome-redis/maxmemory.conf"
LISTEN_CONF = "/run/okome-redis-listen/listen.conf"


@dataclass
class RenderedBackend:
    site: object
    root: Path
    gateway_password: str
    metrics_password: str


@dataclass
class RunningBackend:
    rendered: RenderedBackend
    server: LocalRedisServer
    data_dir: Path
    maxmemory_bytes: int

    def login(self, user: str, password: str) -> redis.Redis:
        return redis.Redis(port=self.server.port, username=user, password=password,
                           socket_timeout=5, retry=Retry(NoBackoff(), 0))

    def gateway(self) -> redis.Redis:
        return self.login(GATEWAY_USER, self.rendered.gateway_password)

    def metrics(self) -> redis.Redis:
        return self.login(METRICS_USER, self.rendered.metrics_password)


def exec_start(unit: Path) -> list[str]:
    """The command line of a unit's last ExecStart=, continuation lines joined."""
    text = unit.read_text().replace("\\\n", " ")
    commands = re.findall(r"^ExecStart=(.+)$", text, flags=re.MULTILINE)
    return shlex.split(commands[-1])


def run_memory_script(root: Path, meminfo_text: str,
                      workdir: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """okome-redis-memory as its unit runs it, but reading `meminfo_text` and writing into
    `workdir`; returns the finished process and the file it was to write."""
    script, fraction, _ = exec_start(root / "etc/systemd/system/okome-redis-memory.service")
    meminfo = workdir / "meminfo"
    meminfo.write_text(meminfo_text)
    output = workdir / "maxmemory.conf"
    result = subprocess.run([root / script.lstrip("/"), fraction, output, meminfo],
                            capture_output=True, text=True)
    return result, output


def run_listen_script(root: Path, workdir: Path, network: Path | None = None
                      ) -> tuple[subprocess.CompletedProcess, Path]:
    """okome-redis-listen as its unit runs it, writing into `workdir` and reading `network` as
    the node's network file (none: a card without identity)."""
    script, _ = exec_start(root / "etc/systemd/system/okome-redis-listen.service")
    output = workdir / "listen.conf"
    network = network or workdir / "no-network-file"
    result = subprocess.run([root / script.lstrip("/"), output, network],
                            capture_output=True, text=True)
    return result, output


def relocated_config(text: str, replacements: dict[str, str]) -> str:
    """The config with lines replaced. A key is a directive that occurs exactly once, or a
    whole line (for a directive that occurs several times, such as include); its value is the
    directive's new value."""
    lines = text.splitlines()
    for key, value in replacements.items():
        matches = [i for i, line in enumerate(lines) if line == key or line.split(" ", 1)[0] == key]
        assert len(matches) == 1, f"{key} appears {len(matches)} times in redis.conf"
        lines[matches[0]] = f"{key.split(' ', 1)[0]} {value}"
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> RenderedBackend:
    site = load_site("lab")
    root = tmp_path_factory.mktemp("backend-rootfs")
    render_overlay("backend", root, {"site": site, "role": "backend"})
    return RenderedBackend(site, root, secrets.token_urlsafe(24), secrets.token_hex(24))


@pytest.fixture
def start_backend(rendered, tmp_path):
    """Start redis on the rendered config in a fresh directory; stopped after the test."""
    servers = []

    def start() -> RunningBackend:
        workdir = tmp_path / f"redis-{len(servers)}"
        data_dir = workdir / "data"
        data_dir.mkdir(parents=True)
        memory, limit_file = run_memory_script(
            rendered.root, f"MemTotal: {FAKE_MEMTOTAL_KIB} kB\n", workdir)
        assert memory.returncode == 0, memory.stderr
        listen, listen_file = run_listen_script(rendered.root, workdir)
        assert listen.returncode == 0, listen.stderr
        acl = workdir / "users.acl"
        acl.write_text(render_redis_acl(rendered.gateway_password, rendered.metrics_password))

        port = free_port()
        config = workdir / "redis.conf"
        config.write_text(relocated_config(
            (rendered.root / "etc/redis/redis.conf").read_text(),
            {"port": str(port), "dir": str(data_dir), "pidfile": str(workdir / "redis.pid"),
             f"include {MAXMEMORY_CONF}": str(limit_file),
             f"include {LISTEN_CONF}": str(listen_file), "aclfile": str(acl)}))
        server = LocalRedisServer(workdir, port, [str(config)]).start()
        servers.append(server)
        limit_kib = int(FAKE_MEMTOTAL_KIB * rendered.site.backend.memory_fraction)
        return RunningBackend(rendered, server, data_dir, limit_kib * 1024)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def backend(start_backend) -> RunningBackend:
    return start_backend()


def raw_command(port: int, *words: str) -> bytes:
    """Send one command as a bare client would, with no HELLO or AUTH first; return the reply."""
    request = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request.encode())
        return connection.recv(4096)


def test_an_unauthenticated_command_is_refused(backend):
    assert raw_command(backend.server.port, "SET", "okome:v1:tools:1", "x").startswith(b"-NOAUTH")
    assert raw_command(backend.server.port, "PING").startswith(b"-NOAUTH")
    assert backend.gateway().get("okome:v1:tools:1") is None


def test_a_wrong_password_and_the_default_user_are_refused(backend):
    with pytest.raises(redis.AuthenticationError):
        backend.login(GATEWAY_USER, backend.rendered.metrics_password).ping()
    with pytest.raises(redis.AuthenticationError):
        backend.login("default", "").ping()


def test_the_gateway_uses_the_cache_keys_and_nothing_else(backend):
    gateway = backend.gateway()
    assert gateway.set("okome:v1:tools:1", "x", ex=60)
    assert gateway.get("okome:v1:tools:1") == b"x"
    with pytest.raises(redis.exceptions.NoPermissionError):
        gateway.set("elsewhere", "x")
    for command in (("FLUSHALL",), ("CONFIG", "SET", "maxmemory", "0"), ("KEYS", "*"),
                    ("SAVE",), ("BGSAVE",), ("SHUTDOWN",), ("ACL", "LIST"),
                    ("REPLICAOF", "127.0.0.1", "1")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            gateway.execute_command(*command)


def test_the_metrics_user_reads_statistics_but_no_key_and_writes_nothing(backend):
    backend.gateway().set("okome:v1:tools:1", "x")
    metrics = backend.metrics()
    assert metrics.info("server")["tcp_port"] == backend.server.port
    for command in (("SET", "okome:v1:tools:1", "y"), ("GET", "okome:v1:tools:1"),
                    ("DEL", "okome:v1:tools:1"), ("FLUSHALL",), ("CONFIG", "SET", "save", "1 1")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            metrics.execute_command(*command)
    assert backend.gateway().get("okome:v1:tools:1") == b"x"


def test_the_memory_limit_is_the_sites_share_of_the_boards_ram(backend):
    memory = backend.metrics().info("memory")
    assert memory["maxmemory"] == backend.maxmemory_bytes
    assert memory["maxmemory_policy"] == backend.rendered.site.backend.maxmemory_policy


def test_filling_past_the_limit_evicts_and_every_write_succeeds(backend):
    gateway = backend.gateway()
    value = os.urandom(8 * 1024)
    writes = 3 * backend.maxmemory_bytes // len(value)

    refused = [i for i in range(writes)
               if gateway.set(f"okome:v1:rag:r:{i:08x}", value) is not True]

    assert refused == []
    stats, memory = backend.metrics().info("stats"), backend.metrics().info("memory")
    assert stats["evicted_keys"] > 0
    assert gateway.dbsize() < writes
    assert memory["used_memory"] <= backend.maxmemory_bytes * 1.05


def test_no_dump_or_append_only_file_is_ever_written(start_backend):
    backend = start_backend()
    gateway = backend.gateway()
    for i in range(2000):
        gateway.set(f"okome:v1:planner:{i}", os.urandom(256))
    persistence = backend.metrics().info("persistence")
    assert persistence["aof_enabled"] == 0
    assert persistence["rdb_bgsave_in_progress"] == 0

    # SIGTERM is how systemd stops redis, and redis then runs its SHUTDOWN path.
    assert backend.server.stop() == 0
    assert list(backend.data_dir.iterdir()) == []


@pytest.mark.skipif(shutil.which("prometheus-redis-exporter") is None,
                    reason="needs Debian's prometheus-redis-exporter on the host")
def test_the_exporter_scrapes_redis_as_the_metrics_user(backend, tmp_path):
    dropin = backend.rendered.root / "etc/systemd/system/prometheus-redis-exporter.service.d"
    command = exec_start(dropin / "okome.conf")
    listen_port = free_port()
    command = [re.sub(r"127\.0\.0\.1:\d+$", f"127.0.0.1:{backend.server.port}", word)
               if word.startswith("-redis.addr=") else
               f"-web.listen-address=127.0.0.1:{listen_port}"
               if word.startswith("-web.listen-address=") else word
               for word in command]
    credentials = render_exporter_credentials(backend.rendered.metrics_password)
    environment = dict(line.split("=", 1) for line in credentials.splitlines())

    log = (tmp_path / "exporter.log").open("w")
    exporter = subprocess.Popen(command, env={"PATH": os.environ["PATH"], **environment},
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        metrics = scrape(listen_port)
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)

    assert metrics["redis_up"] == 1
    assert metrics['redis_exporter_last_scrape_error{err=""}'] == 0
    assert metrics["redis_memory_max_bytes"] == backend.maxmemory_bytes


def scrape(port: int, timeout: float = 10.0) -> dict[str, float]:
    """The exporter's /metrics as {series: value}, once it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


@pytest.mark.parametrize("memtotal_kib, expected_kib", [(3884232, 1942116), (16384, 8192)])
def test_the_memory_script_takes_the_sites_share_of_memtotal(rendered, tmp_path, memtotal_kib,
                                                              expected_kib):
    assert rendered.site.backend.memory_fraction == 0.5
    meminfo = f"MemFree: 1 kB\nMemTotal:       {memtotal_kib} kB\nSwapTotal: 0 kB\n"
    result, limit_file = run_memory_script(rendered.root, meminfo, tmp_path)
    assert result.returncode == 0, result.stderr
    assert limit_file.read_text() == f"maxmemory {expected_kib}kb\n"


def test_the_memory_script_fails_loudly_without_memtotal(rendered, tmp_path):
    result, limit_file = run_memory_script(rendered.root, "MemFree: 1 kB\n", tmp_path)
    assert result.returncode != 0
    assert "MemTotal" in result.stderr
    assert not limit_file.exists()


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs Debian's nftables on the host")
@pytest.mark.parametrize("site_name", ["lab", "production"])
def test_the_firewall_table_passes_nfts_own_check(site_name, tmp_path):
    # `nft -c` parses and validates the ruleset against the kernel without loading it.
    render_overlay("backend", tmp_path, {"site": load_site(site_name), "role": "backend"})
    result = subprocess.run(["nft", "-c", "-f", tmp_path / "etc/nftables.d/okome-redis.nft"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_listen_script_binds_loopback_and_the_nodes_own_address(rendered, tmp_path):
    network = tmp_path / "10-okome-node.network"
    network.write_text("[Match]\nName=en*\n\n[Network]\nAddress=10.86.0.19/24\n"
                       "Gateway=10.86.0.1\n")
    result, listen = run_listen_script(rendered.root, tmp_path, network)
    assert result.returncode == 0, result.stderr
    assert listen.read_text() == "bind 127.0.0.1 -::1 10.86.0.19\n"

    result, listen = run_listen_script(rendered.root, tmp_path)
    assert result.returncode == 0, result.stderr
    assert listen.read_text() == "bind 127.0.0.1 -::1\n"


def test_redis_listens_on_loopback_only_without_an_identity(backend):
    listening = subprocess.run(["ss", "-Htlnp", f"sport = :{backend.server.port}"],
                               capture_output=True, text=True, check=True).stdout
    local = {line.split()[3] for line in listening.splitlines()}
    assert local <= {f"127.0.0.1:{backend.server.port}", f"[::1]:{backend.server.port}"}
    assert f"127.0.0.1:{backend.server.port}" in local
