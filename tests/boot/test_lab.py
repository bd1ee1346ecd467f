"""The lab: frontend-a and frontend-b of the lab site, each booted from the frontend image with
its own node identity, on one private network (a bridge in a network namespace the lab makes and
deletes) where the stub gateway listens at the lab gateway's address, sharing the VIP through
keepalived. One lab serves the whole module; the scenarios run in order on it, each starting
from whoever holds the VIP then.

What the client inside the lab network saw in each scenario (failover time, failed requests)
is printed; run with -s to see it.
"""

import re

import pytest

from builder.lab import GUEST_CPUS, GUEST_MEMORY_MIB, Lab
from builder.lab_chaos import gateway_down, link_cut, nginx_killed
from tests.conftest import TEST_OUT

pytestmark = pytest.mark.boot

NODES = ["frontend-a", "frontend-b"]


@pytest.fixture(scope="module")
def lab(built_image):
    built_image("frontend")
    with Lab(TEST_OUT, NODES) as the_lab:
        the_lab.seconds_to_ssh = the_lab.wait_until_up()
        print(f"\nlab up: {the_lab.seconds_to_ssh} s to SSH; each guest {GUEST_MEMORY_MIB} MiB, "
              f"{GUEST_CPUS} vCPU")
        yield the_lab


def metric(text: str, name: str, **labels) -> float:
    """One sample of a Prometheus text exposition."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    match = re.search(rf"^{name}\{{[^}}]*{re.escape(wanted)}[^}}]*\}} (\S+)$", text, re.M)
    assert match, f"no {name}{{{wanted}}} in:\n{text}"
    return float(match.group(1))


def test_each_node_runs_keepalived_with_its_own_part_of_the_config(lab):
    for name in NODES:
        node = lab.site.nodes[name]
        peer = next(other for other in NODES if other != name)
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


def test_no_failed_unit_on_either_node(lab):
    for name in NODES:
        assert lab[name].wait_for_running(timeout=120) == "running", \
            lab[name].succeed("systemctl --failed --no-pager")


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
    assert report["holder_after_restore"] in NODES  # exactly one, stable for 10 s
    status, _ = lab.http_via_vip()
    assert status == 200


def test_a_crashed_holder_loses_the_vip_to_its_peer(lab):
    holder = lab.wait_for_one_holder()
    lab.crash(holder)
    peer = lab.wait_for_one_holder(not_on=holder, timeout=60)
    status, body = lab.http_via_vip()
    assert status == 200 and f'"node":"{peer}"' in body
