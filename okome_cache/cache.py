"""The cache the gateway's planner reads through: get, set and get-or-compute over redis.

The cache is an optimisation, never a dependency: when redis is down, slow or refuses a
command, every call here answers as if the key were missing (or computes the value itself) and
logs why; it raises only what the caller's own `compute` raises, or for a caller's bug such as
a value that is not JSON.
"""

import json
import logging
import random
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from okome_cache.keys import PREFIX, CacheKey
from okome_cache.ttl import ttl_range

log = logging.getLogger("okome_cache")

T = TypeVar("T")

_MISSING = object()

# Deletes the lock only if it is still ours: a holder that overran its lock must not release
# the next holder's.
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class CacheUnavailable(Exception):
    """Redis could not serve a call; internal, never raised to the library's callers."""


class Cache:
    """Values of the key schema, stored as JSON with TTLs from the table.

    `namespace_version` prefixes every key (`okome:v<N>:`); bumping it makes every value
    written under the previous version unseen, which is how the whole cache is invalidated.
    `lock_seconds` bounds how long one computation keeps others waiting before its lock lapses;
    `wait_seconds` bounds how long a caller waits for another's computation before computing
    too; `retry_after` is how long the cache stays bypassed after redis failed to answer, so that
    a dead redis costs one timeout per period, not one per call.
    """

    def __init__(self, client: redis.Redis, *, namespace_version: int = 1,
                 lock_seconds: float = 30.0, wait_seconds: float = 10.0,
                 retry_after: float = 1.0, rng: random.Random | None = None):
        if namespace_version < 1:
            raise ValueError("namespace_version starts at 1")
        self._client = client
        self.namespace_version = namespace_version
        self.lock_seconds = lock_seconds
        self.wait_seconds = wait_seconds
        self.retry_after = retry_after
        self._rng = rng or random.Random()
        self._unavailable_until = 0.0
        self._release_lock = client.register_script(RELEASE_LOCK)

    @classmethod
    def connect(cls, host: str, port: int = 6379, *, username: str, password: str,
                timeout: float = 0.2, **options: Any) -> "Cache":
        """A cache on the backend's redis, logged in as `username` (the gateway's user).

        `timeout` bounds each connection attempt and each reply: beyond it, redis counts as
        down and the caller computes without the cache. redis-py's retries are turned off for
        the same reason.
        """
        client = redis.Redis(host=host, port=port, username=username, password=password,
                             socket_timeout=timeout, socket_connect_timeout=timeout,
                             retry=Retry(NoBackoff(), 0))
        return cls(client, **options)

    def redis_key(self, key: CacheKey) -> str:
        """The name `key` has in redis under this cache's namespace."""
        return key.in_namespace(self.namespace_version)

    def _lock_name(self, key: CacheKey) -> str:
        return f"{PREFIX}:v{self.namespace_version}:lock:{key.path}"

    def get(self, key: CacheKey, default: Any = None) -> Any:
        """The value stored at `key`, or `default` when it is missing or redis failed."""
        name = self.redis_key(key)
        try:
            raw = self._attempt("GET", lambda client: client.get(name))
        except CacheUnavailable:
            return default
        value = self._decode(raw, name)
        return default if value is _MISSING else value

    def set(self, key: CacheKey, value: Any) -> bool:
        """Store `value` (JSON-serialisable) with its kind's TTL; False when redis failed."""
        data = _encode(value)
        name = self.redis_key(key)
        lifetime = ttl_range(key.kind)
        ttl = lifetime.draw(self._rng) if lifetime else None
        try:
            self._attempt("SET", lambda client: client.set(name, data, ex=ttl))
        except CacheUnavailable:
            return False
        return True

    def delete(self, key: CacheKey) -> bool:
        """Remove `key`; False when redis failed, so the old value may still be served."""
        name = self.redis_key(key)
        try:
            self._attempt("DEL", lambda client: client.delete(name))
        except CacheUnavailable:
            return False
        return True

    def get_or_compute(self, key: CacheKey, compute: Callable[[], T], *,
                       wait_seconds: float | None = None) -> T:
        """The value at `key`, computing and storing it when missing.

        Of many callers that miss the same key, one computes while the others wait for its
        value, up to `wait_seconds` (default: the cache's), then compute themselves. When a
        key nears expiry (its kind's refresh window), one reader recomputes it while the others
        go on reading the current value, so a hot key is rarely seen missing at all.
        """
        try:
            value, remaining_ms = self._read_with_ttl(key)
        except CacheUnavailable:
            return compute()
        if value is not _MISSING and not _due_for_refresh(key, remaining_ms):
            return value

        try:
            token = self._try_lock(key)
        except CacheUnavailable:
            return compute() if value is _MISSING else value
        if token is not None:
            return self._compute_holding_lock(key, compute, token)
        if value is not _MISSING:
            return value
        return self._wait_for_other(
            key, compute, self.wait_seconds if wait_seconds is None else wait_seconds)

    def _compute_holding_lock(self, key: CacheKey, compute: Callable[[], T], token: str) -> T:
        """Compute and store under the lock, unless another holder stored a fresh value first."""
        try:
            try:
                stored, remaining_ms = self._read_with_ttl(key)
                if stored is not _MISSING and not _due_for_refresh(key, remaining_ms):
                    return stored
            except CacheUnavailable:
                pass

            value = compute()
            self.set(key, value)
            return value
        finally:
            self._unlock(key, token)

    def _wait_for_other(self, key: CacheKey, compute: Callable[[], T], wait_seconds: float) -> T:
        """Poll for the value another caller is computing; take over if its lock goes away."""
        name = self.redis_key(key)
        lock_name = self._lock_name(key)
        deadline = time.monotonic() + wait_seconds
        pause = 0.005
        while (remaining := deadline - time.monotonic()) > 0:
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.05)
            try:
                raw, locked = self._attempt(
                    "GET", lambda client: client.pipeline(transaction=False)
                    .get(name).exists(lock_name).execute())
                value = self._decode(raw, name)
                if value is not _MISSING:
                    return value
                token = None if locked else self._try_lock(key)
            except CacheUnavailable:
                return compute()
            if token is not None:
                return self._compute_holding_lock(key, compute, token)

        log.info("waited %.1f s for %s to be computed elsewhere; computing it here", wait_seconds,
                 name)
        value = compute()
        self.set(key, value)
        return value

    def _read_with_ttl(self, key: CacheKey) -> tuple[Any, int]:
        """The decoded value (or _MISSING) and its remaining life in ms, in one round trip."""
        name = self.redis_key(key)
        raw, remaining_ms = self._attempt("GET", lambda client: client.pipeline(
            transaction=False).get(name).pttl(name).execute())
        return self._decode(raw, name), remaining_ms

    def _try_lock(self, key: CacheKey) -> str | None:
        """A token if this caller now holds the key's computation lock, None if another does."""
        token = secrets.token_hex(8)
        lock_name = self._lock_name(key)
        taken = self._attempt("SET NX", lambda client: client.set(
            lock_name, token, nx=True, px=max(1, int(self.lock_seconds * 1000))))
        return token if taken else None

    def _unlock(self, key: CacheKey, token: str) -> None:
        lock_name = self._lock_name(key)
        try:
            self._attempt("unlock", lambda client: self._release_lock(
                keys=[lock_name], args=[token], client=client))
        except CacheUnavailable:
            pass  # the lock lapses by itself after lock_seconds

    def _decode(self, raw: bytes | None, name: str) -> Any:
        if raw is None:
            return _MISSING
        try:
            return json.loads(raw)
        except ValueError:
            log.warning("%s holds a value that is not JSON; treating it as missing", name)
            return _MISSING

    def _attempt(self, what: str, action: Callable[[redis.Redis], T]) -> T:
        """Run `action` on redis, or raise CacheUnavailable (logged) if redis cannot serve it.

        A connection failure or timeout marks redis down for `retry_after` seconds, during
        which calls skip it at once; a refused command (NOPERM, OOM, ...) affects only itself.
        """
        if time.monotonic() < self._unavailable_until:
            raise CacheUnavailable()
        try:
            return action(self._client)
        except (redis.ConnectionError, redis.TimeoutError) as err:
            self._unavailable_until = time.monotonic() + self.retry_after
            log.warning("redis did not answer %s (%s); working without the cache for %.1f s",
                        what, err, self.retry_after)
            raise CacheUnavailable() from err
        except redis.RedisError as err:
            log.warning("redis refused %s: %s", what, err)
            raise CacheUnavailable() from err


def _encode(value: Any) -> bytes:
    """JSON bytes of `value`; a TypeError here is the caller's bug, not a cache failure."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _due_for_refresh(key: CacheKey, remaining_ms: int) -> bool:
    """True when a stored key is close enough to expiry that one reader should recompute it."""
    lifetime = ttl_range(key.kind)
    if lifetime is None or remaining_ms < 0:
        return False
    return remaining_ms < lifetime.refresh_window * 1000
