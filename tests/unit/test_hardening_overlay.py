"""The hardening every role shares, rendered for each role and site: what spares the SD card,
SSH, fail2ban, the firewall, node_exporter and time, and the read-only root's boot scripts.

Fast: nothing is built or booted. The host's own tools stand in for the image's where they are
the same program (nft, systemd-analyze, systemd-tmpfiles, shellcheck); the firewall is loaded and
probed with real packets inside network namespaces the test makes and drops.
"""

import configparser
import os
import re
import shlex
import subprocess
from ipaddress import IPv4Address, ip_network
from pathlib import Path

import pytest
from firewall_probe import probe_firewall

from builder.assemble import BOOT_PARTUUID, ROOT_PARTUUID
from builder.imagespec import load_image_spec
from builder.overlay import OVERLAYS_DIR, render_overlay, render_template
from builder.paths import STAGES_DIR
from builder.site import Site, load_site

ROLES = ["frontend", "backend"]
SITES = ["lab", "production"]
READONLY_STAGE = STAGES_DIR / "10-boot" / "05-readonly-root"
TMPFS_PATHS = {"/tmp", "/var/tmp", "/var/log", "/var/lib/prometheus/node-exporter"}
MASKED = ["apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "man-db.timer",
          "e2scrub_all.timer", "e2scrub_reap.service", "swap.target", "dphys-swapfile.service",
          "zramswap.service"]
NODE_EXPORTER_PORT = 9100

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def context(site: Site, role: str) -> dict:
    image = load_image_spec(role) if role in ROLES else load_image_spec("frontend")
    return {"site": site, "role": role, "image": image,
            "partitions": {"boot": BOOT_PARTUUID, "root": ROOT_PARTUUID}}


def render_root(root: Path, site: Site, role: str) -> Path:
    """The common and hardening overlays as the image gets them, the role's too if it has one."""
    overlays = ["common", "hardening"] + ([role] if role in ROLES else [])
    for overlay in overlays:
        render_overlay(overlay, root, context(site, role))
    return root


def settings(text: str) -> dict[str, list[str]]:
    """`key = value` and `Key=value` lines (sysctl.d, systemd units) as {key: [value, ...]}."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def sshd_settings(text: str) -> dict[str, str]:
    """sshd_config lines as {lowercase keyword: value}, the first value winning as in sshd."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, value = line.split(None, 1)
            found.setdefault(keyword.lower(), value.strip())
    return found


def fstab(root: Path) -> dict[str, list[str]]:
    """/etc/fstab as {mount point: [source, type, options, dump, pass]}."""
    entries = {}
    for line in (root / "etc/fstab").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            source, target, *rest = line.split()
            entries[target] = [source, *rest]
    return entries


def nft_set(ruleset: str, name: str) -> set[str]:
    """The elements a rendered ruleset declares for one named set."""
    match = re.search(rf"set {name} {{(.*?)\n    }}", ruleset, re.S)
    assert match, f"no set {name}"
    elements = re.search(r"elements = \{ (.*) \}", match.group(1))
    return set(elements.group(1).split(", ")) if elements else set()


