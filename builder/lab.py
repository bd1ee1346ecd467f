"""The lab: the lab site's booted role images on one private virtual network, and the verbs
that tests (and `okome-image lab`) use to break it, in the spirit of the NixOS test driver.

The network is a bridge inside a network namespace the lab creates and deletes. Each guest has
two NICs: QEMU user networking for SSH from the host's loopback (as in a single boot, see
builder/machine.py), and a tap on the lab's bridge, the node's LAN, which holds its static
address from the site. The host itself takes part in the lab network only from inside the
namespace: the lab site's gateway address is given to the bridge, where the gateway's stand-in
(the stub of tests/host/stub_gateway.py) listens on the gateway's port, and from where host-side
clients reach the VIP (`Lab.run_in_network`). Nothing of it is routed anywhere: the namespace has no
other interface, so no packet of the lab reaches the host's own networks (DESIGN §7).

Each guest boots from a copy of its role's lab image carrying the node identity that
`okome-image flash` would write for it (builder/identity.py). One file differs: the static
network file matches the lab NIC by its MAC address instead of every en* NIC, so that the
user-network NIC keeps asking DHCP and the node's address lives on the lab network only.
"""

import ctypes
import fcntl
import json
import os
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Iterator

from builder.errors import UserError
from builder.identity import node_identity, render_network
from builder.machine import Machine, MachineError
from builder.paths import PROJECT_DIR
from builder.pipeline import artifact_paths
from builder.site import Site, load_site

LAB_NETDEV = "lab"
BRIDGE = "okbr0"
# The unit that must be active before a node of each role counts as up.
ROLE_UNITS = {"frontend": "keepalived.service", "backend": "redis-server.service"}
# The memory and vCPUs of each guest: three emulated arm64 guests share this 2-core machine.
GUEST_MEMORY_MIB = 512
GUEST_CPUS = 1
STATE_FILE = "lab.json"
# The stub gateway's answers to /api/cacheable are fresh this long: a test waits that much for
# a cached copy to expire.
GATEWAY_MAX_AGE_S = 2

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


def lab_mac(address: IPv4Address) -> str:
    """A fixed MAC for a node's lab NIC, made from its address (QEMU's 52:54:00 prefix)."""
    return "52:54:00:" + ":".join(f"{byte:02x}" for byte in address.packed[1:])


