"""The exact tier's routing of a forward whose rows are stored whole (encoders, pixel models).

Each row's key (`rows.chain_keys`: a digest of its real tokens, positions, token types, the model
state and namespace, and where the caller sees it its padding) is looked up in the index. A row that hits
is served; a row repeating an earlier row of the batch copies that row's result; a row that
misses may be served a neighbour's entry by the verified semantic tier (`Neighbours`), or else
computes, and is reserved an entry to store its states in.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch

from ... import rows
from . import plan as plans


@dataclass
class RowKeys:
    """Each row's key (None: a row that cannot be keyed), its span (`start`, `count`) and what its
    key was made from (`label`, for `held` and `save`): the forward's `header` (None for pixel
    rows, which carry no label) with each row's `marks` (`rows.row_keys`) and the `host` batch."""

    keys: list
    start: np.ndarray  # int64 [B]
    count: np.ndarray  # int64 [B]
    header: bytes | None = None
    marks: np.ndarray | None = None  # int64 [3, B]: per row (lead, trail, before)
    host: np.ndarray | None = None  # the [4, B, T] batch the labels name

    def label(self, r: int):
        return self.labels([r])[0]

    def labels(self, selected: list) -> list:
        if self.header is None:
            return [None] * len(selected)
        marks = self.marks[:, selected]
        headers = [rows.marked_header(self.header, *m) for m in marks.T.tolist()] if marks.any() \
            else repeat(self.header)
        return list(zip(headers, repeat(self.host), selected, self.start[selected].tolist(),
                        self.count[selected].tolist()))


def row_keys(header: bytes, host: np.ndarray, ids_before: bool, counts: dict,
             padding: tuple[bool, bool] = (False, False)) -> RowKeys:
    """The `RowKeys` of a batch whose ids/mask/positions/types are `host` int64 [4, B, T], all
    keyed in one call (`rows.row_keys`); None for a row that cannot be keyed (no real token,
    gaps). `ids_before`: the ids left of a row's first real token decide its positions (its key
    covers them). `padding`: whether the caller sees a row's (leading, trailing) padding: such a
    row is keyed and stored with it, so that what it serves at its padding is what the uncached
    model computes there."""
    keys, start, count, marks = rows.row_keys(header, host, padding, ids_before, counts)
    return RowKeys(keys, start, count, header, marks, host)


def route(store, keyed: RowKeys, seq: int, device: torch.device, counts: dict, near=None, pooling: str = "mean",
          mask: np.ndarray | None = None):
    """The `plan.Plan` of a forward, `keyed` from `row_keys` (`seq`: T of its hidden states), or
    None (every row computes, none stores). `near`: the verified tier's `Neighbours`, which may
    serve a row that misses (with `Semantic.serve == "pooled"`: its pooled state, by `pooling`).
    `mask` (host [B, T], where the caller sees no padding): the computing rows run only up to the
    last real token among them, the padding after it cut off (where the padding is, the model
    computes nothing a caller reads: the uncached call pads these rows to a longer row of the batch).
    Call inside `store.index.pinned()`, under the owner's lock. Where the index is the C++ one,
    no semantic tier takes part and every row keys under the forward's header, the whole routing
    is one call (`route_rows`, csrc/route_rows.cpp; this is its reference)."""
    index, keys = store.index, keyed.keys
    whole = getattr(index, "route_rows", None) if near is None else None
    if whole is not None and (keyed.marks is None or not keyed.marks.any()):
        fields, parts, too_long = whole(keys, keyed.start, keyed.count, seq, keyed.header, keyed.host, mask)
        if too_long:
            counts["too_long"] = counts.get("too_long", 0) + too_long
        return None if fields is None else plans.finish(store, plans.Plan(**fields), parts, device)
    # Every row's lookup at once; the hits are pinned (the reservations below must not evict
    # them before they are read) and counted.
    found = index.find_many(keys)  # (None finds nothing)
    hits = found >= 0
    served, pooled, held, miss = [], [], [], list(range(len(keys)))
    if hits.any():
        hit = np.flatnonzero(hits)
        index.touch(found[hit])
        served, held, miss = hit.tolist(), found[hit].tolist(), np.flatnonzero(~hits).tolist()
        index.pin(held)
    if near is None:
        compute, repeats, misses = _first_rows(keys, miss)
    else:
        compute, repeats, misses = _near_rows(keys, miss, near, index, served, held, pooled)
    entries = index.reserve_many([keys[r] for r in misses], keyed.count[misses], labels=keyed.labels(misses)) \
        if misses else []
    stored = misses
    if -1 in entries:  # (nearly always none)
        for r, entry in zip(misses, entries):
            if entry < 0 and index.find(keys[r]) < 0:
                counts["too_long"] = counts.get("too_long", 0) + 1
        stored = [r for r, entry in zip(misses, entries) if entry >= 0]
        entries = [entry for entry in entries if entry >= 0]
    stored = np.asarray(stored, dtype=np.int64)
    writes = (stored, keyed.start[stored], keyed.count[stored])
    if near is not None:
        for r, entry in zip(stored.tolist(), entries):
            near.stored(r, entry, keys[r])
    width, zeros = seq, None
    if mask is not None and compute and not mask.all():  # (some padding: cut after the last real token)
        real = mask[compute] != 0
        width = int((seq - real[:, ::-1].argmax(1)).max())  # (a row with no real token keeps every position)
        zeros = _padding(mask, compute, repeats, seq)
    if not served and not repeats and not entries and not pooled and width == seq and zeros is None:
        return None
    tokens = (int(keyed.count[served + [r for r, _ in pooled]].sum()), int(keyed.count[compute].sum()))
    semantic = near.pending.served_rows if near is not None else []
    plan = plans.build(store, len(keys), seq, device, (served, keyed.start[served].tolist(), held, None), compute,
                       repeats, entries, writes, width, zeros, served=len(served) + len(pooled),
                       semantic_rows=tuple(semantic), repeats=len(repeats), tokens=tokens)
    if pooled:
        _place_pooled(store, plan, pooled, keyed, pooling, device)
    return plan


