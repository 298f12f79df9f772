"""Decoders: a batch whose rows compute from their cached prefixes on (see `prefix`).

`plan` lays the batch out for the model: each row's suffix (its tokens after its cached prefix),
left-aligned in [B, S], and a KV cache of [B, Pmax] slots holding each row's cached prefix K/V
right-aligned (the rest masked). `suffix_forward` runs the model's own forward on that with the
rows' true position ids, then puts every position's output and K/V back in the call's layout and
writes the new pages.

Where every row has the same cached and computed lengths (`uniform`: a chat's next turn, a
prompt after a shared system prompt), the prefix is read (`ops.read_rows`) straight into one
[blocks, 2, B, heads, P + S, head dim] K/V tensor and a [B, P + S, D] output tensor, each block's
K and V contiguous, with room after the prefix: the model's cache layers then take the suffix's
K/V into that room (`_append_in_place`) instead of concatenating it onto a copy of the prefix,
and the new pages are written from the same tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from ...adapters import KV_CACHE_NAMES, kv_cache
from ...splice import give_kv
from . import plan as plans


@dataclass
class SuffixPlan(plans.Route):
    """A forward whose rows compute from their cached prefix on (`suffix_forward`)."""

    batch: int = 0
    seq: int = 0  # T of the call
    prefix: int = 0  # Pmax: KV slots before the suffix
    suffix: int = 0  # S: the longest suffix
    entries: list = field(default_factory=list)  # reserved entries this forward writes
    store_n: list = field(default_factory=list)  # their token counts
    dev: dict = field(default_factory=dict)  # device index tensors (see `plan`)
    uniform: bool = False  # every row starts at 0 with the same cached and computed lengths
    prefix_states: torch.Tensor | None = None  # [sum P, F]: the rows' cached prefix tokens, read at routing
    # (uniform: prefix_out [B, P + S, D] and prefix_kv [blocks, 2, B, heads, P + S, head dim] instead,
    # the arena's dtype, positions < P read at routing)
    prefix_out: torch.Tensor | None = None
    prefix_kv: torch.Tensor | None = None
    straddle: bool = False  # a page written holds cached tokens too (it replaces a partial page)


def plan(store, geometry, rows_, whole: list, entries: list, writes: tuple, seq: int, device) -> SuffixPlan:
    """Every row computes from its cached prefix on (a whole row: its last token, or its
    trailing padding), and then its trailing padding positions, which attend to the row's
    tokens but not to themselves (their mask is 0, as in the uncached call). `geometry`: the
    span's `adapters.Geometry`."""
    batch = rows_.batch
    arrays = getattr(store.index, "suffix_arrays", None) or functools.partial(suffix_arrays, store.index)
    parts, cached, pmax, smax, uniform, straddle = arrays(
        seq, rows_.host, rows_.start, rows_.n_real, rows_.covered, rows_.keyed, rows_.trailing,
        [e for f in rows_.found for e in f], [len(f) for f in rows_.found], entries, *writes)
    cached = cached.tolist()
    width = pmax + smax
    into_kv = uniform and pmax > 0  # (the prefix read into per-block K/V with room for the suffix)
    dev = plans.upload(parts, device)
    for name in ("ids", "positions", "types"):
        dev[name] = dev[name].view(batch, smax)
    dev["mask"] = dev["mask"].view(batch, width)
    states = out = kv = None
    if into_kv:
        out, kv = _prefix_tensors(store, geometry, batch, pmax, smax, dev["prefix_src"])
    elif pmax:
        n, features = len(dev["prefix_src"]), store.arena.features
        states = store.arena.read(dev["prefix_src"], store.read_buffer(n * features)[: n * features].view(n, features))
    prefix_rows = sum(1 for r in range(batch) if cached[r] and not whole[r])
    computed = sum(rows_.n_real) - sum(cached)
    return SuffixPlan(served=sum(whole), prefix_rows=prefix_rows, tokens=(sum(cached), computed), batch=batch,
                      seq=seq, prefix=pmax, suffix=smax, entries=entries, store_n=writes[2].tolist(), dev=dev,
                      uniform=uniform, prefix_states=states, prefix_out=out, prefix_kv=kv, straddle=straddle)


