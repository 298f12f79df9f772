"""The exact index's storage: `EntryTable` (per-entry fields, as parallel arrays with a free list)
and `PagePool` (the arena's pages: how many exist, which are free).

An entry id is a row of every array; freed ids are reused (its serial number is not: see
`ExactIndex`). Arrays grow by doubling, and ids and pages are handed out for many entries at
once (`new`, `take`). An entry's pages are a row of one block table (`pages`, [entries, widest
entry's pages]), so reserving a batch's entries and reading their token rows (`token_rows`) are
numpy operations over the batch, not a Python loop over entries or pages.
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
    "partial_kids": np.int64,  # of which hold fewer than page_tokens tokens (a partial page)
    "valid": bool,  # visible (committed, not evicted)
    "dead": bool,  # evicted while it had children: freed with its last child
}


class EntryTable:
    """Per-entry fields: `keys`, `labels` (what each key was made from: `rows.describe_label`) as
    lists, the block table `pages` (int64 [capacity, widest entry's pages]: entry e's pages are
    `pages[e, :pages_for(ntokens[e])]`), and the numpy arrays of `ARRAYS`.

    Args:
        page_tokens: tokens per page (an entry's token rows are its pages' first ntokens slots).
    """

    def __init__(self, page_tokens: int):
        self.page_tokens = page_tokens
        self.keys: list[bytes | None] = []
        self.labels: list = []
        self.pages = np.zeros((0, 1), dtype=np.int64)
        for name, dtype in ARRAYS.items():
            setattr(self, name, np.zeros(0, dtype=dtype))
        self.free_entries: list[int] = []
        self.partial_roots = 0  # entries of fewer than page_tokens tokens that extend no entry

    def __len__(self) -> int:
        return len(self.keys)

    def new(self, n: int) -> list[int]:
        """`n` free entry ids (their fields to be set by the caller): freed ones first, most
        recently freed first, then new rows."""
        free = self.free_entries
        cut = len(free) - min(n, len(free))
        reused = free[cut:][::-1]
        del free[cut:]
        first, fresh = len(self.keys), n - len(reused)
        if fresh:
            self.keys.extend([None] * fresh)
            self.labels.extend([None] * fresh)
            if first + fresh > len(self.ntokens):  # (the arrays grow together)
                for name in ARRAYS:
                    array = getattr(self, name)
                    grown = max(16, len(array), first + fresh - len(array))
                    setattr(self, name, np.concatenate([array, np.zeros(grown, dtype=array.dtype)]))
            if first + fresh > len(self.pages):
                grown = max(16, len(self.pages), first + fresh - len(self.pages))
                self.pages = np.concatenate([self.pages, np.zeros((grown, self.pages.shape[1]), dtype=np.int64)])
        return reused + list(range(first, first + fresh))

    def add(self, keys: list, labels: list, pages: np.ndarray, ntokens: np.ndarray, parents: np.ndarray,
            first_serial: int, entries: list | None = None) -> list[int]:
        """New entries for `keys` (`entries`, handed out by `new` earlier, or new ones), their
        fields set: `pages` int64 [E, widest] (`PagePool.take`), serials from `first_serial` on;
        `parents` [i]: an entry id, -1 none, or -2 - j for the entry added here for key j (its
        kids counted)."""
        entries = self.new(len(keys)) if entries is None else entries
        ids = np.asarray(entries, dtype=np.int64)
        for e, key, label in zip(entries, keys, labels):
            self.keys[e], self.labels[e] = key, label
        if pages.shape[1] > self.pages.shape[1]:  # (a longer entry than any before: widen the block table)
            wider = np.zeros((len(self.pages), max(pages.shape[1], 2 * self.pages.shape[1])), dtype=np.int64)
            wider[:, : self.pages.shape[1]] = self.pages
            self.pages = wider
        self.pages[ids, : pages.shape[1]] = pages
        # (min/max first: a batch without parents, an encoder's, skips the passes below)
        inner = parents <= -2 if len(parents) and parents.min() <= -2 else None
        if inner is not None:
            parents = np.where(inner, ids[np.maximum(-2 - parents, 0)], parents)
        self.ntokens[ids], self.ref[ids], self.hits[ids], self.kids[ids], self.dead[ids] = ntokens, 0, 0, 0, False
        self.partial_kids[ids] = 0
        self.serial[ids] = np.arange(first_serial, first_serial + len(keys))
        self.parent[ids] = parents
        linked = len(parents) and parents.max() >= 0
        self.parent_serial[ids] = np.where(parents >= 0, self.serial[np.maximum(parents, 0)], -1) if linked else -1
        if inner is not None:
            np.add.at(self.kids, parents[inner], 1)
        self._count_partial(ntokens, parents, 1)
        return entries

    def _count_partial(self, ntokens: np.ndarray, parents: np.ndarray, sign: int) -> None:
        """Count (sign 1) or uncount (-1) the partial pages among entries of `ntokens` extending `parents`."""
        short = np.asarray(ntokens) < self.page_tokens
        if short.any():
            linked = np.asarray(parents)[short]
            np.add.at(self.partial_kids, linked[linked >= 0], sign)
            self.partial_roots += sign * int((linked < 0).sum())

    def page_list(self, entry: int) -> np.ndarray:
        """int64 [pages]: the entry's pages."""
        return self.pages[entry, : -(-int(self.ntokens[entry]) // self.page_tokens)]

    def token_rows(self, entries) -> np.ndarray:
        """int64: the flat arena rows (page * page_tokens + offset) of the entries' tokens, one
        entry after another (one numpy pass over the batch)."""
        pt = self.page_tokens
        if len(entries) == 1:  # (one entry: its pages' slots, cut to its tokens)
            n = int(self.ntokens[entries[0]])
            return (self.pages[entries[0], : -(-n // pt), None] * pt + np.arange(pt, dtype=np.int64)).ravel()[:n]
        ids = np.asarray(entries, dtype=np.int64)
        counts = self.ntokens[ids]
        if not len(ids):
            return np.zeros(0, dtype=np.int64)
        width = -(-int(counts.max()) // pt)
        slots = (self.pages[ids, :width, None] * pt + np.arange(pt, dtype=np.int64)).reshape(len(ids), -1)
        if (counts == width * pt).all():
            return slots.ravel()
        return slots[np.arange(width * pt)[None, :] < counts[:, None]]

    def free_many(self, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`free` of each of `entries` (int64, distinct) in one pass: (their pages, one entry's
        after another's, as `page_list` gives them; their parents, -1 for none)."""
        counts = -(-self.ntokens[entries] // self.page_tokens)
        width = int(counts.max()) if len(entries) else 0
        pages = self.pages[entries, :width][np.arange(width)[None, :] < counts[:, None]]
        for e in entries.tolist():
            self.keys[e] = self.labels[e] = None
        self.free_entries.extend(entries.tolist())
        parents = self.parent[entries].copy()
        self.parent[entries] = -1
        self._count_partial(self.ntokens[entries], parents, -1)
        return pages, parents

    def free(self, entry: int) -> int:
        """Forget the entry's key and parent link and free its id; returns its parent (-1: none)."""
        self.keys[entry] = self.labels[entry] = None
        self.free_entries.append(entry)
        parent = int(self.parent[entry])
        self.parent[entry] = -1
        self._count_partial(self.ntokens[entry : entry + 1], np.array([parent]), -1)
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

    def take(self, ntokens: np.ndarray) -> np.ndarray:
        """Pages for entries of `ntokens` int64 [E] tokens, taken from the free stack (enough must
        be free): int64 [E, most pages an entry takes], each entry's pages first in its row."""
        return self.layout(self.pop(int((-(-ntokens // self.page_tokens)).sum())), ntokens)

    def pop(self, total: int) -> list[int]:
        """`total` pages off the free stack (enough must be free), in the order `take` hands them out."""
        taken = self.free_pages[len(self.free_pages) - total :][::-1]
        del self.free_pages[len(self.free_pages) - total :]
        return taken

    def layout(self, taken: list, ntokens: np.ndarray) -> np.ndarray:
        """`take`'s result for pages `taken` (from `pop`: each entry's pages after the previous one's)."""
        need = -(-ntokens // self.page_tokens)
        taken = np.asarray(taken, dtype=np.int64)
        width = int(need.max()) if len(need) else 1
        if (need == width).all():
            return taken.reshape(len(need), width)
        first = np.cumsum(need) - need
        cols = np.arange(width, dtype=np.int64)[None, :]
        return np.where(cols < need[:, None], taken[np.minimum(first[:, None] + cols, len(taken) - 1)], 0)

    def give(self, pages: np.ndarray) -> None:
        self.free_pages.extend(pages.tolist())
