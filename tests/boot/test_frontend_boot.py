"""The frontend image boots under qemu-system-aarch64 and behaves: the gate is no failed unit."""

import hashlib
import json
import urllib.error
import urllib.request

import pytest

from builder import bootpart
from builder.assemble import ROOT_PARTUUID
from builder.machine import kernel_and_initrd
from builder.pipeline import sha256_file

pytestmark = pytest.mark.boot


@pytest.fixture(scope="module")
def host(frontend):
    return frontend.testinfra_host()


def test_boots_to_running_with_no_failed_unit(frontend):
    state = frontend.wait_for_running(timeout=240)
    failed = frontend.execute("systemctl --failed --no-legend --plain")[1]
    assert state == "running", f"system is {state}; failed units:\n{failed}"
    assert failed.strip() == ""


def test_identity_from_the_boot_partition_applied(host):
    assert host.check_output("hostname") == "frontend-a"
    assert host.file("/home/okome/.ssh/authorized_keys").mode == 0o600


def test_nginx_is_active_and_answers_on_port_80(frontend, host):
    assert host.service("nginx").is_running
    assert host.socket("tcp://0.0.0.0:80").is_listening
    url = f"http://127.0.0.1:{frontend.host_ports[80]}/"
    try:
        response = urllib.request.urlopen(url, timeout=10)
        server = response.headers["Server"]
    except urllib.error.HTTPError as err:
        server = err.headers["Server"]
    assert server.startswith("nginx")


def test_root_is_ext4_from_the_second_partition(host):
    root = host.mount_point("/")
    assert root.filesystem == "ext4"
    partuuid = host.check_output(f"blkid -s PARTUUID -o value {root.device}")
    assert partuuid == ROOT_PARTUUID
    assert root.device.endswith("2")


def test_running_kernel_is_the_images(frontend_image, host, tmp_path):
    kernel_name, _ = kernel_and_initrd(frontend_image)
    assert host.check_output("uname -r") == kernel_name.removeprefix("vmlinuz-")

    bootpart.copy_boot_file(frontend_image, kernel_name, tmp_path / "kernel")
    shipped = hashlib.sha256((tmp_path / "kernel").read_bytes()).hexdigest()
    on_node = host.check_output(f"sha256sum /boot/firmware/{kernel_name}").split()[0]
    assert on_node == shipped


def test_the_manifest_lists_what_the_node_runs(frontend_image, host):
    """manifest.json names every installed package with the version the node really has, and
    SHA256SUMS matches the artifacts beside it."""
    folder = frontend_image.parent
    manifest = json.loads((folder / "manifest.json").read_text())
    listed = {p["name"]: p["version"] for p in manifest["packages"]}
    installed = dict(line.split("\t") for line in host.check_output(
        "dpkg-query -W -f '${db:Status-Abbrev}\\t${Package}\\t${Version}\\n' "
        "| awk -F '\\t' '$1 ~ /^ii/ {print $2 \"\\t\" $3}'").splitlines())
    assert listed == installed
    assert {"nginx", "keepalived", "linux-image-arm64", "raspi-firmware"} <= set(listed)
    assert manifest["role"] == "frontend" and manifest["site"] == "lab"
    assert manifest["image"]["size"] == frontend_image.stat().st_size

    sums = dict(reversed(line.split("  ", 1)) for line in
                (folder / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {frontend_image.name, f"{frontend_image.name}.bmap",
                         f"{frontend_image.name}.zst", "manifest.json"}
    for name, digest in sums.items():
        assert sha256_file(folder / name) == digest, f"{name} does not match SHA256SUMS"
