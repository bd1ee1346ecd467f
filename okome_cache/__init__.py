"""okome_cache: the gateway's cache on the OKOME backend (redis), per docs/cache-library.md.

    cache = Cache.connect(host, port, username="gateway", password=secret)
    plan = cache.get_or_compute(planner_key(model, prompt, toolset, repo_hash), make_plan)

A cache failure never reaches the caller: the library computes without the cache instead.
"""

from okome_cache.agents import AgentKeys
from okome_cache.budgets import BudgetDecision, Budgets
from okome_cache.cache import Cache
from okome_cache.keys import (
    CacheKey,
    InvalidKeyPart,
    KeyKind,
    agent_keys_key,
    budget_key,
    content_hash,
    health_key,
    model_meta_key,
    planner_key,
    rag_key,
    tools_key,
)
from okome_cache.ttl import TTL_TABLE, TtlRange, ttl_range

__all__ = [
    "AgentKeys", "BudgetDecision", "Budgets", "Cache", "CacheKey", "InvalidKeyPart", "KeyKind",
    "TTL_TABLE", "TtlRange", "agent_keys_key", "budget_key", "content_hash", "health_key",
    "model_meta_key", "planner_key", "rag_key", "tools_key", "ttl_range",
]
