"""Property test (hypothesis) of `ExactIndex`, the host index of the exact tier, under random
interleavings of its verbs, beside a plain-Python model of what it must hold.

The model keeps what the documentation promises, not how the index does it: which keys are
visible and in which entry, which entries are reserved, which are "dead" (made invisible while
children still name them: freed with their last child), each entry's token count, serial,
parent and hits, and which entry ids are pinned. It does not run CLOCK: after each reservation it
reads which visible entries went, and checks that the index was allowed to evict them (visible,
unpinned, no child left, one `evictions` each, none while the reservation fitted without, no more
than it needed) and that a refused reservation had nothing left to evict. Budgets are a few pages
of 4 tokens, so eviction happens often. It runs on the Python reference (`ExactIndex`) and on the
C++ index (`NativeIndex`, where the extension is built), and the C++ one is checked against the
reference call by call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llmcache.bank import ExactIndex, NativeIndex
from llmcache.ops import _library

native = pytest.mark.skipif(_library.extension() is None, reason="the C++ index needs the compiled extension")
IMPLS = [ExactIndex, pytest.param(NativeIndex, marks=native)]

PAGE = 4  # tokens per page
TOKENS = 3  # distinct page contents: keys repeat, so reservations race for one key
ntokens = st.integers(0, 2 * PAGE + 1)


def key_of(token: int, parent_serial: int) -> bytes:
    """A page's key: its contents and the serial of the page it extends (a key that names its
    prefix, as the library's chained digests do; the index does not look inside keys)."""
    return f"{token}@{parent_serial}".encode()


def walk(index: ExactIndex, tokens: list) -> list:
    """The entries of a chain of pages found from its start through `find` and `describe`."""
    found, serial = [], -1
    for token in tokens:
        entry = index.find(key_of(token, serial))
        if entry < 0:
            break
        found.append(entry)
        serial = index.describe(entry).serial
    return found


