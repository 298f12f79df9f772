"""`ExactIndex`: the host-side index of the exact tier: which entry holds which key, in which pages.

Keys are the full bytes of what decides a row's output (`llmcache.rows.exact_key`), not a hash of
them, so two different rows can never share an entry. Per entry the index keeps its token count,
its pages (a block table) and its CLOCK reference count; free pages are a stack. Everything is
host memory and plain Python/numpy, so a lookup costs no device work and no synchronisation; the
arena beside it (`PagedArena`) holds the states.

Decoders chain their entries: each is one page of a row's tokens whose key names its parent
entry by serial number (`rows.page_key`), so a key stands for the whole prefix up to it and a
prefix shared by many rows is held once (a radix tree over pages, as SGLang's). An entry with
children (`kids`) is never evicted: CLOCK takes leaves first, and a parent becomes a leaf when its
last child goes. Serial numbers are never reused, so a key naming a dead parent can never match.

Callers use the verbs (vLLM's block pool is the model): `find`/`lookup`/`touch` to read, `walk` to
follow a chain of pages, `reserve`/`commit`/`release`/`insert` to write, `pinned()` (a context in
which `pin`ned entries are never evicted), `is_live`/`discard`, `describe`, and
`state_dict`/`load_state_dict` for `llmcache.save`/`load`. Nothing outside `bank/` reads a field.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import eviction


@dataclass(frozen=True)
class EntryInfo:
    """What one entry is (`ExactIndex.describe`)."""

    key: bytes
    ntokens: int
    pages: int
    hits: int
    serial: int
    parent_serial: int


class ExactIndex:
    """Entries of the exact tier.

    Args:
        page_tokens: tokens per page.
        max_pages: pages the budget allows in all.
        max_entries: at most this many entries (None: the pages alone bound them).
        policy: eviction policy name (see `eviction`).
    """

    FIELDS = ("ntokens", "ref", "hits", "serial", "parent_serial")  # what `state_dict` keeps per entry

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
        self.serial = np.zeros(0, dtype=np.int64)  # never reused: what a child's key names
        self.parent_serial = np.zeros(0, dtype=np.int64)  # -1: a root entry
        self.parent = np.zeros(0, dtype=np.int64)  # the parent's entry id, -1: none
        self.kids = np.zeros(0, dtype=np.int64)  # children reserved or visible
        self.valid = np.zeros(0, dtype=bool)
        self.dead = np.zeros(0, dtype=bool)  # evicted while it had children: freed with its last child
        self.next_serial = 0
        self.free_entries: list[int] = []
        self.reserved: set[int] = set()  # entries whose states are being written
        self.pins: set[int] = set()  # entries a routing is reading (`pinned`): not evicted until unpinned
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

    def find(self, key: bytes) -> int:
        """The entry holding `key`, or -1 (nothing counted: see `lookup`)."""
        return self.table.get(key, -1)

    def lookup(self, key: bytes) -> int:
        """The entry holding `key` (a hit: its reference count bumped), or -1."""
        entry = self.table.get(key, -1)
        if entry >= 0:
            self.touch((entry,))
        return entry

    def touch(self, entries) -> None:
        """Count a hit on each of `entries` (found earlier, e.g. by `walk`)."""
        for entry in entries:
            self.ref[entry] = eviction.on_hit(self.policy, int(self.ref[entry]))
            self.hits[entry] += 1

    def walk(self, pages: int, key_of: Callable[[int, int], bytes]) -> list[int]:
        """The entries of a chain of pages, found from its start: `key_of(i, parent_serial)` is
        the key of page i after the page with that serial (-1: the first page). Stops at the
        first page not held; counts nothing."""
        found, serial = [], -1
        for i in range(pages):
            entry = self.table.get(key_of(i, serial), -1)
            if entry < 0:
                break
            found.append(entry)
            serial = int(self.serial[entry])
        return found

    def key(self, entry: int) -> bytes | None:
        return self.keys[entry]

    def serial_of(self, entry: int) -> int:
        """The entry's serial number (never reused: what a child's key names); -1 for entry -1."""
        return int(self.serial[entry]) if entry >= 0 else -1

    def is_live(self, entry: int, key: bytes) -> bool:
        """The entry is visible and still holds `key` (not evicted, its slot not reused)."""
        return self.table.get(key, -1) == entry

    def describe(self, entry: int) -> EntryInfo:
        return EntryInfo(self.keys[entry], int(self.ntokens[entry]), len(self.pages[entry]), int(self.hits[entry]),
                         int(self.serial[entry]), int(self.parent_serial[entry]))

    @contextlib.contextmanager
    def pinned(self):
        """Inside, entries handed to `pin` are never evicted (a routing reads them after
        reserving others, which may evict); every pin is dropped on the way out."""
        try:
            yield self.pin
        finally:
            self.pins.clear()

    def pin(self, entries) -> None:
        self.pins.update(entries)

    def token_rows(self, entry: int) -> np.ndarray:
        """int64 [n]: the flat arena rows (page * page_tokens + offset) of the entry's n tokens."""
        return self.rows[entry]

    def pages_for(self, ntokens: int) -> int:
        return -(-ntokens // self.page_tokens)

    # ---- writing -------------------------------------------------------------------------
    def reserve(self, key: bytes, ntokens: int, parent: int = -1) -> int:
        """Pages for a new entry for `key` of `ntokens` tokens, evicting by CLOCK as needed; -1 if
        it cannot fit without evicting another reserved entry. A reserved entry is invisible to
        lookups and never evicted until `commit` (its states are written in between) or
        `release`. `parent`: the entry this one extends (a chained page), kept alive while this
        one lives. The caller grows the arena to `num_pages` before writing."""
        if key in self.table:
            return -1
        if parent >= 0:
            self.kids[parent] += 1  # first: the evictions below must spare it
        if not self._make_room(self.pages_for(ntokens)):
            if parent >= 0:
                self._drop_kid(parent)
            return -1
        need = self.pages_for(ntokens)
        entry = self._new_entry()
        self.keys[entry] = key
        pages = np.array([self.free_pages.pop() for _ in range(need)], dtype=np.int64)
        offsets = np.arange(ntokens, dtype=np.int64)
        self.pages[entry] = pages
        self.rows[entry] = pages[offsets // self.page_tokens] * self.page_tokens + offsets % self.page_tokens
        self.ntokens[entry] = ntokens
        self.ref[entry] = 0
        self.hits[entry] = 0
        self.serial[entry] = self.next_serial
        self.next_serial += 1
        self.parent[entry] = parent
        self.parent_serial[entry] = self.serial[parent] if parent >= 0 else -1
        self.kids[entry] = 0
        self.dead[entry] = False
        self.reserved.add(entry)
        return entry

    def _make_room(self, need: int) -> bool:
        """Free pages (and an entry slot) for `need` pages, growing the arena's page count or evicting."""
        if need > self.max_pages:
            return False
        full = self.max_entries is not None and self.entries + len(self.reserved) >= self.max_entries
        if full and not self._evict_one():
            return False
        while len(self.free_pages) < need:
            if self.num_pages < self.max_pages:
                grown = min(self.max_pages, max(2 * self.num_pages, self.num_pages + need - len(self.free_pages), 16))
                self.free_pages.extend(range(grown - 1, self.num_pages - 1, -1))
                self.num_pages = grown
            elif not self._evict_one():
                return False
        return True

    def commit(self, entry: int) -> bool:
        """Make a reserved entry visible (its states are written). False (and the entry released)
        when another entry took its key meanwhile."""
        self.reserved.discard(entry)
        key = self.keys[entry]
        if key in self.table:
            self._drop(entry)
            return False
        self.valid[entry] = True
        self.table[key] = entry
        return True

    def release(self, entry: int) -> None:
        """Give back a reserved entry that will not be written (its forward failed)."""
        if entry in self.reserved:
            self.reserved.discard(entry)
            self._drop(entry)

    def insert(self, key: bytes, ntokens: int, parent: int = -1) -> int:
        """Reserve and commit at once (states written by the caller right after); -1 if it cannot fit."""
        entry = self.reserve(key, ntokens, parent)
        if entry >= 0:
            self.commit(entry)
        return entry

    def _drop(self, entry: int) -> None:
        """Free an invisible entry, or mark it dead while children still name it."""
        if self.kids[entry]:
            self.dead[entry] = True
        else:
            self._free(entry)

    def evict(self, entry: int) -> None:
        """Forget a visible entry and free its pages (an entry with children: once they are gone;
        until then nothing can reach them, since their keys name it)."""
        if not self.valid[entry]:
            return
        del self.table[self.keys[entry]]
        self.valid[entry] = False
        self._drop(entry)

    def discard(self, entry: int, key: bytes) -> bool:
        """Evict `entry` if it still holds this very `key` object (the write that stored it: an
        entry evicted and reused since is another row's now). True when evicted."""
        if entry >= 0 and self.keys[entry] is key and self.valid[entry]:
            self.evict(entry)
            return True
        return False

    def _free(self, entry: int) -> None:
        self.free_pages.extend(self.pages[entry].tolist())
        self.keys[entry] = self.pages[entry] = self.rows[entry] = None
        self.free_entries.append(entry)
        parent = int(self.parent[entry])
        self.parent[entry] = -1
        if parent >= 0:
            self._drop_kid(parent)

    def _drop_kid(self, parent: int) -> None:
        self.kids[parent] -= 1
        if self.kids[parent] == 0 and self.dead[parent]:
            self.dead[parent] = False
            self._free(parent)

    def _new_entry(self) -> int:
        if self.free_entries:
            return self.free_entries.pop()
        entry = len(self.keys)
        self.keys.append(None)
        self.pages.append(None)
        self.rows.append(None)
        grow = lambda a: np.concatenate([a, np.zeros(max(16, len(a)), dtype=a.dtype)]) if entry >= len(a) else a
        for name in ("ntokens", "ref", "hits", "serial", "parent_serial", "parent", "kids", "valid", "dead"):
            setattr(self, name, grow(getattr(self, name)))
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
            if not self.valid[entry] or self.kids[entry] or entry in self.pins:  # leaves first
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

    def state_dict(self) -> dict:
        """The live entries, a page after the page it extends (by serial): "entries" (their ids,
        for the caller to read their token rows), "keys" (bytes) and each of `FIELDS` (int64)."""
        live = sorted(self.live(), key=lambda e: int(self.serial[e]))
        state = {"entries": live, "keys": [self.keys[e] for e in live]}
        for name in self.FIELDS:
            state[name] = getattr(self, name)[live].copy()
        return state

    def load_state_dict(self, state: dict) -> list[int]:
        """Insert the entries of a `state_dict` into this empty index; their new ids, in order.
        Raises ValueError when one names a parent page it does not hold, or they do not fit."""
        by_serial: dict[int, int] = {}
        out = []
        for i, key in enumerate(state["keys"]):
            parent_serial = int(state["parent_serial"][i])
            parent = by_serial.get(parent_serial, -1)
            if parent_serial >= 0 and parent < 0:
                raise ValueError("the file holds a page whose prefix page it does not hold")
            entry = self.insert(key, int(state["ntokens"][i]), parent)
            if entry < 0 or self.evictions:
                raise ValueError("the file holds more (or longer) entries than this config's budget fits")
            for name in self.FIELDS:
                if name != "ntokens":
                    getattr(self, name)[entry] = int(state[name][i])
            by_serial[int(self.serial[entry])] = entry
            self.next_serial = max(self.next_serial, int(self.serial[entry]) + 1)
            out.append(entry)
        return out