def open_tap(netns: str, name: str) -> int:
    """Create a tap inside `netns` and return its descriptor, for QEMU to inherit.

    The tap is made in a thread that enters the namespace (setns changes only the calling
    thread), so QEMU itself runs in the host's namespace, where its SSH forward on 127.0.0.1
    is. The tap lives as long as a descriptor of it is open: when QEMU dies, it goes.
    """
    result: dict[str, int | BaseException] = {}

    def inside() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{netns}") as namespace:
                if libc.setns(namespace.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            descriptor = os.open("/dev/net/tun", os.O_RDWR)
            fcntl.ioctl(descriptor, _TUNSETIFF,
                        struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
            result["fd"] = descriptor
        except BaseException as err:  # handed to the caller's thread
            result["error"] = err

    thread = threading.Thread(target=inside)
    thread.start()
    thread.join()
    if "error" in result:
        raise UserError(f"cannot make tap {name} in {netns}: {result['error']}")
    os.set_inheritable(result["fd"], True)
    return result["fd"]


def _ip(*argv: str) -> None:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"`ip {' '.join(argv)}` failed: {result.stderr.strip()}")


@dataclass
class Guest:
    """One node of the lab: its Machine and where it sits on the lab network."""

    name: str
    role: str
    address: IPv4Address
    tap: str
    machine: Machine


class Lab:
    """The lab site's nodes booted together. Use as a context manager, or start()/stop()."""

    def __init__(self, out_dir: Path, nodes: list[str] | None = None, site: str = "lab",
                 work_dir: Path | None = None, netns: str | None = None,
                 memory_mib: int = GUEST_MEMORY_MIB, cpus: int = GUEST_CPUS):
        self.site: Site = load_site(site)
        self.out_dir = out_dir
        self.node_names = nodes or sorted(self.site.nodes)
        for name in self.node_names:
            if name not in self.site.nodes:
                raise UserError(f"site {self.site.name} has no node '{name}'",
                                f"its nodes: {', '.join(sorted(self.site.nodes))}")
        self.netns = netns or f"okome-lab-{os.getpid()}"
        self.memory_mib = memory_mib
        self.cpus = cpus
        self._own_work_dir = work_dir is None
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="okome-lab-"))
        self.guests: dict[str, Guest] = {}
        self.gateway: "subprocess.Popen | RunningProcess | None" = None
        self._detach = False

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> "Lab":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def admin_key(self) -> Path:
        return self.work_dir / "id_ed25519"

    @property
    def vip(self) -> str:
        return str(self.site.vip)

    @property
    def client_address(self) -> str:
        """The host's address inside the lab network: the site's gateway address."""
        return str(self.site.gateway.host)

    def start(self, detach: bool = False) -> None:
        """Make the network, then boot every node (all at once: they boot in parallel)."""
        if os.geteuid() != 0:
            raise UserError("the lab needs root (network namespace, taps)",
                            "run it with sudo, or as root")
        self._check_images()
        self._detach = detach
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._make_network()
        self.start_gateway()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "okome lab admin",
                        "-f", str(self.admin_key)], check=True)
        sources = self._throwaway_sources()
        for name in self.node_names:
            self.guests[name] = self._boot(name, detach, sources)

    def _check_images(self) -> None:
        for name in self.node_names:
            role = self.site.nodes[name].role
            if not artifact_paths(self.out_dir, role).image.is_file():
                raise UserError(f"no {role} image in {self.out_dir / role}",
                                f"build it: okome-image build --role {role} --site "
                                f"{self.site.name} --out {self.out_dir}")

    def _make_network(self) -> None:
        """The namespace, its bridge, and the gateway address on the bridge."""
        prefix = self.site.network.prefix.prefixlen
        _ip("netns", "add", self.netns)
        # A bridge takes the lowest MAC of its ports unless given one: then a guest restarted
        # on a new tap could change the gateway address's MAC under the frontends' ARP caches.
        _ip("-n", self.netns, "link", "add", BRIDGE, "address",
            lab_mac(IPv4Address(self.client_address)), "type", "bridge")
        _ip("-n", self.netns, "addr", "add", f"{self.client_address}/{prefix}", "dev", BRIDGE)
        _ip("-n", self.netns, "link", "set", BRIDGE, "up")
        _ip("-n", self.netns, "link", "set", "lo", "up")

    def _throwaway_sources(self) -> dict[str, str]:
        """Values for the site's variables that `flash` would read: the lab's admin key for the
        admin's, and a fresh random value for each secret not set already (redis passwords).
        They live in the guests' identities only, never in the lab's files."""
        values = {}
        if self.site.admin.authorized_keys.env:
            values[self.site.admin.authorized_keys.env] = \
                self.admin_key.with_suffix(".pub").read_text()
        for source in self.site.secrets.values():
            if source.env and source.env not in os.environ:
                values[source.env] = secrets.token_hex(24)
        return values

    def _identity(self, name: str, sources: dict[str, str]) -> dict[str, bytes]:
        """What `flash` writes for the node, with the network file bound to the lab NIC."""
        node = self.site.nodes[name]
        saved = {variable: os.environ.get(variable) for variable in sources}
        os.environ.update(sources)
        try:
            files = node_identity(self.site, name, node.role)
        finally:
            for variable, value in saved.items():
                if value is None:
                    del os.environ[variable]
                else:
                    os.environ[variable] = value
        files["network"] = render_network(
            self.site, name, match=f"MACAddress={lab_mac(node.address)}").encode()
        return files

    def _boot(self, name: str, detach: bool, sources: dict[str, str]) -> Guest:
        node = self.site.nodes[name]
        tap = f"oktap{len(self.guests)}"
        machine = Machine(
            artifact_paths(self.out_dir, node.role).image, name=name,
            user=self.site.admin.user, memory_mib=self.memory_mib, cpus=self.cpus,
            identity=self._identity(name, sources), ssh_key=self.admin_key,
            work_dir=self.work_dir / name, detach=detach)
        machine.work_dir.mkdir(parents=True, exist_ok=True)
        guest = Guest(name, node.role, node.address, tap, machine)
        self._plug(guest)
        try:
            machine.start()
        finally:
            self._unplug_fd(guest)
        return guest

    def _plug(self, guest: Guest) -> None:
        """A new tap on the bridge, and the QEMU arguments for the NIC on it."""
        fd = open_tap(self.netns, guest.tap)
        _ip("-n", self.netns, "link", "set", guest.tap, "master", BRIDGE, "up")
        guest.machine.pass_fds = (fd,)
        guest.machine.extra_qemu_args = [
            "-netdev", f"tap,id={LAB_NETDEV},fd={fd}",
            "-device", f"virtio-net-pci,netdev={LAB_NETDEV},mac={lab_mac(guest.address)},romfile="]

    @staticmethod
    def _unplug_fd(guest: Guest) -> None:
        """QEMU holds the tap now; our copy would keep it alive after QEMU is gone."""
        for fd in guest.machine.pass_fds:
            os.close(fd)
        guest.machine.pass_fds = ()

    def start_gateway(self, timeout: float = 30) -> None:
        """The stub gateway, inside the lab network at the site's gateway address."""
        gateway = self.site.gateway
        argv = [sys.executable, "-m", "tests.host.stub_gateway", "--host", str(gateway.host),
                "--port", str(gateway.port), "--cacheable-max-age", str(GATEWAY_MAX_AGE_S)]
        # Detached, its complaints go to a file of the lab's, not to the output of the command
        # that started it (see Machine.launch).
        errors = (self.work_dir / "gateway.log").open("ab") if self._detach else None
        try:
            self.gateway = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv],
                                            cwd=PROJECT_DIR, stdout=subprocess.DEVNULL,
                                            stderr=errors, start_new_session=self._detach)
        finally:
            if errors:
                errors.close()
        url = f"http://{gateway.host}:{gateway.port}{gateway.health_path}"
        deadline = time.monotonic() + timeout
        while self.run_in_network(["curl", "-fsS", "-o", "/dev/null", "--noproxy", "*",
                                   "--max-time", "1", url]).returncode != 0:
            if self.gateway.poll() is not None or time.monotonic() > deadline:
                raise UserError(f"the lab's stub gateway did not come up on {url}")
            time.sleep(0.2)
        self._keep_state()

    def stop_gateway(self) -> None:
        """The gateway gone: connections to it are refused."""
        if self.gateway and self.gateway.poll() is None:
            self.gateway.terminate()
            try:
                self.gateway.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait()

    def stop(self) -> None:
        """Stop every guest and the gateway, delete the network, remove the lab's files."""
        for guest in self.guests.values():
            guest.machine.stop()
        self.stop_gateway()
        subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True)
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def wait_until_up(self, timeout: float = 600) -> dict[str, float]:
        """Block until each guest has SSH and its role's main unit (ROLE_UNITS) is active;
        seconds to SSH each."""
        seconds = {}
        for name, guest in self.guests.items():
            seconds[name] = guest.machine.wait_for_ssh(timeout)
            guest.machine.wait_for_unit(ROLE_UNITS[guest.role], timeout=120)
        return seconds

    # -- looking at it ----------------------------------------------------------------------

    def __getitem__(self, name: str) -> Machine:
        return self.guests[name].machine

    def of_role(self, role: str) -> list[str]:
        """The lab's nodes of one role, by name."""
        return [name for name, guest in self.guests.items() if guest.role == role]

    def run_in_network(self, argv: list[str], timeout: float = 30,
                       check: bool = False) -> subprocess.CompletedProcess:
        """A host command inside the lab network (from the gateway address)."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True,
                              text=True, timeout=timeout, check=check)

    def vip_holders(self) -> list[str]:
        """The frontends that have the VIP on an interface, as each of them says."""
        holders = []
        for name, guest in self.guests.items():
            if guest.role != "frontend" or guest.machine.process.poll() is not None:
                continue
            status, output = guest.machine.execute(f"ip -o -4 addr show to {self.vip}/32")
            if status == 0 and output.strip():
                holders.append(name)
        return holders

    def wait_for_one_holder(self, timeout: float = 60, stable_s: float = 3,
                            not_on: str | None = None) -> str:
        """Wait until exactly one node holds the VIP (and not `not_on`) for `stable_s`."""
        deadline = time.monotonic() + timeout
        since, last = None, None
        while time.monotonic() < deadline:
            holders = self.vip_holders()
            holder = holders[0] if len(holders) == 1 and holders[0] != not_on else None
            if holder and holder == last:
                if time.monotonic() - since >= stable_s:
                    return holder
            else:
                since, last = time.monotonic(), holder
            time.sleep(0.5)
        raise MachineError(f"no single VIP holder{f' other than {not_on}' if not_on else ''} "
                           f"after {timeout:.0f} s: holders {self.vip_holders()}")

    def request(self, path: str, timeout: float = 5) -> dict:
        """One GET to the VIP from inside the lab network: status (0 if no answer), headers,
        body and seconds."""
        result = self.run_in_network([sys.executable, "-c", _REQUEST, f"http://{self.vip}{path}",
                                      str(timeout)], timeout=timeout + 30)
        if result.returncode != 0:
            raise MachineError(f"GET {path} through the VIP: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def http_via_vip(self, path: str = "/okome/health") -> tuple[int, str]:
        """(status, body) of one GET to the VIP from inside the lab network; 0 if none."""
        answer = self.request(path)
        return answer["status"], answer["body"]

    # -- breaking it ------------------------------------------------------------------------

    def set_link(self, name: str, up: bool) -> None:
        """Cut (up=False) or restore a guest's cable to the lab network."""
        self[name].set_link(LAB_NETDEV, up)

    def crash(self, name: str) -> None:
        """Power a guest off at once, without a shutdown."""
        self[name].crash()

    def restart(self, name: str) -> None:
        """Power a crashed guest on again, on its own disk, with a new cable."""
        guest = self.guests[name]
        self._plug(guest)
        try:
            guest.machine.launch()
        finally:
            self._unplug_fd(guest)
        self._keep_state()

    def reboot(self, name: str, timeout: float = 120) -> None:
        """A clean reboot of a guest, as `systemctl reboot` on the node does it. QEMU runs with
        -no-reboot, so it exits when the guest's shutdown is done and is started again here:
        same disk, same identity."""
        machine = self[name]
        # From a timer, so the SSH session that asks gets its answer before sshd stops.
        machine.succeed("systemd-run --on-active=1 --timer-property=AccuracySec=100ms "
                        "systemctl reboot")
        try:
            machine.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MachineError(f"{name}: still running {timeout:.0f} s after "
                               f"`systemctl reboot`; console:\n{machine.console_tail()}") \
                from None
        self.restart(name)

    @contextmanager
    def vip_client(self, path: str = "/okome/health", interval_s: float = 0.1,
                   timeout_s: float = 0.5) -> Iterator["VipClient"]:
        """A client inside the lab network that requests the VIP every `interval_s`; a request
        not answered within `timeout_s` counts as failed (short, so a dead holder costs few
        polls; longer where only whether an answer comes matters)."""
        client = VipClient(self, path, interval_s, timeout_s)
        client.start()
        try:
            yield client
        finally:
            client.stop()

    # -- kept between commands (`okome-image lab up`, then `status`, `down`) -----------------

    def save(self) -> Path:
        state = {"site": self.site.name, "out_dir": str(self.out_dir), "netns": self.netns,
                 "memory_mib": self.memory_mib, "cpus": self.cpus,
                 "gateway_pid": self.gateway.pid if self.gateway else None,
                 "guests": {name: {"pid": guest.machine.process.pid, "tap": guest.tap,
                                   "ssh_port": guest.machine.ssh_port}
                            for name, guest in self.guests.items()}}
        path = self.work_dir / STATE_FILE
        path.write_text(json.dumps(state, indent=2) + "\n")
        return path

    def _keep_state(self) -> None:
        """A lab that outlives the command that started it (`lab up`) keeps its state file
        current when a process of it is replaced, so `lab down` stops the new one."""
        if (self.work_dir / STATE_FILE).exists():
            self.save()

    @classmethod
    def attach(cls, work_dir: Path) -> "Lab":
        """The lab that `okome-image lab up` left running in `work_dir`."""
        path = work_dir / STATE_FILE
        if not path.is_file():
            raise UserError(f"no lab is up in {work_dir}",
                            "`okome-image lab up` starts one; give --lab-dir if it was started "
                            "with one")
        state = json.loads(path.read_text())
        lab = cls(Path(state["out_dir"]), list(state["guests"]), site=state["site"],
                  work_dir=work_dir, netns=state["netns"], memory_mib=state["memory_mib"],
                  cpus=state["cpus"])
        lab._own_work_dir = False
        lab._detach = True
        if state["gateway_pid"]:
            lab.gateway = RunningProcess(state["gateway_pid"], b"stub_gateway")
        for name, saved in state["guests"].items():
            node = lab.site.nodes[name]
            machine = Machine(artifact_paths(lab.out_dir, node.role).image, name=name,
                              user=lab.site.admin.user, memory_mib=lab.memory_mib,
                              cpus=lab.cpus, ssh_key=lab.admin_key, work_dir=work_dir / name,
                              detach=True)
            machine.process = RunningProcess(saved["pid"])
            machine.host_ports = {22: saved["ssh_port"]}
            lab.guests[name] = Guest(name, node.role, node.address, saved["tap"], machine)
        return lab

    def remove(self) -> None:
        """`lab down`: stop what `lab up` left running and remove all of it."""
        self.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)


