"""The hardening on a booted frontend: what spares the SD card, SSH, fail2ban, the firewall,
metrics and time; then a card booted twice and a card with the read-only root. (Lynis's audit is
bench/lynis_audit.py: ten minutes under emulation.)

Most tests use the shared `frontend` guest. Logins that must fail arrive from QEMU's host
address, so fail2ban is told to ignore that address while they run: a ban would cut the tests'
own SSH connection. Addresses that must be refused or banned come from a network namespace
inside the guest, on a veth pair with TEST-NET-3 addresses (RFC 5737): nothing leaves the guest.
"""

import hashlib
import re
import shlex
import subprocess
from ipaddress import ip_network
from pathlib import Path

import paramiko
import pytest

from builder import bootpart
from builder.machine import Machine

pytestmark = pytest.mark.boot

TMPFS_MIB = {"/tmp": 128, "/var/tmp": 32, "/var/log": 64, "/var/lib/prometheus/node-exporter": 4}
OUTSIDE_NETNS = "okome-outside"
NODE_SIDE, OUTSIDER = "203.0.113.1", "203.0.113.7"
NODE_EXPORTER_PORT = 9100


# -- helpers ------------------------------------------------------------------------------------

def qemu_host_address(machine: Machine) -> str:
    """Where the host's connections to a guest come from: QEMU user networking's host, .2."""
    return str(ip_network(machine.network or "10.0.2.0/24")[2])


def ssh_client(machine: Machine, user: str | None = None, **auth) -> paramiko.SSHClient:
    """A fresh SSH connection to the guest, with exactly the credentials given."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect("127.0.0.1", port=machine.ssh_port, username=user or machine.user,
                   timeout=10, banner_timeout=30, auth_timeout=30, allow_agent=False,
                   look_for_keys=False, **auth)
    return client


def mounts(machine: Machine) -> dict[str, tuple[str, set[str]]]:
    """Mount point → (filesystem type, options), as the guest's findmnt lists them."""
    found = {}
    for line in machine.succeed("findmnt --raw --noheadings -o TARGET,FSTYPE,OPTIONS")\
            .splitlines():
        target, fstype, options = line.split(" ")
        found[target] = (fstype, set(options.split(",")))
    return found


def failed_units(machine: Machine) -> str:
    return machine.execute("systemctl --failed --no-legend --plain")[1].strip()


def power_off(machine: Machine, timeout: float = 240) -> None:
    """Shut the guest down cleanly, as a node is switched off, and wait for QEMU to exit."""
    machine.execute("nohup sh -c 'sleep 1; systemctl poweroff' >/dev/null 2>&1 &")
    machine.process.wait(timeout=timeout)


def card_copy(image: Path, target: Path) -> Path:
    """A copy of the image to change before a Machine boots it."""
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(image), str(target)],
                   check=True)
    return target


def set_kernel_flag(card: Path, flag: str, work: Path) -> None:
    """Append a flag to cmdline.txt on the card's boot partition (one line, as the Pi reads)."""
    cmdline = bootpart.read_boot_file(card, "cmdline.txt").decode().split()
    local = work / "cmdline.txt"
    local.write_text(" ".join([*cmdline, flag]) + "\n")
    part = bootpart.boot_partition(card)
    subprocess.run(["mcopy", "-o", "-i", f"{card}@@{part.start}", str(local), "::/cmdline.txt"],
                   check=True, env=bootpart.MTOOLS_ENV)


def root_partition_digest(image: Path) -> str:
    part = bootpart.partitions(image)[1]
    digest = hashlib.sha256()
    with image.open("rb") as f:
        f.seek(part.start)
        remaining = part.size
        while remaining:
            chunk = f.read(min(remaining, 8 * 2**20))
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def lab_machine(image: Path, name: str, lab_site, stub_gateway, work_dir: Path,
                extra_disk_mib: int = 1024) -> Machine:
    """A frontend on the lab network with the stub gateway, its files kept in `work_dir`, on a
    disk `extra_disk_mib` larger than `image` (a card bigger than the image)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    gateway = (str(lab_site.gateway.host), lab_site.gateway.port, stub_gateway.port)
    return Machine(image, name=name, user=lab_site.admin.user,
                   network=str(lab_site.network.prefix), guest_forwards=[gateway],
                   work_dir=work_dir, extra_disk_mib=extra_disk_mib)


def boots_clean(machine: Machine) -> None:
    machine.wait_for_ssh(timeout=480)
    state = machine.wait_for_running(timeout=480)
    failed = failed_units(machine)
    assert state == "running" and not failed, f"{machine.name} is {state}; failed:\n{failed}"


def grow_root_log(machine: Machine) -> str:
    return machine.succeed("journalctl -b --no-pager -o cat -u okome-grow-root.service")


def assert_root_fills_its_disk(machine: Machine) -> None:
    """The root partition ends where the disk does, and ext4 fills the partition."""
    device = machine.succeed("findmnt -no SOURCE /").strip()
    name = device.rsplit("/", 1)[1]
    disk = machine.succeed(f"lsblk -no PKNAME {device}").strip()
    disk_size, start, size = map(int, machine.succeed(
        f"cat /sys/class/block/{disk}/size /sys/class/block/{name}/start "
        f"/sys/class/block/{name}/size").split())
    assert disk_size - (start + size) < 2048, "the root partition does not reach the disk's end"
    superblock = dict(line.split(":", 1) for line in machine.succeed(
        f"dumpe2fs -h {device} 2>/dev/null").splitlines() if ":" in line)
    fs_bytes = int(superblock["Block count"]) * int(superblock["Block size"])
    assert size * 512 - fs_bytes < 2**20, "the filesystem does not fill the partition"


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
def failed_logins_allowed(frontend):
    """The tests' own address is left unbanned while a test fails logins on purpose."""
    address = qemu_host_address(frontend)
    frontend.wait_for_unit("fail2ban.service")
    frontend.succeed(f"fail2ban-client set sshd addignoreip {address}")
    yield
    frontend.succeed(f"fail2ban-client set sshd delignoreip {address}")


