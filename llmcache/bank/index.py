"""`ExactIndex`: the host-side index of the exact tier: which entry holds which key, in which pages.

Keys are the full bytes of what decides a row's output (`llmcache.rows.exact_key`), not a hash of
them, so two different rows can never share an entry. Per entry the index keeps its token count,
its pages (a block table) and its CLOCK reference count; free pages are a stack. Everything is
host memory and plain Python/numpy, so a lookup costs no device work and no synchronisation; the
arena beside it (`PagedArena`) holds the states.

Per-entry fields are declared once in `FIELDS` so that `state()` and `restore()` (used by
`llmcache.save`/`load`) iterate them.
"""

from __future__ import annotations

import numpy as np

from . import eviction


class ExactIndex:
    """Entries of the exact tier.

    Args:
        page_tokens: tokens per page.
        max_pages: pages the budget allows in all.
        max_entries: at most this many entries (None: the pages alone bound them).
        policy: eviction policy name (see `eviction`).
    """

    FIELDS = ("ntokens", "ref", "hits")

    def __init__(self, page_tokens: int, max_pages: int, max_entries: int | None, policy: str = "lru"):
        self.page_tokens = page_tokens
        self.max_pages = max_pages
        self.max_entries = max_entries
        self.policy = policy
        self.clear()

    def clear(self) -> None:
        self.table: dict[bytes, int] = {}
        self.keys: list[bytes | None] = []
        self.pages: list[np.ndarray | None] = []  # block table: the entry's pages in order
        self.rows: list[np.ndarray | None] = []  # the flat arena row of each of its tokens
        self.ntokens = np.zeros(0, dtype=np.int64)
        self.ref = np.zeros(0, dtype=np.int64)
        self.hits = np.zeros(0, dtype=np.int64)
        self.valid = np.zeros(0, dtype=bool)
        self.free_entries: list[int] = []
        self.reserved: set[int] = set()  # entries whose states are being written
        self.free_pages: list[int] = []
        self.num_pages = 0  # pages the arena has now
        self.hand = 0
        self.evictions = 0

    # ---- reading -------------------------------------------------------------------------
    @property
    def entries(self) -> int:
        return len(self.table)

    @property
    def held_pages(self) -> int:
        """Pages of visible and reserved entries."""
        return self.num_pages - len(self.free_pages)

    def lookup(self, key: bytes) -> int:
        """The entry holding `key` (its reference count bumped), or -1."""
        entry = self.table.get(key, -1)
        if entry >= 0:
            self.ref[entry] = eviction.on_hit(self.policy, int(self.ref[entry]))
            self.hits[entry] += 1
        return entry

    def token_rows(self, entry: int) -> np.ndarray:
        """int64 [n]: the flat arena rows (page * page_tokens + offset) of the entry's n tokens."""
        return self.rows[entry]

    def pages_for(self, ntokens: int) -> int:
        return -(-ntokens // self.page_tokens)

    # ---- writing -------------------------------------------------------------------------
    def reserve(self, key: bytes, ntokens: int) -> int:
        """Pages for a new entry for `key` of `ntokens` tokens, evicting by CLOCK as needed; -1 if
        it cannot fit without evicting another reserved entry. A reserved entry is invisible to
        lookups and never evicted until `commit` (its states are written in between) or
        `release`. The caller grows the arena to `num_pages` before writing."""
        if key in self.table:
            return -1
        need = self.pages_for(ntokens)
        if need > self.max_pages:
            return -1
        full = self.max_entries is not None and self.entries + len(self.reserved) >= self.max_entries
        if full and not self._evict_one():
            return -1
        while len(self.free_pages) < need:
            if self.num_pages < self.max_pages:
                grown = min(self.max_pages, max(2 * self.num_pages, self.num_pages + need - len(self.free_pages), 16))
                self.free_pages.extend(range(grown - 1, self.num_pages - 1, -1))
                self.num_pages = grown
            elif not self._evict_one():
                return -1
        entry = self._new_entry()
        self.keys[entry] = key
        pages = np.array([self.free_pages.pop() for _ in range(need)], dtype=np.int64)
        offsets = np.arange(ntokens, dtype=np.int64)
        self.pages[entry] = pages
        self.rows[entry] = pages[offsets // self.page_tokens] * self.page_tokens + offsets % self.page_tokens
        self.ntokens[entry] = ntokens
        self.ref[entry] = 0
        self.hits[entry] = 0
        self.reserved.add(entry)
        return entry

    def commit(self, entry: int) -> bool:
        """Make a reserved entry visible (its states are written). False (and the entry released)
        when another entry took its key meanwhile."""
        self.reserved.discard(entry)
        key = self.keys[entry]
        if key in self.table:
            self._free(entry)
            return False
        self.valid[entry] = True
        self.table[key] = entry
        return True

    def release(self, entry: int) -> None:
        """Give back a reserved entry that will not be written (its forward failed)."""
        if entry in self.reserved:
            self.reserved.discard(entry)
            self._free(entry)

    def insert(self, key: bytes, ntokens: int) -> int:
        """Reserve and commit at once (states written by the caller right after); -1 if it cannot fit."""
        entry = self.reserve(key, ntokens)
        if entry >= 0:
            self.commit(entry)
        return entry

    def evict(self, entry: int) -> None:
        """Forget a visible entry and free its pages."""
        if not self.valid[entry]:
            return
        del self.table[self.keys[entry]]
        self.valid[entry] = False
        self._free(entry)

    def _free(self, entry: int) -> None:
        self.free_pages.extend(self.pages[entry].tolist())
        self.keys[entry] = self.pages[entry] = self.rows[entry] = None
        self.free_entries.append(entry)

    def _new_entry(self) -> int:
        if self.free_entries:
            return self.free_entries.pop()
        entry = len(self.keys)
        self.keys.append(None)
        self.pages.append(None)
        self.rows.append(None)
        grow = lambda a: np.concatenate([a, np.zeros(max(16, len(a)), dtype=a.dtype)]) if entry >= len(a) else a
        self.ntokens, self.ref, self.hits, self.valid = map(grow, (self.ntokens, self.ref, self.hits, self.valid))
        return entry

    def _evict_one(self) -> bool:
        """Move the hand to the first visible entry whose count is zero (sparing and lowering the
        others) and evict it. False when there is none (reserved entries are never evicted)."""
        total = len(self.keys)
        if total == 0 or self.entries == 0:
            return False
        # Each full turn lowers every spared count by one, so GCLOCK_MAX + 1 turns always find a victim.
        for _ in range((eviction.GCLOCK_MAX + 1) * total + 1):
            entry = self.hand
            self.hand = (self.hand + 1) % total
            if not self.valid[entry]:
                continue
            if self.ref[entry] > 0:
                self.ref[entry] = eviction.on_sweep(int(self.ref[entry]))
                continue
            self.evict(entry)
            self.evictions += 1
            return True
        return False

    # ---- persistence ---------------------------------------------------------------------
    def live(self) -> list[int]:
        """Live entry ids, in id order."""
        return [e for e in range(len(self.keys)) if self.valid[e]]
