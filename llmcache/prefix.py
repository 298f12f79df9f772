"""Decoders: every row reuses its longest cached prefix, page by page (lossless prompt caching).

In a causal model a token's hidden states and K/V at every layer depend only on the tokens
before it, so a prefix's states are the same whatever follows. Each page of a decoder row (its
real tokens, `page_tokens` at a time) is one entry of the exact tier's index, keyed by its tokens
and the serial number of the entry holding the page before it (`rows.page_key`); an entry holds
the last block's output and every block's K and V at its tokens. Routing (`route`, once per
forward, on the host) walks each row's pages through the index: the pages found are its cached
prefix; the pages after it are reserved for this forward to write.

Three kinds of row: *whole* (every token cached: served, no block runs, bit-identical),
*prefix* (its first P tokens cached, P a multiple of the page size) and *miss*. A batch without
prefix rows runs the exact tier's block splice (`exact.ExactTier.block_forward`). A batch with
one runs `suffix_forward`: the model itself runs on every row's tokens from its P on, attending
to a KV cache that holds each row's cached prefix K/V (right-aligned, the rest masked), with the
rows' true position ids, so rotary or absolute positions and the causal mask are the model's
own; a whole row computes its last token only. Outputs at prefix positions come from the bank
(the final norm applied to the stored last-block output, as the model does), the caller's KV
cache gets every row's K/V in the batch's own layout, and the new pages are written.

A suffix computed against cached K/V is not bit-identical to a full prefill: matrix products
over a different number of rows may round differently (vLLM users see the same). The tests
bound it (`tests/test_prefix.py`, PREFIX_TOLERANCE) and `generate` tokens stay identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import gate, rows
from .exact import Plan, _upload, every_token


@dataclass
class SuffixPlan:
    """A forward whose rows compute from their cached prefix on (`suffix_forward`)."""

    batch: int
    seq: int  # T of the call
    prefix: int  # Pmax: KV slots before the suffix
    suffix: int  # S: the longest suffix
    served_tokens: int
    computed_tokens: int
    entries: list  # reserved entries this forward writes
    store_n: list  # their token counts
    dev: dict  # device index tensors (see `route`)
    host: dict  # host arrays: suffix ids, positions, mask
    prefix_states: torch.Tensor | None  # [sum P, F]: the rows' cached prefix tokens, read at routing


def _walk(index, header: bytes, ids, positions, types, page: int):
    """(entries found from the row's start, tokens they cover)."""
    n = len(ids)
    found = index.walk(-(-n // page), lambda i, serial: rows.page_key(
        header, serial, ids[i * page : (i + 1) * page], positions[i * page : (i + 1) * page],
        types[i * page : (i + 1) * page]))
    return found, min(len(found) * page, n)


def route(tier, header: bytes, host: np.ndarray, seq: int, device: torch.device, counts: dict,
          pending: tuple, prefixes: bool, near=None, padding: tuple[bool, bool] = (False, False)):
    """The plan of a decoder forward whose ids/mask/positions/types are `host` int64 [4, B, T]:
    a `Plan` for the block splice, a `SuffixPlan`, or None (nothing served, nothing stored).
    `prefixes`: prefix rows may compute their suffix only (else they compute whole). `near`: the
    verified semantic tier's part (as `ExactTier.route`'s): in a batch that the splice serves, a
    row not wholly cached may be served a neighbour's whole chain of pages. `padding`: whether
    the caller sees a row's (leading, trailing) padding (`ModelCache.padding_visible`): trailing
    padding is then computed after the row's cached tokens (a suffix that attends to them and
    not to itself, as the uncached model's padding does); leading padding, which the uncached
    model computes attending to no token at all, is keyed and stored with the row, so the row is
    served where it comes again with as much padding. Call under the owner's lock."""
    tier._check_pending(*pending, counts)
    index, page = tier.index, tier.owner.config.page_tokens
    ids, mask, positions, types = host
    start, count, contiguous = rows.real_spans(mask)
    batch = ids.shape[0]
    keyed = [bool(count[r] > 0 and contiguous[r]) for r in range(batch)]
    # Padding the caller sees: a row's leading padding is keyed and stored with it (its pages
    # start at position 0, under a header that says how much padding they begin with), its
    # trailing padding is computed after its cached tokens (`_suffix_plan`).
    leading = [bool(padding[0] and keyed[r] and start[r] > 0) for r in range(batch)]
    trailing = [int(seq - start[r] - count[r]) if padding[1] and keyed[r] else 0 for r in range(batch)]
    pads = np.where(leading, start, 0)
    start, count = start - pads, count + pads  # (from here on: the span each row keys)
    headers = [header + rows.padding_mark((int(pads[r]), 0)) if leading[r] else header for r in range(batch)]
    found, covered = [], []
    for r in range(batch):
        s, n = int(start[r]), int(count[r])
        if not keyed[r]:
            reason = "no_tokens" if n == 0 else "mask_gaps"
            counts[reason] = counts.get(reason, 0) + 1
            found.append([])
            covered.append(0)
            continue
        f, c = _walk(index, headers[r], ids[r, s : s + n], positions[r, s : s + n], types[r, s : s + n], page)
        found.append(f)
        covered.append(c)
    # The pages found stay put while this routing reserves pages (which may evict) and reads them.
    with index.pinned() as pin:
        pin(e for f in found for e in f)
        chains = None
        if near is not None:
            chains = _near(near, index, found, covered, keyed, count, prefixes,
                           [leading[r] or trailing[r] > 0 for r in range(batch)])
        plan = _plan(tier, headers, ids, positions, types, start, count, found, covered, keyed, seq, device, counts,
                     prefixes, chains, leading, trailing, pads)
        for r, chain in enumerate(chains or ()):
            if chain is not None:
                near[0].stored(near[1], r, near[2][r], chain, tuple(index.key(e) for e in chain), near[3][r])
        return plan


def _near(near, index, found, covered, keyed, count, prefixes: bool, padded: list) -> list:
    """Serve rows a neighbour's whole chain where the verified semantic tier allows it (only when
    no row computes a suffix: a whole row in a suffix batch computes its last token, which would
    mix its own token into the neighbour's answer; never a row whose padding the caller sees).
    Returns the list the plan fills with each computing row's chain of pages (None: not stored
    whole)."""
    tier, pending, keys, codes = near
    batch = len(found)
    chains = [None] * batch
    if prefixes and all(keyed) and any(0 < covered[r] < int(count[r]) for r in range(batch)):
        return chains
    for r in range(batch):
        if keyed[r] and covered[r] < int(count[r]) and not padded[r]:
            chain = tier.consider(pending, r, keys[r], codes[r], index)
            if chain is not None:
                found[r], covered[r] = list(chain), int(count[r])
                index.pin(chain)
    return chains


def _plan(tier, headers, ids, positions, types, start, count, found, covered, keyed, seq, device, counts, prefixes,
          chains, leading, trailing, pads):
    index, page = tier.index, tier.owner.config.page_tokens
    batch = ids.shape[0]
    n_real = [int(c) for c in count]
    whole = [keyed[r] and covered[r] == n_real[r] for r in range(batch)]
    partial = [keyed[r] and 0 < covered[r] < n_real[r] for r in range(batch)]
    # (A row with gaps in its mask, or none at all, computes in the call's own layout: the splice;
    # so does a batch with a row whose leading padding the caller sees: its suffix would attend to
    # that padding, which the uncached row does not.)
    suffix_mode = (prefixes and all(keyed) and not any(leading)
                   and (any(partial) or any(whole[r] and trailing[r] for r in range(batch))))
    if not suffix_mode:  # the splice serves a whole row only where it holds what the caller sees of its padding
        held = [whole[r] and trailing[r] > 0 for r in range(batch)]
        if any(held):
            counts["padding"] = counts.get("padding", 0) + sum(held)
        whole = [whole[r] and not held[r] for r in range(batch)]
    # Reserve the pages each computing row adds (one copy of a page that two rows of this batch share).
    reserved: dict[bytes, int] = {}
    entries, store = [], []  # store: (row, token offset in the row, ntokens)
    for r in range(batch):
        if not keyed[r] or whole[r]:
            continue
        s, n = int(start[r]), n_real[r]
        serial = index.serial_of(found[r][-1]) if found[r] else -1
        parent = found[r][-1] if found[r] else -1
        at = covered[r]
        chain = list(found[r])
        while at < n:
            end = min(at + page, n)
            key = rows.page_key(headers[r], serial, ids[r, s + at : s + end], positions[r, s + at : s + end],
                                types[r, s + at : s + end])
            entry = reserved.get(key, -1)
            if entry < 0:
                entry = index.reserve(key, end - at, parent)
                if entry < 0:
                    counts["too_long"] = counts.get("too_long", 0) + 1
                    break
                reserved[key] = entry
                entries.append(entry)
                store.append((r, at, end - at))
            serial, parent, at = index.serial_of(entry), entry, end
            chain.append(entry)
        if chains is not None and at == n:  # every page of the row cached or written: a neighbour for later rows
            chains[r] = tuple(chain)
    for r in range(batch):
        uses = found[r] if (whole[r] or (suffix_mode and partial[r])) else []
        index.touch(uses)  # hits: bump their reference counts
    if suffix_mode:
        return _suffix_plan(tier, ids, positions, types, start, n_real, found, covered, whole, keyed, entries,
                            store, seq, device, trailing)
    padded = [leading[r] or trailing[r] > 0 for r in range(batch)]
    return _splice_plan(tier, ids, positions, types, start, n_real, found, whole, keyed, entries, store, seq, device,
                        padded, pads)


def _splice_plan(tier, ids, positions, types, start, n_real, found, whole, keyed, entries, store, seq,
                 device, padded, pads) -> Plan | None:
    """Whole rows served, the rest computed by the block splice; in-batch repeats copied (not a
    row whose padding the caller sees: its padding is its own). `pads`: leading padding each
    row's span holds (not counted as tokens served or computed)."""
    index = tier.index
    batch = len(n_real)
    served_rows, compute, repeat_rows, repeat_src = [], [], [], []
    first_row: dict[bytes, int] = {}
    for r in range(batch):
        if whole[r]:
            served_rows.append(r)
            continue
        if keyed[r] and not padded[r]:
            s, n = int(start[r]), n_real[r]
            tokens = b"".join(a[r, s : s + n].tobytes() for a in (ids, positions, types))
            if tokens in first_row:
                repeat_rows.append(r)
                repeat_src.append(first_row[tokens])
                continue
            first_row.setdefault(tokens, r)
        compute.append(r)
    if not served_rows and not repeat_rows and not entries:
        return None
    position = {r: i for i, r in enumerate(compute)}
    plan = Plan(batch, seq, len(compute), len(served_rows), entries,
                [(position[r], int(start[r]) + at, n) for r, at, n in store], repeats=len(repeat_rows))
    plan.tokens = (sum(n_real[r] - int(pads[r]) for r in served_rows), sum(n_real[r] - int(pads[r]) for r in compute))
    parts = {"compute": compute if (served_rows or repeat_rows) else None}
    if served_rows:
        src = [np.concatenate([index.token_rows(e) for e in found[r]]) for r in served_rows]
        parts["served_src"] = np.concatenate(src)
        parts["served_dst"] = np.concatenate(
            [r * seq + int(start[r]) + np.arange(len(t), dtype=np.int64) for r, t in zip(served_rows, src)])
    if repeat_rows:
        parts["repeat_rows"] = repeat_rows
        parts["repeat_src"] = [position[r] for r in repeat_src]
    if entries:
        parts["store_src"] = np.concatenate([position[r] * seq + int(start[r]) + at + np.arange(n, dtype=np.int64)
                                             for r, at, n in store])
        parts["store_dst"] = np.concatenate([index.token_rows(e) for e in entries])
        plan.store_all = every_token(parts["store_src"], len(compute) * seq)
    plan.place(parts, device, tier.arena)
    return plan


def _suffix_plan(tier, ids, positions, types, start, n_real, found, covered, whole, keyed, entries, store, seq,
                 device, trailing) -> SuffixPlan:
    """Every row computes from its cached prefix on (a whole row: its last token, or its
    trailing padding), and then its `trailing` padding positions, which attend to the row's
    tokens but not to themselves (their mask is 0, as in the uncached call)."""
    index = tier.index
    batch = len(n_real)
    cached = [min(covered[r], n_real[r] - (0 if trailing[r] else 1)) if keyed[r] and found[r] else 0
              for r in range(batch)]
    real_len = [n_real[r] - cached[r] for r in range(batch)]
    suffix_len = [real_len[r] + int(trailing[r]) for r in range(batch)]
    pmax, smax = max(cached), max(max(suffix_len), 1)
    width = pmax + smax
    sfx_ids = np.zeros((batch, smax), dtype=np.int64)
    sfx_pos = np.zeros((batch, smax), dtype=np.int64)
    sfx_types = np.zeros((batch, smax), dtype=np.int64)
    kv_mask = np.zeros((batch, width), dtype=np.int64)
    prefix_src, prefix_slot, prefix_dst, suffix_src, suffix_dst = [], [], [], [], []
    uniform = seq == width and all(int(start[r]) == 0 and cached[r] == pmax and suffix_len[r] == smax
                                   for r in range(batch))
    for r in range(batch):
        s, p, k = int(start[r]), cached[r], suffix_len[r]
        if k:
            sfx_ids[r, :k] = ids[r, s + p : s + p + k]
            sfx_pos[r, :k] = positions[r, s + p : s + p + k]
            sfx_types[r, :k] = types[r, s + p : s + p + k]
            sfx_ids[r, k:] = sfx_ids[r, k - 1]
            sfx_pos[r, k:] = sfx_pos[r, k - 1] + 1 + np.arange(smax - k)
        kv_mask[r, pmax - p : pmax + real_len[r]] = 1
        if p:
            prefix_src.append(np.concatenate([index.token_rows(e) for e in found[r]])[:p])
            prefix_slot.append(r * pmax + pmax - p + np.arange(p))
            prefix_dst.append(r * seq + s + np.arange(p))
        suffix_src.append(r * smax + np.arange(k))
        suffix_dst.append(r * seq + s + p + np.arange(k))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)
    parts = {"ids": sfx_ids, "positions": sfx_pos, "types": sfx_types, "mask": kv_mask, "prefix_src": cat(prefix_src),
             "prefix_slot": cat(prefix_slot), "prefix_dst": cat(prefix_dst), "suffix_src": cat(suffix_src),
             "suffix_dst": cat(suffix_dst)}
    if entries:
        # A reserved page of row r covers its tokens [at, at + n), all at or after the row's cached prefix.
        parts["store_src"] = np.concatenate([r * smax + at - cached[r] + np.arange(n) for r, at, n in store])
        parts["store_dst"] = np.concatenate([index.token_rows(e) for e in entries])
    dev = _upload(parts, device)
    for name, shape in (("ids", (batch, smax)), ("positions", (batch, smax)), ("types", (batch, smax)),
                        ("mask", (batch, width))):
        dev[name] = dev[name].view(shape)
    states = tier.arena.read(dev["prefix_src"], tier.read_buffer(len(dev["prefix_src"]))) if pmax else None
    return SuffixPlan(batch, seq, pmax, smax, sum(cached), sum(real_len), entries, [n for _, _, n in store],
                      dev, {"cached": cached, "uniform": uniform, "whole": sum(whole), "prefix": sum(1 for r in range(batch)
                                                                                if cached[r] and not whole[r])}, states)


