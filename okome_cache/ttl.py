"""How long each kind of key lives: the TTL table of DESIGN §1, in one place.

Each kind has a range, and every write draws its TTL uniformly from it, so keys written together
(a burst of planner answers, a warm-up of model metadata) do not all expire in the same second
and send their recomputations to the gateway at once. Where the design gives a single figure,
the range is its last tenth: a key may expire a little early, never late.
"""

import random
from dataclasses import dataclass

from okome_cache.keys import KeyKind

MINUTE = 60
HOUR = 60 * MINUTE


@dataclass(frozen=True)
class TtlRange:
    """The shortest and longest life, in seconds, of a key of one kind."""

    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    @property
    def refresh_window(self) -> float:
        """Seconds before expiry in which one reader recomputes while the others keep reading.

        A tenth of the shortest life: early enough that a hot key is rarely seen missing.
        """
        return self.low / 10


# Budgets live for their window, which the caller chooses; agent keys never expire, because the
# gateway replaces or deletes them when it changes them.
TTL_TABLE: dict[KeyKind, TtlRange | None] = {
    KeyKind.MODEL_META: TtlRange(int(21.6 * HOUR), 24 * HOUR),
    KeyKind.PLANNER: TtlRange(5 * MINUTE, 15 * MINUTE),
    KeyKind.RAG: TtlRange(30 * MINUTE, 60 * MINUTE),
    KeyKind.TOOLS: TtlRange(9 * MINUTE, 10 * MINUTE),
    # A health key's TTL is how long a silent node still counts as alive: no jitter.
    KeyKind.HEALTH: TtlRange(30, 30),
    KeyKind.AGENT_KEYS: None,
}


def ttl_range(kind: KeyKind) -> TtlRange | None:
    """The TTL range of `kind`; None for keys that do not expire."""
    if kind not in TTL_TABLE:
        raise ValueError(f"{kind} has no TTL in the table: budgets take their window's")
    return TTL_TABLE[kind]
