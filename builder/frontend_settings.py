"""Site settings of the frontend role (nginx edge cache, health probe, rate limits).

The gateway itself (address, port, health path, streaming paths) is `site.gateway`; what is here
is how the frontend treats it. Every default suits a Raspberry Pi with an SD card in front of one
LLM gateway on the same LAN.
"""

from ipaddress import IPv4Address

from pydantic import BaseModel, ConfigDict, Field, model_validator

# nginx turns a request header into the variable $http_<name>, and a cookie into $cookie_<name>;
# only these characters survive that unchanged.
HEADER_NAME = r"^[A-Za-z][A-Za-z0-9-]{0,63}$"
COOKIE_NAME = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"

DEFAULT_STATIC_EXTENSIONS = [
    "css", "js", "mjs", "map", "wasm", "webmanifest", "png", "jpg", "jpeg", "gif", "svg", "webp",
    "ico", "woff", "woff2", "ttf", "otf",
]


def header_variable(header: str) -> str:
    """The nginx variable holding a request header: `X-Okome-Agent` -> `$http_x_okome_agent`."""
    return "$http_" + header.lower().replace("-", "_")


class FrontendSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    listen_address: IPv4Address | None = Field(
        None, description="address nginx listens on; none: every address, so the VIP is served "
                          "wherever it floats")
    listen_port: int = Field(80, ge=1, le=65535, description="HTTP port clients reach")

    cache_max_size_mb: int = Field(
        1024, ge=16, description="cap on the disk cache; least recently used entries go first")
    cache_min_free_mb: int = Field(
        512, ge=0, description="free space the cache always leaves on the card's filesystem")
    cache_inactive_h: int = Field(
        168, ge=1, description="entries unused this long are deleted, stale or not; until then "
                               "they can be served stale during an outage")
    cache_key_version: int = Field(
        1, ge=1, description="part of every cache key: bump it to invalidate the whole cache "
                             "without touching the disk")
    static_extensions: list[str] = Field(
        DEFAULT_STATIC_EXTENSIONS,
        description="file extensions cached even when the gateway sends no cache headers")
    static_ttl_s: int = Field(
        3600, ge=1, description="how long a static asset stays fresh when the gateway sets no TTL")
    cache_lock_timeout_s: int = Field(
        5, ge=1, description="how long concurrent misses for one key wait for the first to fill it")
    cache_connect_timeout_s: int = Field(
        1, ge=1, le=10, description="connect timeout for cacheable requests: how soon stale is "
                                    "served when the gateway stops answering")
    cache_read_timeout_s: int = Field(
        15, ge=1, description="read timeout for cacheable requests before stale is served")

    stream_connect_timeout_s: int = Field(
        5, ge=1, le=60, description="connect timeout on streaming and API paths")
    stream_timeout_s: int = Field(
        600, ge=30, description="read and send timeout on streaming and API paths: long enough "
                                "for a generation that stays silent")
    max_request_body_mb: int = Field(64, ge=1, description="largest request body accepted")
    upstream_keepalive: int = Field(
        16, ge=1, description="idle keep-alive connections each worker keeps to the gateway")
    upstream_keepalive_timeout_s: int = Field(
        4, ge=1, description="nginx closes an idle connection to the gateway after this; keep it "
                             "below the gateway's own idle timeout, so nginx never reuses one "
                             "the gateway is closing")

    vrrp_check_interval_s: int = Field(
        1, ge=1, le=60, description="how often keepalived asks the local nginx whether it serves")
    vrrp_check_timeout_s: int = Field(
        2, ge=1, le=60, description="a check of nginx slower than this counts as a failure")
    vrrp_check_fall: int = Field(
        2, ge=1, le=10, description="failed checks in a row that make the node give the VIP up")
    vrrp_check_rise: int = Field(
        2, ge=1, le=10, description="good checks in a row that make a failed node eligible again")
    probe_interval_s: int = Field(
        2, ge=1, le=60, description="how often the gateway's health endpoint is probed")
    probe_timeout_s: int = Field(
        1, ge=1, description="a probe slower than this counts as a failure")
    probe_failures_to_down: int = Field(
        2, ge=1, description="consecutive failed probes before the gateway is treated as down "
                             "(one success brings it back)")

    client_rate_per_s: int = Field(20, ge=1, description="sustained requests/s per client address")
    client_burst: int = Field(100, ge=0, description="requests over the rate a client may burst")
    agent_header: str = Field(
        "X-Okome-Agent", pattern=HEADER_NAME,
        description="request header naming the agent, for per-agent limits and logs")
    agent_rate_per_s: int = Field(10, ge=1, description="sustained requests/s per agent")
    agent_burst: int = Field(50, ge=0, description="requests over the rate an agent may burst")
    streams_per_agent: int = Field(
        8, ge=1, description="concurrent requests on streaming paths per agent (per client "
                             "address when the agent header is absent)")

    canary_header: str = Field(
        "X-Okome-Cache-Policy", pattern=HEADER_NAME,
        description="request header choosing a canary cache policy: bypass or refresh")
    canary_cookie: str = Field(
        "okome_cache_policy", pattern=COOKIE_NAME,
        description="cookie choosing a canary cache policy when the header is absent")

    prewarm_interval_min: int = Field(
        10, ge=1, description="how often the most requested cacheable URLs are refreshed")
    prewarm_top: int = Field(50, ge=1, description="how many URLs each pre-warm run refreshes")
    prewarm_pause_ms: int = Field(
        200, ge=0, description="pause between pre-warm requests, to stay under the rate limits")

    @property
    def agent_variable(self) -> str:
        return header_variable(self.agent_header)

    @property
    def canary_header_variable(self) -> str:
        return header_variable(self.canary_header)

    @property
    def canary_cookie_variable(self) -> str:
        return "$cookie_" + self.canary_cookie

    @model_validator(mode="after")
    def _probe_fits_its_interval(self) -> "FrontendSettings":
        if self.probe_timeout_s >= self.probe_interval_s:
            raise ValueError("probe_timeout_s must be shorter than probe_interval_s")
        return self

    @model_validator(mode="after")
    def _static_extensions_are_plain(self) -> "FrontendSettings":
        for extension in self.static_extensions:
            if not extension.isalnum():
                raise ValueError(f"static_extensions: '{extension}' is not letters and digits")
        return self
