"""A real redis-server for the cache library's tests, with the backend's ACL.

The library logs in as the gateway user of render_redis_acl, so every test also proves that the
gateway's ACL allows everything the library sends (scripts, locks, pipelines). Each cache gets
a namespace version of its own instead of a flushed database: the gateway may not flush.
"""

import itertools
import secrets

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from builder.redis_acl import GATEWAY_USER, METRICS_USER, render_redis_acl
from okome_cache import Cache
from okome_cache.testing import LocalRedisServer, free_port

GATEWAY_PASSWORD = secrets.token_urlsafe(24)
METRICS_PASSWORD = secrets.token_urlsafe(24)

_namespaces = itertools.count(1)


def _start_redis(workdir) -> LocalRedisServer:
    workdir.mkdir(parents=True, exist_ok=True)
    acl = workdir / "users.acl"
    acl.write_text(render_redis_acl(GATEWAY_PASSWORD, METRICS_PASSWORD))
    port = free_port()
    return LocalRedisServer(workdir, port, [
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(workdir), "--aclfile", str(acl), "--logfile", ""]).start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the session: no persistence, the backend's ACL."""
    server = _start_redis(tmp_path_factory.mktemp("cachelib-redis"))
    yield server
    server.stop()


@pytest.fixture
def own_redis_server(tmp_path):
    """A redis-server of the test's own, which the test may stop and start again."""
    server = _start_redis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def make_cache(redis_server):
    """Returns a function making caches as the gateway, each in a namespace of its own unless
    `namespace_version` is given; `server` defaults to the session's."""

    def make(server: LocalRedisServer | None = None, *, port: int | None = None,
             user: str = GATEWAY_USER, password: str = GATEWAY_PASSWORD, **options) -> Cache:
        options.setdefault("namespace_version", next(_namespaces))
        port = port or (server or redis_server).port
        return Cache.connect("127.0.0.1", port, username=user, password=password, **options)

    return make


@pytest.fixture
def cache(make_cache) -> Cache:
    return make_cache()


@pytest.fixture
def inspector(redis_server) -> redis.Redis:
    """A plain client, as the gateway, to look at what the library stored."""
    return redis.Redis(port=redis_server.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD,
                       retry=Retry(NoBackoff(), 0))


@pytest.fixture
def metrics_login() -> dict:
    """Username and password of the read-only metrics user, as make_cache options."""
    return {"user": METRICS_USER, "password": METRICS_PASSWORD}
