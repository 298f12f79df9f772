"""Decoders: every row reuses its longest cached prefix, page by page (lossless prompt caching).

In a causal model a token's hidden states and K/V at every layer depend only on the tokens
before it, so a prefix's states are the same whatever follows. Each page of a decoder row (its
real tokens, `page_tokens` at a time) is one entry of the exact tier's index, keyed by a digest
chained over its tokens and the pages before it (`rows.chain_keys`: every page of the batch in
one call); an entry holds the last block's output and every block's K and V at its tokens.
Routing (`route`, once per forward, on the host) looks every page of the batch up at once: a
row's longest run of pages found from its start is its cached prefix; the pages after it are
reserved for this forward to write.

Three kinds of row: *whole* (every token cached: served, no block runs, bit-identical),
*prefix* (its first P tokens cached, P a multiple of the page size) and *miss*. A batch without
prefix rows runs the exact tier's block splice (`tier.ExactTier.block_forward`). A batch with
one runs `suffix.suffix_forward`: the model itself runs on every row's tokens from its P on, attending
to a KV cache that holds each row's cached prefix K/V (right-aligned, the rest masked), with the
rows' true position ids, so rotary or absolute positions and the causal mask are the model's
own; a whole row computes its last token only. Outputs at prefix positions come from the bank
(the final norm applied to the stored last-block output, as the model does), the caller's KV
cache gets every row's K/V in the batch's own layout, and the new pages are written.

A suffix computed against cached K/V is not bit-identical to a full prefill: matrix products
over a different number of rows may round differently (vLLM users see the same). The tests
bound it (PREFIX_TOLERANCE in `tests/helpers.py`) and `generate` tokens stay identical.
"""

from __future__ import annotations

import functools
from itertools import repeat

import numpy as np
import torch

from ... import rows
from . import plan as plans
from . import suffix