@pytest.fixture
def outsider(frontend):
    """A network namespace in the guest, joined to it by a veth pair: a host outside every
    network the site names. Returns a function running a shell command from there."""
    frontend.succeed(f"""
        ip netns add {OUTSIDE_NETNS}
        ip link add okome-node type veth peer name okome-outside netns {OUTSIDE_NETNS}
        ip address add {NODE_SIDE}/24 dev okome-node && ip link set okome-node up
        ip -n {OUTSIDE_NETNS} address add {OUTSIDER}/24 dev okome-outside
        ip -n {OUTSIDE_NETNS} link set okome-outside up
    """)

    def run(command: str, timeout: float = 60) -> tuple[int, str]:
        return frontend.execute(f"ip netns exec {OUTSIDE_NETNS} sh -c {shlex.quote(command)}",
                                timeout)

    yield run
    frontend.execute(f"ip netns delete {OUTSIDE_NETNS}; ip link delete okome-node")


def tcp_connect(port: int) -> str:
    """A shell command that exits 0 if a TCP connection to the node opens, 124 if it times out
    (a drop), and 1 if it is refused (a reject)."""
    return f"timeout 3 bash -c 'exec 3<>/dev/tcp/{NODE_SIDE}/{port}'"


# -- SD-card wear -------------------------------------------------------------------------------

def test_root_is_noatime_with_a_long_commit_and_busy_paths_are_capped_tmpfs(frontend):
    found = mounts(frontend)
    fstype, options = found["/"]
    assert fstype == "ext4" and {"noatime", "commit=60"} <= options
    for target, mib in TMPFS_MIB.items():
        fstype, options = found[target]
        assert fstype == "tmpfs", target
        assert {"nosuid", "nodev", "noexec", f"size={mib * 1024}k"} <= options, target


def test_no_swap_of_any_kind(frontend):
    assert frontend.succeed("cat /proc/swaps").strip().splitlines()[1:] == []
    assert frontend.succeed("swapon --show --noheadings").strip() == ""
    assert frontend.execute("systemctl is-enabled swap.target")[1].strip() == "masked"
    assert frontend.execute("ls /sys/block | grep zram")[0] != 0


def test_journal_is_in_memory_only_and_nothing_is_on_the_card(frontend):
    paths = re.findall(r"File path: (\S+)", frontend.succeed("journalctl --header"))
    assert paths and all(path.startswith("/run/log/journal/") for path in paths), paths
    frontend.fail("test -e /var/log/journal")
    # Under the tmpfs, on the card itself: a bind mount of / shows what the tmpfs hides.
    on_card = frontend.succeed("unshare --mount --propagation private sh -c "
                               "'mount --bind / /mnt && find /mnt/var/log -name \"*journal*\"'")
    assert on_card.strip() == ""


def test_log_directories_exist_before_their_services(frontend):
    frontend.succeed("test -d /var/log/apt && test -d /var/log/nginx")
    frontend.wait_for_unit("nginx.service")


def test_writeback_is_tuned_for_flash_and_the_kernel_is_hardened(frontend):
    values = {key: frontend.succeed(f"sysctl -n {key}").strip() for key in [
        "vm.dirty_expire_centisecs", "vm.dirty_writeback_centisecs", "vm.swappiness",
        "kernel.kptr_restrict", "net.ipv4.conf.all.accept_redirects"]}
    assert values == {"vm.dirty_expire_centisecs": "6000", "vm.dirty_writeback_centisecs": "1500",
                      "vm.swappiness": "0", "kernel.kptr_restrict": "2",
                      "net.ipv4.conf.all.accept_redirects": "0"}