def pages_for(n: int) -> int:
    return -(-n // PAGE)


@dataclass(eq=False)
class Entry:
    """What the model knows of one entry the index has not freed."""

    id: int
    key: bytes  # the very object handed to the index (`discard` compares identity)
    token: int
    ntokens: int
    serial: int
    parent: Entry | None
    state: str = "reserved"  # "reserved", "visible" or "dead"
    hits: int = 0
    kids: set = field(default_factory=set)  # children the index has not freed

    @property
    def pages(self) -> int:
        return pages_for(self.ntokens)

    def check(self, index: ExactIndex, entry: int) -> None:
        """`index.describe(entry)` is this entry: key, tokens, pages, hits, serial and parent."""
        info = index.describe(entry)
        assert (info.key, info.ntokens, info.pages, info.hits, info.serial) == \
            (self.key, self.ntokens, self.pages, self.hits, self.serial), (self.state, info, self)
        assert info.parent_serial == (self.parent.serial if self.parent else -1)
        assert len(index.token_rows(entry)) == self.ntokens

    def chain(self) -> list[Entry]:
        """This entry's page chain, from its row's first page."""
        chain, e = [], self
        while e is not None:
            chain.append(e)
            e = e.parent
        return chain[::-1]


class ExactIndexMachine(RuleBasedStateMachine):
    impl = ExactIndex  # the implementation under test

    def __init__(self):
        super().__init__()
        self.index: ExactIndex | None = None
        self.held: dict[int, Entry] = {}  # entry id -> entry, for every entry not freed
        self.visible: dict[bytes, Entry] = {}
        self.serials: set[int] = set()  # every serial this index handed out
        self.evictions = 0
        self.pins: set[int] | None = None  # entry ids pinned; None: outside `pinned()`
        self.context = self.pin_fn = None
        self.gone: list[tuple[int, bytes]] = []  # (id, key) of entries made invisible or freed

    # ---- the model's own bookkeeping ------------------------------------------------------------
    def reserved(self) -> list[Entry]:
        return [e for e in self.held.values() if e.state == "reserved"]

    def evictable(self, entry: Entry) -> bool:
        """What CLOCK may take: a visible leaf that is not pinned."""
        return entry.state == "visible" and not entry.kids and entry.id not in (self.pins or ())

    def free_pages(self) -> int:
        """Pages a reservation can have without evicting (the arena grows up to the budget)."""
        return self.index.max_pages - sum(e.pages for e in self.held.values())

    def full(self) -> bool:
        cap = self.index.max_entries
        return cap is not None and len(self.visible) + len(self.reserved()) >= cap

    def hide(self, entry: Entry) -> list[Entry]:
        """`entry` is no longer visible or reserved: freed, or dead while children name it. Returns
        the entries freed (its dead ancestors too, when it was their last child)."""
        self.gone.append((entry.id, entry.key))
        if entry.kids:
            entry.state = "dead"
            return []
        freed = []
        while entry is not None:
            del self.held[entry.id]
            freed.append(entry)
            parent = entry.parent
            if parent is not None:
                parent.kids.discard(entry)
                if parent.state == "dead" and not parent.kids:
                    entry = parent
                    continue
            entry = None
        return freed

    def reachable(self) -> list[Entry]:
        """Visible entries whose every ancestor is visible (what a walk can reach), by serial."""
        def reached(e: Entry) -> bool:
            return e.state == "visible" and (e.parent is None or reached(e.parent))
        return sorted((e for e in self.visible.values() if reached(e)), key=lambda e: e.serial)

    # ---- setup ------------------------------------------------------------------------------------
    @initialize(max_pages=st.integers(1, 8), max_entries=st.none() | st.integers(1, 5),
                policy=st.sampled_from(["lru", "staleness"]))
    def build(self, max_pages, max_entries, policy):
        self.index = self.impl(PAGE, max_pages, max_entries, policy)

    def teardown(self):
        if self.context is not None:
            self.context.__exit__(None, None, None)

    # ---- writing ----------------------------------------------------------------------------------
    def _reserve(self, data, insert: bool) -> None:
        token, n = data.draw(st.integers(0, TOKENS - 1), "token"), data.draw(ntokens, "ntokens")
        parents = [e for e in self.held.values() if e.state in ("reserved", "visible")]
        parent = data.draw(st.none() | st.sampled_from(sorted(parents, key=lambda e: e.serial)), "parent") \
            if parents else None
        key = key_of(token, parent.serial if parent else -1)
        need = pages_for(n)
        free, full, taken = self.free_pages(), self.full(), key in self.visible
        before = self.index.evictions
        pid = parent.id if parent else -1
        entry = self.index.insert(key, n, pid) if insert else self.index.reserve(key, n, pid)

        # What went: visible entries the index no longer finds, each one counted eviction.
        victims = [e for e in self.visible.values() if self.index.find(e.key) != e.id]
        assert self.index.evictions - before == len(victims), (self.index.evictions - before, len(victims))
        for v in victims:
            assert v is not parent, "the parent of the entry being reserved was evicted"
            assert v.id not in (self.pins or ()), f"pinned entry {v.id} was evicted"
            assert all(k in victims for k in v.kids), f"entry {v.id} was evicted while a child lived"
        freed = []
        for v in victims:
            del self.visible[v.key]
            freed += self.hide(v)
        assert all(v.id not in self.held for v in victims), "an evicted entry still had children"
        self.evictions += len(victims)

        if taken or need > self.index.max_pages:
            assert entry == -1 and not victims, "a key already visible, or longer than the budget"
            return
        if free >= need and not full:
            assert entry >= 0 and not victims, "evicted (or refused) although the reservation fitted"
        if entry < 0:
            left = [e.id for e in self.visible.values() if self.evictable(e) and e is not parent]
            assert not left, f"refused while {left} could be evicted"
            return
        if victims and (len(victims) >= 2 or not full):  # the last victim was evicted for pages
            last = max(v.pages for v in victims) + sum(e.pages for e in freed if e not in victims)
            assert free + sum(e.pages for e in freed) - last < need, "evicted more than the reservation needed"

        assert entry not in self.held, f"entry id {entry} handed out while in use"
        info = self.index.describe(entry)
        assert info.serial not in self.serials, f"serial {info.serial} reused"
        self.serials.add(info.serial)
        new = Entry(entry, key, token, n, info.serial, parent)
        self.held[entry] = new
        if parent is not None:
            parent.kids.add(new)
        if insert:
            new.state = "visible"
            self.visible[key] = new
        else:
            assert self.index.find(key) == -1, "a reserved entry is visible"

    @rule(data=st.data())
    def reserve(self, data):
        self._reserve(data, insert=False)

    @rule(data=st.data())
    def insert(self, data):
        self._reserve(data, insert=True)

    @rule(data=st.data())
    def reserve_many(self, data):
        """A batch of distinct new keys, each extending a held entry or nothing: each stored as
        `reserve` would store it, and what went evictable (visible, unpinned, no child left, not
        a parent of the batch), one `evictions` each, none where the batch fitted without."""
        parents = sorted((e for e in self.held.values() if e.state in ("reserved", "visible")), key=lambda e: e.serial)
        batch = data.draw(st.lists(st.tuples(st.integers(0, TOKENS - 1), ntokens,
                                             st.none() | st.sampled_from(parents) if parents else st.none()),
                                   min_size=1, max_size=4), "batch")
        keys = [key_of(t, p.serial if p else -1) for t, _, p in batch]
        if len(set(keys)) < len(keys) or any(k in self.visible for k in keys):
            return
        need = sum(pages_for(n) for _, n, _ in batch)
        free, full = self.free_pages(), self.index.max_entries is not None and \
            len(self.visible) + len(self.reserved()) + len(batch) > self.index.max_entries
        before = self.index.evictions
        got = self.index.reserve_many(keys, [n for _, n, _ in batch], [p.id if p else -1 for _, _, p in batch])
        victims = [e for e in self.visible.values() if self.index.find(e.key) != e.id]
        assert self.index.evictions - before == len(victims)
        for v in victims:
            assert all(v is not p for _, _, p in batch), "the parent of a page being reserved was evicted"
            assert v.id not in (self.pins or ()), f"pinned entry {v.id} was evicted"
        if free >= need and not full:
            assert all(e >= 0 for e in got) and not victims, "evicted (or refused) although the batch fitted"
        for v in victims:
            del self.visible[v.key]
            self.hide(v)
        assert all(v.id not in self.held for v in victims), "an evicted entry still had children"
        self.evictions += len(victims)
        for entry, key, (token, n, parent) in zip(got, keys, batch):
            if entry < 0:
                continue
            info = self.index.describe(entry)
            assert entry not in self.held and info.serial not in self.serials
            self.serials.add(info.serial)
            new = Entry(entry, key, token, n, info.serial, parent)
            self.held[entry] = new
            if parent is not None:
                parent.kids.add(new)
            assert self.index.find(key) == -1, "a reserved entry is visible"

    @precondition(lambda self: self.reserved())
    @rule(data=st.data())
    def commit(self, data):
        entry = data.draw(st.sampled_from(sorted(self.reserved(), key=lambda e: e.serial)))
        ok = entry.key not in self.visible  # else another entry took its key meanwhile
        if data.draw(st.booleans()):
            assert self.index.commit(entry.id) == ok
        else:  # (the batch verb: the entry, or -1 where its key was taken, and the key it was reserved with)
            assert self.index.commit_many([entry.id]) == ([entry.id if ok else -1], [entry.key])
        if ok:
            entry.state = "visible"
            self.visible[entry.key] = entry
        else:
            self.hide(entry)

    @precondition(lambda self: self.reserved())
    @rule(data=st.data())
    def release(self, data):
        entry = data.draw(st.sampled_from(sorted(self.reserved(), key=lambda e: e.serial)))
        self.index.release(entry.id)
        self.hide(entry)

    @precondition(lambda self: self.visible)
    @rule(data=st.data())
    def evict(self, data):
        entry = data.draw(st.sampled_from(sorted(self.visible.values(), key=lambda e: e.serial)))
        self.index.evict(entry.id)
        del self.visible[entry.key]
        self.hide(entry)

    @precondition(lambda self: self.visible or self.gone)
    @rule(data=st.data(), same=st.booleans())
    def discard(self, data, same):
        """`discard` evicts only an entry still holding the very key object of its write."""
        choices = [(e.id, e.key) for e in self.visible.values()] + self.gone
        entry, key = data.draw(st.sampled_from(choices))
        if not same:
            key = (key + b"!")[:-1]  # equal bytes, another object
        holder = self.held.get(entry)
        expect = same and holder is not None and holder.state == "visible" and holder.key is key
        assert self.index.discard(entry, key) == expect
        if expect:
            del self.visible[holder.key]
            self.hide(holder)

    # ---- reading ----------------------------------------------------------------------------------
    @rule(data=st.data(), hit=st.booleans())
    def lookup(self, data, hit):
        serials = sorted(self.serials) + [-1]
        key = key_of(data.draw(st.integers(0, TOKENS - 1)), data.draw(st.sampled_from(serials)))
        want = self.visible.get(key)
        got = self.index.lookup(key) if hit else self.index.find(key)
        assert got == (want.id if want else -1)
        if want and hit:
            want.hits += 1

    @precondition(lambda self: self.visible)
    @rule(data=st.data())
    def touch(self, data):
        entries = data.draw(st.lists(st.sampled_from(sorted(self.visible.values(), key=lambda e: e.serial)),
                                     max_size=3))
        self.index.touch([e.id for e in entries])
        for e in entries:
            e.hits += 1

    @precondition(lambda self: self.held)
    @rule(data=st.data(), extra=st.integers(0, 2))
    def walk(self, data, extra):
        """Walk the chain of any entry (visible or not), `extra` pages past it that nothing holds:
        the entries of its visible prefix, nothing counted."""
        entry = data.draw(st.sampled_from(sorted(self.held.values(), key=lambda e: e.serial)))
        tokens = [e.token for e in entry.chain()] + [TOKENS] * extra
        want, serial = [], -1
        for token in tokens:
            found = self.visible.get(key_of(token, serial))
            if found is None:
                break
            want.append(found.id)
            serial = found.serial
        assert walk(self.index, tokens) == want

    # ---- pinning ----------------------------------------------------------------------------------
    @rule(data=st.data())
    def pin(self, data):
        """Open `pinned()` (if it is not), and pin some visible entries."""
        if self.context is None:
            self.context = self.index.pinned()
            self.pin_fn = self.context.__enter__()
            self.pins = set()
        ids = sorted(e.id for e in self.visible.values())
        chosen = data.draw(st.lists(st.sampled_from(ids), max_size=3)) if ids else []
        self.pin_fn(chosen)
        self.pins.update(chosen)

    @precondition(lambda self: self.context is not None)
    @rule()
    def unpin(self):
        self.context.__exit__(None, None, None)
        self.context = self.pins = None

    # ---- persistence ------------------------------------------------------------------------------
    @precondition(lambda self: self.visible)
    @rule(adopt=st.booleans())
    def save_and_load(self, adopt):
        """state_dict -> load_state_dict into a fresh index of the same budget: the same visible
        keys a walk can reach (orphans under a dead parent are left out), token counts, hits,
        serials and parents; nothing evicted. With `adopt` (and nothing reserved, dead, orphaned
        or pinned), the machine goes on with the loaded index."""
        state = self.index.state_dict()
        saved = self.reachable()
        assert state["entries"] == [e.id for e in saved]
        fresh = self.impl(PAGE, self.index.max_pages, self.index.max_entries, self.index.policy)
        ids = fresh.load_state_dict(state)
        assert len(ids) == len(set(ids)) == fresh.entries == len(saved)
        assert fresh.evictions == 0
        assert fresh.held_pages == sum(e.pages for e in saved)
        for e in saved:
            got = fresh.find(e.key)
            assert got >= 0, f"{e.key!r} was not loaded"
            e.check(fresh, got)
        adopt = adopt and len(saved) == len(self.visible)
        if adopt and len(self.held) == len(self.visible) and self.context is None:
            self.index = fresh
            self.held = {}
            for e in self.visible.values():
                e.id = fresh.find(e.key)
                self.held[e.id] = e
            self.serials = {e.serial for e in self.visible.values()}
            self.evictions, self.gone = 0, []

    # ---- invariants -------------------------------------------------------------------------------
    @invariant()
    def entries_are_what_the_model_holds(self):
        if self.index is None:
            return
        index = self.index
        assert index.entries == len(self.visible)
        assert index.live() == sorted(e.id for e in self.visible.values())
        assert index.evictions == self.evictions
        cap = index.max_entries
        assert cap is None or len(self.visible) + len(self.reserved()) <= cap
        for e in self.held.values():
            e.check(index, e.id)
            if e.state == "visible":
                assert index.find(e.key) == e.id and index.is_live(e.id, e.key)
            else:  # reserved or dead: never visible
                assert index.find(e.key) == (self.visible[e.key].id if e.key in self.visible else -1)
                assert not index.is_live(e.id, e.key)

    @invariant()
    def pages_are_disjoint_and_counted(self):
        if self.index is None:
            return
        index = self.index
        assert index.num_pages <= index.max_pages
        assert index.held_pages == sum(e.pages for e in self.held.values())
        used = set()
        for e in self.held.values():
            rows = np.asarray(index.token_rows(e.id))
            assert rows.shape == (e.ntokens,)
            offsets = np.arange(e.ntokens)
            assert (rows % PAGE == offsets % PAGE).all(), "a token is not at its offset in its page"
            pages = rows // PAGE
            assert (pages[offsets % PAGE != 0] == pages[np.maximum(offsets - 1, 0)][offsets % PAGE != 0]).all()
            distinct = set(pages.tolist())
            assert len(distinct) == e.pages and all(0 <= p < index.num_pages for p in distinct)
            assert not used & distinct, f"entry {e.id} shares a page"
            used |= distinct

    @invariant()
    def partial_pages_are_known_by_what_they_extend(self):
        """`partial_after` says of each entry (and of -1, the start of a row) whether an entry of
        fewer than PAGE tokens that the index has not freed extends it."""
        if self.index is None:
            return
        held = sorted(self.held.values(), key=lambda e: e.serial)
        want = [any(k.ntokens < PAGE for k in e.kids) for e in held]
        want.append(any(e.parent is None and e.ntokens < PAGE for e in held))
        assert self.index.partial_after([e.id for e in held] + [-1]).tolist() == want

    @invariant()
    def visible_chains_are_walked(self):
        """A visible entry whose whole prefix is visible is reached by walking its chain."""
        if self.index is None:
            return
        for e in self.visible.values():
            chain = e.chain()
            if all(c.state == "visible" for c in chain):
                tokens = [c.token for c in chain]
                assert walk(self.index, tokens) == [c.id for c in chain]


class NativeIndexMachine(ExactIndexMachine):
    impl = NativeIndex


MACHINE_SETTINGS = settings(max_examples=100, stateful_step_count=40, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])
TestExactIndex = ExactIndexMachine.TestCase
TestExactIndex.settings = MACHINE_SETTINGS
TestNativeIndex = native(NativeIndexMachine.TestCase)
TestNativeIndex.settings = MACHINE_SETTINGS


