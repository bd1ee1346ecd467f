"""A node's identity files, made from the site at flash time: what each node gets, and the one
line an operator sees when a key or a secret is missing."""

import configparser
import hashlib
import secrets
import subprocess

import pytest

from builder.assemble import BOOT_PARTUUID, ROOT_PARTUUID
from builder.errors import UserError
from builder.identity import node_identity
from builder.imagespec import load_image_spec
from builder.overlay import render_overlay
from builder.site import Source

GATEWAY_PASSWORD = secrets.token_hex(20)
METRICS_PASSWORD = secrets.token_hex(20)


@pytest.fixture(scope="module")
def admin_key(tmp_path_factory):
    key = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "operator@lab",
                    "-f", str(key)], check=True)
    return key.with_suffix(".pub").read_text()


@pytest.fixture(autouse=True)
def lab_sources(monkeypatch, admin_key):
    monkeypatch.setenv("OKOME_LAB_ADMIN_KEYS", admin_key)
    monkeypatch.setenv("OKOME_LAB_REDIS_GATEWAY_PASSWORD", GATEWAY_PASSWORD)
    monkeypatch.setenv("OKOME_LAB_REDIS_METRICS_PASSWORD", METRICS_PASSWORD)


def parse_network(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(text)
    return parser


def environment(text: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in text.splitlines() if line and line[0] != "#"]
    return {name: value.strip('"') for name, value in pairs}


def test_two_frontends_differ_only_in_what_makes_them_a_node(lab_site):
    a = node_identity(lab_site, "frontend-a", "frontend")
    b = node_identity(lab_site, "frontend-b", "frontend")
    assert set(a) == set(b) == {"hostname", "authorized_keys", "network", "vrrp.env"}
    assert (a["hostname"], b["hostname"]) == (b"frontend-a\n", b"frontend-b\n")
    assert a["authorized_keys"] == b["authorized_keys"]
    assert a["network"] != b["network"] and a["vrrp.env"] != b["vrrp.env"]


def test_the_network_file_gives_the_sites_static_address_router_and_dns(lab_site):
    network = parse_network(node_identity(lab_site, "frontend-b")["network"].decode())
    node, prefix = lab_site.nodes["frontend-b"], lab_site.network.prefix
    assert network["Network"]["Address"] == f"{node.address}/{prefix.prefixlen}"
    assert network["Network"]["Gateway"] == str(lab_site.network.router)
    assert network["Network"]["DNS"] == str(lab_site.network.dns[-1])
    # The same interfaces as the DHCP fallback, which this file replaces by sorting first.
    assert network["Match"]["Name"] == "en* eth*"


def test_vrrp_settings_name_the_state_priority_peer_and_vip(lab_site):
    settings = environment(node_identity(lab_site, "frontend-a")["vrrp.env"].decode())
    a, b = lab_site.nodes["frontend-a"], lab_site.nodes["frontend-b"]
    assert settings["OKOME_VRRP_STATE"] == a.vrrp.state
    assert settings["OKOME_VRRP_PRIORITY"] == str(a.vrrp.priority)
    assert settings["OKOME_VRRP_ADDRESS"] == str(a.address)
    assert settings["OKOME_VRRP_PEERS"] == str(b.address)
    assert settings["OKOME_VRRP_VIP"] == f"{lab_site.vip}/{lab_site.network.prefix.prefixlen}"


def test_the_backend_gets_redis_credentials_and_never_the_gateway_password(lab_site):
    files = node_identity(lab_site, "backend", "backend")
    assert "vrrp.env" not in files
    acl = files["redis-users.acl"].decode()
    assert hashlib.sha256(GATEWAY_PASSWORD.encode()).hexdigest() in acl
    assert GATEWAY_PASSWORD not in b"".join(files.values()).decode()
    assert files["redis-exporter.env"].decode() == f"REDIS_PASSWORD={METRICS_PASSWORD}\n"


def test_a_frontend_card_holds_no_secret(lab_site):
    files = b"".join(node_identity(lab_site, "frontend-a").values()).decode()
    assert GATEWAY_PASSWORD not in files and METRICS_PASSWORD not in files


def test_every_identity_file_is_named_by_the_roles_identity_lists(lab_site, tmp_path):
    """A file the lists do not name would sit on the card and never reach the node."""
    for role in ("frontend", "backend"):
        root = tmp_path / role
        for overlay in load_image_spec(role).overlays:
            render_overlay(overlay, root, {
                "site": lab_site, "role": role, "image": load_image_spec(role),
                "partitions": {"boot": BOOT_PARTUUID, "root": ROOT_PARTUUID}})
        listed = {line.split()[0] for path in (root / "etc/okome/identity.d").glob("*.list")
                  for line in path.read_text().splitlines()
                  if line.strip() and not line.startswith("#")}
        node = next(name for name, node in lab_site.nodes.items() if node.role == role)
        assert set(node_identity(lab_site, node)) - {"hostname"} <= listed, role


def test_a_missing_variable_is_one_line_naming_it(lab_site, monkeypatch):
    monkeypatch.delenv("OKOME_LAB_REDIS_METRICS_PASSWORD")
    with pytest.raises(UserError) as raised:
        node_identity(lab_site, "backend")
    assert "OKOME_LAB_REDIS_METRICS_PASSWORD" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_secret_the_site_does_not_list_is_named(lab_site):
    site = lab_site.model_copy(update={"secrets": {}})
    with pytest.raises(UserError, match="names no secret 'redis_gateway_password'"):
        node_identity(site, "backend")


def test_a_missing_key_file_is_named(lab_site, tmp_path):
    missing = tmp_path / "no-such-keys.pub"
    admin = lab_site.admin.model_copy(update={"authorized_keys": Source(file=str(missing))})
    with pytest.raises(UserError, match="no-such-keys.pub"):
        node_identity(lab_site.model_copy(update={"admin": admin}), "frontend-a")


def test_file_secrets_lose_the_newline_an_editor_adds(lab_site, tmp_path):
    (tmp_path / "gateway").write_text(GATEWAY_PASSWORD + "\n")
    (tmp_path / "metrics").write_text(METRICS_PASSWORD + "\n")
    site = lab_site.model_copy(update={"secrets": {
        "redis_gateway_password": Source(file=str(tmp_path / "gateway")),
        "redis_metrics_password": Source(file=str(tmp_path / "metrics"))}})
    files = node_identity(site, "backend")
    assert files["redis-exporter.env"].decode() == f"REDIS_PASSWORD={METRICS_PASSWORD}\n"


def test_a_key_variable_holding_a_path_says_to_put_the_key_itself(lab_site, monkeypatch):
    monkeypatch.setenv("OKOME_LAB_ADMIN_KEYS", "~/.ssh/id_ed25519.pub")
    with pytest.raises(UserError) as raised:
        node_identity(lab_site, "frontend-a")
    assert "not an SSH public key" in raised.value.message
    assert "must hold the keys themselves" in raised.value.hint


def test_keys_are_kept_one_per_line_without_blank_lines_or_comments(lab_site, monkeypatch,
                                                                     admin_key):
    monkeypatch.setenv("OKOME_LAB_ADMIN_KEYS", f"# operators\n\n{admin_key}\r\n")
    keys = node_identity(lab_site, "frontend-a")["authorized_keys"].decode()
    assert keys == admin_key.strip() + "\n"


def test_an_unknown_node_lists_the_known_ones(lab_site):
    with pytest.raises(UserError) as raised:
        node_identity(lab_site, "frontend-c")
    assert "frontend-a" in raised.value.hint and "backend" in raised.value.hint


def test_a_node_of_another_role_is_refused(lab_site):
    with pytest.raises(UserError, match="runs the backend image, not frontend"):
        node_identity(lab_site, "backend", "frontend")


def test_a_node_name_that_is_no_hostname_is_refused(lab_site):
    nodes = {**lab_site.nodes, "Frontend_C": lab_site.nodes["frontend-a"]}
    with pytest.raises(UserError, match="not a usable hostname"):
        node_identity(lab_site.model_copy(update={"nodes": nodes}), "Frontend_C")
