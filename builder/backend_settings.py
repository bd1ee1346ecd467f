"""Site settings of the backend role (redis as a pure cache)."""

from ipaddress import IPv4Network
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Only the allkeys-* policies keep a full cache writable: noeviction refuses writes, and the
# volatile-* policies refuse them once every remaining key is one without a TTL.
EvictionPolicy = Literal["allkeys-lfu", "allkeys-lru", "allkeys-random"]


class BackendSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = Field(6379, ge=1, le=65535, description="redis's TCP port")
    memory_fraction: float = Field(
        0.5, ge=0.1, le=0.8,
        description="share of the board's RAM that redis may fill before it evicts; the rest "
                    "is for the system, the exporters and redis's own fragmentation")
    maxmemory_policy: EvictionPolicy = Field(
        "allkeys-lfu",
        description="which keys redis evicts when full; LFU keeps often-read keys (model "
                    "metadata, tool lists, agent keys) when one-off planner answers pile up")
    extra_clients: list[IPv4Network] = Field(
        [], description="hosts or networks allowed to reach redis besides the gateway and the "
                        "frontends (e.g. a lab's test host)")
    exporter_port: int = Field(
        9121, ge=1, le=65535,
        description="port of the redis exporter's /metrics, open to the monitoring networks")
    gateway_password_secret: str = Field(
        "redis_gateway_password",
        description="entry of the site's secrets holding the gateway user's redis password")
    metrics_password_secret: str = Field(
        "redis_metrics_password",
        description="entry of the site's secrets holding the metrics user's redis password")