@pytest.fixture(scope="module", params=[(s, r) for s in SITES for r in ROLES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def rendered(request, tmp_path_factory):
    site_name, role = request.param
    site = load_site(site_name)
    root = render_root(tmp_path_factory.mktemp(f"{site_name}-{role}"), site, role)
    return site, role, root


def documentation_site() -> Site:
    """The lab site moved onto TEST-NET-1 (RFC 5737), addresses no real network uses, so the
    firewall can be probed with them on a veth pair between namespaces of the test's own."""
    data = load_site("lab").model_dump(mode="json")
    data["network"].update(prefix="192.0.2.0/24", router="192.0.2.1", dns=["192.0.2.1"],
                           admin_networks=["192.0.2.96/28"],
                           monitoring_networks=["192.0.2.112/28"])
    data.update(vip="192.0.2.18", gpu_host="192.0.2.30")
    data["gateway"]["host"] = "192.0.2.25"
    data["nodes"]["frontend-a"]["address"] = "192.0.2.20"
    data["nodes"]["frontend-b"]["address"] = "192.0.2.21"
    data["nodes"]["backend"]["address"] = "192.0.2.19"
    data["backend"]["extra_clients"] = ["192.0.2.200/32"]
    return Site.model_validate(data)


# -- no addresses of their own ------------------------------------------------------------------

def test_templates_and_scripts_hold_no_addresses_of_their_own():
    for tree in (OVERLAYS_DIR / "hardening", READONLY_STAGE):
        for path in tree.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert not re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", path.read_text()), path


# -- SD-card wear -------------------------------------------------------------------------------

def test_root_is_mounted_noatime_with_the_commit_interval_writeback_waits_for(rendered):
    _, _, root = rendered
    entries = fstab(root)
    source, fstype, options, _, fsck_pass = entries["/"]
    assert (source, fstype, fsck_pass) == ("PARTUUID=" + ROOT_PARTUUID, "ext4", "1")
    options = options.split(",")
    assert "noatime" in options
    commit = int(next(o for o in options if o.startswith("commit=")).split("=")[1])
    assert commit >= 30
    flash = settings((root / "etc/sysctl.d/60-okome-flash.conf").read_text())
    assert int(flash["vm.dirty_expire_centisecs"][0]) == commit * 100
    assert int(flash["vm.dirty_writeback_centisecs"][0]) > 500
    assert entries["/boot/firmware"][2].split(",")[:2] == ["defaults", "noatime"]


def test_busy_paths_are_tmpfs_with_a_size_cap_that_fits_the_smallest_board(rendered):
    _, _, root = rendered
    entries = fstab(root)
    caps_mib = 0
    for path in TMPFS_PATHS:
        source, fstype, options, *_ = entries[path]
        assert (source, fstype) == ("tmpfs", "tmpfs"), path
        options = dict(o.partition("=")[::2] for o in options.split(","))
        assert {"nosuid", "nodev", "noexec"} <= options.keys(), path
        caps_mib += int(options["size"].removesuffix("M"))
    assert caps_mib <= 256, "the caps together must leave a 1 GiB board room to run"


def test_no_swap_and_nothing_that_would_make_one(rendered):
    _, _, root = rendered
    assert all(entry[1] != "swap" for entry in fstab(root).values())
    for unit in ["swap.target", "dphys-swapfile.service", "zramswap.service"]:
        assert os.readlink(root / "etc/systemd/system" / unit) == "/dev/null"
    assert settings((root / "etc/sysctl.d/60-okome-flash.conf").read_text())["vm.swappiness"] \
        == ["0"]


def test_journal_is_in_memory_and_capped(rendered):
    _, _, root = rendered
    journald = settings((root / "etc/systemd/journald.conf.d/okome.conf").read_text())
    assert journald["Storage"] == ["volatile"]
    assert journald["ForwardToSyslog"] == ["no"]
    assert 0 < int(journald["RuntimeMaxUse"][0].removesuffix("M")) <= 64


def test_tmpfiles_make_the_log_directories_and_never_a_journal(rendered, tmp_path):
    _, _, root = rendered
    config = root / "etc/tmpfiles.d/okome-hardening.conf"
    assert "/var/log/journal" not in [line.split()[1] for line in config.read_text().splitlines()
                                      if line.strip() and not line.startswith("#")]
    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(config)],
                   check=True)
    assert (tmp_path / "var/log/apt").is_dir()
    assert not (tmp_path / "var/log/journal").exists()


def test_jobs_that_write_to_the_card_for_no_one_are_masked(rendered):
    _, _, root = rendered
    for unit in MASKED:
        assert os.readlink(root / "etc/systemd/system" / unit) == "/dev/null", unit
    # fstrim stays: telling the card which blocks are free is what keeps its wear levelling fit.
    assert not (root / "etc/systemd/system/fstrim.timer").exists()


def test_timesyncd_saves_the_clock_hourly_not_every_minute(rendered):
    _, _, root = rendered
    timesyncd = settings((root / "etc/systemd/timesyncd.conf.d/okome.conf").read_text())
    assert timesyncd["SaveIntervalSec"] == ["1h"]


