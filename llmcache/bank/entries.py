"""The exact index's storage: `EntryTable` (per-entry fields, as parallel arrays with a free list)
and `PagePool` (the arena's pages: how many exist, which are free).

An entry id is a row of every array; freed ids are reused (its serial number is not: see
`ExactIndex`). Arrays grow by doubling, so reserving an entry costs no Python loop over fields.
"""

from __future__ import annotations

import numpy as np

# name -> dtype of the per-entry numpy arrays
ARRAYS = {
    "ntokens": np.int64,
    "ref": np.int64,  # CLOCK reference count
    "hits": np.int64,  # rows served
    "serial": np.int64,  # never reused: orders pages after the pages they extend
    "parent_serial": np.int64,  # -1: a root entry
    "parent": np.int64,  # the parent's entry id, -1: none
    "kids": np.int64,  # children reserved or visible
    "valid": bool,  # visible (committed, not evicted)
    "dead": bool,  # evicted while it had children: freed with its last child
}


class EntryTable:
    """Per-entry fields: `keys`, `labels` (what each key was made from: `rows.describe_label`),
    `pages` (block table), `rows` (flat arena row of each token) as lists, and the numpy arrays
    of `ARRAYS`."""

    def __init__(self):
        self.keys: list[bytes | None] = []
        self.labels: list = []
        self.pages: list[np.ndarray | None] = []
        self.rows: list[np.ndarray | None] = []
        for name, dtype in ARRAYS.items():
            setattr(self, name, np.zeros(0, dtype=dtype))
        self.free_entries: list[int] = []

    def __len__(self) -> int:
        return len(self.keys)

    def new(self) -> int:
        """A free entry id (its fields to be set by the caller)."""
        if self.free_entries:
            return self.free_entries.pop()
        entry = len(self.keys)
        self.keys.append(None)
        self.labels.append(None)
        self.pages.append(None)
        self.rows.append(None)
        for name in ARRAYS:
            array = getattr(self, name)
            if entry >= len(array):
                setattr(self, name, np.concatenate([array, np.zeros(max(16, len(array)), dtype=array.dtype)]))
        return entry

    def free(self, entry: int) -> int:
        """Forget the entry's key, pages and parent link and free its id; returns its parent (-1: none)."""
        self.keys[entry] = self.labels[entry] = self.pages[entry] = self.rows[entry] = None
        self.free_entries.append(entry)
        parent = int(self.parent[entry])
        self.parent[entry] = -1
        return parent


class PagePool:
    """The arena's pages: `num_pages` exist (grown in chunks, never past `max_pages`), the free
    ones on a stack."""

    def __init__(self, page_tokens: int, max_pages: int):
        self.page_tokens, self.max_pages = page_tokens, max_pages
        self.free_pages: list[int] = []
        self.num_pages = 0

    @property
    def held(self) -> int:
        return self.num_pages - len(self.free_pages)

    def pages_for(self, ntokens: int) -> int:
        return -(-ntokens // self.page_tokens)

    def grow(self, need: int) -> bool:
        """Add pages (doubling, at least what `need` lacks, capped); False when at the cap."""
        if self.num_pages >= self.max_pages:
            return False
        grown = min(self.max_pages, max(2 * self.num_pages, self.num_pages + need - len(self.free_pages), 16))
        self.free_pages.extend(range(grown - 1, self.num_pages - 1, -1))
        self.num_pages = grown
        return True

    def make_room(self, need: int, evict) -> bool:
        """At least `need` free pages, growing or calling `evict()` (False: nothing to evict)."""
        while len(self.free_pages) < need:
            if not self.grow(need) and not evict():
                return False
        return True

    def take(self, need: int, ntokens: int) -> tuple[np.ndarray, np.ndarray]:
        """(pages int64 [need], the flat arena row of each of `ntokens` tokens in them)."""
        pages = np.array([self.free_pages.pop() for _ in range(need)], dtype=np.int64)
        offsets = np.arange(ntokens, dtype=np.int64)
        return pages, pages[offsets // self.page_tokens] * self.page_tokens + offsets % self.page_tokens

    def give(self, pages: np.ndarray) -> None:
        self.free_pages.extend(pages.tolist())