def longest_runs(index, keys: list, per_row: int, count: np.ndarray) -> tuple[list, list]:
    """Per row (`keys`: its pages' keys, row after row, `per_row` each), the entries of its longest
    run of pages held from its start, and the tokens they cover (`count`: the row's tokens). The
    C++ index's `longest_runs` (csrc/route_pages.cpp) where it has one; this is its reference."""
    batch, page = len(count), index.page_tokens
    hit = index.find_many(keys).reshape(batch, per_row)
    present = (hit >= 0) & (np.arange(per_row)[None, :] < (-(-count // page))[:, None])
    run = np.cumprod(present, axis=1).sum(1)
    return [hit[r, : run[r]].tolist() for r in range(batch)], np.minimum(run * page, count).tolist()


def _partial_pages(index, headers: list, host: np.ndarray, start: np.ndarray, count: np.ndarray, page: int,
                   flat: list, found: list, covered: list) -> list:
    """Per row whose run of whole pages stops inside its span, the longest partial page held
    right after the run (k < page tokens: the last page of an earlier prompt or answer, whose
    row went on otherwise), added to its `found` and `covered` (in place); per row, its k."""
    batch = len(count)
    partial = [0] * batch
    short = [r for r in range(batch) if covered[r] < count[r]]
    if short and page > 1:  # (only where a partial page extends the row's last page found, or a row's start)
        after = index.partial_after([found[r][-1] if found[r] else -1 for r in short])
        short = [r for r, some in zip(short, after.tolist()) if some]
    if not short or page == 1:
        return partial
    pages = len(flat) // batch
    nxt = np.asarray([len(found[r]) for r in short], dtype=np.int64)
    first = np.asarray(start)[short] + nxt * page
    remaining = np.asarray(count)[short] - nxt * page
    cols = np.minimum(first[:, None] + np.arange(page)[None, :], host.shape[2] - 1)
    compact = host[:, np.asarray(short)[:, None], cols]  # [4, rows, page]: the tokens of each row's next page
    after = np.frombuffer(b"".join(flat[r * pages + j - 1] if j else rows.chain_seed(b"P", headers[r])
                                   for r, j in zip(short, nxt.tolist())), dtype=np.uint8).reshape(len(short), 32)
    sizes = np.arange(1, page)
    counts = np.where(sizes[None, :] < remaining[:, None], sizes[None, :], 0).ravel()  # (k = remaining: its own key)
    if not counts.any():  # (every short row has one token after its run: no partial page can precede it)
        return partial
    keys = rows.chain_keys(b"P", [b""] * len(counts), np.repeat(compact, page - 1, axis=1), np.zeros_like(counts),
                           counts, page, after=np.repeat(after, page - 1, axis=0))
    hit = index.find_many(rows.split_keys(keys[:, 0])).reshape(len(short), page - 1)
    hit = np.where(counts.reshape(hit.shape) > 0, hit, -1)
    for i in np.flatnonzero((hit >= 0).any(1)).tolist():  # (rows that continue a partial page: a chat's turns)
        k = int(np.flatnonzero(hit[i] >= 0)[-1]) + 1
        r = short[i]
        found[r].append(int(hit[i, k - 1]))
        covered[r] += k
        partial[r] = k
    return partial


def route(store, header: bytes, host: np.ndarray, seq: int, device: torch.device, counts: dict, geometry,
          near=None, padding: tuple[bool, bool] = (False, False), follow=None, warm=None):
    """The route of a decoder forward whose ids/mask/positions/types are `host` int64 [4, B, T]:
    a `plan.Plan` for the block splice, a `suffix.SuffixPlan`, or None (nothing served, nothing
    stored). `geometry`: the span's `adapters.Geometry`; where it has a final norm, prefix rows may
    compute their suffix only (else they compute whole).
    `near`: the verified tier's `Neighbours`: in a batch that the splice serves, a row not
    wholly cached may be served a neighbour's whole chain of pages. `padding`: whether the
    caller sees a row's (leading, trailing) padding (`ModelCache.padding_visible`): trailing
    padding is then computed after the row's cached tokens (a suffix that attends to them and
    not to itself, as the uncached model's padding does); leading padding, which the uncached
    model computes attending to no token at all, is keyed and stored with the row, so the row is
    served where it comes again with as much padding. `follow(rows)`: called with what routing
    knew of the rows (`_Rows`), once reserved (`extend.Tracks.start`). `warm(flat keys, pages per
    row, keyed counts, headers, host, start, page)`: the shared tier brings the pages it holds of
    them into the bank first (`remote.Remote.warm_pages`). Call inside `store.index.pinned()`, under
    the owner's lock."""
    index, page = store.index, store.config.page_tokens
    # Padding the caller sees: a row's leading padding is keyed and stored with it (its pages
    # start at position 0, under a header that says how much padding they begin with), its
    # trailing padding is computed after its cached tokens (`suffix.plan`). A row that cannot be
    # keyed has no pages.
    keyed_pages = rows.page_keys(header, host, page, padding, counts)
    batch = len(keyed_pages.start)
    keyed = keyed_pages.keyed.tolist()
    leading = (keyed_pages.lead > 0).tolist()
    trailing = keyed_pages.trail.tolist()
    pads, headers, flat, per_row = keyed_pages.lead, keyed_pages.headers, keyed_pages.keys, keyed_pages.per_row
    start, count = keyed_pages.start, keyed_pages.count  # (from here on: the span each row keys)
    keyed_count = np.where(keyed_pages.keyed, count, 0)
    if warm is not None:
        warm(flat, per_row, keyed_count, headers, host, start, page)
    runs = getattr(index, "longest_runs", None) or functools.partial(longest_runs, index)
    found, covered = runs(flat, per_row, keyed_count)
    partial = _partial_pages(index, headers, host, start, keyed_count, page, flat, found, covered) \
        if near is None else [0] * batch
    # The pages found stay put while this routing reserves pages (which may evict) and reads them.
    index.pin(e for f in found for e in f)
    rows_ = _Rows(headers, host, flat, per_row, start, count.tolist(), found, covered, keyed, leading, trailing,
                  pads, partial)
    chains = None
    prefixes = geometry.final_norm is not None
    if near is not None:
        chains = _near(near, index, rows_, prefixes)
    result = _plan(store, rows_, seq, device, counts, geometry, chains, near)
    for r, chain in enumerate(chains or ()):
        if chain is not None:
            near.stored(r, chain, tuple(index.key(e) for e in chain))
    if follow is not None:
        follow(rows_)
    return result


class _Rows:
    """What routing knows of each row of a decoder batch (lists and arrays indexed by row)."""

    def __init__(self, headers, host, flat, per_row, start, n_real, found, covered, keyed, leading, trailing, pads,
                 partial):
        self.headers, self.host = headers, host
        self.flat, self.per_row = flat, per_row  # every row's pages' keys, row after row, `per_row` each
        self.partial = partial  # per row: tokens of the partial page that ends its cached prefix (0: none)
        self.ids, self.positions, self.types = host[0], host[2], host[3]
        self.start, self.n_real, self.found, self.covered, self.keyed = start, n_real, found, covered, keyed
        self.leading, self.trailing, self.pads = leading, trailing, pads
        self.batch = len(n_real)

    def page_key(self, r: int, j: int) -> bytes:
        """The key of row r's page j (chained over the row's pages before it)."""
        return self.flat[r * self.per_row + j]

    def padded(self, r: int) -> bool:
        """The caller sees this row's padding."""
        return self.leading[r] or self.trailing[r] > 0


def _near(near, index, rows_: _Rows, prefixes: bool) -> list:
    """Serve rows a neighbour's whole chain where the verified semantic tier allows it (only when
    no row computes a suffix: a whole row in a suffix batch computes its last token, which would
    mix its own token into the neighbour's answer; never a row whose padding the caller sees).
    Returns the list the plan fills with each computing row's chain of pages (None: not stored
    whole)."""
    batch, found, covered = rows_.batch, rows_.found, rows_.covered
    chains = [None] * batch
    if _suffix_mode(rows_, prefixes):  # (serving a neighbour makes a row whole, not partial, nor padded: the
        return chains                  # batch's mode stays what it is now)
    for r in range(batch):
        if rows_.keyed[r] and covered[r] < rows_.n_real[r] and not rows_.padded(r):
            chain = near.consider(r, index)
            if chain is not None:
                found[r], covered[r] = list(chain), rows_.n_real[r]
                index.pin(chain)
    return chains


def _suffix_mode(rows_: _Rows, prefixes: bool) -> bool:
    """Whether the batch computes suffixes (`suffix.suffix_forward`): the model has a final norm
    (`prefixes`), every row is keyed and some row is cached in part, or whole with trailing padding
    the caller sees (computed after its cached tokens). A row with gaps in its mask, or none at
    all, computes in the call's own layout: the splice; so does a batch with a row whose leading
    padding the caller sees: its suffix would attend to that padding, which the uncached row does
    not."""
    if not prefixes or not all(rows_.keyed) or any(rows_.leading):
        return False
    return any(0 < c < n or (c == n and t) for c, n, t in zip(rows_.covered, rows_.n_real, rows_.trailing))


def _reserve(index, rows_: _Rows, whole: list, counts: dict, chains) -> tuple[list, tuple]:
    """Reserve the pages each computing row adds (one copy of a page that two rows of this batch
    share): (entries, writes: int64 arrays (rows, token offsets in the row's span, ntokens), a
    value per entry). One call: the C++ index's `reserve_pages` (csrc/route_pages.cpp), or its
    reference, this module's `reserve_pages`."""
    todo = [r for r in range(rows_.batch) if rows_.keyed[r] and not whole[r]]
    if not todo:
        return [], (np.zeros(0, dtype=np.int64),) * 3
    # (A partial page ends the prefix: the next page replaces it.)
    full = [rows_.found[r][:-1] if rows_.partial[r] else rows_.found[r] for r in todo]
    first = np.fromiter(map(len, full), dtype=np.int64, count=len(todo))
    opens = np.asarray([f[-1] if f else -1 for f in full], dtype=np.int64)
    reserve = getattr(index, "reserve_pages", None) or functools.partial(reserve_pages, index)
    entries, o_row, o_at, o_n, failed, mine = reserve(rows_.flat, rows_.per_row, todo, first, opens, rows_.n_real,
                                                      rows_.start, rows_.headers, rows_.host, chains is not None)
    if failed:
        counts["too_long"] = counts.get("too_long", 0) + len(failed)
    if mine is not None:  # every page of the row cached or written: a neighbour for later rows
        for r, pages in zip(todo, mine):
            if r not in failed:
                chains[r] = tuple(rows_.found[r]) + tuple(pages)
    return entries, (o_row, o_at, o_n)


def reserve_pages(index, flat: list, per_row: int, todo: list, first: np.ndarray, opens: np.ndarray, n_real: list,
                   start: np.ndarray, headers: list, host: np.ndarray, chains: bool) -> tuple:
    """The reference of the C++ index's `reserve_pages` (its contract is there): numpy over the
    batch's pages, one `reserve_many`."""
    page = index.page_tokens
    n_real = np.asarray(n_real, dtype=np.int64)
    need = -(-n_real[todo] // page) - first
    row = np.repeat(np.asarray(todo, dtype=np.int64), need)  # per candidate page: its row, its page number
    number = plans.runs(first, need)
    if not len(row):
        return [], row, row, row, [], None
    at = number * page
    ntokens = np.minimum(page, n_real[row] - at)
    keys = [flat[i] for i in (row * per_row + number).tolist()]
    # One reservation per distinct key, at its first place in the batch (its parent page is
    # before it there: a key is chained over the pages before it, so they come with it).
    firsts = dict(zip(reversed(keys), range(len(keys) - 1, -1, -1)))
    order = np.sort(np.fromiter(firsts.values(), dtype=np.int64, count=len(firsts)))
    place = np.searchsorted(order, np.fromiter(map(firsts.__getitem__, keys), dtype=np.int64, count=len(keys)))
    before = place[np.arange(-1, len(place) - 1)]  # (the place of the page before, in the batch)
    parents = np.where(number == np.repeat(first, need), np.repeat(opens, need), -2 - before)[order]
    o_row, o_at, o_n = row[order], at[order], ntokens[order]
    labels = list(zip(map(headers.__getitem__, o_row.tolist()), repeat(host), o_row.tolist(),
                      (start[o_row] + o_at).tolist(), o_n.tolist()))
    got = np.asarray(index.reserve_many([keys[i] for i in order.tolist()], o_n, parents, labels), dtype=np.int64)
    ok = got >= 0
    failed = np.unique(row[~ok[place]]).tolist() if not ok.all() else []
    mine = [p.tolist() for p in np.split(got[place], np.cumsum(need)[:-1])] if chains else None
    return got[ok].tolist(), o_row[ok], o_at[ok], o_n[ok], failed, mine


def _plan(store, rows_: _Rows, seq: int, device, counts: dict, geometry, chains, near):
    index, batch = store.index, rows_.batch
    n_real, covered, keyed, trailing = rows_.n_real, rows_.covered, rows_.keyed, rows_.trailing
    whole = [keyed[r] and covered[r] == n_real[r] for r in range(batch)]
    partial = [keyed[r] and 0 < covered[r] < n_real[r] for r in range(batch)]
    suffix_mode = _suffix_mode(rows_, geometry.final_norm is not None)
    if not suffix_mode:  # the splice serves a whole row only where it holds what the caller sees of its padding
        held = [whole[r] and trailing[r] > 0 for r in range(batch)]
        if any(held):
            counts["padding"] = counts.get("padding", 0) + sum(held)
        whole = [whole[r] and not held[r] for r in range(batch)]
    entries, writes = _reserve(index, rows_, whole, counts, chains)
    # Hits: bump their reference counts.
    index.touch([e for r in range(batch) if whole[r] or (suffix_mode and partial[r]) for e in rows_.found[r]])
    if suffix_mode:
        return suffix.plan(store, geometry, rows_, whole, entries, writes, seq, device)
    return _splice_plan(store, rows_, whole, entries, writes, seq, device, near)


def _splice_plan(store, rows_: _Rows, whole, entries, writes, seq, device, near):
    """Whole rows served, the rest computed by the block splice; in-batch repeats copied (not a
    row whose padding the caller sees: its padding is its own). A row's leading padding that its
    span holds is not counted as tokens served or computed."""
    served, compute, repeats = [], [], []
    first_row: dict[bytes, int] = {}
    start, page = rows_.start, store.config.page_tokens
    for r in range(rows_.batch):
        n = rows_.n_real[r]
        if whole[r]:
            served.append(r)
            continue
        if rows_.keyed[r] and not rows_.padded(r):
            tokens = rows_.page_key(r, (n - 1) // page)  # (its last page's key names every token of it)
            if tokens in first_row:
                repeats.append((r, first_row[tokens]))
                continue
            first_row.setdefault(tokens, r)
        compute.append(r)
    if not served and not repeats and not entries:
        return None
    real = [rows_.n_real[r] - int(rows_.pads[r]) for r in range(rows_.batch)]
    semantic = near.pending.served_rows if near is not None else []
    serving = (served, start[served].tolist(), [e for r in served for e in rows_.found[r]],
               [len(rows_.found[r]) for r in served])
    return plans.build(store, rows_.batch, seq, device, serving, compute, repeats, entries,
                       (writes[0], start[writes[0]] + writes[1], writes[2]), served=len(served),
                       semantic_rows=tuple(semantic), repeats=len(repeats), kv=True,
                       tokens=(sum(real[r] for r in served), sum(real[r] for r in compute)))
