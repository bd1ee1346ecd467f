"""One frontend image flashed for frontend-a and for frontend-b, each card booted (a copy of it)
with the identity `flash` wrote and nothing else: each comes up as its node, with its hostname,
its static address from the site (inside QEMU's own network), the admin's keys, and SSH host
keys of its own."""

import subprocess

import pytest

from builder import bootpart
from builder.buildlog import BuildLog
from builder.flash import flash_node
from builder.machine import Machine
from tests.conftest import TEST_OUT

pytestmark = pytest.mark.boot

NODES = ("frontend-a", "frontend-b")
# frontend-b's card is edited after its first boot and booted again.
EDITED, RENAMED = "frontend-b", "frontend-renamed"
IDENTITY_FILES = ("hostname", "authorized_keys", "network", "vrrp.env")


@pytest.fixture(scope="module")
def admin_key(tmp_path_factory):
    key = tmp_path_factory.mktemp("admin") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lab operator",
                    "-f", str(key)], check=True)
    return key


def edit_card_and_reboot(machine: Machine) -> dict[str, str]:
    """Power the node off, change its hostname on the card's boot partition as an operator
    would from any computer, power it on again; what it shows then."""
    machine.succeed("systemd-run --on-active=1 systemctl poweroff")
    machine.process.wait(timeout=180)  # QEMU ends with the guest's power-off
    files = {name: bootpart.read_boot_file(machine.disk, f"okome/{name}")
             for name in IDENTITY_FILES}
    files["hostname"] = f"{RENAMED}\n".encode()
    bootpart.write_boot_files(machine.disk, "okome", files, machine.work_dir)
    machine.launch()
    machine.wait_for_ssh()
    machine.wait_for_unit("okome-identity.service")
    return {"hostname": machine.succeed("hostname").strip(),
            "host_key": machine.succeed("cat /etc/ssh/ssh_host_ed25519_key.pub")}


@pytest.fixture(scope="module")
def booted(built_image, lab_site, admin_key, tmp_path_factory):
    """What each node showed once up; the guests boot one after the other (two cores)."""
    image = built_image("frontend")
    facts = {}
    with pytest.MonkeyPatch.context() as env:
        # The lab site reads the admin's keys from this variable: the key text itself.
        env.setenv("OKOME_LAB_ADMIN_KEYS", admin_key.with_suffix(".pub").read_text())
        for node in NODES:
            card = tmp_path_factory.mktemp(node) / "card.img"
            card.touch()
            flash_node("lab", node, card, TEST_OUT, image_path=image, confirm=None,
                       log=BuildLog(None))
            address = str(lab_site.nodes[node].address)
            with Machine(card, name=node, user=lab_site.admin.user,
                         network=str(lab_site.network.prefix), keep_identity=True,
                         ssh_key=admin_key, guest_address=address) as machine:
                machine.wait_for_ssh()
                machine.wait_for_unit("okome-identity.service")
                facts[node] = {
                    "hostname": machine.succeed("hostname").strip(),
                    "addresses": machine.succeed("ip -o -4 addr show scope global"),
                    "authorized_keys": machine.succeed(
                        f"cat ~{lab_site.admin.user}/.ssh/authorized_keys"),
                    "host_key": machine.succeed("cat /etc/ssh/ssh_host_ed25519_key.pub"),
                    "network_file": machine.succeed(
                        "cat /etc/systemd/network/10-okome-node.network"),
                    "vrrp": machine.succeed("cat /etc/okome/vrrp.env"),
                }
                if node == EDITED:
                    facts[node]["after_edit"] = edit_card_and_reboot(machine)
    return facts


@pytest.mark.parametrize("node", NODES)
def test_the_node_comes_up_with_its_hostname(booted, node):
    assert booted[node]["hostname"] == node


@pytest.mark.parametrize("node", NODES)
def test_the_node_has_its_static_address_from_the_site(booted, lab_site, node):
    expected = f"inet {lab_site.nodes[node].address}/{lab_site.network.prefix.prefixlen}"
    assert expected in booted[node]["addresses"]
    # The static file replaced the DHCP fallback: QEMU's DHCP would have given .15.
    assert "dynamic" not in booted[node]["addresses"]


@pytest.mark.parametrize("node", NODES)
def test_the_admins_keys_are_the_flashed_ones(booted, admin_key, node):
    # Logging in at all needed them: the guest was given no other key.
    assert booted[node]["authorized_keys"].strip() == \
        admin_key.with_suffix(".pub").read_text().strip()


@pytest.mark.parametrize("node", NODES)
def test_the_vrrp_settings_reached_the_node(booted, lab_site, node):
    assert f"OKOME_VRRP_STATE={lab_site.nodes[node].vrrp.state}" in booted[node]["vrrp"]


def test_two_nodes_from_one_image_have_different_ssh_host_keys(booted):
    keys = {booted[node]["host_key"].split()[1] for node in NODES}
    assert len(keys) == 2


def test_editing_the_card_and_rebooting_reconfigures_the_node(booted):
    after = booted[EDITED]["after_edit"]
    assert after["hostname"] == RENAMED
    assert after["host_key"] == booted[EDITED]["host_key"]  # made once, on the first boot
