"""Send real packets through an nftables ruleset, inside network namespaces made for the purpose.

`probe_firewall` runs this file as root under `unshare --net`: in that new namespace, the node,
it loads the rulesets and listens on every probed TCP port and on IP protocol 112 (VRRP). It then
makes a second namespace, the network, joined to the node by a veth pair, and sends each probe
from there with the probe's own source address. What got through comes back as one boolean per
probe. Both namespaces end with their last process; nothing reaches the host's network.
"""

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VRRP = 112
TIMEOUT_S = 0.5


def probe_firewall(rulesets: list[Path], node: str, probes: list[dict]) -> list[bool]:
    """Whether each probe ({"source": ADDRESS, "tcp": PORT} or {"source": ADDRESS,
    "ip_protocol": 112}) reaches `node` through `rulesets`, loaded in order."""
    spec = {"rulesets": [str(path) for path in rulesets], "node": node, "probes": probes}
    result = subprocess.run(["unshare", "--net", sys.executable, __file__, "node"],
                            input=json.dumps(spec), capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"firewall probe failed:\n{result.stderr}")
    return json.loads(result.stdout)


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def join_network_namespace(node: str, sources: list[str]) -> subprocess.Popen:
    """A process in a new network namespace, joined to this one by a veth pair."""
    network = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    own = os.readlink("/proc/self/ns/net")
    while os.readlink(f"/proc/{network.pid}/ns/net") == own:
        time.sleep(0.01)
    run("ip", "link", "set", "lo", "up")
    run("ip", "link", "add", "probe-node", "type", "veth", "peer", "name", "probe-net", "netns",
        str(network.pid))
    run("ip", "address", "add", f"{node}/24", "dev", "probe-node")
    run("ip", "link", "set", "probe-node", "up")
    inside = ["nsenter", "--target", str(network.pid), "--net"]
    for source in sources:
        run(*inside, "ip", "address", "add", f"{source}/24", "dev", "probe-net")
    run(*inside, "ip", "link", "set", "probe-net", "up")
    return network


def node_side(spec: dict) -> list[bool]:
    """In the node's namespace: load, listen, have the network side send, see what arrived."""
    for ruleset in spec["rulesets"]:
        run("nft", "-f", ruleset)
    probes = spec["probes"]
    listeners = []
    for port in sorted({probe["tcp"] for probe in probes if "tcp" in probe}):
        listener = socket.create_server(("0.0.0.0", port), backlog=len(probes))
        listeners.append(listener)
    vrrp = socket.socket(socket.AF_INET, socket.SOCK_RAW, VRRP)
    vrrp.settimeout(TIMEOUT_S)

    sources = sorted({probe["source"] for probe in probes})
    network = join_network_namespace(spec["node"], sources)
    try:
        sent = subprocess.run(["nsenter", "--target", str(network.pid), "--net", sys.executable,
                               __file__, "network"], input=json.dumps(spec), check=True,
                              capture_output=True, text=True)
        passed = json.loads(sent.stdout)
        arrived = set()
        try:
            while True:
                packet = vrrp.recv(2048)
                arrived.add(packet[(packet[0] & 0x0F) * 4:].decode())
        except TimeoutError:
            pass
    finally:
        network.kill()
        network.wait()
    return [f"probe-{index}" in arrived if passed[index] is None else passed[index]
            for index in range(len(probes))]


def send_probe(node: str, index: int, probe: dict) -> bool | None:
    """TCP: whether the handshake completes. VRRP: sent; the node side says if it arrived."""
    if "tcp" in probe:
        with socket.socket() as sock:
            sock.bind((probe["source"], 0))
            sock.settimeout(TIMEOUT_S)
            try:
                return sock.connect_ex((node, probe["tcp"])) == 0
            except TimeoutError:
                return False
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, probe["ip_protocol"]) as sock:
        sock.bind((probe["source"], 0))
        sock.sendto(f"probe-{index}".encode(), (node, 0))
    return None


def network_side(spec: dict) -> list[bool | None]:
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda item: send_probe(spec["node"], *item),
                             enumerate(spec["probes"])))


if __name__ == "__main__":
    side = {"node": node_side, "network": network_side}[sys.argv[1]]
    print(json.dumps(side(json.load(sys.stdin))))
