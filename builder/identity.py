"""A node's identity: the files `okome-image flash` writes into the boot partition's okome/.

Role images are the same for every node of a role; these files make a card one node. At boot,
okome-identity.service installs them where /etc/okome/identity.d/*.list says (see
overlays/common/usr/local/sbin/okome-apply-identity.j2), before the network and the services
start. Secrets are read here, at flash time, and go nowhere but onto the card.

| file on the card  | on the node                                  | who gets it            |
|-------------------|----------------------------------------------|------------------------|
| `hostname`        | /etc/hostname                                | every node             |
| `authorized_keys` | ~ADMIN/.ssh/authorized_keys                  | every node             |
| `network`         | /etc/systemd/network/10-okome-node.network   | every node             |
| `vrrp.env`        | /etc/okome/vrrp.env                          | nodes with `vrrp:`     |
| `redis-users.acl`, `redis-exporter.env` | see builder/redis_acl.py | backend nodes   |
"""

import os
import re
from collections.abc import Callable

from builder.errors import UserError
from builder.redis_acl import checked_password, render_exporter_credentials, render_redis_acl
from builder.site import Node, Site

IDENTITY_FOLDER = "okome"

# What the apply script keeps of a hostname is [a-z0-9-]; refusing anything else here means a
# card never boots under a name other than the one the site gives.
HOSTNAME_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

# A public key line: optional options, then a key type and base64 ("AAAA" starts every blob).
PUBLIC_KEY_PATTERN = re.compile(
    r"(^|\s)(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp\d+|sk-ssh-ed25519@openssh\.com"
    r"|sk-ecdsa-sha2-nistp256@openssh\.com)\s+AAAA[0-9A-Za-z+/]+=*(\s|$)")


def find_node(site: Site, node_name: str) -> Node:
    node = site.nodes.get(node_name)
    if node is None:
        known = ", ".join(sorted(site.nodes))
        raise UserError(f"site {site.name} has no node '{node_name}'", f"its nodes: {known}")
    return node


def node_identity(site: Site, node_name: str, role: str | None = None) -> dict[str, bytes]:
    """The files of okome/ for one node (name → content); `role` is the image's, if known.

    Every source (admin keys, secrets) is read now, so a missing one fails before a card is
    touched.
    """
    node = find_node(site, node_name)
    if role is not None and node.role != role:
        raise UserError(f"node {node_name} runs the {node.role} image, not {role}",
                        f"flash okome-{node.role}.img for it")
    if not HOSTNAME_PATTERN.fullmatch(node_name):
        raise UserError(f"node name '{node_name}' is not a usable hostname",
                        "use 1 to 63 of a-z 0-9 and '-', not starting or ending with '-'")

    unset = [source.env for source in sources_of(site, node.role)
             if source.env and source.env not in os.environ]
    if len(unset) > 1:
        raise UserError(f"environment variables not set: {', '.join(unset)}",
                        "export each of them before running (the site names them)")

    files = {
        "hostname": f"{node_name}\n".encode(),
        "authorized_keys": admin_authorized_keys(site).encode(),
        "network": render_network(site, node_name).encode(),
    }
    if node.vrrp is not None:
        files["vrrp.env"] = render_vrrp_env(site, node_name).encode()
    role_files = ROLE_FILES.get(node.role)
    if role_files:
        files.update(role_files(site))
    return files


def sources_of(site: Site, role: str) -> list:
    """Every file or variable a node of `role` reads its identity from."""
    names = ROLE_SECRETS[role](site) if role in ROLE_SECRETS else []
    return [site.admin.authorized_keys] + [site.secrets[n] for n in names if n in site.secrets]


