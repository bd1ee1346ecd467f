"""keepalived on the frontends: the configuration rendered from the site, the per-node part
written at boot from the node's identity, the check and notify scripts, run for real."""

import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder.identity import render_network, render_vrrp_env
from builder.imagespec import load_image_spec
from builder.lab import lab_mac
from builder.overlay import OVERLAYS_DIR, render_template
from builder.site import load_site

FRONTEND = OVERLAYS_DIR / "frontend"
GENERATOR = FRONTEND / "usr/local/sbin/okome-keepalived-node"
NOTIFY = FRONTEND / "usr/local/libexec/okome/keepalived-notify"
CHECK = FRONTEND / "usr/local/libexec/okome/keepalived-check-nginx"

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="a network namespace needs root and unshare")


def render_config(site_name: str) -> str:
    site = load_site(site_name)
    return render_template(FRONTEND / "etc/keepalived/keepalived.conf.j2",
                           {"site": site, "role": "frontend"})


@pytest.mark.parametrize("site_name", ["lab", "production"])
def test_one_instance_for_the_sites_vip_with_no_per_node_value(site_name):
    site = load_site(site_name)
    config = render_config(site_name)
    assert config.count("vrrp_instance ") == 1
    assert f"{site.vip}/32" in config
    assert f"virtual_router_id {str(site.vip).split('.')[-1]}" in config
    # What differs per node comes from the file written at boot, never from the image.
    assert "include /run/okome/keepalived-node.conf" in config
    for per_node in ("state ", "priority ", "unicast_src_ip", "unicast_peer", "interface "):
        assert not re.search(rf"^\s*{per_node}", config, re.M), per_node
    for node in site.nodes.values():
        assert str(node.address) not in config


def test_non_preemptive_with_script_security_a_tracked_check_and_a_notify_script():
    config = render_config("production")
    assert re.search(r"^\s*nopreempt$", config, re.M)
    assert re.search(r"^\s*enable_script_security$", config, re.M)
    assert re.search(r"^\s*script_user keepalived_script$", config, re.M)
    assert re.search(r"track_script \{\s*okome_nginx\s*\}", config)
    assert "notify /usr/local/libexec/okome/keepalived-notify" in config


def test_the_check_timing_comes_from_the_site():
    lab = load_site("lab").frontend
    config = render_config("lab")
    assert f"interval {lab.vrrp_check_interval_s}\n" in config
    assert f"timeout {lab.vrrp_check_timeout_s}\n" in config
    assert f"fall {lab.vrrp_check_fall}\n" in config
    assert f'/okome/health {lab.vrrp_check_timeout_s}"' in config


def test_the_frontend_image_enables_keepalived_and_tests_its_config():
    spec = load_image_spec("frontend")
    assert "keepalived" in spec.packages and "keepalived.service" in spec.enable
    assert any("keepalived --config-test" in check for check in spec.checks)
    assert "30-frontend" in spec.stages


# --- the per-node part, written at boot -------------------------------------------------------

def run_generator(tmp_path: Path, env_text: str,
                  address: str | None) -> subprocess.CompletedProcess:
    """okome-keepalived-node in a network namespace of its own, where a bridge holds
    `address` (if any), as the node's NIC would."""
    env_file = tmp_path / "vrrp.env"
    env_file.write_text(env_text)
    out = tmp_path / "node.conf"
    setup = "ip link add okome0 type bridge; "
    if address:
        setup += f"ip addr add {address}/24 dev okome0; "
    env = {**os.environ, "OKOME_VRRP_ENV": str(env_file), "OKOME_KEEPALIVED_NODE_CONF": str(out),
           "OKOME_VRRP_WAIT_S": "0"}
    return subprocess.run(["unshare", "--net", "sh", "-c", setup + f"exec {GENERATOR}"],
                          capture_output=True, text=True, env=env)


@needs_root
@pytest.mark.parametrize("node", ["frontend-a", "frontend-b"])
def test_each_node_gets_its_priority_address_and_peer(tmp_path, node):
    site = load_site("lab")
    peer = next(name for name in site.nodes_of_role("frontend") if name != node)
    address = str(site.nodes[node].address)
    result = run_generator(tmp_path, render_vrrp_env(site, node), address)
    assert result.returncode == 0, result.stderr
    part = (tmp_path / "node.conf").read_text()
    assert "state BACKUP" in part  # nopreempt needs it, whatever the site's state
    assert f"priority {site.nodes[node].vrrp.priority}" in part
    assert "interface okome0" in part  # the NIC holding the node's address
    assert f"unicast_src_ip {address}" in part
    assert re.search(rf"unicast_peer \{{\s*{re.escape(str(site.nodes[peer].address))}\s*\}}",
                     part)


