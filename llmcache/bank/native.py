"""`NativeIndex`: `ExactIndex`'s verbs on the extension's C++ index (`csrc/exact_index.h`).

The Python `ExactIndex` (index.py) is the reference: the contract, the fallback without the
extension, and the oracle of the tests (tests/test_index_properties.py runs both). This one holds
the table, the entry fields, the page pool and the CLOCK hand in C++, so each verb a forward
calls (`find_many`, `touch`, `reserve_many`, `commit_many`, `token_rows`) is one call into the
extension. `new_index` picks it where the extension is loaded; `LLMCACHE_INDEX=python` forces
the reference.
"""

from __future__ import annotations

import os

import numpy as np

from .index import EntryInfo, ExactIndex, _Pinned


class NativeIndex:
    """Entries of the exact tier (see `ExactIndex`, whose arguments and verbs these are)."""

    FIELDS = ExactIndex.FIELDS

    def __init__(self, page_tokens: int, max_pages: int, max_entries: int | None, policy: str = "lru"):
        self.page_tokens, self.max_pages, self.max_entries, self.policy = page_tokens, max_pages, max_entries, policy
        self.clear()

    def clear(self) -> None:
        from ..ops import _library

        self.core = _library.extension().ExactIndexCore(self.page_tokens, self.max_pages, self.max_entries,
                                                        self.policy == "staleness")
        core = self.core
        # (the hot verbs bound straight to the core: no Python frame of ours around them)
        self.find_many, self.commit_many, self.token_counts = core.find_many, core.commit_many, core.token_counts
        self.key, self.parent_key, self.is_live, self.release, self.evict = \
            core.key, core.parent_key, core.is_live, core.release, core.evict
        self.commit, self.discard, self.live = core.commit, core.discard, core.live
        self.walkable, self.field, self.restore = core.walkable, core.field, core.restore
        self.partial_after = core.partial_after
        # (tiers/exact/route.py, prefix.py, plan.py, suffix.py: a forward's routing in a call or two:
        # route_rows.cpp, route_pages.cpp, plan_arrays.cpp, suffix_arrays.cpp)
        self.route_rows, self.longest_runs, self.reserve_pages = core.route_rows, core.longest_runs, core.reserve_pages
        self.plan_arrays, self.suffix_arrays = core.plan_arrays, core.suffix_arrays

    # ---- reading ---------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.core.num_pages

    @property
    def entries(self) -> int:
        return self.core.entries

    @property
    def held_pages(self) -> int:
        return self.core.held_pages

    @property
    def evictions(self) -> int:
        return self.core.evictions

    def find(self, key: bytes) -> int:
        return self.core.find(key)

    def lookup(self, key: bytes) -> int:
        entry = self.core.find(key)
        if entry >= 0:
            self.core.touch((entry,))
        return entry

    def touch(self, entries) -> None:
        if len(entries):
            self.core.touch(entries)

    def describe(self, entry: int) -> EntryInfo:
        return EntryInfo(*self.core.describe(entry))

    def pinned(self) -> _Pinned:
        return _Pinned(self)

    def pin(self, entries) -> None:
        if not isinstance(entries, (list, tuple, np.ndarray)):
            entries = list(entries)
        if len(entries):
            self.core.pin(entries)

    def unpin_all(self) -> None:
        self.core.unpin_all()

    def token_rows(self, entries) -> np.ndarray:
        return self.core.token_rows((entries,) if isinstance(entries, (int, np.integer)) else entries)

    # ---- writing ---------------------------------------------------------------------------
    def reserve(self, key: bytes, ntokens: int, parent: int = -1, label=None) -> int:
        return self.core.reserve(key, int(ntokens), int(parent), label)

    def reserve_many(self, keys: list, ntokens, parents=None, labels=None) -> list[int]:
        parents = np.full(len(keys), -1, dtype=np.int64) if parents is None else parents
        return self.core.reserve_many(keys, ntokens, parents, labels).tolist()

    insert = ExactIndex.insert

    # ---- persistence (the reference's, on these verbs) -------------------------------------
    @property
    def next_serial(self) -> int:
        return self.core.next_serial

    @next_serial.setter
    def next_serial(self, value: int) -> None:
        self.core.next_serial = value

    state_dict, load_state_dict = ExactIndex.state_dict, ExactIndex.load_state_dict


def new_index(page_tokens: int, max_pages: int, max_entries: int | None, policy: str = "lru"):
    """The exact tier's index: the C++ one where the extension is loaded (unless
    `LLMCACHE_INDEX=python`), else the Python reference."""
    from ..ops import _library

    if os.environ.get("LLMCACHE_INDEX", "native") != "python" and _library.extension() is not None:
        return NativeIndex(page_tokens, max_pages, max_entries, policy)
    return ExactIndex(page_tokens, max_pages, max_entries, policy)
