"""The per-agent key lookup: an agent's key record, read through the cache.

Agent keys have no TTL; the gateway stores a record when it issues or rotates an agent's keys
and forgets it when it revokes them. The cache may still lose a record (eviction, a rebuilt
backend), so a lookup always carries `load`, which reads the gateway's own source of truth.
"""

from collections.abc import Callable
from typing import Any, TypeVar

from okome_cache.cache import Cache
from okome_cache.keys import agent_keys_key

T = TypeVar("T")


class AgentKeys:
    """Lookup, store and forget agent key records in one cache."""

    def __init__(self, cache: Cache):
        self._cache = cache

    def lookup(self, agent: str, load: Callable[[], T]) -> T:
        """The agent's record from the cache, or from `load` (once for concurrent callers)."""
        return self._cache.get_or_compute(agent_keys_key(agent), load)

    def store(self, agent: str, record: Any) -> bool:
        """Replace the agent's record; False when redis failed."""
        return self._cache.set(agent_keys_key(agent), record)

    def forget(self, agent: str) -> bool:
        """Drop the agent's record, e.g. on revocation.

        False means redis failed and a revoked record may still be served from the cache: the
        caller must retry, or keep the agent out by other means, until this returns True.
        """
        return self._cache.delete(agent_keys_key(agent))
