"""The frontend's rendered configuration, parsed with crossplane: the directives that are in
effect in each location, counting what it inherits from the server and http levels.
"""

import re
import shutil
import subprocess
from pathlib import Path

import crossplane
import pydantic
import pytest

from builder.errors import UserError
from builder.frontend_settings import FrontendSettings
from builder.overlay import OVERLAYS_DIR
from builder.site import Site, load_site
from builder.yamlfile import load_model
from tests.frontend_rootfs import render_frontend_rootfs

# What nginx uses where a directive appears at no level.
NGINX_DEFAULTS = {
    "proxy_buffering": ["on"],
    "proxy_request_buffering": ["on"],
    "proxy_cache": ["off"],
    "gzip": ["off"],
    "proxy_http_version": ["1.0"],
    "proxy_next_upstream": ["error", "timeout"],
}
OBSERVABILITY_HEADERS = {"X-Cache-Status", "X-Request-ID", "X-Served-By", "X-Upstream-Status",
                         "X-Upstream-Response-Time", "X-Gateway-State"}


class Block:
    """A directive in the parsed tree, knowing its enclosing block."""

    def __init__(self, directive: dict, parent: "Block | None"):
        self.name = directive["directive"]
        self.args = directive.get("args", [])
        self.parent = parent
        self.children = [Block(child, self) for child in directive.get("block", [])]

    def find(self, name: str) -> list["Block"]:
        return [child for child in self.children if child.name == name]

    def walk(self):
        for child in self.children:
            yield child
            yield from child.walk()

    def effective_all(self, name: str) -> list[list[str]]:
        """Every occurrence at the nearest level that has one: how nginx inherits."""
        level: Block | None = self
        while level is not None:
            found = level.find(name)
            if found:
                return [directive.args for directive in found]
            level = level.parent
        return [NGINX_DEFAULTS[name]] if name in NGINX_DEFAULTS else []

    def effective(self, name: str) -> list[str]:
        found = self.effective_all(name)
        assert len(found) <= 1, f"{name} appears {len(found)} times at one level"
        return found[0] if found else []


def parse_rendered(site: Site, root: Path) -> Block:
    conf = render_frontend_rootfs(site, root)
    payload = crossplane.parse(str(conf), combine=True)
    assert payload["status"] == "ok", payload["errors"]
    return Block({"directive": "main", "block": payload["config"][0]["parsed"]}, None)


@pytest.fixture(scope="module")
def production_site() -> Site:
    return load_site("production")


@pytest.fixture(scope="module")
def main(production_site, tmp_path_factory) -> Block:
    return parse_rendered(production_site, tmp_path_factory.mktemp("rootfs"))


@pytest.fixture(scope="module")
def server(main) -> Block:
    (http,) = main.find("http")
    (server,) = http.find("server")
    return server


def locations(server: Block) -> list[Block]:
    return [block for block in server.walk() if block.name in ("location", "if")]


def location(server: Block, *args: str) -> Block:
    (found,) = [block for block in server.find("location") if block.args == list(args)]
    return found


def matching_location(server: Block, uri: str) -> Block:
    """The location nginx picks for `uri`: exact, else the longest prefix if it is ^~, else the
    first regex that matches, else the longest prefix."""
    candidates = [block for block in server.find("location") if not block.args[0].startswith("@")]
    for block in candidates:
        if block.args[:1] == ["="] and block.args[1] == uri:
            return block
    prefixes = [b for b in candidates if len(b.args) == 1 or b.args[0] == "^~"]
    prefixes = [b for b in prefixes if uri.startswith(b.args[-1])]
    longest = max(prefixes, key=lambda b: len(b.args[-1]), default=None)
    if longest is not None and longest.args[0] == "^~":
        return longest
    for block in candidates:
        if block.args[0] in ("~", "~*"):
            flags = re.IGNORECASE if block.args[0] == "~*" else 0
            if re.search(block.args[1], uri, flags):
                return block
    return longest


def proxies(block: Block) -> bool:
    return bool(block.effective("proxy_pass")) or any(
        child.name == "proxy_pass" for child in block.walk())


# --- streaming ------------------------------------------------------------------------------

def test_streaming_locations_pass_bytes_through_untouched(server, production_site):
    settings = production_site.frontend
    for path in production_site.gateway.streaming_paths:
        stream = location(server, "^~", path)
        assert stream.effective("proxy_cache") == ["off"], path
        assert stream.effective("proxy_buffering") == ["off"], path
        assert stream.effective("proxy_request_buffering") == ["off"], path
        assert stream.effective("gzip") == ["off"], path
        assert stream.effective("proxy_http_version") == ["1.1"], path
        assert stream.effective("proxy_next_upstream") == ["off"], path
        assert "X-Accel-Buffering" in stream.effective("proxy_ignore_headers"), path
        for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
            assert stream.effective(timeout) == [f"{settings.stream_timeout_s}s"], path
        assert stream.effective("limit_conn") == ["okome_streams",
                                                  str(settings.streams_per_agent)]


