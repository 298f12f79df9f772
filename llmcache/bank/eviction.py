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


def sweep_many(meta, hand: int, pins: set, pages: int, entries: int, page_tokens: int) -> tuple[np.ndarray, int]:
    """One turn of the hand from `hand` as `sweep` makes it victim after victim, in one numpy
    pass: (the victims, in the order the hand meets them, the hand after the last), enough that
    their pages number at least `pages` and they are at least `entries`; fewer (every victim of
    the turn, the hand back where it started) when the turn does not hold that many. Spared
    counts the hand passes are lowered as `sweep` lowers them. An entry that becomes a leaf when
    its last child goes waits for the next turn (`sweep` may take it in this one)."""
    total = len(meta)
    window = min(total, max(256, 8 * (pages + entries)))  # (the hand's next entries: widened while short)
    while True:
        ring = np.arange(hand, hand + window, dtype=np.int64) % total
        leaf = meta.valid[ring] & (meta.kids[ring] == 0)
        if pins:
            leaf &= ~np.isin(ring, np.fromiter(pins, dtype=np.int64, count=len(pins)))
        passed = np.flatnonzero(leaf)
        zero = meta.ref[ring[passed]] == 0
        victims = passed[zero]
        size = -(-meta.ntokens[ring[victims]] // page_tokens)
        enough = np.flatnonzero(np.cumsum(size) >= pages) if pages > 0 else np.zeros(1, dtype=np.int64) - 1
        take = max(int(enough[0]) + 1 if len(enough) else len(victims) + 1, entries)
        if take <= len(victims) or window == total:
            break
        window = min(total, 4 * window)
    if take > len(victims):  # (short: every victim of the turn, the hand comes back round)
        take, spared, hand_after = len(victims), passed[~zero], hand
    elif take == 0:
        return victims[:0], hand
    else:
        last = victims[take - 1]
        spared, hand_after = passed[~zero & (passed < last)], int((hand + last + 1) % total)
    spared = ring[spared]
    meta.ref[spared] = np.maximum(meta.ref[spared] - 1, 0)  # (`on_sweep` of each)
    return ring[victims[:take]], hand_after
