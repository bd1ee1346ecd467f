"""The key schema and the TTL table of DESIGN §1, as the cache library builds them."""

import random

import pytest

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
from okome_cache.ttl import HOUR, MINUTE, TTL_TABLE, ttl_range

REPO = content_hash("repo at some commit")
CHUNK = content_hash("a chunk of it")


def test_every_key_of_the_schema_has_its_documented_shape():
    prompt_hash = content_hash("plan the task")
    assert model_meta_key("qwen2.5").in_namespace(1) == "okome:v1:model_meta:qwen2.5"
    assert (planner_key("qwen2.5", "plan the task", "default", REPO).in_namespace(1)
            == f"okome:v1:planner:qwen2.5:{prompt_hash}:default:{REPO}")
    assert rag_key("okome/gateway", CHUNK).in_namespace(1) == f"okome:v1:rag:okome/gateway:{CHUNK}"
    assert tools_key("1.4.2").in_namespace(1) == "okome:v1:tools:1.4.2"
    assert health_key("frontend-a").in_namespace(1) == "okome:v1:health:frontend-a"
    assert agent_keys_key("agent-7").in_namespace(1) == "okome:v1:agentkeys:agent-7"
    assert (budget_key(KeyKind.RATE_BUDGET, "agent-7", "60s@120").in_namespace(1)
            == "okome:v1:budget:rl:agent-7:60s@120")
    assert (budget_key(KeyKind.WRITE_BUDGET, "agent-7", "60s@120").in_namespace(1)
            == "okome:v1:budget:writes:agent-7:60s@120")


def test_the_namespace_version_changes_every_key():
    key = tools_key("1.4.2")
    assert key.in_namespace(1) != key.in_namespace(2)
    assert key.in_namespace(2).startswith("okome:v2:")


def test_a_prompt_is_hashed_and_never_appears_in_its_key():
    key = planner_key("m", "secret customer text", "t", REPO)
    assert "secret" not in key.path
    assert content_hash("secret customer text") in key.path
    assert key == planner_key("m", "secret customer text", "t", REPO)
    assert key != planner_key("m", "secret customer text ", "t", REPO)


def test_a_colon_inside_a_part_cannot_forge_another_key():
    # Ollama names models "name:tag"; unescaped, that colon would shift every later part.
    tagged = model_meta_key("llama3:8b")
    assert tagged.path == "model_meta:llama3%3A8b"
    assert tagged != model_meta_key("llama3")


@pytest.mark.parametrize("bad", ["", " ", "a b", "tab\t", "new\nline", "x" * 129, "per%cent",
                                 "ünï", None, 7])
def test_invalid_parts_are_refused(bad):
    with pytest.raises(InvalidKeyPart):
        model_meta_key(bad)


@pytest.mark.parametrize("bad", ["", "ABCDEF12", "abc", "g" * 16, "0" * 129])
def test_digests_must_be_lowercase_hex(bad):
    with pytest.raises(InvalidKeyPart):
        rag_key("repo", bad)
    with pytest.raises(InvalidKeyPart):
        planner_key("m", "p", "t", bad)


def test_a_prompt_must_be_text():
    with pytest.raises(InvalidKeyPart):
        planner_key("m", b"bytes", "t", REPO)


def test_budget_keys_only_for_budget_kinds():
    with pytest.raises(InvalidKeyPart):
        budget_key(KeyKind.TOOLS, "agent", "60s@0")


def test_the_ttl_table_matches_the_design():
    assert (ttl_range(KeyKind.PLANNER).low, ttl_range(KeyKind.PLANNER).high) == (300, 900)
    assert (ttl_range(KeyKind.RAG).low, ttl_range(KeyKind.RAG).high) == (1800, 3600)
    # Single figures in the design are upper bounds: keys expire early, never late.
    assert ttl_range(KeyKind.MODEL_META).high == 24 * HOUR
    assert ttl_range(KeyKind.TOOLS).high == 10 * MINUTE
    assert (ttl_range(KeyKind.HEALTH).low, ttl_range(KeyKind.HEALTH).high) == (30, 30)
    assert ttl_range(KeyKind.AGENT_KEYS) is None


def test_budgets_have_no_row_because_their_window_is_their_ttl():
    with pytest.raises(ValueError):
        ttl_range(KeyKind.RATE_BUDGET)


@pytest.mark.parametrize("kind", [kind for kind, row in TTL_TABLE.items() if row])
def test_drawn_ttls_stay_inside_their_range_and_spread_across_it(kind):
    row = ttl_range(kind)
    rng = random.Random(4)
    drawn = [row.draw(rng) for _ in range(500)]
    assert all(row.low <= ttl <= row.high for ttl in drawn)
    if row.high - row.low >= 60:
        # Keys written together must not expire together: a wide, even spread.
        assert max(drawn) - min(drawn) > 0.8 * (row.high - row.low)
        assert len(set(drawn)) > min(100, (row.high - row.low) / 2)


def test_a_cache_key_is_a_plain_value():
    assert CacheKey(KeyKind.TOOLS, "tools:1") == tools_key("1")
    assert len({tools_key("1"), tools_key("1")}) == 1
