"""Per-agent budgets over fixed windows: how many requests, and how many writes, an agent may
make per window, counted atomically in redis so that concurrent gateway workers share them.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

from okome_cache.cache import Cache, CacheUnavailable
from okome_cache.keys import KeyKind, budget_key

# Check and spend in one step, so two workers can never both take the last unit; a refused
# spend takes nothing. The counter lives until its window ends.
SPEND = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local cost = tonumber(ARGV[1])
if used + cost > tonumber(ARGV[2]) then
    return {0, used}
end
used = redis.call('INCRBY', KEYS[1], cost)
if redis.call('PTTL', KEYS[1]) < 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return {1, used}
"""


@dataclass(frozen=True)
class BudgetDecision:
    """The answer to one spend.

    `enforced` is False when redis could not be asked: the spend is then allowed (the cache
    never blocks the gateway) and `used` is unknown (None).
    """

    allowed: bool
    used: int | None
    limit: int
    resets_in: float
    enforced: bool = True


class Budgets:
    """Request (`rl`) and write budgets per agent, in the cache's namespace.

    A window of `window_seconds` starts at every multiple of it since the epoch, by `clock`
    (wall time), so every gateway worker counts into the same window.
    """

    def __init__(self, cache: Cache, clock: Callable[[], float] = time.time):
        self._cache = cache
        self._clock = clock
        self._spend = cache._client.register_script(SPEND)

    def spend_requests(self, agent: str, limit: int, window_seconds: int,
                       cost: int = 1) -> BudgetDecision:
        """Take `cost` requests from `agent`'s rate budget of `limit` per window."""
        return self._spend_from(KeyKind.RATE_BUDGET, agent, limit, window_seconds, cost)

    def spend_writes(self, agent: str, limit: int, window_seconds: int,
                     cost: int = 1) -> BudgetDecision:
        """Take `cost` writes from `agent`'s write budget of `limit` per window."""
        return self._spend_from(KeyKind.WRITE_BUDGET, agent, limit, window_seconds, cost)

    def _spend_from(self, kind: KeyKind, agent: str, limit: int, window_seconds: int,
                    cost: int) -> BudgetDecision:
        if limit < 0 or cost < 1 or window_seconds < 1:
            raise ValueError("budgets need limit >= 0, cost >= 1 and window_seconds >= 1")

        now = self._clock()
        start = int(now // window_seconds) * window_seconds
        resets_in = start + window_seconds - now
        key = budget_key(kind, agent, f"{window_seconds}s@{start}")
        name = self._cache.redis_key(key)
        expire_ms = max(1, int(resets_in * 1000))

        try:
            allowed, used = self._cache._attempt("budget", lambda client: self._spend(
                keys=[name], args=[cost, limit, expire_ms], client=client))
        except CacheUnavailable:
            return BudgetDecision(True, None, limit, resets_in, enforced=False)
        return BudgetDecision(bool(allowed), int(used), limit, resets_in)