def test_jobs_that_write_for_no_one_are_masked_and_not_scheduled(frontend):
    scheduled = frontend.succeed("systemctl list-timers --no-legend --plain")
    for timer in ["apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
                  "man-db.timer", "e2scrub_all.timer"]:
        assert timer not in scheduled
    assert frontend.execute("systemctl is-enabled apt-daily.timer")[1].strip() == "masked"


def test_root_grew_on_first_boot_to_fill_the_disk(frontend):
    """The shared frontend's disk is larger than the image, as a card is (Machine's
    extra_disk_mib)."""
    frontend.wait_for_unit("okome-grow-root.service")
    assert "growing" in grow_root_log(frontend)
    assert_root_fills_its_disk(frontend)


# -- the admin and SSH --------------------------------------------------------------------------

def test_admin_has_a_login_shell_and_sudo(frontend):
    shell = frontend.succeed(f"getent passwd {frontend.user}").strip().split(":")[-1]
    frontend.succeed(f"grep -qx {shell} /etc/shells")
    with ssh_client(frontend, key_filename=str(frontend.key_path)) as client:
        _, stdout, _ = client.exec_command("echo $0; id -nG; sudo -n true && echo sudo-ok")
        output = stdout.read().decode()
    assert output.split("\n")[0].endswith("bash")
    assert "sudo" in output.split("\n")[1].split() and "sudo-ok" in output


def test_password_login_is_refused_and_key_login_accepted(frontend, failed_logins_allowed):
    with pytest.raises(paramiko.AuthenticationException):
        ssh_client(frontend, password="a password the node never had").close()
    # What the server offers at all: only keys (a wrong password is refused either way).
    with paramiko.Transport(("127.0.0.1", frontend.ssh_port)) as transport:
        transport.start_client(timeout=30)
        with pytest.raises(paramiko.BadAuthenticationType) as offered:
            transport.auth_none(frontend.user)
        assert offered.value.allowed_types == ["publickey"]
    with ssh_client(frontend, key_filename=str(frontend.key_path)) as client:
        _, stdout, _ = client.exec_command("true")
        assert stdout.channel.recv_exit_status() == 0


def test_root_login_is_refused_even_with_an_accepted_key(frontend, failed_logins_allowed):
    frontend.succeed(f"install -d -m 0700 /root/.ssh && "
                     f"cp /home/{frontend.user}/.ssh/authorized_keys /root/.ssh/")
    try:
        with pytest.raises(paramiko.AuthenticationException):
            ssh_client(frontend, user="root", key_filename=str(frontend.key_path)).close()
    finally:
        frontend.succeed("rm -rf /root/.ssh")


@pytest.mark.parametrize("user", ["root", "okome", "nobody"])
def test_effective_sshd_configuration_is_keys_only_for_every_user(frontend, user):
    output = frontend.succeed(f"sshd -T -C user={user},host=h,addr={OUTSIDER}")
    effective = dict(line.split(" ", 1) for line in output.splitlines() if " " in line)
    assert effective["passwordauthentication"] == "no"
    assert effective["kbdinteractiveauthentication"] == "no"
    assert effective["permitrootlogin"] == "no"
    assert effective["authenticationmethods"] == "publickey"
    assert effective["allowusers"] == frontend.user


def test_host_key_was_made_on_this_node_at_its_first_boot(frontend):
    made = int(frontend.succeed("stat -c %Y /etc/ssh/ssh_host_ed25519_key"))
    booted = int(frontend.succeed("awk '/^btime/ { print $2 }' /proc/stat"))
    assert made >= booted, "the image carries no host key; this node made its own"


# -- firewall and fail2ban ----------------------------------------------------------------------

def test_firewall_is_loaded_with_a_drop_policy(frontend):
    frontend.wait_for_unit("nftables.service")
    table = frontend.succeed("nft list table inet okome")
    assert "hook input priority filter; policy drop;" in table
    assert "set admin_networks" in table and "set frontend_peers" in table


def test_firewall_lets_strangers_reach_http_only(frontend, outsider):
    assert outsider(tcp_connect(80))[0] == 0
    assert outsider(tcp_connect(22))[0] == 124
    assert outsider(tcp_connect(NODE_EXPORTER_PORT))[0] == 124
    status, output = outsider(f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 10 "
                              f"http://{NODE_SIDE}/okome/health")
    assert (status, output) == (0, "200")


def test_fail2ban_jail_reads_sshd_from_the_journal(frontend):
    frontend.wait_for_unit("fail2ban.service")
    status = frontend.succeed("fail2ban-client status sshd")
    assert "Journal matches:" in status and "_COMM=sshd" in status


