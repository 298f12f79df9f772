"""The exact tier's routing of a forward whose rows are stored whole (encoders, pixel models).

Each row's key (`rows.chain_keys`: a digest of its real tokens, positions, token types, the model
state and namespace, and where the caller sees it its padding) is looked up in the index. A row that hits
is served; a row repeating an earlier row of the batch copies that row's result; a row that
misses may be served a neighbour's entry by the verified semantic tier (`Neighbours`), or else
computes, and is reserved an entry to store its states in.
"""

from __future__ import annotations

from itertools import repeat

import numpy as np
import torch

from ... import rows
from . import plan as plans


def row_keys(header: bytes, host: np.ndarray, ids_before: bool, counts: dict,
             padding: tuple[bool, bool] = (False, False)) -> list:
    """(key or None, start, ntokens, label) per row of a batch whose ids/mask/positions/types are
    `host` int64 [4, B, T], all keyed in one call (`rows.chain_keys`); None for a row that cannot
    be keyed (no real token, gaps). `ids_before`: the ids left of a row's first real token decide
    its positions (its key covers them). `padding`: whether the caller sees a row's (leading,
    trailing) padding: such a row is keyed and stored with it, so that what it serves at its
    padding is what the uncached model computes there."""
    spans = rows.spans(host[1], padding, counts)
    start = spans.start - spans.lead
    count = np.where(spans.keyed, spans.count + spans.lead + spans.trail, 0)
    before = start if ids_before else np.zeros_like(start)
    headers = rows.marked_headers(header, spans.lead, spans.trail, before)
    keys = rows.split_keys(rows.chain_keys(b"R", headers, host, start - before, count + before, host.shape[2])[:, 0]) \
        if len(count) and count.any() else [None] * len(count)
    keys = [k if keyed else None for k, keyed in zip(keys, spans.keyed.tolist())]
    starts, counts_ = start.tolist(), count.tolist()
    return list(zip(keys, starts, counts_, zip(headers, repeat(host), range(len(keys)), starts, counts_)))


def route(store, keys: list, seq: int, device: torch.device, counts: dict, near=None, pooling: str = "mean",
          mask: np.ndarray | None = None):
    """The `plan.Plan` of a forward, `keys` from `row_keys` (`seq`: T of its hidden states; a
    pixel model's rows have no label), or
    None (every row computes, none stores). `near`: the verified tier's `Neighbours`, which may
    serve a row that misses (with `Semantic.serve == "pooled"`: its pooled state, by `pooling`).
    `mask` (host [B, T], where the caller sees no padding): the computing rows run only up to the
    last real token among them, the padding after it cut off (where the padding is, the model
    computes nothing a caller reads: the uncached call pads these rows to a longer row of the batch).
    Call inside `store.index.pinned()`, under the owner's lock."""
    index = store.index
    # Every row's lookup at once; the hits are pinned (the reservations below must not evict
    # them before they are read) and counted.
    found = index.find_many([key if key is not None else b"" for key, _, _, _ in keys])
    hit = np.flatnonzero(found >= 0)
    index.touch(found[hit])
    index.pin(found[hit].tolist())
    served = [(r, keys[r][1], e) for r, e in zip(hit.tolist(), found[hit].tolist())]
    compute, repeats, pooled, misses = [], [], [], []
    first_row: dict[bytes, int] = {}
    serve_pooled = near is not None and near.tier.semantic.serve == "pooled"
    for r in np.flatnonzero(found < 0).tolist():
        key, s = keys[r][0], keys[r][1]
        if key is None:
            compute.append(r)
            continue
        if key in first_row:
            repeats.append((r, first_row[key]))
            continue
        entry = near.consider(r, index) if near is not None else None
        if entry is not None:  # a neighbour's entry, served by the verified semantic tier
            index.pin((entry,))
            (pooled if serve_pooled else served).append((r, s, entry))
            continue
        first_row[key] = r
        misses.append(r)
        compute.append(r)
    reserved = index.reserve_many([keys[r][0] for r in misses], [keys[r][2] for r in misses],
                                  labels=[keys[r][3] for r in misses]) if misses else []
    entries, writes = [], []
    for r, entry in zip(misses, reserved):
        key, s, n, _ = keys[r]
        if entry >= 0:
            if near is not None:
                near.stored(r, entry, key)
            entries.append(entry)
            writes.append((r, s, n))
        elif index.find(key) < 0:
            counts["too_long"] = counts.get("too_long", 0) + 1
    width = seq
    if mask is not None and compute:
        real = mask[compute] != 0
        width = int((seq - real[:, ::-1].argmax(1)).max())  # (a row with no real token keeps every position)
    if not served and not repeats and not entries and not pooled and width == seq:
        return None
    tokens = (sum(keys[r][2] for r, _, _ in served + pooled), sum(keys[r][2] for r in compute))
    semantic = near.pending.served_rows if near is not None else []
    plan = plans.build(store, len(keys), seq, device, [(r, s, index.token_rows(e)) for r, s, e in served], compute,
                       repeats, entries, writes, width, served=len(served) + len(pooled),
                       semantic_rows=tuple(semantic), repeats=len(repeats), tokens=tokens)
    if pooled:
        _place_pooled(store, plan, pooled, keys, pooling, device)
    return plan


def _place_pooled(store, plan, pooled: list, keys: list, pooling: str, device) -> None:
    """Add to the plan's served tokens rows served a neighbour's pooled state: each real token
    of row r holds the mean (pooling "mean") or the first token (pooling "cls") of the entry's
    stored output, so the caller's pooling of the row gives the entry's pooled output."""
    vectors, dst = [], []
    for r, _, entry in pooled:
        _, s, n, _ = keys[r]
        states = store.arena.read(torch.from_numpy(store.index.token_rows(entry)).to(device))
        vector = states[:1] if pooling == "cls" else states.float().mean(0, keepdim=True).to(states.dtype)
        vectors.append(vector.expand(n, -1))
        dst.append(r * plan.seq + s + np.arange(n, dtype=np.int64))
    plan.add_served(torch.cat(vectors), torch.from_numpy(np.concatenate(dst)).to(device))
