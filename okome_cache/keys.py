"""The key schema shared by the gateway's planner and the backend (DESIGN §1), as code.

Every key is built here, from validated parts, so two callers can never spell one key two ways
nor make two different things share a key. A key's kind picks its TTL from `okome_cache.ttl`.
The namespace (`okome:v<N>:`) is added by the `Cache` that stores the key, so bumping its
version leaves every earlier key unread.
"""

import enum
import hashlib
import re
from dataclasses import dataclass

PREFIX = "okome"

# Parts are names (models, repos, agents, nodes, versions) or digests. ':' separates parts, so
# one inside a part is escaped as %3A; '%' itself is not allowed, which keeps the escape unique.
PART_PATTERN = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")
DIGEST_PATTERN = re.compile(r"[0-9a-f]{8,128}")


class KeyKind(enum.Enum):
    """What a key holds; the value is the key's first part below the namespace."""

    MODEL_META = "model_meta"
    PLANNER = "planner"
    RAG = "rag"
    TOOLS = "tools"
    HEALTH = "health"
    RATE_BUDGET = "budget:rl"
    WRITE_BUDGET = "budget:writes"
    AGENT_KEYS = "agentkeys"


class InvalidKeyPart(ValueError):
    """A key part that the schema does not allow; a bug in the caller, not a cache failure."""


@dataclass(frozen=True)
class CacheKey:
    """A key of the schema: its kind and its path below the namespace, e.g. `tools:1.4.2`."""

    kind: KeyKind
    path: str

    def in_namespace(self, version: int) -> str:
        """The key's name in redis under namespace `version`, e.g. `okome:v1:tools:1.4.2`."""
        return f"{PREFIX}:v{version}:{self.path}"


def _part(value: str, what: str) -> str:
    if not isinstance(value, str) or not PART_PATTERN.fullmatch(value):
        raise InvalidKeyPart(f"{what} {value!r}: use 1 to 128 of A-Z a-z 0-9 . _ : / @ + -")
    return value.replace(":", "%3A")


def _digest(value: str, what: str) -> str:
    if not isinstance(value, str) or not DIGEST_PATTERN.fullmatch(value):
        raise InvalidKeyPart(f"{what} {value!r}: expected 8 to 128 lowercase hex digits")
    return value


def content_hash(content: str | bytes) -> str:
    """The SHA-256 hex digest that keys use for prompts, repositories and chunks."""
    data = content.encode() if isinstance(content, str) else content
    return hashlib.sha256(data).hexdigest()


def model_meta_key(model: str) -> CacheKey:
    """`model_meta:{model}`: a model's metadata."""
    return CacheKey(KeyKind.MODEL_META, f"model_meta:{_part(model, 'model')}")


def planner_key(model: str, prompt: str, toolset: str, repo_hash: str) -> CacheKey:
    """`planner:{model}:{prompt_hash}:{toolset}:{repo_hash}`: a planner answer.

    The prompt is hashed exactly as given, so the key never carries the prompt's text.
    """
    if not isinstance(prompt, str):
        raise InvalidKeyPart(f"prompt must be text, not {type(prompt).__name__}")
    parts = (_part(model, "model"), content_hash(prompt), _part(toolset, "toolset"),
             _digest(repo_hash, "repo_hash"))
    return CacheKey(KeyKind.PLANNER, "planner:" + ":".join(parts))


def rag_key(repo: str, chunk_hash: str) -> CacheKey:
    """`rag:{repo}:{chunk_hash}`: a retrieved chunk of a repository."""
    path = f"rag:{_part(repo, 'repo')}:{_digest(chunk_hash, 'chunk_hash')}"
    return CacheKey(KeyKind.RAG, path)


def tools_key(tool_version: str) -> CacheKey:
    """`tools:{tool_version}`: the tool list of one tool version."""
    return CacheKey(KeyKind.TOOLS, f"tools:{_part(tool_version, 'tool_version')}")


def health_key(node: str) -> CacheKey:
    """`health:{node}`: a node's latest health report."""
    return CacheKey(KeyKind.HEALTH, f"health:{_part(node, 'node')}")


def agent_keys_key(agent: str) -> CacheKey:
    """`agentkeys:{agent}`: an agent's key record, kept until the gateway replaces it."""
    return CacheKey(KeyKind.AGENT_KEYS, f"agentkeys:{_part(agent, 'agent')}")


def budget_key(kind: KeyKind, agent: str, window: str) -> CacheKey:
    """`budget:rl:{agent}:{window}` or `budget:writes:{agent}:{window}`: a budget's counter."""
    if kind not in (KeyKind.RATE_BUDGET, KeyKind.WRITE_BUDGET):
        raise InvalidKeyPart(f"{kind} is not a budget")
    return CacheKey(kind, f"{kind.value}:{_part(agent, 'agent')}:{_part(window, 'window')}")
