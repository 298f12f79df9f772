"""`ExactIndex`: the host-side index of the exact tier: which entry holds which key, in which pages.

Keys are content-addressed (`llmcache.rows`: a 256-bit BLAKE2b digest of what decides a row's
output), so no two different rows share an entry. Per entry the index keeps its token count, its
pages (a block table), its CLOCK reference count and its label (what its key was made from, for
`held` and `save`); free pages are a stack. Everything is host memory, so a lookup costs no
device work and no synchronisation; the arena beside it (`PagedArena`) holds the states. This is
the reference, in Python and numpy; where the extension is built the exact tier uses the same
verbs in C++ (`native.NativeIndex`), which the tests check against this one call by call.

Decoders chain their entries: each is one page of a row's tokens whose key is chained over the
pages before it, so a key stands for the whole prefix up to it and a prefix shared by many rows
is held once (a radix tree over pages, as SGLang's). An entry names the entry it extends
(`parent`); one with children (`kids`) is never evicted: CLOCK takes leaves first, and a parent
becomes a leaf when its last child goes.

Callers use the verbs (vLLM's block pool is the model): `find`/`find_many`/`lookup`/`touch` to
read, `reserve`/`reserve_many`/`commit`/`commit_many`/`release`/`insert`
to write, `pinned()` (a context in which `pin`ned entries are never evicted), `is_live`/
`discard`, `describe`, and `state_dict`/`load_state_dict` for `llmcache.save`/`load`. Nothing
outside `bank/` reads a field.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat

import numpy as np

from . import eviction
from .entries import EntryTable, PagePool


@dataclass(frozen=True)
class EntryInfo:
    """What one entry is (`ExactIndex.describe`)."""

    key: bytes
    ntokens: int
    pages: int
    hits: int
    serial: int
    parent_serial: int
    label: object = None  # what the key was made from (`rows.describe_label`), or None


class _Pinned:
    """`ExactIndex.pinned()` (a plain context manager: entered once per forward)."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index

    def __enter__(self):
        return self.index.pin

    def __exit__(self, *exc) -> None:
        self.index.unpin_all()


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
        self.page_tokens, self.max_pages, self.max_entries, self.policy = page_tokens, max_pages, max_entries, policy
        self.clear()

    def clear(self) -> None:
        self.table: dict[bytes, int] = {}
        self.meta = EntryTable(self.page_tokens)  # per-entry fields
        self.next_serial = 0
        self.reserved: set[int] = set()  # entries whose states are being written
        self.pins: set[int] = set()  # entries a routing is reading (`pinned`): not evicted until unpinned
        self.pool = PagePool(self.page_tokens, self.max_pages)
        self.hand = 0
        self.evictions = 0

    # ---- reading -------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        """Pages the arena must have now."""
        return self.pool.num_pages

    @property
    def entries(self) -> int:
        return len(self.table)

    @property
    def held_pages(self) -> int:
        """Pages of visible and reserved entries."""
        return self.pool.held

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
        """Count a hit on each of `entries` (found earlier, e.g. by `find_many`)."""
        entries = np.asarray(entries, dtype=np.int64)
        if len(entries):
            eviction.on_hits(self.policy, self.meta.ref, entries)
            np.add.at(self.meta.hits, entries, 1)

    def find_many(self, keys: list) -> np.ndarray:
        """int64 [len(keys)]: `find` of each key (one pass, no Python call per key; None finds nothing)."""
        return np.fromiter(map(self.table.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))

    def key(self, entry: int) -> bytes | None:
        return self.meta.keys[entry]

    def parent_key(self, entry: int) -> bytes:
        """The key of the entry `entry` extends (a decoder page's previous page), b"" for none."""
        parent = int(self.meta.parent[entry])
        return self.meta.keys[parent] if parent >= 0 else b""

    def is_live(self, entry: int, key: bytes) -> bool:
        """The entry is visible and still holds `key` (not evicted, its slot not reused)."""
        return self.table.get(key, -1) == entry

    def describe(self, entry: int) -> EntryInfo:
        m = self.meta
        return EntryInfo(m.keys[entry], int(m.ntokens[entry]), len(m.page_list(entry)), int(m.hits[entry]),
                         int(m.serial[entry]), int(m.parent_serial[entry]), m.labels[entry])

    def pinned(self) -> _Pinned:
        """A context inside which entries handed to `pin` are never evicted (a routing reads
        them after reserving others, which may evict); every pin is dropped on the way out."""
        return _Pinned(self)

    def pin(self, entries) -> None:
        self.pins.update(entries)

    def unpin_all(self) -> None:
        self.pins.clear()

    def partial_after(self, entries) -> np.ndarray:
        """bool [len(entries)]: whether an entry of fewer than `page_tokens` tokens (a partial
        page: a prompt's or an answer's last) extends each of `entries` (-1: extends none), reserved
        or visible. Where it is False no partial page after that entry can be found, so a routing
        need not make the keys to look one up."""
        entries = np.asarray(entries, dtype=np.int64)
        out = np.full(len(entries), self.meta.partial_roots > 0)
        linked = entries >= 0
        out[linked] = self.meta.partial_kids[entries[linked]] > 0
        return out

    def token_counts(self, entries) -> np.ndarray:
        """int64 [len(entries)]: each entry's token count."""
        return self.meta.ntokens[np.asarray(entries, dtype=np.int64)]

    def token_rows(self, entries) -> np.ndarray:
        """int64: the flat arena rows (page * page_tokens + offset) of the tokens of an entry (an
        int) or of several (a sequence: one after another, in one numpy pass)."""
        return self.meta.token_rows((entries,) if isinstance(entries, (int, np.integer)) else entries)

    # ---- writing -------------------------------------------------------------------------
    def reserve(self, key: bytes, ntokens: int, parent: int = -1, label=None) -> int:
        """Pages for a new entry for `key` of `ntokens` tokens, evicting by CLOCK as needed; -1 if
        it cannot fit without evicting another reserved entry. A reserved entry is invisible to
        lookups and never evicted until `commit` (its states are written in between) or
        `release`. `parent`: the entry this one extends (a chained page), kept alive while this
        one lives. `label`: what the key was made from (kept for `describe`). The caller grows
        the arena to `num_pages` before writing."""
        if key in self.table:
            return -1
        if parent >= 0:
            self.meta.kids[parent] += 1  # first: the evictions below must spare it
        if not self._make_room(self.pool.pages_for(ntokens)):
            if parent >= 0:
                self._drop_kid(parent)
            return -1
        return self._fill([key], np.array([ntokens], dtype=np.int64), np.array([parent], dtype=np.int64), [label])[0]

    def reserve_many(self, keys: list, ntokens, parents=None, labels=None) -> list[int]:
        """`reserve` of each of `keys` (distinct) in order: in one pass where there is room for
        all of them (evicting for the whole batch at once where the bank is full), else one by
        one. The batch's own parents are never its victims. `parents[i]`: the entry key i
        extends, -1 none, or -2 - j for the entry this call reserves for key j < i (key i gets -1
        when key j got -1)."""
        count = len(keys)
        ntokens = np.asarray(ntokens, dtype=np.int64)
        parents = np.asarray(parents, dtype=np.int64) if parents is not None else np.full(count, -1, dtype=np.int64)
        labels = [None] * count if labels is None else labels
        need = int((-(-ntokens // self.page_tokens)).sum())
        fits = (self.max_entries is None or self.entries + len(self.reserved) + count <= self.max_entries) \
            and need <= self.max_pages and self.pool.make_room(need, lambda: False)
        # The batch's parents are spared by its evictions (counted as their children first).
        spared = parents[parents >= 0]
        if len(spared):
            np.add.at(self.meta.kids, spared, 1)
        # Room for all of them at once: a full bank's evictions in a few numpy passes (the
        # victims `reserve` key by key would take, their pages and ids handed out in another order).
        if not any(map(self.table.__contains__, keys)) and (fits or self._make_room_many(need, count)):
            return self._fill(keys, ntokens, parents, labels)
        try:
            return self._reserve_each(keys, ntokens, parents, labels)
        finally:
            for parent in spared.tolist():
                self._drop_kid(parent)

    def _reserve_each(self, keys: list, ntokens: np.ndarray, parents: np.ndarray, labels: list) -> list[int]:
        """`reserve_many` key by key as `reserve` does it (some keys may still fit), the new
        entries' fields set in one pass at the end."""
        out: list[int] = []
        made: list[int] = []  # per key: its place among the entries made (-1: none)
        kept, taken = [], []  # the keys given entries (index into keys); their pages, one after another
        codes = []  # their parents: an entry id, -1, or -2 - (place of an entry made here)
        for i, (key, n, parent) in enumerate(zip(keys, ntokens.tolist(), parents.tolist())):
            code = parent
            if parent <= -2:
                code = -2 - made[-2 - parent]
                parent = out[-2 - parent]
                if parent < 0:  # (the page it extends got no entry)
                    out.append(-1)
                    made.append(-1)
                    continue
            entry = self._allocate(key, n, parent if code >= 0 else -1, taken)
            out.append(entry)
            made.append(len(kept) if entry >= 0 else -1)
            if entry >= 0:
                kept.append(i)
                codes.append(code)
        if kept:
            self._fill([keys[i] for i in kept], ntokens[kept], np.asarray(codes, dtype=np.int64),
                       [labels[i] for i in kept], taken, [out[i] for i in kept])
        return out

    def _allocate(self, key: bytes, ntokens: int, parent: int, taken: list) -> int:
        """`reserve`'s evictions and allocation for one key, its fields left to `_fill`: an entry
        id (reserved) with its pages appended to `taken`, or -1. `parent`: an entry visible
        before this call (-1: none or one made in this call, whose kids `_fill` counts)."""
        if key in self.table:
            return -1
        if parent >= 0:
            self.meta.kids[parent] += 1  # first: the evictions below must spare it
        need = self.pool.pages_for(ntokens)
        if not self._make_room(need):
            if parent >= 0:
                self._drop_kid(parent)
            return -1
        entry = self.meta.new(1)[0]
        self.reserved.add(entry)
        taken.extend(self.pool.pop(need))
        return entry

    def _fill(self, keys: list, ntokens: np.ndarray, parents: np.ndarray, labels: list, taken: list | None = None,
              entries: list | None = None) -> list[int]:
        """New reserved entries for `keys` (room made, outer parents' kids counted); `parents` as
        `reserve_many` takes them; or the fields of the `entries` that `_allocate` made, with the
        pages it `taken`."""
        pages = self.pool.take(ntokens) if taken is None else self.pool.layout(taken, ntokens)
        entries = self.meta.add(keys, labels, pages, ntokens, parents, self.next_serial, entries)
        self.next_serial += len(keys)
        self.reserved.update(entries)
        return entries

    def _make_room(self, need: int) -> bool:
        """Free pages (and an entry slot) for `need` pages, growing the arena's page count or evicting."""
        full = self.max_entries is not None and self.entries + len(self.reserved) >= self.max_entries
        if need > self.max_pages or (full and not self._evict_one()):
            return False
        return self.pool.make_room(need, self._evict_one)

    def _make_room_many(self, pages: int, entries: int) -> bool:
        """`_make_room` for `entries` new entries of `pages` pages in all, at once: the arena's
        page count grown, then turns of the CLOCK hand (`eviction.sweep_many`) until there is room.
        False when there is none to make (what was evicted stays evicted)."""
        if pages > self.max_pages:
            return False
        pool = self.pool
        while len(pool.free_pages) < pages and pool.grow(pages):
            pass
        idle = 0  # turns without a victim: each lowers every spared count, so a few find one if any can
        while idle <= eviction.GCLOCK_MAX + 1:
            short = pages - len(pool.free_pages)
            slots = 0 if self.max_entries is None else self.entries + len(self.reserved) + entries - self.max_entries
            if short <= 0 and slots <= 0:
                return True
            if self.entries == 0:
                return False
            victims, self.hand = eviction.sweep_many(self.meta, self.hand, self.pins, short, slots, self.page_tokens)
            idle = 0 if len(victims) else idle + 1
            self._evict_leaves(victims)
        return False

    def _evict_leaves(self, victims: np.ndarray) -> None:
        """`evict` of each of `victims` (visible leaves, distinct: each freed now) in one pass."""
        if not len(victims):
            return
        for key in map(self.meta.keys.__getitem__, victims.tolist()):
            del self.table[key]
        self.meta.valid[victims] = False
        # (Freed last victim first: the batch's first keys then get the first victims' ids and
        # pages off the free stacks, as they do key by key, so the hand meets them in that order.)
        pages, parents = self.meta.free_many(victims[::-1])
        self.pool.give(pages)
        self.evictions += len(victims)
        linked = parents[parents >= 0]
        if len(linked):
            np.subtract.at(self.meta.kids, linked, 1)
            orphaned = np.unique(linked[self.meta.dead[linked] & (self.meta.kids[linked] == 0)])
            for parent in orphaned.tolist():  # (dead parents whose last child went: nearly always none)
                self.meta.dead[parent] = False
                self._free(parent)

    def commit(self, entry: int) -> bool:
        """Make a reserved entry visible (its states are written). False (and the entry released)
        when another entry took its key meanwhile."""
        self.reserved.discard(entry)
        key = self.meta.keys[entry]
        if key in self.table:
            self._drop(entry)
            return False
        self.meta.valid[entry] = True
        self.table[key] = entry
        return True

    def commit_many(self, entries: list) -> tuple[list, list]:
        """`commit` of each entry, in one pass where no key is taken meanwhile: (the entries, -1
        where another entry took its key meanwhile; their keys)."""
        keys = list(map(self.meta.keys.__getitem__, entries))
        if len(set(keys)) < len(keys) or any(map(self.table.__contains__, keys)):
            return [e if self.commit(e) else -1 for e in entries], keys
        self.reserved.difference_update(entries)
        self.meta.valid[entries] = True
        self.table.update(zip(keys, entries))
        return list(entries), keys

    def release(self, entry: int) -> None:
        """Give back a reserved entry that will not be written (its forward failed)."""
        if entry in self.reserved:
            self.reserved.discard(entry)
            self._drop(entry)

    def insert(self, key: bytes, ntokens: int, parent: int = -1, label=None) -> int:
        """Reserve and commit at once (states written by the caller right after); -1 if it cannot fit."""
        entry = self.reserve(key, ntokens, parent, label)
        if entry >= 0:
            self.commit(entry)
        return entry

    def _drop(self, entry: int) -> None:
        """Free an invisible entry, or mark it dead while children still name it."""
        if self.meta.kids[entry]:
            self.meta.dead[entry] = True
        else:
            self._free(entry)

    def evict(self, entry: int) -> None:
        """Forget a visible entry and free its pages (an entry with children: once they are gone;
        until then nothing can reach them, since their keys name it)."""
        if not self.meta.valid[entry]:
            return
        del self.table[self.meta.keys[entry]]
        self.meta.valid[entry] = False
        self._drop(entry)

    def discard(self, entry: int, key: bytes) -> bool:
        """Evict `entry` if it still holds this very `key` object (the write that stored it: an
        entry evicted and reused since is another row's now). True when evicted."""
        if entry >= 0 and self.meta.keys[entry] is key and self.meta.valid[entry]:
            self.evict(entry)
            return True
        return False

    def _free(self, entry: int) -> None:
        self.pool.give(self.meta.page_list(entry))
        parent = self.meta.free(entry)
        if parent >= 0:
            self._drop_kid(parent)

    def _drop_kid(self, parent: int) -> None:
        self.meta.kids[parent] -= 1
        if self.meta.kids[parent] == 0 and self.meta.dead[parent]:
            self.meta.dead[parent] = False
            self._free(parent)

    def _evict_one(self) -> bool:
        """Evict the CLOCK hand's next victim (`eviction.sweep`); False when there is none."""
        if self.entries == 0:
            return False
        entry, self.hand = eviction.sweep(self.meta, self.hand, self.pins)
        if entry < 0:
            return False
        self.evict(entry)
        self.evictions += 1
        return True

    # ---- persistence ---------------------------------------------------------------------
    def live(self) -> list[int]:
        """Live entry ids, in id order."""
        return [e for e in range(len(self.meta)) if self.meta.valid[e]]

    def walkable(self) -> list[int]:
        """The live entries a walk can reach (not a page under a dead parent, e.g. one whose copy
        lost a commit race), a page after the page it extends (by serial)."""
        live, kept = [], {-1}
        for e in sorted(self.live(), key=lambda e: int(self.meta.serial[e])):
            if int(self.meta.parent_serial[e]) in kept:
                live.append(e)
                kept.add(int(self.meta.serial[e]))
        return live

    def field(self, name: str, entries: list) -> np.ndarray:
        """int64 [len(entries)]: one of `FIELDS` of each entry."""
        return getattr(self.meta, name)[np.asarray(entries, dtype=np.int64)].copy()

    def restore(self, entry: int, ref: int, hits: int, serial: int, parent_serial: int) -> None:
        """Set a loaded entry's fields as the file holds them."""
        m = self.meta
        m.ref[entry], m.hits[entry], m.serial[entry], m.parent_serial[entry] = ref, hits, serial, parent_serial

    def state_dict(self) -> dict:
        """The entries `walkable` gives: "entries" (their ids, for the caller to read their token
        rows), "keys" (bytes), "labels" and each of `FIELDS` (int64)."""
        live = self.walkable()
        infos = [self.describe(e) for e in live]
        return {"entries": live, "keys": [i.key for i in infos], "labels": [i.label for i in infos],
                **{name: self.field(name, live) for name in self.FIELDS}}

    def load_state_dict(self, state: dict) -> list[int]:
        """Insert the entries of a `state_dict` into this empty index; their new ids, in order.
        Raises ValueError when one names a parent page it does not hold, or they do not fit."""
        by_serial: dict[int, int] = {}
        out = []
        labels = state.get("labels")
        for i, key in enumerate(state["keys"]):
            parent = by_serial.get(int(state["parent_serial"][i]), -1)
            if state["parent_serial"][i] >= 0 and parent < 0:
                raise ValueError("the file holds a page whose prefix page it does not hold")
            entry = self.insert(key, int(state["ntokens"][i]), parent, labels[i] if labels is not None else None)
            if entry < 0 or self.evictions:
                raise ValueError("the file holds more (or longer) entries than this config's budget fits")
            self.restore(entry, *(int(state[name][i]) for name in ("ref", "hits", "serial", "parent_serial")))
            by_serial[int(state["serial"][i])] = entry
            self.next_serial = max(self.next_serial, int(state["serial"][i]) + 1)
            out.append(entry)
        return out