def suffix_arrays(index, seq: int, host: np.ndarray, start, n_real, covered, keyed, trailing, found, sizes,
                  entries, w_rows, w_at, w_n) -> tuple:
    """(parts: the plan's host arrays by name, cached: int64 [B] prefix tokens per row, Pmax, S,
    uniform, straddle): the reference of the C++ index's `suffix_arrays` (csrc/suffix_arrays.cpp),
    numpy over the batch. `host` int64 [4, B, T]; per row its span's start, real tokens, tokens
    covered by its entries found, whether it is keyed, its trailing padding, and how many of
    `found` (every row's entries found, row after row) are its; `entries` reserved, written from
    (w_rows, w_at, w_n): a value per entry, its row, first token in the row's span, ntokens."""
    s, n, t, sizes = (np.asarray(x, dtype=np.int64) for x in (start, n_real, trailing, sizes))
    batch = len(n)
    p = np.where(np.asarray(keyed, dtype=bool) & (sizes > 0), np.minimum(covered, n - (t == 0)), 0)
    real_len = n - p
    k = real_len + t
    pmax, smax = int(p.max()), max(int(k.max()), 1)
    width = pmax + smax
    uniform = bool(seq == width and not s.any() and (p == pmax).all() and (k == smax).all())
    # Row r's suffix: its tokens from s + p on, k of them; after them (up to S) its last id again
    # and positions counting on (masked slots), types 0.
    col = np.arange(smax)[None, :]
    at = (s + p)[:, None] + np.minimum(col, np.maximum(k - 1, 0)[:, None])
    live, some = col < k[:, None], (k > 0)[:, None]
    by_row = np.arange(batch)[:, None]
    take = lambda a: a[by_row, at]  # (each row's suffix columns: plain indexing, not np.take_along_axis)
    last_position = host[2][by_row, (s + p + np.maximum(k - 1, 0))[:, None]]
    parts = {"ids": np.where(some, take(host[0]), 0),
             "positions": np.where(some, np.where(live, take(host[2]), last_position + col - k[:, None] + 1), 0),
             "types": np.where(live, take(host[3]), 0)}
    cols = np.arange(width)[None, :]
    parts["mask"] = ((cols >= (pmax - p)[:, None]) & (cols < (pmax + real_len)[:, None])).astype(np.int64)
    rows = np.arange(batch, dtype=np.int64)
    held_n = np.where(p > 0, covered, 0)  # (the tokens of a prefix row's entries, one row after another)
    mine = np.repeat(p > 0, sizes)
    held = index.token_rows(np.asarray(found, dtype=np.int64)[mine]) if mine.any() else np.zeros(0, dtype=np.int64)
    parts["prefix_src"] = held[plans.runs((np.cumsum(held_n) - held_n)[p > 0], p[p > 0])]
    parts["prefix_slot"] = plans.runs(rows * pmax + pmax - p, p)
    parts["prefix_dst"] = plans.runs(rows * seq + s, p)
    parts["suffix_src"] = plans.runs(rows * smax, k)
    parts["suffix_dst"] = plans.runs(rows * seq + s + p, k)
    straddle = False
    into_kv = uniform and pmax > 0
    if len(entries):
        # A reserved page of row r covers its tokens [at, at + n): computed ones, and where it
        # replaces a partial page that ended the row's cached prefix, cached ones before them
        # (`store_src` then indexes those cached tokens first, `store_prefix` their rows among
        # the prefix states read, then the computed tokens; with `into_kv`, token t of row r is
        # r * (P + S) + t of the prefix tensors, which hold the computed tokens too by then).
        token, row = plans.runs(w_at, w_n), np.repeat(np.asarray(w_rows, dtype=np.int64), w_n)
        before = token < p[row]
        straddle = bool(before.any()) and not into_kv
        computed = row * width + token if into_kv else row * smax + token - p[row]
        if straddle:
            parts["store_prefix"] = ((np.cumsum(p) - p)[row] + token)[before]
            computed = np.where(before, np.cumsum(before) - 1, computed + int(before.sum()))
        parts["store_src"] = computed
        parts["store_dst"] = index.token_rows(entries)
    return parts, p, pmax, smax, uniform, straddle