def suffix_forward(tier, plan: SuffixPlan, arguments: dict, forward, call):
    """Run the model on every row's suffix against its cached prefix; return what the uncached
    call returns (hidden states of every position, the caller's KV cache filled). `arguments`:
    the call's bound arguments; `call(**kwargs)`: the model's own forward; `forward`: the cache's
    record of this call (its `capture` gets the last block's output)."""
    from transformers import DynamicCache

    dev = plan.dev
    batch, pmax, smax, seq = plan.batch, plan.prefix, plan.suffix, plan.seq
    hidden_size = tier.arena.features - len(tier.span) * tier.kv_width
    half = tier.kv_width // 2
    heads = tier.kv_heads
    kv_dtype = tier.kv_dtype(forward.switches)
    device = dev["ids"].device
    # Uniform: every row starts at 0 with the same cached and computed lengths (a batch of one):
    # the cached K/V are views of the states read, and the stand-in's cache is the caller's.
    uniform = plan.host["uniform"]

    def prefix_kv(position: int, which: int) -> torch.Tensor:
        """[B, heads, Pmax, head dim]: block `position`'s cached K (0) or V (1), zeros where a
        row's prefix is shorter than Pmax (those slots are masked)."""
        lo = hidden_size + position * tier.kv_width + which * half
        cols = plan.prefix_states[:, lo : lo + half].to(kv_dtype)
        if not uniform:
            cols = cols.new_zeros((batch * pmax, half)).index_copy_(0, dev["prefix_slot"], cols)
        return cols.view(batch, pmax, heads, -1).transpose(1, 2)

    stand_in = DynamicCache()
    for position in range(len(tier.span)):
        if pmax:
            keys, values = prefix_kv(position, 0), prefix_kv(position, 1)
        else:
            keys = values = torch.zeros(batch, heads, 0, half // heads, dtype=kv_dtype, device=device)
        stand_in.update(keys, values, tier.layer_idx(position))
    name = tier.cache_name
    real = gate.kv_cache(arguments)  # (given under the old name too)
    # The stand-in goes under the name the caller used: the model's own forward then does with
    # it what it does with the caller's (transformers warns that `past_key_values` is deprecated).
    given = next((n for n in gate.KV_CACHE_NAMES if arguments.get(n) is not None), name)
    use_cache = arguments.get("use_cache")
    if use_cache is None:
        use_cache = bool(getattr(tier.owner.base.config, "use_cache", True))
    kwargs = {k: v for k, v in arguments.items() if k not in gate.KV_CACHE_NAMES}
    kwargs.update({"input_ids": dev["ids"], "attention_mask": dev["mask"], "position_ids": dev["positions"],
                   given: stand_in, "use_cache": True})
    if "cache_position" in tier.owner.signature.parameters:
        kwargs["cache_position"] = torch.arange(pmax, pmax + smax, device=device)
    if isinstance(kwargs.get("token_type_ids"), torch.Tensor):
        kwargs["token_type_ids"] = dev["types"]
    forward.capture = []
    try:
        result = call(**kwargs)
    finally:
        captured, forward.capture = forward.capture, None
    out = result[0] if isinstance(result, tuple) else result.last_hidden_state
    # Every position's output in the call's layout: prefix from the bank, the rest computed.
    if uniform:
        parts = ([tier.final_norm(plan.prefix_states[:, :hidden_size].to(out.dtype)).view(batch, pmax, -1)]
                 if pmax else [])
        full = torch.cat(parts + [out], dim=1)
    else:
        full = out.new_zeros((batch * seq, out.shape[-1]))
        if pmax:
            full.index_copy_(0, dev["prefix_dst"], tier.final_norm(plan.prefix_states[:, :hidden_size].to(out.dtype)))
        full.index_copy_(0, dev["suffix_dst"], out.reshape(batch * smax, -1).index_select(0, dev["suffix_src"]))
        full = full.view(batch, seq, -1)
    layers = [stand_in.layers[tier.layer_idx(p)] for p in range(len(tier.span))]
    # The computed tokens' K and V per block, [B * S, half] each (slots after the prefix).
    suffix_kv = [[t[:, :, pmax:].transpose(1, 2).reshape(batch * smax, half) for t in (layer.keys, layer.values)]
                 for layer in layers]
    cache = real if real is not None else (DynamicCache() if use_cache else None)
    if cache is not None:
        for position, layer in enumerate(layers):
            if uniform:
                cache.update(layer.keys, layer.values, tier.layer_idx(position))
                continue
            both = []
            for which in (0, 1):
                flat = suffix_kv[position][which].new_zeros((batch * seq, half))
                if pmax:
                    lo = hidden_size + position * tier.kv_width + which * half
                    flat.index_copy_(0, dev["prefix_dst"], plan.prefix_states[:, lo : lo + half].to(flat.dtype))
                flat.index_copy_(0, dev["suffix_dst"], suffix_kv[position][which].index_select(0, dev["suffix_src"]))
                both.append(flat.view(batch, seq, heads, -1).transpose(1, 2).contiguous())
            cache.update(both[0], both[1], tier.layer_idx(position))
    if plan.entries:
        last = captured[-1] if captured else None
        if last is None or last.shape[:2] != (batch, smax):
            tier.abort(plan)
        else:
            src = dev["store_src"]
            parts = [last.reshape(batch * smax, -1).index_select(0, src)]
            parts += [t.index_select(0, src) for kv in suffix_kv for t in kv]
            tier.commit_states(plan.entries, plan.store_n, dev["store_dst"], parts)
            plan.entries = []
    if isinstance(result, tuple):
        return (full, cache) + tuple(result[2:]) if len(result) > 1 else (full,)
    out_name = next((n for n in gate.KV_CACHE_NAMES if n in result), "cache")
    fields = {k: v for k, v in result.items() if k != out_name}
    fields["last_hidden_state"] = full
    if cache is not None:
        fields[out_name] = cache
    return type(result)(**fields)