class RunningProcess:
    """A process started by an earlier command (a QEMU, the gateway), known by its process id
    and a word of its command line: what the lab needs of a subprocess.Popen."""

    def __init__(self, pid: int, marker: bytes = b"qemu-system"):
        self.pid = pid
        self.marker = marker
        self.returncode: int | None = None

    def poll(self) -> int | None:
        try:
            os.kill(self.pid, 0)
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
            if self.marker not in cmdline:
                raise ProcessLookupError
        except (ProcessLookupError, FileNotFoundError):
            self.returncode = -1
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(15)

    def kill(self) -> None:
        self.send_signal(9)

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.1)
        return self.returncode


# Runs inside the lab network: one GET, printed as JSON (errors are status 0).
_REQUEST = r"""
import json, sys, time, urllib.error, urllib.request
url, timeout = sys.argv[1], float(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
started = time.monotonic()
try:
    answer = opener.open(url, timeout=timeout)
except urllib.error.HTTPError as err:
    answer = err
except OSError as err:
    print(json.dumps({"status": 0, "headers": {}, "body": str(err),
                      "seconds": time.monotonic() - started}))
    sys.exit()
body = answer.read().decode(errors="replace")
print(json.dumps({"status": answer.status, "headers": dict(answer.headers.items()),
                  "body": body, "seconds": time.monotonic() - started}))
"""