@pytest.mark.parametrize("impl", IMPLS)
def test_a_page_whose_parent_lost_its_commit_is_left_out_of_a_save(impl):
    index = impl(PAGE, 8, None)
    first, second = index.reserve(b"p", PAGE), index.reserve(b"p", PAGE)  # two forwards store one page
    child = index.reserve(key_of(0, index.describe(second).serial), PAGE, second)  # ... and its next page
    assert index.commit(first) and not index.commit(second) and index.commit(child)
    fresh = impl(PAGE, 8, None)
    fresh.load_state_dict(index.state_dict())  # (the orphan, which no walk can reach, is not saved)
    assert fresh.find(b"p") >= 0 and fresh.entries == 1


def snapshot(index: ExactIndex, entries: list) -> list:
    """What each of `entries` is, with the pages and token rows it was given (-1: none)."""
    return [None if e < 0 else (index.describe(e), index.token_rows(e).tolist()) for e in entries]


@given(st.lists(st.tuples(st.integers(1, 3 * PAGE), st.integers(-3, 8)), min_size=1, max_size=12),
       st.integers(2, 12), st.sampled_from([None, 3, 6]), st.lists(st.integers(1, 2 * PAGE), max_size=6))
@settings(max_examples=150, deadline=None)
def test_reserve_many_does_what_reserve_does_key_by_key(batch, max_pages, max_entries, earlier):
    """`reserve_many` gives every key what `reserve` called key by key gives it, from the same
    index: the same entry, pages, serial and parent where nothing is evicted; where the bank is
    full, the same keys stored with the same serials and parents, and the same entries evicted
    (it evicts for the whole batch at once, so pages and entry ids may be handed out in another order)."""
    twins = [ExactIndex(PAGE, max_pages, max_entries) for _ in range(2)]
    for index in twins:  # the same history: some visible entries, one reserved
        for i, n in enumerate(earlier):
            entry = index.reserve(f"old{i}".encode(), n)
            if entry >= 0 and i:
                index.commit(entry)
    keys, ntokens, parents = [], [], []
    for i, (n, parent) in enumerate(batch):
        keys.append(f"new{i}".encode())
        ntokens.append(n)
        # parent >= 0: an earlier key of this call (-2 - j), else none
        parents.append(-2 - (parent % i) if parent >= 0 and i else -1)
    got = twins[0].reserve_many(keys, ntokens, parents)
    want: list[int] = []
    for key, n, parent in zip(keys, ntokens, parents):
        if parent <= -2:
            parent = want[-2 - parent]
            if parent < 0:  # (the page it extends got no entry: neither does it)
                want.append(-1)
                continue
        want.append(twins[1].reserve(key, n, parent))
    assert [e >= 0 for e in got] == [e >= 0 for e in want]
    if twins[1].evictions == 0:
        assert snapshot(twins[0], got) == snapshot(twins[1], want)
    else:
        assert [twins[0].describe(e) if e >= 0 else None for e in got] == \
            [twins[1].describe(e) if e >= 0 else None for e in want]
        assert twins[0].evictions == twins[1].evictions
        live = [sorted(index.describe(e).key for e in index.live()) for index in twins]
        assert live[0] == live[1]
    assert twins[0].num_pages <= max_pages
    made = [e for e in got if e >= 0]
    assert twins[0].commit_many(made) == (made, [k for k, e in zip(keys, got) if e >= 0])
    assert all(twins[0].find(k) == e for k, e in zip(keys, got) if e >= 0)


