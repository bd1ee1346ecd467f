"""The hardening as built into the frontend image, read from the image without booting it.

The root filesystem is copied out of the image with debugfs (no mount, no loop device). Static
facts are read from it; SSH's effective configuration and fail2ban's configuration test are run
by the image's own sshd and fail2ban under emulation, in the same private namespaces the build
uses; the firewall file is loaded by the host's nft (the same version) in a network namespace of
its own, which an arm64 nft under qemu-user cannot do: qemu-user has no netfilter netlink.
"""

import subprocess

import pytest

from builder import bootpart
from builder.chroot import chroot_command, chroot_env
from builder.machine import kernel_and_initrd

pytestmark = pytest.mark.boot  # needs the built image, though nothing boots

ADMIN = "okome"
MASKED = ["apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "man-db.timer",
          "e2scrub_all.timer", "e2scrub_reap.service", "swap.target", "dphys-swapfile.service",
          "zramswap.service"]
ENABLED = ["nftables.service", "fail2ban.service", "prometheus-node-exporter.service",
           "systemd-timesyncd.service", "okome-grow-root.service", "ssh.service"]
PACKAGES = ["nftables", "fail2ban", "python3-systemd", "prometheus-node-exporter",
            "systemd-timesyncd", "e2fsprogs", "fdisk"]
SWAP_PACKAGES = ["dphys-swapfile", "zram-tools", "systemd-zram-generator", "swapspace"]


@pytest.fixture(scope="module")
def rootfs(frontend_image, tmp_path_factory):
    """The image's root filesystem, copied out of its second partition."""
    root = tmp_path_factory.mktemp("frontend-rootfs")
    part = bootpart.partitions(frontend_image)[1]
    subprocess.run(["debugfs", "-R", f"rdump / {root}", f"{frontend_image}?offset={part.start}"],
                   check=True, capture_output=True)
    return root


def in_image(rootfs, command: str, timeout: float = 300) -> str:
    """A shell command run by the image's own binaries (arm64, under emulation)."""
    result = subprocess.run(chroot_command(rootfs, ["/bin/sh", "-c", command]),
                            env=chroot_env({}), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"`{command}` failed:\n{result.stdout}{result.stderr}"
    return result.stdout


def sshd_effective(rootfs, user: str) -> dict[str, str]:
    """`sshd -T` for a connection by `user` from an address no site names."""
    output = in_image(rootfs, "mkdir -p /run/sshd && ssh-keygen -q -t ed25519 -N '' -f /run/k"
                              f" && sshd -T -h /run/k -C user={user},host=h,addr=203.0.113.7")
    return dict(line.split(" ", 1) for line in output.splitlines() if " " in line)


def cpio_files(archive: bytes) -> dict[str, bytes]:
    """Names and contents of a newc cpio archive, the initramfs format."""
    files, offset = {}, 0
    while archive[offset:offset + 6] == b"070701":
        size = int(archive[offset + 54:offset + 62], 16)
        name_size = int(archive[offset + 94:offset + 102], 16)
        name = archive[offset + 110:offset + 110 + name_size - 1].decode()
        if name == "TRAILER!!!":
            break
        start = (offset + 110 + name_size + 3) & ~3
        files[name] = archive[start:start + size]
        offset = (start + size + 3) & ~3
    return files


def test_fstab_has_the_root_options_and_the_tmpfs_mounts(rootfs):
    lines = [line.split() for line in (rootfs / "etc/fstab").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    by_target = {fields[1]: fields for fields in lines}
    assert {"noatime", "commit=60"} <= set(by_target["/"][3].split(","))
    for target in ["/tmp", "/var/tmp", "/var/log", "/var/lib/prometheus/node-exporter"]:
        assert by_target[target][2] == "tmpfs" and "size=" in by_target[target][3], target
    assert all(fields[2] != "swap" for fields in lines)


def test_image_holds_no_host_keys_and_no_journal(rootfs):
    assert not list((rootfs / "etc/ssh").glob("ssh_host_*"))
    assert not list((rootfs / "var/log").rglob("*.journal*"))
    assert not (rootfs / "var/log/journal").exists(), \
        "the journal is volatile: the card needs no /var/log/journal (build step 'clean')"


def test_jobs_that_write_for_no_one_are_masked(rootfs):
    for unit in MASKED:
        link = rootfs / "etc/systemd/system" / unit
        assert link.is_symlink() and str(link.readlink()) == "/dev/null", unit


def test_hardening_services_are_enabled(rootfs):
    for unit in ENABLED:
        state = subprocess.run(["systemctl", f"--root={rootfs}", "is-enabled", unit],
                               capture_output=True, text=True).stdout.strip()
        assert state == "enabled", f"{unit} is {state}"


def test_units_we_ship_or_extend_pass_systemd_analyze_verify(rootfs):
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={rootfs}",
                             "okome-grow-root.service", "fail2ban.service"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_packages_the_hardening_needs_are_in_and_swap_makers_are_not(rootfs):
    output = subprocess.run(["dpkg-query", f"--admindir={rootfs / 'var/lib/dpkg'}", "-W",
                             "-f", "${db:Status-Abbrev} ${Package}\n"],
                            capture_output=True, text=True).stdout
    installed = {line.split()[1] for line in output.splitlines() if line.startswith("ii")}
    assert set(PACKAGES) <= installed, set(PACKAGES) - installed
    assert not set(SWAP_PACKAGES) & installed


def test_root_grow_finds_its_tools(rootfs):
    in_image(rootfs, "for tool in findmnt sfdisk partx dumpe2fs resize2fs; do "
                     "command -v $tool || exit 1; done")


@pytest.mark.parametrize("user", ["root", ADMIN, "nobody"])
def test_sshd_effective_configuration_is_keys_only_for_every_user(rootfs, user):
    effective = sshd_effective(rootfs, user)
    assert effective["passwordauthentication"] == "no"
    assert effective["kbdinteractiveauthentication"] == "no"
    assert effective["permitrootlogin"] == "no"
    assert effective["authenticationmethods"] == "publickey"
    assert effective["pubkeyauthentication"] == "yes"
    assert effective["permitemptypasswords"] == "no"
    assert effective["allowusers"] == ADMIN
    assert effective["x11forwarding"] == "no"


def test_fail2ban_configuration_passes_its_own_test(rootfs):
    output = in_image(rootfs, "fail2ban-client --test 2>&1", timeout=600)
    assert "OK: configuration test is successful" in output


def test_firewall_file_loads_with_the_same_nft(rootfs):
    result = subprocess.run(["unshare", "--net", "sh", "-euc",
                             f"nft -c -f {rootfs / 'etc/nftables.conf'}; "
                             f"nft -f {rootfs / 'etc/nftables.conf'}; nft list ruleset"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "policy drop" in result.stdout


def test_initramfs_carries_the_read_only_root_and_cmdline_leaves_it_off(frontend_image,
                                                                         tmp_path):
    _, initrd = kernel_and_initrd(frontend_image)
    bootpart.copy_boot_file(frontend_image, initrd, tmp_path / "initrd")
    archive = subprocess.run(["zstd", "-dc", str(tmp_path / "initrd")], check=True,
                             capture_output=True).stdout
    files = cpio_files(archive)
    for phase in ["local-top", "local-bottom"]:
        assert f"scripts/{phase}/okome-readonly-root" in files
        assert b"okome-readonly-root" in files[f"scripts/{phase}/ORDER"]
    assert any(name.endswith("/kernel/fs/overlayfs/overlay.ko") for name in files)
    cmdline = bootpart.read_boot_file(frontend_image, "cmdline.txt").decode()
    assert "okome.readonly" not in cmdline
