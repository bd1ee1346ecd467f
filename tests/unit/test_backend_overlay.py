"""The backend overlay rendered from a site: redis, its firewall, units and kernel settings."""

import re
import shlex
from pathlib import Path

import pytest

from builder.overlay import OVERLAYS_DIR, render_overlay
from builder.redis_acl import ACL_PATH, EXPORTER_CREDENTIALS_PATH, METRICS_USER
from builder.site import load_site


def directives(text: str) -> dict[str, list[str]]:
    """A redis.conf or sysctl/unit-like file as {name: [value, ...]}, comments dropped."""
    found: dict[str, list[str]] = {}
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            name, value = re.fullmatch(r"([^\s=]+)\s*(?:=\s*|\s+)?(.*)", line).groups()
            found.setdefault(name, []).append(value.strip())
    return found


@pytest.fixture(scope="module", params=["lab", "production"])
def rendered(request, tmp_path_factory):
    site = load_site(request.param)
    root = tmp_path_factory.mktemp(request.param)
    render_overlay("backend", root, {"site": site, "role": "backend"})
    return site, root


def test_templates_hold_no_addresses_of_their_own():
    for path in (OVERLAYS_DIR / "backend").rglob("*"):
        if path.is_file():
            addresses = set(re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", path.read_text()))
            assert addresses <= {"127.0.0.1"}, path


def test_redis_is_a_protected_cache_without_persistence(rendered):
    site, root = rendered
    conf = directives((root / "etc/redis/redis.conf").read_text())
    assert conf["save"] == ['""'] and conf["appendonly"] == ["no"]
    assert conf["protected-mode"] == ["yes"]
    assert conf["aclfile"] == [ACL_PATH]
    assert conf["port"] == [str(site.backend.port)]
    assert conf["maxmemory-policy"] == [site.backend.maxmemory_policy]
    assert conf["logfile"] == ['""'], "logs go to the journal, not onto the card"
    assert "requirepass" not in conf and "user" not in conf


def test_the_memory_limit_comes_from_the_file_the_boot_unit_writes(rendered):
    site, root = rendered
    conf = directives((root / "etc/redis/redis.conf").read_text())
    assert "maxmemory" not in conf
    unit = directives((root / "etc/systemd/system/okome-redis-memory.service").read_text())
    command = shlex.split(unit["ExecStart"][0])
    assert command[0] == "/usr/local/sbin/okome-redis-memory"
    assert float(command[1]) == site.backend.memory_fraction
    assert command[2] in conf["include"]
    assert command[2].startswith("/run/" + unit["RuntimeDirectory"][0] + "/")
    assert (root / command[0].lstrip("/")).stat().st_mode & 0o777 == 0o755


def test_redis_listens_where_the_boot_unit_says_after_the_identity_is_applied(rendered):
    _, root = rendered
    conf = directives((root / "etc/redis/redis.conf").read_text())
    assert "bind" not in conf, "the addresses come from the node's identity, at boot"
    unit = directives((root / "etc/systemd/system/okome-redis-listen.service").read_text())
    command = shlex.split(unit["ExecStart"][0])
    assert command[1] in conf["include"]
    assert command[1].startswith("/run/" + unit["RuntimeDirectory"][0] + "/")
    assert "okome-identity.service" in unit["After"]
    sysctl = directives((root / "etc/sysctl.d/60-okome-redis.conf").read_text())
    assert sysctl["net.ipv4.ip_nonlocal_bind"] == ["1"]


def test_redis_waits_for_its_limit_firewall_and_acl(rendered):
    _, root = rendered
    dropin = directives((root / "etc/systemd/system/redis-server.service.d/okome.conf")
                        .read_text())
    assert dropin["ConditionPathExists"] == [ACL_PATH]
    required = " ".join(dropin["Requires"]).split()
    ordered_after = " ".join(dropin["After"]).split()
    for unit in ("okome-redis-memory.service", "okome-redis-listen.service",
                 "okome-redis-firewall.service"):
        assert unit in required and unit in ordered_after
    assert "okome-transparent-hugepages.service" in " ".join(dropin["Wants"])


def test_huge_pages_are_skipped_where_the_kernel_has_none(rendered):
    _, root = rendered
    unit = directives((root / "etc/systemd/system/okome-transparent-hugepages.service")
                      .read_text())
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    assert unit["ConditionPathExists"] == [thp]
    assert thp in unit["ExecStart"][0] and "never" in unit["ExecStart"][0]


def test_the_exporter_logs_in_as_the_metrics_user_with_a_flashed_password(rendered):
    site, root = rendered
    dropin = directives((root / "etc/systemd/system/prometheus-redis-exporter.service.d/"
                                "okome.conf").read_text())
    assert dropin["ConditionPathExists"] == [EXPORTER_CREDENTIALS_PATH]
    assert dropin["EnvironmentFile"] == ["", EXPORTER_CREDENTIALS_PATH]
    command = dropin["ExecStart"][1]
    assert f"-redis.user={METRICS_USER}" in command
    assert f"-redis.addr=redis://127.0.0.1:{site.backend.port}" in command
    assert f"-web.listen-address=:{site.backend.exporter_port}" in command
    assert "password" not in command


def test_the_firewall_opens_redis_to_the_gateway_and_frontends_only(rendered):
    site, root = rendered
    rules = (root / "etc/nftables.d/okome-redis.nft").read_text()
    port, exporter = site.backend.port, site.backend.exporter_port
    redis_sources = set(re.findall(rf"ip saddr (\S+) tcp dport {port} accept", rules))
    expected = {str(site.gateway.host)}
    expected |= {str(node.address) for node in site.nodes_of_role("frontend").values()}
    expected |= {str(network) for network in site.backend.extra_clients}
    assert redis_sources == expected
    metrics_sources = set(re.findall(rf"ip saddr (\S+) tcp dport {exporter} accept", rules))
    assert metrics_sources == {str(network) for network in site.network.monitoring_networks}
    last_rule = [line.strip() for line in rules.splitlines() if line.strip()][-3]
    assert last_rule == f"tcp dport {{ {port}, {exporter} }} drop"


def test_kernel_settings_hold_redis_backlog(rendered):
    _, root = rendered
    sysctl = directives((root / "etc/sysctl.d/60-okome-redis.conf").read_text())
    conf = directives((root / "etc/redis/redis.conf").read_text())
    assert sysctl["vm.overcommit_memory"] == ["1"]
    assert int(sysctl["net.core.somaxconn"][0]) >= int(conf["tcp-backlog"][0])


def test_every_unit_and_dropin_of_the_overlay_is_written(rendered):
    _, root = rendered
    units = {path.relative_to(root) for path in (root / "etc/systemd/system").rglob("*")
             if path.is_file()}
    assert units == {Path("etc/systemd/system") / name for name in (
        "okome-redis-firewall.service", "okome-redis-memory.service", "okome-redis-listen.service",
        "okome-transparent-hugepages.service", "redis-server.service.d/okome.conf",
        "prometheus-redis-exporter.service.d/okome.conf")}