def test_streaming_upstream_keeps_alive_and_upgrades(server, main):
    headers = {args[0]: args[1] for args in server.effective_all("proxy_set_header")}
    assert headers["Connection"] == "$okome_connection"
    assert headers["Upgrade"] == "$http_upgrade"
    (http,) = main.find("http")
    (connection_map,) = [m for m in http.find("map") if m.args[1] == "$okome_connection"]
    values = {child.name: child.args for child in connection_map.children}
    assert values == {"": [""], "default": ["upgrade"]}
    (gateway,) = [u for u in http.find("upstream") if u.args == ["okome_gateway"]]
    assert gateway.find("keepalive")


def test_streaming_paths_win_over_the_static_asset_rule(server, production_site):
    for path in production_site.gateway.streaming_paths:
        for uri in (f"{path}chat/completions", f"{path}bundle.js", f"{path}logo.PNG"):
            assert matching_location(server, uri).args == ["^~", path], uri
    assert matching_location(server, "/static/app.js").args[0] == "~*"
    assert matching_location(server, "/api/v1/chats").args == ["/"]


# --- caching --------------------------------------------------------------------------------

def test_wherever_the_cache_is_on_buffering_is_on(server, main):
    (http,) = main.find("http")
    for level in (http, server):
        assert ["off"] not in [b.args for b in level.find("proxy_buffering")]
    cached = [b for b in locations(server) if b.effective("proxy_cache") != ["off"] and proxies(b)]
    assert len(cached) >= 2
    for block in cached:
        assert block.effective("proxy_buffering") == ["on"], block.args


def test_cached_locations_serve_stale_lock_and_update_in_the_background(server, production_site):
    settings = production_site.frontend
    for uri in ("/", "/static/app.js"):
        block = matching_location(server, uri)
        assert block.effective("proxy_cache") == ["okome"]
        assert set(block.effective("proxy_cache_use_stale")) >= {
            "error", "timeout", "updating", "http_500", "http_502", "http_503", "http_504"}
        assert block.effective("proxy_cache_background_update") == ["on"]
        assert block.effective("proxy_cache_lock") == ["on"]
        assert block.effective("proxy_connect_timeout") == [f"{settings.cache_connect_timeout_s}s"]
        assert block.effective("proxy_pass") == ["http://$okome_upstream"]


def test_only_static_assets_get_a_ttl_of_their_own(server, production_site):
    static = matching_location(server, "/assets/index.css")
    ttl = production_site.frontend.static_ttl_s
    assert static.effective("proxy_cache_valid") == ["200", f"{ttl}s"]
    assert matching_location(server, "/api/config").effective("proxy_cache_valid") == []


def test_cache_key_carries_the_site_key_version(server, production_site, tmp_path):
    key = server.effective("proxy_cache_key")[0]
    assert key.startswith(f"v{production_site.frontend.cache_key_version}|")

    bumped = production_site.model_copy(update={"frontend": production_site.frontend.model_copy(
        update={"cache_key_version": production_site.frontend.cache_key_version + 1})})
    (http,) = parse_rendered(bumped, tmp_path).find("http")
    bumped_key = http.find("server")[0].effective("proxy_cache_key")[0]
    assert bumped_key != key and bumped_key.startswith(f"v{bumped.frontend.cache_key_version}|")


def test_cache_size_is_capped_for_an_sd_card(main, production_site):
    (http,) = main.find("http")
    (cache_path,) = http.find("proxy_cache_path")
    settings = production_site.frontend
    assert f"max_size={settings.cache_max_size_mb}m" in cache_path.args
    assert f"min_free={settings.cache_min_free_mb}m" in cache_path.args
    assert "use_temp_path=off" in cache_path.args


# --- headers, errors, limits ----------------------------------------------------------------

def test_every_location_inherits_the_observability_headers_on_every_status(server):
    for block in locations(server):
        headers = {args[0]: args for args in block.effective_all("add_header")}
        assert set(headers) >= OBSERVABILITY_HEADERS | {"Retry-After"}, block.args
        assert all(args[-1] == "always" for args in headers.values()), block.args


def test_no_location_cuts_the_server_level_lists_it_would_otherwise_inherit(server):
    for block in locations(server):
        for name in ("add_header", "proxy_set_header", "error_page", "limit_req"):
            assert not block.find(name), f"{name} in location {block.args}"


def test_nginx_errors_become_json_with_retry_after(server, production_site):
    pages = {tuple(args[:-2]): args[-2:] for args in server.effective_all("error_page")}
    assert pages[("502", "503", "504")] == ["=503", "@okome_gateway_unavailable"]
    assert pages[("429",)] == ["=429", "@okome_rate_limited"]
    unavailable = location(server, "@okome_gateway_unavailable")
    assert unavailable.effective("default_type") == ["application/json"]
    assert unavailable.find("set")[0].args == [
        "$okome_retry_after", str(production_site.frontend.probe_interval_s)]


