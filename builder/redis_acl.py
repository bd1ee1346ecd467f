"""The backend's secret files, made when a card is flashed: redis's ACL and the exporter's login.

Neither file exists at build time, so neither the repository, the build cache nor the image holds
a password. The ACL stores only SHA-256 digests; the exporter's file must hold its password in
plain text because the exporter logs in with it, which is why the metrics user can only read
server statistics (see docs/backend.md).
"""

import hashlib
import re

from builder.errors import UserError

GATEWAY_USER = "gateway"
METRICS_USER = "metrics"

# Where the node keeps the files below; the redis config and the exporter's drop-in name them.
ACL_PATH = "/etc/redis/users.acl"
EXPORTER_CREDENTIALS_PATH = "/etc/okome/redis-exporter.env"

# A plain alphabet keeps a password intact in systemd's environment files and in clients'
# configs without any quoting; hex, base64 and base64url generators all stay inside it.
PASSWORD_PATTERN = re.compile(r"[A-Za-z0-9._~+/=@%^*!,:-]{16,256}")
PASSWORD_HINT = "use 16 to 256 of A-Z a-z 0-9 ._~+/=@%^*!,:- e.g. from `openssl rand -hex 32`"

# The gateway may do anything to the cache's own keys but nothing to the server: no CONFIG,
# FLUSHALL, KEYS, SHUTDOWN, SAVE, replication or ACL commands (all @admin or @dangerous).
GATEWAY_RULES = ("resetkeys ~okome:* resetchannels -@all +@read +@write +@keyspace +@scripting"
                 " +@transaction +@connection -@admin -@dangerous")

# What prometheus-redis-exporter sends on a scrape, all read-only; without CONFIG GET it still
# works but fills the ACL log with a denial per scrape. No key may be read: cached planner
# answers are the gateway's data, not metrics.
METRICS_RULES = ("resetkeys resetchannels -@all +auth +hello +ping +info +config|get"
                 " +client|setname +slowlog|get +slowlog|len +latency|latest")


def checked_password(password: str, what: str) -> str:
    if not PASSWORD_PATTERN.fullmatch(password):
        problem = "is empty" if not password else "has characters or a length not allowed"
        if password != password.strip():
            problem = "starts or ends with whitespace (a trailing newline in its file?)"
        raise UserError(f"{what} {problem}", PASSWORD_HINT)
    return password


def _digest(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def render_redis_acl(gateway_password: str, metrics_password: str) -> str:
    """The content of /etc/redis/users.acl: `default` off, the gateway and the metrics user.

    Passwords are stored as `#<sha256>`, so the card never holds the gateway's password.
    """
    checked_password(gateway_password, "redis gateway password")
    checked_password(metrics_password, "redis metrics password")
    if gateway_password == metrics_password:
        raise UserError("the redis gateway and metrics passwords are the same",
                        "give the metrics user its own password: it is stored in plain text")

    # `default` gets no password and not `nopass`: an unauthenticated client gets NOAUTH.
    return (
        "user default off resetpass resetkeys resetchannels -@all\n"
        f"user {GATEWAY_USER} on #{_digest(gateway_password)} {GATEWAY_RULES}\n"
        f"user {METRICS_USER} on #{_digest(metrics_password)} {METRICS_RULES}\n"
    )


def render_exporter_credentials(metrics_password: str) -> str:
    """The content of /etc/okome/redis-exporter.env, read by the exporter's unit (mode 0600)."""
    checked_password(metrics_password, "redis metrics password")
    return f"REDIS_PASSWORD={metrics_password}\n"
