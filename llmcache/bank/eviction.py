"""How the exact tier's CLOCK hand values an entry: plain functions of its reference count.

The hand sweeps the entries in a ring; an entry whose value is above zero is skipped and its
count lowered (a second chance), the first one at zero is evicted. What a hit adds decides the
policy: "lru" sets the count to 1 (CLOCK, the classic approximation of least-recently-used);
"staleness" adds 1 up to `GCLOCK_MAX` (GCLOCK: an entry hit often survives several sweeps, one
hit long ago does not). New entries start at zero: they earn their place by being hit.
"""

from __future__ import annotations

import numpy as np

GCLOCK_MAX = 8


def on_hits(policy: str, ref: np.ndarray, entries: np.ndarray) -> None:
    """Count a hit on each of `entries` (int64, repeats hit again) in the reference counts `ref`."""
    if policy == "staleness":
        np.add.at(ref, entries, 1)
        ref[entries] = np.minimum(ref[entries], GCLOCK_MAX)
    else:
        ref[entries] = 1


def on_sweep(count: int) -> int:
    """The count after the hand passes an entry it spares."""
    return count - 1 if count > 0 else 0


def sweep(meta, hand: int, pins: set) -> tuple[int, int]:
    """(the victim, the hand after it): from `hand`, the first visible leaf entry of `meta`
    (`entries.EntryTable`) that is not pinned and whose count is zero, sparing and lowering the
    others; (-1, hand) when there is none (reserved entries, parents and pinned ones are never
    victims)."""
    total = len(meta)
    # Each full turn lowers every spared count by one, so GCLOCK_MAX + 1 turns always find a victim.
    for _ in range((GCLOCK_MAX + 1) * total + 1):
        entry = hand
        hand = (hand + 1) % total
        if not meta.valid[entry] or meta.kids[entry] or entry in pins:  # leaves first
            continue
        if meta.ref[entry] > 0:
            meta.ref[entry] = on_sweep(int(meta.ref[entry]))
            continue
        return entry, hand
    return -1, hand