@needs_root
@pytest.mark.parametrize("change, message", [
    (("OKOME_VRRP_PRIORITY=150", "OKOME_VRRP_PRIORITY=999"), "OKOME_VRRP_PRIORITY must be"),
    (("OKOME_VRRP_STATE=MASTER", "OKOME_VRRP_STATE=LEADER"), "OKOME_VRRP_STATE must be"),
    (('OKOME_VRRP_PEERS="10.86.0.21"', 'OKOME_VRRP_PEERS="frontend-b"'), "'frontend-b' is not"),
])
def test_a_bad_identity_is_one_line_naming_the_value(tmp_path, change, message):
    env_text = render_vrrp_env(load_site("lab"), "frontend-a").replace(*change)
    result = run_generator(tmp_path, env_text, "10.86.0.20")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


@needs_root
def test_no_interface_with_the_nodes_address_is_an_error(tmp_path):
    result = run_generator(tmp_path, render_vrrp_env(load_site("lab"), "frontend-a"), None)
    assert result.returncode == 1 and "no interface holds 10.86.0.20" in result.stderr


# --- notify: logs and metrics ------------------------------------------------------------------

def notify(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OKOME_VRRP_STATE_DIR": str(tmp_path)}
    # keepalived runs its scripts with this umask
    return subprocess.run(["sh", "-c", 'umask 077; exec "$0" "$@"', str(NOTIFY), *args],
                          capture_output=True, text=True, env=env)


def test_every_transition_is_counted_and_the_state_exported(tmp_path):
    for state in ("BACKUP", "MASTER", "FAULT"):
        assert notify(tmp_path, "INSTANCE", "okome_vip", state, "150").returncode == 0
    metrics = (tmp_path / "okome_vrrp.prom").read_text()
    assert (tmp_path / "okome_vrrp.prom").stat().st_mode & 0o777 == 0o644  # node_exporter reads it
    assert 'okome_vrrp_state{instance="okome_vip",state="FAULT"} 1' in metrics
    assert 'okome_vrrp_state{instance="okome_vip",state="MASTER"} 0' in metrics
    assert 'okome_vrrp_transitions_total{instance="okome_vip"} 3' in metrics
    assert "# TYPE okome_vrrp_transitions_total counter" in metrics
    assert not list(tmp_path.glob("*.tmp"))


def test_notify_refuses_what_keepalived_never_sends(tmp_path):
    assert notify(tmp_path, "INSTANCE", "okome_vip", "'; rm -rf /", "1").returncode == 1
    assert not (tmp_path / "okome_vrrp.prom").exists()


# --- the tracked check -------------------------------------------------------------------------

class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the base class's name
        self.send_response(200 if self.path == "/okome/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def health_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_the_check_passes_only_on_a_200_from_the_port(health_server):
    def check(port, path):
        return subprocess.run([str(CHECK), str(port), path, "1"], capture_output=True).returncode

    assert check(health_server, "/okome/health") == 0
    assert check(health_server, "/elsewhere") != 0
    with ThreadingHTTPServer(("127.0.0.1", 0), _Health) as unused:
        closed_port = unused.server_address[1]
    assert check(closed_port, "/okome/health") != 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck")
def test_the_scripts_are_shellcheck_clean():
    scripts = [GENERATOR, NOTIFY, CHECK,
               Path("stages/30-frontend/00-keepalived/00-run-chroot.sh").resolve()]
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- the lab's view of a node ------------------------------------------------------------------

def test_the_lab_binds_the_static_address_to_its_lab_nic_by_mac():
    site = load_site("lab")
    mac = lab_mac(site.nodes["frontend-b"].address)
    assert mac == "52:54:00:56:00:15"
    network = render_network(site, "frontend-b", match=f"MACAddress={mac}")
    assert f"[Match]\nMACAddress={mac}\n" in network
    assert "Address=10.86.0.21/24" in network
    # A flashed card matches every wired NIC, as before.
    assert "Name=en* eth*" in render_network(site, "frontend-b")


@pytest.mark.parametrize("args, message", [
    (["lab", "status", "--lab-dir", "/nonexistent/lab"], "error: no lab is up in /nonexistent"),
    (["lab", "chaos", "unplug-everything"], "'unplug-everything' is not one of 'nginx-killed'"),
])
def test_lab_mistakes_are_one_line(args, message):
    result = subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