@given(st.integers(300, 1200), st.integers(0, 1199), st.integers(8, 40), st.sampled_from(["lru", "staleness"]))
@settings(max_examples=20, deadline=None)
def test_a_large_full_bank_evicts_for_a_batch_what_reserve_evicts_key_by_key(entries, hits, batch, policy):
    """Where the hand must pass many spared entries (more than one look ahead of it holds), the
    batch evicts what `reserve` key by key evicts, and lowers the counts it passes as `reserve`
    does: batch after batch, past the hand's first full turn, the same entries go."""
    twins = [ExactIndex(PAGE, entries, None, policy) for _ in range(2)]
    for index in twins:
        for i in range(entries):
            index.commit(index.reserve(f"old{i}".encode(), PAGE))
        index.touch(list(range(min(hits, entries))))  # (hit entries are spared: a second chance)
    for round_ in range(2 * entries // batch + 1):
        keys = [f"new{round_}-{i}".encode() for i in range(batch)]
        got = twins[0].reserve_many(keys, [PAGE] * batch)
        want = [twins[1].reserve(k, PAGE) for k in keys]
        assert all(e >= 0 for e in got) and all(e >= 0 for e in want)
        assert twins[0].evictions == twins[1].evictions
        for index, made in zip(twins, (got, want)):
            index.commit_many(made)
            index.touch(made[::3])  # (some of the new entries are hit too)
        if round_ % 8 == 0:
            live = [sorted(index.describe(e).key for e in index.live()) for index in twins]
            assert live[0] == live[1], round_
    live = [sorted(index.describe(e).key for e in index.live()) for index in twins]
    assert live[0] == live[1]


@native
@given(st.lists(st.tuples(st.sampled_from(["reserve", "batch", "commit", "release", "touch", "evict", "pin", "unpin"]),
                          st.integers(0, 2 * PAGE + 1), st.integers(-4, 12)), min_size=8, max_size=60),
       st.integers(1, 10), st.sampled_from([None, 2, 5]), st.sampled_from(["lru", "staleness"]))
@settings(max_examples=200, deadline=None)
def test_the_cpp_index_does_what_the_reference_does_key_by_key(steps, max_pages, max_entries, policy):
    """Call for call, `NativeIndex` hands out the entries, pages and serials the reference does
    key by key (`reserve`; a batch is `reserve_many`, which the C++ index makes key by key) and
    evicts the same entries: the same CLOCK over the same ring, whatever the history."""
    ref, cpp = ExactIndex(PAGE, max_pages, max_entries, policy), NativeIndex(PAGE, max_pages, max_entries, policy)
    contexts = [None, None]
    made: list[int] = []  # entries handed out (the same ids in both)
    reserved: list[int] = []  # ... and not committed or released since (what `commit` may be handed)
    for i, (verb, n, pick) in enumerate(steps):
        target = made[pick % len(made)] if made and pick >= 0 else -1
        if verb == "commit":
            target = reserved.pop(pick % len(reserved)) if reserved and pick >= 0 else -1
        if verb == "reserve":
            got = [index.reserve(f"k{i}".encode(), n, target if target >= 0 and index.describe(target).key else -1)
                   for index in (ref, cpp)]
        elif verb == "batch":
            keys, sizes = [f"k{i}.{j}".encode() for j in range(3)], [n, max(n - 1, 0), 1]
            want = []
            for key, size, parent in zip(keys, sizes, [-1, -2, -3]):
                parent = want[-2 - parent] if parent <= -2 else parent
                want.append(-1 if parent == -1 and key != keys[0] else ref.reserve(key, size, parent))
            got = [want, cpp.reserve_many(keys, sizes, [-1, -2, -3])]
        elif verb in ("commit", "release", "evict") and target >= 0:
            got = [getattr(index, verb)(target) for index in (ref, cpp)]
            reserved = [e for e in reserved if e != target]
        elif verb == "touch" and target >= 0:
            got = [index.touch([target, target]) for index in (ref, cpp)]
        elif verb == "pin" and target >= 0:
            for k, index in enumerate((ref, cpp)):
                if contexts[k] is None:
                    contexts[k] = index.pinned()
                    contexts[k].__enter__()
                index.pin([target])
            got = [None, None]
        elif verb == "unpin":
            for k in range(2):
                if contexts[k] is not None:
                    contexts[k].__exit__(None, None, None)
                    contexts[k] = None
            got = [None, None]
        else:
            continue
        assert got[0] == got[1], (i, verb)
        if verb in ("reserve", "batch"):
            new = [e for e in (got[0] if verb == "batch" else [got[0]]) if e >= 0]
            made += new
            reserved += new
        assert (ref.entries, ref.held_pages, ref.num_pages, ref.evictions) == \
            (cpp.entries, cpp.held_pages, cpp.num_pages, cpp.evictions), (i, verb)
        assert ref.live() == cpp.live()
        assert all(ref.field(name, ref.live()).tolist() == cpp.field(name, ref.live()).tolist()
                   for name in ExactIndex.FIELDS), (i, verb)  # (the CLOCK counts too)
        assert ref.partial_after(ref.live() + [-1]).tolist() == cpp.partial_after(ref.live() + [-1]).tolist()
        for e in ref.live():
            assert ref.describe(e) == cpp.describe(e)
            assert ref.token_rows(e).tolist() == cpp.token_rows(e).tolist()
    keys = [ref.describe(e).key for e in ref.live()] + [b"absent", None]
    assert ref.find_many(keys).tolist() == cpp.find_many(keys).tolist()
    state = [index.state_dict() for index in (ref, cpp)]
    assert state[0]["keys"] == state[1]["keys"] and state[0]["entries"] == state[1]["entries"]
    assert all((state[0][name] == state[1][name]).all() for name in ExactIndex.FIELDS)