def admin_authorized_keys(site: Site) -> str:
    """The administrators' public keys, checked line by line so a wrong value fails here and
    not as a node nobody can log in to."""
    source = site.admin.authorized_keys
    text = source.read("admin authorized keys")
    lines = [line.strip() for line in text.splitlines()]
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        raise UserError(f"admin authorized keys: {source.describe()} holds no key",
                        "put the operators' public keys there, one per line")
    for number, line in enumerate(keys, start=1):
        if not PUBLIC_KEY_PATTERN.search(line):
            hint = "each line must be an SSH public key such as `ssh-ed25519 AAAA... name`"
            if source.env and line.startswith(("/", "~", ".")):
                hint = (f"{source.env} must hold the keys themselves, not a file name: "
                        f"export {source.env}=\"$(cat {line})\"")
            raise UserError(f"admin authorized keys: key {number} from {source.describe()} "
                            "is not an SSH public key", hint)
    return "\n".join(keys) + "\n"


def render_network(site: Site, node_name: str, match: str = "Name=en* eth*") -> str:
    """The node's systemd-networkd file; it sorts before 90-okome-dhcp.network, so it wins.

    By default it matches the same interfaces as the DHCP fallback (end0 on a Pi, enp0s*
    under QEMU); the lab, whose guests have a second NIC, matches its lab NIC by MAC address.
    """
    node = site.nodes[node_name]
    return "\n".join([
        f"# {node_name} of site {site.name}, written by `okome-image flash`. Edit it on the",
        "# card's boot partition (okome/network) and reboot; delete it to go back to DHCP.",
        "[Match]",
        match,
        "",
        "[Network]",
        f"Address={node.address}/{site.network.prefix.prefixlen}",
        f"Gateway={site.network.router}",
        *[f"DNS={server}" for server in site.network.dns],
        "",
    ])


def render_vrrp_env(site: Site, node_name: str) -> str:
    """What keepalived will need for this node, as an environment file for its unit.

    Peers are the other nodes of the same role that have VRRP settings: they share the VIP.
    """
    node = site.nodes[node_name]
    peers = [str(other.address) for name, other in sorted(site.nodes.items())
             if name != node_name and other.role == node.role and other.vrrp is not None]
    return "\n".join([
        f"# VRRP settings of {node_name} (site {site.name}), written by `okome-image flash`.",
        f"OKOME_VRRP_STATE={node.vrrp.state}",
        f"OKOME_VRRP_PRIORITY={node.vrrp.priority}",
        f"OKOME_VRRP_ADDRESS={node.address}",
        f'OKOME_VRRP_PEERS="{" ".join(peers)}"',
        f"OKOME_VRRP_VIP={site.vip}/{site.network.prefix.prefixlen}",
        "",
    ])


def read_secret(site: Site, name: str) -> str:
    """A secret the site names, read from its file or variable now."""
    source = site.secrets.get(name)
    if source is None:
        raise UserError(f"site {site.name} names no secret '{name}'",
                        f"add it under secrets: as `{name}: {{env: VARIABLE}}` or "
                        f"`{name}: {{file: PATH}}`")
    value = source.read(f"secret {name}")
    # Editors and `echo > file` end a file with a newline that is not part of the secret.
    return value.rstrip("\r\n") if source.file else value


def read_password(site: Site, name: str) -> str:
    """A redis password the site names, checked; a bad one is named with where it came from."""
    return checked_password(read_secret(site, name),
                            f"secret {name} (from {site.secrets[name].describe()})")


def backend_files(site: Site) -> dict[str, bytes]:
    """redis's ACL (digests only) and the exporter's login, as builder/redis_acl.py makes them."""
    gateway_password = read_password(site, site.backend.gateway_password_secret)
    metrics_password = read_password(site, site.backend.metrics_password_secret)
    return {
        "redis-users.acl": render_redis_acl(gateway_password, metrics_password).encode(),
        "redis-exporter.env": render_exporter_credentials(metrics_password).encode(),
    }


# The files a role's nodes need beyond the common ones; names match the role's identity list
# (overlays/ROLE/etc/okome/identity.d/ROLE.list). And the secrets they are made from.
ROLE_FILES: dict[str, Callable[[Site], dict[str, bytes]]] = {
    "backend": backend_files,
}
ROLE_SECRETS: dict[str, Callable[[Site], list[str]]] = {
    "backend": lambda site: [site.backend.gateway_password_secret,
                             site.backend.metrics_password_secret],
}