def _padding(mask: np.ndarray, compute: list, repeats: list, seq: int) -> np.ndarray | None:
    """int64: the flat output rows (row * seq + t) of the padding (mask == 0) of the rows that
    compute or copy a computing row, where the output holds zeros as a served row's does: what a
    caller gets at padding it does not see is the same however the row was reached (served or
    computed, in a batch of any width); None where there is none."""
    rows = np.asarray(compute + [r for r, _ in repeats], dtype=np.int64)
    r, t = np.nonzero(mask[rows] == 0)
    return rows[r] * seq + t if len(r) else None


def _first_rows(keys: list, miss: list) -> tuple[list, list, list]:
    """(rows that compute, (row, earlier row of the batch it repeats), rows to store) of the rows
    that `miss`: a key's first row computes and is stored, its repeats copy it."""
    mine = [keys[r] for r in miss]
    first = dict(zip(reversed(mine), reversed(miss)))  # key -> its first row
    if len(first) == len(miss) and None not in first:  # (no repeats, every row keyed: nearly always)
        return miss, [], miss
    first.pop(None, None)
    misses = sorted(first.values())
    repeats = [(r, first[keys[r]]) for r in miss if keys[r] is not None and first[keys[r]] != r]
    copied = {r for r, _ in repeats}
    return [r for r in miss if r not in copied], repeats, misses


def _near_rows(keys: list, miss: list, near, index, served: list, held: list, pooled: list) -> tuple[list, list, list]:
    """`_first_rows` where the verified semantic tier may serve a row a neighbour's entry (added
    to `served`/`held`, or to `pooled` as (row, start, entry) when it serves pooled states)."""
    compute, repeats, misses = [], [], []
    first_row: dict[bytes, int] = {}
    serve_pooled = near.tier.semantic.serve == "pooled"
    for r in miss:
        key = keys[r]
        if key is None:
            compute.append(r)
            continue
        if key in first_row:
            repeats.append((r, first_row[key]))
            continue
        entry = near.consider(r, index)
        if entry is not None:  # a neighbour's entry, served by the verified semantic tier
            index.pin((entry,))
            if serve_pooled:
                pooled.append((r, entry))
            else:
                served.append(r)
                held.append(entry)
            continue
        first_row[key] = r
        misses.append(r)
        compute.append(r)
    if served and sorted(served) != served:  # (the plan takes served rows in row order)
        order = sorted(range(len(served)), key=served.__getitem__)
        served[:], held[:] = [served[i] for i in order], [held[i] for i in order]
    return compute, repeats, misses


def _place_pooled(store, plan, pooled: list, keyed: RowKeys, pooling: str, device) -> None:
    """Add to the plan's served tokens rows served a neighbour's pooled state: each real token
    of row r holds the mean (pooling "mean") or the first token (pooling "cls") of the entry's
    stored output, so the caller's pooling of the row gives the entry's pooled output."""
    vectors, dst = [], []
    for r, entry in pooled:
        s, n = int(keyed.start[r]), int(keyed.count[r])
        states = store.arena.read(torch.from_numpy(store.index.token_rows(entry)).to(device))
        vector = states[:1] if pooling == "cls" else states.float().mean(0, keepdim=True).to(states.dtype)
        vectors.append(vector.expand(n, -1))
        dst.append(r * plan.seq + s + np.arange(n, dtype=np.int64))
    plan.add_served(torch.cat(vectors), torch.from_numpy(np.concatenate(dst)).to(device))
