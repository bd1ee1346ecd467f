"""The site inventory: the cluster's addresses, nodes and where secrets come from.

Every field is declared once here, with its meaning; the same declaration validates site files
and is listed by `okome-image site-keys`.
"""

import os
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from builder.backend_settings import BackendSettings
from builder.errors import UserError
from builder.frontend_settings import FrontendSettings
from builder.imagespec import known_roles
from builder.paths import SITES_DIR
from builder.yamlfile import load_model


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(Strict):
    """Where a value that must not enter the repository comes from: a file or a variable."""

    env: str | None = Field(None, description="environment variable holding the value")
    file: str | None = Field(None, description="file holding the value (~ is expanded)")

    @model_validator(mode="after")
    def _exactly_one(self) -> "Source":
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' or 'file'")
        return self

    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env else f"file {self.file}"

    def read(self, what: str) -> str:
        """The value, or one clear error naming what is missing and where it was looked for."""
        if self.env:
            value = os.environ.get(self.env)
            if value is None:
                raise UserError(f"{what}: environment variable {self.env} is not set",
                                f"export {self.env}=... before running")
            return value
        path = Path(self.file).expanduser()
        try:
            return path.read_text()
        except OSError as err:
            raise UserError(f"{what}: cannot read {path}: {err.strerror}",
                            "create the file or change the site") from None


class Network(Strict):
    prefix: IPv4Network = Field(description="the nodes' subnet")
    router: IPv4Address = Field(description="default route for the nodes")
    dns: list[IPv4Address] = Field(description="name servers the nodes use")
    admin_networks: list[IPv4Network] = Field(description="networks allowed to SSH in")
    monitoring_networks: list[IPv4Network] = Field(description="networks allowed to scrape metrics")


class Gateway(Strict):
    host: IPv4Address = Field(description="the gateway: the only upstream of the frontends")
    port: int = Field(8000, ge=1, le=65535, description="the gateway's HTTP port")
    health_path: str = Field("/health", description="path the health probe requests")
    streaming_paths: list[str] = Field(
        ["/v1/", "/api/ollama/"], description="API and streaming paths: never cached or buffered")


class Admin(Strict):
    user: str = Field("okome", pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
                      description="login of the administrators' account on every node")
    authorized_keys: Source = Field(description="the administrators' SSH public keys")


class Vrrp(Strict):
    state: Literal["MASTER", "BACKUP"] = Field(description="keepalived's initial state")
    priority: int = Field(ge=1, le=254, description="VRRP priority; the higher one holds the VIP")


class Node(Strict):
    role: str = Field(description="the image this node runs (a file in images/)")
    address: IPv4Address = Field(description="the node's static address")
    vrrp: Vrrp | None = Field(None, description="VRRP settings, for nodes that share the VIP")


class Site(Strict):
    name: str = Field(description="the site's name")
    network: Network
    vip: IPv4Address = Field(description="the address that floats between the frontends")
    gateway: Gateway
    gpu_host: IPv4Address | None = Field(None, description="the GPU host (not built here)")
    admin: Admin
    secrets: dict[str, Source] = Field({}, description="secrets by name, read at flash time")
    nodes: dict[str, Node] = Field(description="the nodes by name")
    frontend: FrontendSettings = Field(FrontendSettings(), description="frontend role settings")
    backend: BackendSettings = Field(BackendSettings(), description="backend role settings")

    # A check across keys names the key it is about as "@a.b: ..." (builder/yamlfile.py).
    @model_validator(mode="after")
    def _addresses_inside_prefix_and_distinct(self) -> "Site":
        prefix = self.network.prefix
        if self.vip not in prefix:
            raise ValueError(f"@vip: {self.vip} is outside network.prefix {prefix}")
        seen = {self.vip: "vip"}
        for name, node in self.nodes.items():
            if node.address not in prefix:
                raise ValueError(f"@nodes.{name}.address: {node.address} is outside "
                                 f"network.prefix {prefix}")
            if node.address in seen:
                raise ValueError(f"@nodes.{name}.address: {node.address} is already "
                                 f"{seen[node.address]}'s")
            seen[node.address] = name
        return self

    @model_validator(mode="after")
    def _roles_known_and_one_vrrp_master(self) -> "Site":
        roles = known_roles()
        for name, node in self.nodes.items():
            if node.role not in roles:
                raise ValueError(f"@nodes.{name}.role: unknown role '{node.role}' (known "
                                 f"roles: {', '.join(roles)})")
        masters = [name for name, node in self.nodes.items()
                   if node.vrrp and node.vrrp.state == "MASTER"]
        if len(masters) > 1:
            raise ValueError(f"@nodes.{masters[1]}.vrrp.state: {masters[0]} is the MASTER "
                             "already; the peers that share the VIP start as BACKUP")
        return self

    def nodes_of_role(self, role: str) -> dict[str, Node]:
        return {name: node for name, node in self.nodes.items() if node.role == role}


def resolve_site_path(site: str) -> Path:
    """A site given by name (a file in sites/) or by path."""
    path = Path(site)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    candidate = SITES_DIR / f"{site}.yaml"
    if not candidate.exists():
        known = ", ".join(sorted(p.stem for p in SITES_DIR.glob("*.yaml")))
        raise UserError(f"unknown site '{site}'", f"known sites: {known}; or give a file path")
    return candidate


def load_site(site: str) -> Site:
    return load_model(resolve_site_path(site), Site)