def test_node_exporter_textfile_directory_is_the_tmpfs_the_frontend_writes_to(rendered):
    site, role, root = rendered
    args = shlex.split(settings((root / "etc/default/prometheus-node-exporter").read_text())
                       ["ARGS"][0].strip('"'))
    options = dict(arg.removeprefix("--").split("=", 1) for arg in args)
    assert options["web.listen-address"] == f":{NODE_EXPORTER_PORT}"
    assert options["collector.textfile.directory"] in TMPFS_PATHS
    frontend_env = render_template(OVERLAYS_DIR / "frontend/etc/okome/frontend.env.j2",
                                   context(site, role))
    assert f"OKOME_TEXTFILE_DIR={options['collector.textfile.directory']}\n" in frontend_env


# -- root grows on first boot -------------------------------------------------------------------

def test_root_grows_before_the_services_start(rendered):
    _, _, root = rendered
    unit = settings((root / "etc/systemd/system/okome-grow-root.service").read_text())
    assert unit["DefaultDependencies"] == ["no"]
    assert "sysinit.target" in unit["Before"][0].split()
    assert unit["WantedBy"] == ["sysinit.target"]
    script = root / unit["ExecStart"][0].lstrip("/")
    assert script.stat().st_mode & 0o777 == 0o755


def test_units_pass_systemd_analyze_verify(rendered):
    _, _, root = rendered
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}",
                             "okome-grow-root.service"], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


# -- SSH ----------------------------------------------------------------------------------------

def test_sshd_hardening_is_read_first_and_admits_only_the_admin_with_a_key(rendered):
    site, _, root = rendered
    dropins = sorted((root / "etc/ssh/sshd_config.d").glob("*.conf"))
    assert dropins[0].name == "01-okome-hardening.conf"
    ours = sshd_settings(dropins[0].read_text())
    assert ours["allowusers"] == site.admin.user
    assert ours["permitrootlogin"] == "no"
    assert ours["passwordauthentication"] == "no"
    assert ours["kbdinteractiveauthentication"] == "no"
    assert ours["authenticationmethods"] == "publickey"
    assert ours["x11forwarding"] == "no"
    assert int(ours["maxauthtries"]) <= 3
    # A later drop-in may only agree: for sshd the first value read wins.
    for later in dropins[1:]:
        for keyword, value in sshd_settings(later.read_text()).items():
            if keyword in ours:
                assert value == ours[keyword], f"{later.name}: {keyword}"