# Runs inside the lab network: a GET every interval, one JSON line per request on stdout,
# until stdin closes. Each request is on a fresh connection, as a new client would make it.
_CLIENT = r"""
import json, sys, threading, time, urllib.request
url, interval, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
next_at = time.monotonic()
while not stop.is_set():
    started, wall = time.monotonic(), time.time()
    try:
        with opener.open(url, timeout=timeout) as answer:
            node = json.loads(answer.read()).get("node", "?")
            line = {"t": wall, "ok": answer.status == 200, "node": node}
    except Exception as err:
        line = {"t": wall, "ok": False, "error": type(err).__name__}
    line["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(line), flush=True)
    next_at = max(next_at + interval, time.monotonic())
    stop.wait(next_at - time.monotonic())
"""


class VipClient:
    """Polls the VIP from inside the lab network and keeps every answer (or failure)."""

    def __init__(self, lab: Lab, path: str, interval_s: float, timeout_s: float):
        self.url = f"http://{lab.vip}{path}"
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.lab = lab
        self.results: list[dict] = []
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.netns, sys.executable, "-c", _CLIENT, self.url,
             str(self.interval_s), str(self.timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            self.results.append(json.loads(line))

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._reader:
            self._reader.join(timeout=5)

    def wait_for(self, predicate, timeout: float = 60) -> dict:
        """The first result after now that satisfies `predicate`."""
        start = len(self.results)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for result in self.results[start:]:
                if predicate(result):
                    return result
            time.sleep(0.1)
        raise MachineError(f"the VIP client saw no such answer in {timeout:.0f} s; "
                           f"last: {self.results[-3:]}")

    def outage(self, since: float) -> dict:
        """What the client saw from `since` (a time.time()) on: failed requests, and the
        seconds from `since` to the first answer from a node other than the one answering
        before `since` (the failover time)."""
        before = [r for r in self.results if r["t"] < since and r["ok"]]
        old_node = before[-1]["node"] if before else None
        after = [r for r in self.results if r["t"] >= since]
        moved = next((r for r in after if r["ok"] and r["node"] != old_node), None)
        return {
            "requests": len(after),
            "failed": sum(1 for r in after if not r["ok"]),
            "old_node": old_node,
            "new_node": moved["node"] if moved else None,
            "failover_s": round(moved["t"] - since, 2) if moved else None,
        }