def test_fail2ban_bans_an_address_after_repeated_failed_logins(frontend, outsider):
    frontend.wait_for_unit("fail2ban.service")
    maxretry = int(frontend.succeed("fail2ban-client get sshd maxretry"))
    # SSH is open to the admin networks only; for this test the outsider may knock too.
    frontend.succeed('nft insert rule inet okome input iifname "okome-node" tcp dport 22 '
                     'accept comment "okome-fail2ban-test"')
    try:
        for _ in range(maxretry + 1):
            outsider("ssh -o BatchMode=yes -o StrictHostKeyChecking=no "
                     "-o UserKnownHostsFile=/dev/null -o ConnectTimeout=5 "
                     f"no-such-user@{NODE_SIDE} true")
        frontend.wait_until_succeeds(
            f"fail2ban-client status sshd | grep -q 'Banned IP list:.*{OUTSIDER}'", timeout=60)
        assert OUTSIDER in frontend.succeed("nft list set inet f2b-table addr-set-sshd")
        # The ban holds: the outsider is now turned away before sshd sees it.
        assert outsider(tcp_connect(22))[0] != 0
        frontend.succeed("true")  # and the tests' own connection is untouched
    finally:
        frontend.execute(f"fail2ban-client set sshd unbanip {OUTSIDER}")
        handles = re.findall(r'"okome-fail2ban-test" # handle (\d+)',
                             frontend.succeed("nft -a list chain inet okome input"))
        for handle in handles:
            frontend.succeed(f"nft delete rule inet okome input handle {handle}")


# -- metrics and time ---------------------------------------------------------------------------

def test_node_exporter_serves_the_textfile_metrics(frontend):
    frontend.wait_for_unit("prometheus-node-exporter.service")
    metrics = frontend.wait_until_succeeds(
        f"curl -sf http://127.0.0.1:{NODE_EXPORTER_PORT}/metrics | grep '^okome_gateway_up '",
        timeout=90)
    assert metrics.strip()
    assert "node_textfile_scrape_error 0" in frontend.succeed(
        f"curl -sf http://127.0.0.1:{NODE_EXPORTER_PORT}/metrics")


def test_time_is_synchronised_by_timesyncd(frontend):
    frontend.wait_for_unit("systemd-timesyncd.service")
    assert frontend.succeed("timedatectl show -p NTP --value").strip() == "yes"


# -- one card, two boots ------------------------------------------------------------------------

def test_a_card_grows_once_and_boots_twice_without_a_failed_unit(frontend, frontend_image,
                                                                 lab_site, stub_gateway,
                                                                 tmp_path):
    first, second = tmp_path / "first-boot", tmp_path / "second-boot"

    with lab_machine(frontend_image, "frontend-card", lab_site, stub_gateway, first) as node:
        boots_clean(node)
        assert "growing" in grow_root_log(node)
        assert_root_fills_its_disk(node)
        host_key = node.succeed("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub")
        machine_id = node.succeed("cat /etc/machine-id")
        power_off(node)

    # The same card again, no larger this time.
    with lab_machine(first / "disk.img", "frontend-card", lab_site, stub_gateway, second,
                     extra_disk_mib=0) as node:
        boots_clean(node)
        assert "nothing to grow" in grow_root_log(node)
        assert_root_fills_its_disk(node)
        assert node.succeed("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub") == host_key
        assert node.succeed("cat /etc/machine-id") == machine_id
    other_node_key = frontend.succeed("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub")
    assert other_node_key != host_key, "each node makes its own host key"


# -- the read-only root -------------------------------------------------------------------------

def test_read_only_root_runs_the_services_and_leaves_the_card_unchanged(frontend_image, lab_site,
                                                                        stub_gateway, tmp_path):
    card = card_copy(frontend_image, tmp_path / "card.img")
    set_kernel_flag(card, "okome.readonly=1", tmp_path)
    work = tmp_path / "read-only"

    with lab_machine(card, "frontend-ro", lab_site, stub_gateway, work) as node:
        boots_clean(node)
        found = mounts(node)
        assert found["/"][0] == "overlay"
        lower = "/run/okome-readonly-root/lower"
        assert found[lower][0] == "ext4" and "ro" in found[lower][1]
        # The root filesystem on the card cannot be written to ...
        refused = node.fail(f"touch {lower}/okome-write-test")
        assert "Read-only file system" in refused
        # ... and what the node writes lands in RAM, not on the card.
        node.succeed("echo ram > /okome-write-test")
        node.fail(f"test -e {lower}/okome-write-test")
        for unit in ["nginx.service", "fail2ban.service", "nftables.service",
                     "prometheus-node-exporter.service", "ssh.service"]:
            node.wait_for_unit(unit)
        assert "policy drop" in node.succeed("nft list table inet okome")
        assert "not a disk partition" in grow_root_log(node)
        power_off(node)

    assert root_partition_digest(work / "disk.img") == root_partition_digest(frontend_image)