def test_rare_protocols_core_dumps_and_strangers_are_turned_away(rendered):
    _, _, root = rendered
    modprobe = (root / "etc/modprobe.d/okome-unused-modules.conf").read_text()
    for module in ["dccp", "sctp", "rds", "tipc", "firewire-core"]:
        assert f"install {module} /bin/true" in modprobe.splitlines(), module
    assert "usb" not in modprobe.replace("USB storage stays", ""), "a Pi may boot from USB"
    limits = [line.split() for line in
              (root / "etc/security/limits.d/okome-no-core-dumps.conf").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert limits == [["*", "hard", "core", "0"]]
    for banner in ["etc/issue", "etc/issue.net"]:
        assert "authorised" in (root / banner).read_text()

# -- fail2ban -----------------------------------------------------------------------------------

def test_fail2ban_reads_sshd_from_the_journal_bans_with_nftables_and_writes_nothing(rendered):
    _, _, root = rendered
    jail = configparser.ConfigParser(interpolation=None)
    jail.read(root / "etc/fail2ban/jail.d/okome.local")
    assert jail["sshd"]["enabled"] == "true" and jail["sshd"]["backend"] == "systemd"
    assert jail["DEFAULT"]["banaction"] == "nftables-multiport"
    assert int(jail["DEFAULT"]["maxretry"]) >= 3
    server = configparser.ConfigParser(interpolation=None)
    server.read(root / "etc/fail2ban/fail2ban.d/okome.local")
    assert server["Definition"]["logtarget"] == "SYSTEMD-JOURNAL"
    assert server["Definition"]["dbfile"] == ":memory:"
    dropin = settings((root / "etc/systemd/system/fail2ban.service.d/okome.conf").read_text())
    assert dropin["PartOf"] == ["nftables.service"]


# -- firewall -----------------------------------------------------------------------------------

def nft_in_namespace(script: str) -> subprocess.CompletedProcess:
    """A shell script run in a network namespace of its own, so nft touches no real ruleset."""
    return subprocess.run(["unshare", "--net", "sh", "-euc", script], capture_output=True,
                          text=True)


@needs_root
@pytest.mark.parametrize("site_name", SITES)
@pytest.mark.parametrize("role", ROLES + ["a-future-role"])
def test_ruleset_loads_twice_and_drops_what_it_does_not_name(site_name, role, tmp_path):
    ruleset = tmp_path / "nftables.conf"
    ruleset.write_text(render_template(OVERLAYS_DIR / "hardening/etc/nftables.conf.j2",
                                       context(load_site(site_name), role)))
    result = nft_in_namespace(f"nft -c -f {ruleset}; nft -f {ruleset}; nft -f {ruleset}; "
                              "nft list ruleset")
    assert result.returncode == 0, result.stderr
    listing = result.stdout
    assert listing.count("table inet okome {") == 1
    assert "hook input priority filter; policy drop;" in listing
    assert "hook forward priority filter; policy drop;" in listing
    assert not [line for line in ruleset.read_text().splitlines()
                if line.strip().startswith("flush")], "reloading must not flush other tables"


@needs_root
def test_reloading_the_firewall_leaves_fail2ban_and_redis_tables_alone(tmp_path):
    site = load_site("lab")
    root = render_root(tmp_path / "root", site, "backend")
    fail2ban = tmp_path / "f2b.nft"
    fail2ban.write_text("table inet f2b-table {\n  chain f2b-chain {\n"
                        "    type filter hook input priority -1;\n  }\n}\n")
    okome = root / "etc/nftables.conf"
    redis = root / "etc/nftables.d/okome-redis.nft"
    result = nft_in_namespace(f"nft -f {okome}; nft -f {fail2ban}; nft -f {redis}; "
                              f"nft -f {okome}; nft list tables")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.splitlines()) == {"table inet okome", "table inet f2b-table",
                                               "table inet okome_redis"}


def test_backend_firewall_admits_redis_from_exactly_the_redis_tables_sources(tmp_path):
    for site_name in SITES:
        site = load_site(site_name)
        root = render_root(tmp_path / site_name, site, "backend")
        ours = (root / "etc/nftables.conf").read_text()
        redis_table = (root / "etc/nftables.d/okome-redis.nft").read_text()
        port = site.backend.port
        theirs = set(re.findall(rf"ip saddr (\S+) tcp dport {port} accept", redis_table))
        assert {str(ip_network(a)) for a in nft_set(ours, "redis_clients")} \
            == {str(ip_network(a)) for a in theirs}
        assert nft_set(ours, "monitoring_networks") \
            == {str(n) for n in site.network.monitoring_networks}


def test_frontend_firewall_names_the_frontends_as_vrrp_peers(rendered):
    site, role, root = rendered
    ruleset = (root / "etc/nftables.conf").read_text()
    assert nft_set(ruleset, "admin_networks") == {str(n) for n in site.network.admin_networks}
    if role == "frontend":
        peers = {str(node.address) for node in site.nodes_of_role("frontend").values()}
        assert nft_set(ruleset, "frontend_peers") == peers
        assert "ip protocol 112 ip saddr @frontend_peers accept" in ruleset
    else:
        assert "frontend_peers" not in ruleset
        assert f"tcp dport {site.frontend.listen_port} accept" not in ruleset


ADMIN, MONITOR, STRANGER = "192.0.2.100", "192.0.2.113", "192.0.2.77"
GATEWAY, FRONTEND_A, FRONTEND_B, EXTRA_CLIENT = "192.0.2.25", "192.0.2.20", "192.0.2.21", \
    "192.0.2.200"


def expect_probes(rulesets: list[Path], node: str, expected: dict[tuple, bool]) -> None:
    probes = [{"source": source, **({"tcp": what} if isinstance(what, int)
                                    else {"ip_protocol": 112})}
              for source, what in expected]
    passed = probe_firewall(rulesets, node, probes)
    wrong = {probe: f"{'passed' if got else 'dropped'}, should have "
                    f"{'passed' if want else 'been dropped'}"
             for (probe, want), got in zip(expected.items(), passed) if got != want}
    assert not wrong, wrong


