"""How the exact tier's CLOCK hand values an entry: plain functions of its reference count.

The hand sweeps the entries in a ring; an entry whose value is above zero is skipped and its
count lowered (a second chance), the first one at zero is evicted. What a hit adds decides the
policy: "lru" sets the count to 1 (CLOCK, the classic approximation of least-recently-used);
"staleness" adds 1 up to `GCLOCK_MAX` (GCLOCK: an entry hit often survives several sweeps, one
hit long ago does not). New entries start at zero: they earn their place by being hit.
"""

from __future__ import annotations

GCLOCK_MAX = 8


def on_hit(policy: str, count: int) -> int:
    """The reference count of an entry after a hit."""
    if policy == "staleness":
        return min(count + 1, GCLOCK_MAX)
    return 1


def on_sweep(count: int) -> int:
    """The count after the hand passes an entry it spares."""
    return count - 1 if count > 0 else 0
