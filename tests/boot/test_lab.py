"""The lab: frontend-a, frontend-b and the backend of the lab site, each booted from its role's
image with its own node identity, on one private network (a bridge in a network namespace the
lab makes and deletes) where the stub gateway listens at the lab gateway's address; the
frontends share the VIP through keepalived. One lab, started with `okome-image lab up`, serves
the whole module; the scenarios run in order on it, each starting from whoever holds the VIP
then, some through the Python API and some through `okome-image lab chaos`; the last test is
`okome-image lab down`.

What the client inside the lab network saw in each scenario (failover time, failed requests)
is printed; run with -s to see it."""

import re
import shlex
import subprocess
import sys

import pytest

from builder.lab import GUEST_CPUS, GUEST_MEMORY_MIB, Lab
from builder.lab_chaos import gateway_down, link_cut, nginx_killed
from tests.conftest import TEST_OUT
from tests.runbook import runbook_blocks

pytestmark = pytest.mark.boot

FRONTENDS = ["frontend-a", "frontend-b"]
NODES = [*FRONTENDS, "backend"]


def okome_image(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lab") / "run"


@pytest.fixture(scope="module")
def lab(built_image, lab_dir):
    """The lab as an operator starts it: `okome-image lab up` boots every node in the
    background; the tests attach to it, as `lab status` and `lab chaos` do."""
    built_image("frontend")
    built_image("backend")
    try:
        up = okome_image("lab", "up", "--out", str(TEST_OUT), "--lab-dir", str(lab_dir))
        assert up.returncode == 0, f"lab up failed:\n{up.stdout}\n{up.stderr}"
        print(f"\nlab up ({GUEST_MEMORY_MIB} MiB, {GUEST_CPUS} vCPU each):\n{up.stdout}")
        yield Lab.attach(lab_dir)
    finally:
        if (lab_dir / "lab.json").exists():
            okome_image("lab", "down", "--lab-dir", str(lab_dir))


def metric(text: str, name: str, **labels) -> float:
    """One sample of a Prometheus text exposition."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    match = re.search(rf"^{name}\{{[^}}]*{re.escape(wanted)}[^}}]*\}} (\S+)$", text, re.M)
    assert match, f"no {name}{{{wanted}}} in:\n{text}"
    return float(match.group(1))


def test_each_frontend_runs_keepalived_with_its_own_part_of_the_config(lab):
    for name in FRONTENDS:
        node = lab.site.nodes[name]
        peer = next(other for other in FRONTENDS if other != name)
        part = lab[name].succeed("cat /run/okome/keepalived-node.conf")
        assert "state BACKUP" in part  # nopreempt: every node starts as BACKUP
        assert f"priority {node.vrrp.priority}" in part
        assert f"unicast_src_ip {node.address}" in part
        assert str(lab.site.nodes[peer].address) in part
        # The same main file on both: the image's.
        assert "nopreempt" in lab[name].succeed("cat /etc/keepalived/keepalived.conf")


def test_exactly_one_node_holds_the_vip_and_nginx_answers_on_it(lab):
    holder = lab.wait_for_one_holder(timeout=60)
    status, body = lab.http_via_vip()
    assert status == 200 and f'"node":"{holder}"' in body


def test_scripts_run_as_the_unprivileged_script_user_and_transitions_are_metrics(lab):
    holder = lab.wait_for_one_holder()
    machine = lab[holder]
    # Written by the notify script: it ran, as keepalived_script.
    owner = machine.succeed("stat -c %U /run/okome/vrrp/transitions").strip()
    assert owner == "keepalived_script"
    assert "SECURITY VIOLATION" not in machine.succeed("journalctl -b -u keepalived --no-pager")
    # node_exporter serves the textfile metrics through the link in its directory.
    metrics = machine.succeed("curl -fsS http://127.0.0.1:9100/metrics")
    assert metric(metrics, "okome_vrrp_state", state="MASTER") == 1
    assert metric(metrics, "okome_vrrp_transitions_total") >= 1
    assert "okome-vrrp" in machine.succeed("journalctl -b -t okome-vrrp --no-pager")


def test_redis_listens_on_loopback_and_the_backends_address_and_frontends_reach_it(lab):
    backend = lab.site.nodes["backend"]
    listening = lab["backend"].succeed(f"ss -Htln 'sport = :{lab.site.backend.port}'")
    assert {line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines()} == \
        {"127.0.0.1", "[::1]", str(backend.address)}
    # A frontend is let through the backend's firewall; redis asks it to log in.
    answer = lab["frontend-a"].succeed(
        f"timeout 10 bash -c 'exec 3<>/dev/tcp/{backend.address}/{lab.site.backend.port}; "
        "printf \"PING\\r\\n\" >&3; head -c 7 <&3'")
    assert answer.startswith("-NOAUTH"), answer


def test_no_failed_unit_on_any_node(lab):
    for name in NODES:
        assert lab[name].wait_for_running(timeout=120) == "running", \
            lab[name].succeed("systemctl --failed --no-pager")


# Runs inside the lab network: COUNT requests at once-ish to URL as one agent; prints how many
# were answered 429.
STORM = r"""
import concurrent.futures, sys, urllib.error, urllib.request
url, header, agent, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def get(_):
    try:
        return opener.open(urllib.request.Request(url, headers={header: agent}), timeout=20).status
    except urllib.error.HTTPError as err:
        return err.code
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    print(sum(status == 429 for status in pool.map(get, range(count))))
"""


def test_every_runbook_command_runs_where_the_runbook_says(lab):
    """docs/runbook.md's "how to see it" blocks, each on the nodes it names, run by bash with
    `set -eo pipefail`: every command of every pipeline exits 0 and each block prints
    something. A rate-limit storm on each frontend comes first, so the storm's block has one
    to find."""
    holder = lab.wait_for_one_holder()
    settings = lab.site.frontend
    for name in FRONTENDS:
        storm = lab.run_in_network(
            [sys.executable, "-c", STORM, f"http://{lab.site.nodes[name].address}/api/profile",
             settings.agent_header, "runbook-storm", str(settings.agent_burst * 3)], timeout=300)
        assert storm.returncode == 0 and int(storm.stdout) > 0, \
            f"no 429 from {name}: {storm.stdout} {storm.stderr}"

    where = {"on a frontend": FRONTENDS, "on the backend": ["backend"], "on any node": NODES}
    for block in runbook_blocks():
        script = "set -eo pipefail\n" + block.commands
        if block.place == "from the admin network":
            result = lab.run_in_network(["bash", "-c", f"VIP={lab.vip}\n{script}"])
            assert result.returncode == 0 and result.stdout.strip(), \
                f"runbook line {block.line}, from the lab network: {result.stderr}"
            assert f'"node":"{holder}"' in result.stdout
            continue
        for name in where[block.place]:
            output = lab[name].succeed(f"bash -c {shlex.quote(script)}")
            assert output.strip(), f"runbook line {block.line} printed nothing on {name}"
            if block.section == "Rate-limit storm":
                assert int(output.split()[0]) > 0, f"{name}: the storm is not in the log"


def test_chaos_gateway_down_serves_stale_and_fast_503_through_the_vip_then_recovers(lab):
    report = gateway_down(lab)
    print(f"\ngateway down: {report}")
    assert report["stale_s"] < 1 and report["api_503_s"] < 1
    assert report["fresh_again"] in ("HIT", "MISS")


def test_chaos_nginx_killed_on_the_holder_moves_the_vip(lab):
    report = nginx_killed(lab)
    print(f"\nnginx killed: {report}")
    assert report["new_holder"] != report["old_holder"]
    assert report["failover_s"] is not None and report["failover_s"] < 15
    # Repaired, the old holder stays BACKUP: the VIP did not move back.
    assert report["holder_after_repair"] == report["new_holder"]
    new = lab[report["new_holder"]].succeed("curl -fsS http://127.0.0.1:9100/metrics")
    assert metric(new, "okome_vrrp_state", state="MASTER") == 1
    old = lab[report["old_holder"]].succeed("curl -fsS http://127.0.0.1:9100/metrics")
    assert metric(old, "okome_vrrp_state", state="BACKUP") == 1
    assert metric(old, "okome_vrrp_transitions_total") >= 3  # BACKUP/MASTER, FAULT, BACKUP


def test_chaos_link_cut_moves_the_vip_and_restoring_it_leaves_one_holder(lab):
    report = link_cut(lab)
    print(f"\nlink cut: {report}")
    assert report["new_holder"] != report["old_holder"]
    assert report["failover_s"] is not None and report["failover_s"] < 15
    assert report["holder_after_restore"] in FRONTENDS  # exactly one, stable for 10 s
    status, _ = lab.http_via_vip()
    assert status == 200


def chaos(lab_dir, scenario: str) -> dict[str, str]:
    """`okome-image lab chaos SCENARIO` on the running lab; its report as printed."""
    result = okome_image("lab", "chaos", scenario, "--lab-dir", str(lab_dir))
    assert result.returncode == 0, f"lab chaos {scenario}: {result.stderr}"
    print(f"\n{scenario}:\n{result.stdout}")
    return dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)


def test_chaos_backend_rebooted_the_frontends_keep_serving(lab, lab_dir):
    report = chaos(lab_dir, "backend-rebooted")
    assert report["failed"] == "0" and int(report["requests"]) > 0
    backend = Lab.attach(lab_dir)["backend"]  # the state file names the new QEMU
    backend.wait_for_unit("redis-server.service")
    assert backend.wait_for_running(timeout=120) == "running", \
        backend.succeed("systemctl --failed --no-pager")


def test_chaos_log_full_on_the_holder_keeps_nginx_serving(lab, lab_dir):
    report = chaos(lab_dir, "log-full")
    assert report["failed"] == "0"
    assert report["holders_while_full"] == f"['{report['holder']}']"


def test_lab_status_shows_each_node_and_the_vip(lab, lab_dir):
    status = okome_image("lab", "status", "--lab-dir", str(lab_dir))
    assert status.returncode == 0, status.stderr
    for name in NODES:
        assert re.search(rf"^{name}: \S+, ssh port \d+, system running$", status.stdout, re.M), \
            status.stdout
    holder = lab.wait_for_one_holder()
    assert f"VIP {lab.vip}: held by {holder}; HTTP 200" in status.stdout


def test_a_crashed_holder_loses_the_vip_to_its_peer(lab):
    holder = lab.wait_for_one_holder()
    lab.crash(holder)
    peer = lab.wait_for_one_holder(not_on=holder, timeout=60)
    status, body = lab.http_via_vip()
    assert status == 200 and f'"node":"{peer}"' in body


def test_lab_down_stops_every_guest_and_removes_the_network(lab, lab_dir):
    attached = Lab.attach(lab_dir)
    processes = [guest.machine.process for guest in attached.guests.values()]
    down = okome_image("lab", "down", "--lab-dir", str(lab_dir))
    assert down.returncode == 0, down.stderr
    assert all(process.poll() is not None for process in processes)
    assert attached.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                text=True).stdout
    assert not lab_dir.exists()