@needs_root
def test_frontend_firewall_lets_in_exactly_whom_it_names(tmp_path):
    site = documentation_site()
    root = render_root(tmp_path, site, "frontend")
    http = site.frontend.listen_port
    expect_probes([root / "etc/nftables.conf"], FRONTEND_A, {
        (ADMIN, 22): True, (MONITOR, 22): False, (STRANGER, 22): False,
        (MONITOR, NODE_EXPORTER_PORT): True, (ADMIN, NODE_EXPORTER_PORT): False,
        (STRANGER, NODE_EXPORTER_PORT): False,
        (STRANGER, http): True, (ADMIN, http): True,
        (STRANGER, 8080): False, (ADMIN, 6379): False,
        (FRONTEND_B, "vrrp"): True, (STRANGER, "vrrp"): False,
    })


@needs_root
def test_backend_firewall_and_redis_table_together_let_in_exactly_whom_they_name(tmp_path):
    site = documentation_site()
    root = render_root(tmp_path, site, "backend")
    redis, exporter = site.backend.port, site.backend.exporter_port
    expect_probes([root / "etc/nftables.conf", root / "etc/nftables.d/okome-redis.nft"],
                  str(IPv4Address(site.nodes["backend"].address)), {
        (GATEWAY, redis): True, (FRONTEND_A, redis): True, (FRONTEND_B, redis): True,
        (EXTRA_CLIENT, redis): True, (ADMIN, redis): False, (STRANGER, redis): False,
        (MONITOR, exporter): True, (STRANGER, exporter): False, (GATEWAY, exporter): False,
        (MONITOR, NODE_EXPORTER_PORT): True, (ADMIN, 22): True, (STRANGER, 22): False,
        (STRANGER, 80): False, (FRONTEND_B, "vrrp"): False,
    })


# -- scripts ------------------------------------------------------------------------------------

def test_scripts_pass_shellcheck():
    scripts = [OVERLAYS_DIR / "hardening/usr/local/sbin/okome-grow-root",
               READONLY_STAGE / "00-run.sh", *sorted((READONLY_STAGE / "files").iterdir())]
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# -- the read-only root's boot scripts ----------------------------------------------------------

@pytest.mark.parametrize("option", ["yes", "no"])
def test_readonly_stage_always_installs_the_boot_scripts_and_the_flag_only_when_asked(
        option, tmp_path):
    env = {**os.environ, "OKOME_READ_ONLY_ROOT": option}
    subprocess.run(["/bin/bash", "00-run.sh", str(tmp_path)], cwd=READONLY_STAGE, env=env,
                   check=True)
    initramfs = tmp_path / "etc/initramfs-tools"
    for path in ["hooks", "scripts/local-top", "scripts/local-bottom"]:
        script = initramfs / path / "okome-readonly-root"
        assert script.stat().st_mode & 0o777 == 0o755, script
    extra = tmp_path / "etc/default/raspi-extra-cmdline"
    if option == "yes":
        assert extra.read_text().split() == ["okome.readonly=1"]
    else:
        assert not extra.exists()


def test_both_boot_scripts_read_the_same_flag():
    """local-top makes the root read-only and local-bottom lays the overlay on it: they must
    agree on when, or the node boots with a root that is neither written nor writable."""
    def flag_loop(name: str) -> str:
        text = (READONLY_STAGE / "files" / name).read_text()
        return text[text.index("enabled=no"):text.index("done\n")]

    assert flag_loop("local-top") == flag_loop("local-bottom")
    assert "okome.readonly=1) enabled=yes" in flag_loop("local-top")


def test_initramfs_hook_adds_the_overlay_module():
    hook = (READONLY_STAGE / "files/initramfs-hook").read_text()
    assert "manual_add_modules overlay" in hook
    bottom = (READONLY_STAGE / "files/local-bottom").read_text()
    assert "modprobe overlay" in bottom and "-o move" in bottom