def test_rate_limits_apply_per_client_and_agent_but_not_to_health(server, main,
                                                                  production_site):
    settings = production_site.frontend
    limits = server.effective_all("limit_req")
    assert ["zone=okome_per_client", f"burst={settings.client_burst}", "nodelay"] in limits
    assert ["zone=okome_per_agent", f"burst={settings.agent_burst}", "nodelay"] in limits
    (http,) = main.find("http")
    (exempt,) = [m for m in http.find("map") if m.args == ["$uri", "$okome_rate_exempt"]]
    exempt_paths = {child.name for child in exempt.children if child.args == ["1"]}
    assert exempt_paths == {"/okome/health", "/okome/status", production_site.gateway.health_path}
    zones = {args[1].split(":")[0]: args for args in
             (b.args for b in http.find("limit_req_zone"))}
    assert zones["zone=okome_per_client"][2] == f"rate={settings.client_rate_per_s}r/s"
    (agent_key,) = [m for m in http.find("map") if m.args[1] == "$okome_agent_key"]
    assert {c.name: c.args for c in agent_key.children}["default"] == ["$http_x_okome_agent"]


def test_gateway_state_is_read_per_request_without_reload(server, main):
    (check,) = server.find("if")
    assert check.args[0] == "-f" and check.args[1].endswith("/run/okome/gateway-down")
    (http,) = main.find("http")
    assert not http.find("open_file_cache"), "a cached stat() would hide the probe's verdict"


def test_served_by_is_the_nodes_runtime_hostname(server):
    headers = {args[0]: args[1] for args in server.effective_all("add_header")}
    assert headers["X-Served-By"] == "$hostname"


# --- no addresses in templates --------------------------------------------------------------

def test_gateway_address_appears_only_in_upstream_servers(main, production_site):
    address = str(production_site.gateway.host)
    (http,) = main.find("http")
    for block in http.walk():
        if any(address in arg for arg in block.args):
            assert block.name == "server" and block.parent.name == "upstream", block.args


def test_templates_hold_no_address_literal():
    literal = re.compile(r"\b(?!127\.0\.0\.1\b)\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")
    for path in (OVERLAYS_DIR / "frontend").rglob("*"):
        if path.is_file():
            assert not literal.findall(path.read_text()), path


# --- settings -------------------------------------------------------------------------------

def test_settings_reject_a_probe_timeout_as_long_as_its_interval():
    with pytest.raises(pydantic.ValidationError, match="probe_timeout_s"):
        FrontendSettings(probe_interval_s=2, probe_timeout_s=2)


def test_a_header_name_nginx_cannot_read_is_an_error_with_its_line(tmp_path):
    site_file = tmp_path / "site.yaml"
    text = (Path(__file__).resolve().parents[2] / "sites/lab.yaml").read_text()
    site_file.write_text(text.replace("frontend:\n", "frontend:\n  agent_header: X_Agent Name\n"))
    with pytest.raises(UserError, match=r"site.yaml:\d+: frontend.agent_header"):
        load_model(site_file, Site)


def test_every_setting_has_a_description():
    for name, field in FrontendSettings.model_fields.items():
        assert field.description, name


# --- units and scripts ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab_rootfs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lab-rootfs")
    render_frontend_rootfs(load_site("lab"), root)
    return root


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_pass_systemd_analyze_verify(lab_rootfs):
    # The units' dependencies (timers.target, nginx.service, ...) come from this host's systemd.
    shutil.copytree("/usr/lib/systemd/system", lab_rootfs / "usr/lib/systemd/system",
                    dirs_exist_ok=True, symlinks=True)
    units = sorted(str(p.relative_to(lab_rootfs)) for p in
                   (lab_rootfs / "etc/systemd/system").glob("okome-*"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={lab_rootfs}",
                             *units], capture_output=True, text=True, cwd=lab_rootfs)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_probe_timer_runs_from_boot_at_the_site_interval(lab_rootfs):
    timer = (lab_rootfs / "etc/systemd/system/okome-gateway-probe.timer").read_text()
    interval = load_site("lab").frontend.probe_interval_s
    assert f"OnUnitActiveSec={interval}s" in timer
    assert "OnBootSec=" in timer and "AccuracySec=100ms" in timer


def test_tmpfiles_recreate_what_tmpfs_loses(lab_rootfs):
    entries = (lab_rootfs / "etc/tmpfiles.d/okome-frontend.conf").read_text()
    for path in ("/var/log/nginx", "/run/okome", "/var/cache/nginx/okome"):
        assert re.search(rf"^d {re.escape(path)} ", entries, re.MULTILINE), path


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck")
def test_scripts_are_shellcheck_clean():
    scripts = sorted((OVERLAYS_DIR / "frontend/usr/local/sbin").iterdir())
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