def _prefix_tensors(store, g, batch: int, pmax: int, smax: int, token_rows: torch.Tensor):
    """(output [B, P + S, D], K/V [blocks, 2, B, heads, P + S, head dim]) in the arena's dtype, in
    this thread's `store.read_buffer`, positions < P read from the arena's `token_rows` (int64
    [B * P], row after row)."""
    n_out = batch * (pmax + smax) * g.hidden
    shape = (g.blocks, 2, batch, g.kv_heads, pmax + smax, g.kv_width // 2 // g.kv_heads)
    n_kv = g.blocks * g.kv_width * batch * (pmax + smax)
    buf = store.read_buffer(n_out + n_kv)
    out, kv = buf[:n_out].view(batch, pmax + smax, g.hidden), buf[n_out : n_out + n_kv].view(shape)
    store.arena.read_tokens(token_rows, out, kv)
    return out, kv


def _prefix_cache(tier, plan: SuffixPlan, kv_dtype: torch.dtype, cache=None):
    """A DynamicCache (`cache`, empty, or a new one) holding every span block's cached prefix K/V,
    [B, heads, Pmax, head dim], zeros where a row's prefix is shorter than Pmax (those slots are
    masked)."""
    from transformers import DynamicCache

    g, dev = tier.geometry, plan.dev
    batch, pmax, half = plan.batch, plan.prefix, g.kv_width // 2
    cache = DynamicCache() if cache is None else cache
    if plan.prefix_kv is not None:
        from transformers.cache_utils import DynamicLayer

        kv = plan.prefix_kv if plan.prefix_kv.dtype == kv_dtype else plan.prefix_kv.to(kv_dtype)
        # (every block's views in four calls: indexing them block by block costs µs per view)
        keys, values = kv[:, 0].unbind(0), kv[:, 1].unbind(0)
        held_keys, held_values = kv[:, 0, :, :, :pmax].unbind(0), kv[:, 1, :, :, :pmax].unbind(0)
        for position in range(g.blocks):
            give_kv(cache, held_keys[position], held_values[position], tier.layer_idx(position), kv_dtype)
            layer = cache.layers[tier.layer_idx(position)]
            if type(layer) is DynamicLayer and layer.keys is held_keys[position]:  # (give_kv kept the view)
                _append_in_place(layer, keys[position], values[position], pmax)
        return cache
    if pmax:  # every block's K and V [B, heads, Pmax, head dim]: views of one [B * Pmax, blocks x K|V] block
        flat = plan.prefix_states[:, g.hidden : g.hidden + g.blocks * g.kv_width].to(kv_dtype)
        if not plan.uniform:  # (uniform: the cached K/V are views of the states read)
            flat = flat.new_zeros((batch * pmax, flat.shape[1])).index_copy_(0, dev["prefix_slot"], flat)
        kv = flat.view(batch, pmax, g.blocks, 2, g.kv_heads, -1).permute(2, 3, 0, 4, 1, 5)
    else:
        empty = torch.zeros(batch, g.kv_heads, 0, half // g.kv_heads, dtype=kv_dtype, device=dev["ids"].device)
        kv = [(empty, empty)] * g.blocks
    for position in range(g.blocks):
        # (Views of the read buffer: the suffix's own update replaces them with its concatenation.)
        give_kv(cache, kv[position][0], kv[position][1], tier.layer_idx(position), kv_dtype)
    return cache


def _append_in_place(layer, keys: torch.Tensor, values: torch.Tensor, filled: int) -> None:
    """`layer` (a DynamicLayer holding keys/values[:, :, :filled]) takes its next update's K/V
    into keys/values[:, :, filled:] in place of concatenating them onto a copy: the same tensor,
    with no copy of the prefix. Once: the override (an attribute of this layer only) goes with
    that update, or with `_plain_again` after the forward; K/V of another shape or dtype, or a
    layer whose K/V were replaced meanwhile, concatenate as ever."""
    held = layer.keys
    room = (*keys.shape[:2], keys.shape[2] - filled, keys.shape[3])  # (what the suffix's K and V must be)

    def update(key_states, value_states, *args, **kwargs):
        del layer.update
        if not (key_states.shape == room and value_states.shape == room and layer.keys is held
                and key_states.dtype == keys.dtype and value_states.dtype == values.dtype):
            return layer.update(key_states, value_states, *args, **kwargs)
        keys[:, :, filled:].copy_(key_states)
        values[:, :, filled:].copy_(value_states)
        layer.keys, layer.values = keys, values
        return keys, values

    layer.update = update


def _plain_again(cache) -> None:
    """Drop what `_append_in_place` left on the cache's layers (a layer the forward did not update)."""
    for layer in getattr(cache, "layers", ()):
        layer.__dict__.pop("update", None)


def _run(tier, plan: SuffixPlan, call, forward, stand_in):
    """The model's own forward on the suffixes, the stand-in as its KV cache; (result, captured
    last-block outputs)."""
    arguments, dev = call.arguments, plan.dev
    # The stand-in goes under the name the caller used: the model's own forward then does with
    # it what it does with the caller's (transformers warns that `past_key_values` is deprecated).
    given = next((n for n in KV_CACHE_NAMES if arguments.get(n) is not None), tier.geometry.cache_name)
    kwargs = {k: v for k, v in arguments.items() if k not in KV_CACHE_NAMES}
    kwargs.update({"input_ids": dev["ids"], "attention_mask": dev["mask"], "position_ids": dev["positions"],
                   given: stand_in, "use_cache": True})
    if tier.takes_cache_position:
        kwargs["cache_position"] = torch.arange(plan.prefix, plan.prefix + plan.suffix, device=dev["ids"].device)
    if isinstance(kwargs.get("token_type_ids"), torch.Tensor):
        kwargs["token_type_ids"] = dev["types"]
    call.capture = []
    try:
        return forward(**kwargs), call.capture
    finally:
        call.capture = None
        _plain_again(stand_in)


def _outputs(tier, plan: SuffixPlan, out: torch.Tensor) -> torch.Tensor:
    """[B, T, D]: every position's output in the call's layout, prefix from the bank (the final
    norm applied, as the model does), the rest computed."""
    dev, hidden = plan.dev, tier.geometry.hidden
    batch, pmax = plan.batch, plan.prefix
    norm = tier.geometry.final_norm
    if plan.uniform:
        parts = [norm(plan.prefix_out[:, :pmax].to(out.dtype))] if pmax else []
        return torch.cat(parts + [out], dim=1)
    full = out.new_zeros((batch * plan.seq, out.shape[-1]))
    if pmax:
        full.index_copy_(0, dev["prefix_dst"], norm(plan.prefix_states[:, :hidden].to(out.dtype)))
    full.index_copy_(0, dev["suffix_dst"], out.reshape(batch * plan.suffix, -1).index_select(0, dev["suffix_src"]))
    return full.view(batch, plan.seq, -1)


def _fill_cache(tier, plan: SuffixPlan, cache, layers: list, suffix_kv: list) -> None:
    """Give the caller's KV cache every row's K/V (cached prefix and computed suffix) in the call's layout."""
    g, dev = tier.geometry, plan.dev
    half = g.kv_width // 2
    for position, layer in enumerate(layers):
        if plan.uniform:
            give_kv(cache, layer.keys, layer.values, tier.layer_idx(position), layer.keys.dtype)
            continue
        both = []
        for which in (0, 1):
            flat = suffix_kv[position][which].new_zeros((plan.batch * plan.seq, half))
            if plan.prefix:
                lo = g.hidden + position * g.kv_width + which * half
                flat.index_copy_(0, dev["prefix_dst"], plan.prefix_states[:, lo : lo + half].to(flat.dtype))
            flat.index_copy_(0, dev["suffix_dst"], suffix_kv[position][which].index_select(0, dev["suffix_src"]))
            both.append(flat.view(plan.batch, plan.seq, g.kv_heads, -1).transpose(1, 2))
        give_kv(cache, both[0], both[1], tier.layer_idx(position), both[0].dtype)


def _plain_and_empty(cache) -> bool:
    """`cache` is an empty DynamicCache of full-attention layers (none that keeps a window only)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return (type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)
            and cache.get_seq_length() == 0)


def suffix_forward(tier, plan: SuffixPlan, call, forward):
    """Run the model on every row's suffix against its cached prefix; return what the uncached
    call returns (hidden states of every position, the caller's KV cache filled). `call`: the
    cache's record of this forward; `forward(**kwargs)`: the model's own forward."""
    from transformers import DynamicCache

    batch, smax, half = plan.batch, plan.suffix, tier.geometry.kv_width // 2
    real = kv_cache(call.arguments)
    # The caller's own empty cache (generate's prefill) runs as the stand-in where the rows share
    # one layout: it ends up holding what the uncached call leaves in it, with no copy after.
    adopt = plan.uniform and _plain_and_empty(real)
    stand_in = _prefix_cache(tier, plan, tier.kv_dtype(call.switches), real if adopt else None)
    result, captured = _run(tier, plan, call, forward, stand_in)
    out = result[0] if isinstance(result, tuple) else result.last_hidden_state
    full = _outputs(tier, plan, out)
    layers = [stand_in.layers[tier.layer_idx(p)] for p in range(tier.geometry.blocks)]
    use_cache = call.arguments.get("use_cache")
    if use_cache is None:
        use_cache = tier.use_cache_default
    if adopt or (real is None and use_cache and plan.uniform):
        cache = stand_in  # (uniform: it holds every row's K/V in the call's own layout already)
    else:
        cache = real if real is not None else (DynamicCache() if use_cache else None)
        if cache is not None:
            # The computed tokens' K and V per block, [B * S, half] each (slots after the prefix).
            suffix_kv = [[t[:, :, plan.prefix :].transpose(1, 2).reshape(batch * smax, half)
                          for t in (layer.keys, layer.values)] for layer in layers]
            _fill_cache(tier, plan, cache, layers, suffix_kv)
    if plan.entries:
        last = captured[-1] if captured else None
        if last is None or last.shape[:2] != (batch, smax):
            tier.release(plan)
        else:
            src = plan.dev["store_src"]
            # A token's row: the output, then per block K then V [B, heads, S, head dim] (`ops.write_rows`).
            if plan.prefix_out is not None:  # (the prefix tensors, the computed outputs after it: P + S tokens a row)
                plan.prefix_out[:, plan.prefix :].copy_(last)
                pieces = [plan.prefix_out.unsqueeze(1)] + [t for layer in layers for t in (layer.keys, layer.values)]
            else:
                pieces = [last.unsqueeze(1)] + [t[:, :, plan.prefix :] for layer in layers for t in (layer.keys, layer.values)]
            if plan.straddle:  # (the cached tokens of the partial pages these pages replace, then the computed ones)
                dtype = plan.prefix_states.dtype
                cached = plan.prefix_states.index_select(0, plan.dev["store_prefix"])
                computed = torch.cat([p.to(dtype).transpose(1, 2).reshape(batch * smax, -1) for p in pieces], -1)
                source = torch.cat([cached, computed])
                pieces = [source.view(source.shape[0], 1, 1, -1)]  # (token src[i] of [N, 1, 1, F]: row src[i])
            tier.commit(plan, plan.dev["store_dst"], pieces, src)
    if isinstance(result, tuple):
        return (full, cache) + tuple(result[2:]) if len(result) > 1 else (full,)
    out_name = next((n for n in KV_CACHE_NAMES if n in result), "cache")
    fields = {k: v for k, v in result.items() if k != out_name}
    fields["last_hidden_state"] = full
    if cache is not None:
        fields[out_name] = cache
    return type(result)(**fields)
