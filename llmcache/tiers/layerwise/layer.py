"""The per-block tier's cached block (the paper's design): banks looked up by SimHash fingerprint.

Used when `CacheConfig.threshold` is set. Per forward each row has a tag, a key and a fingerprint
(`context.ForwardContext`). Per cached block: look the rows up (exact hash, then Hamming
radius), run the block on the rows that missed only, merge bank rows and computed rows with
`gather_with_mask`, and insert the computed rows. Decoder blocks
store each row's K and V beside its hidden state and write the merged K/V into the model's
DynamicCache.

The raw `threshold` tier is an experts' tool: semantic hits change outputs and it keeps no error
bound (nothing measures or limits how far a served state is from the true one). The bounded tier
is `llmcache.Semantic` (llmcache/tiers/verified.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ... import ops
from ...ops.simhash import simhash_pooled_unchecked
from ...splice import CacheParam, KVStandIn, give_kv, kv_split, per_position, slice_rows
from .context import ForwardContext, pixel_context
from .ring_buffer import RingBuffer


@dataclass
class Rows:
    """Which rows of a batch a cached layer runs, and how its output is merged."""

    compute: torch.Tensor  # bool [B]: rows the block runs on
    n_compute: int
    rows: torch.Tensor  # int64 [M]: those rows, ascending
    slot: torch.Tensor | None = None  # int64 [B]: the bank slot a served row reads, -1 where computed
    row_of: torch.Tensor | None = None  # int64 [B]: a computed row's place among `rows` (a repeat: its source's)
    sliced: dict = field(default_factory=dict)  # id(argument) -> (argument, its `rows`): each sliced once


@dataclass
class LayerStats:
    """Counters of one cached layer (host integers and seconds)."""

    layer: int
    lookups: int = 0
    hits: int = 0
    exact_hits: int = 0
    semantic_hits: int = 0
    insertions: int = 0
    evictions: int = 0
    fingerprint_s: float = 0.0
    lookup_s: float = 0.0
    bytes: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class CachedLayer:
    """The per-block tier's cached forward of one block; `module.forward` points at `self.forward`."""

    def __init__(self, owner, index: int, position: int, module: nn.Module):
        self.owner = owner
        self.index = index
        self.module = module
        self.original_forward = module.forward
        cfg = owner.config
        self.threshold = cfg.layerwise.layer_threshold(position)
        self.radius = ops.hamming_radius(self.threshold, cfg.num_bits)
        self.bank: RingBuffer | None = None
        self.stats = LayerStats(layer=index)
        self.cache_param = CacheParam.of(self.original_forward)
        if owner.adapter.decoder and self.cache_param.name is None:
            raise ValueError(f"{type(module).__name__}.forward takes no KV cache argument: cannot cache a decoder block")
        self._kv_layout = None  # (kv heads, head dim) of this block's K/V, once seen
        self._kv_dtypes: dict = {}  # model state (Call.switches) -> the dtype its K/V are computed in

    def _allocate(self, entry: torch.Tensor) -> None:
        """This layer's bank, sized for entries like `entry` ([M, T, *F]: max_tokens x F per slot)."""
        owner = self.owner
        cfg = owner.config
        entry_shape, dtype, device = (cfg.layerwise.max_tokens,) + tuple(entry.shape[2:]), entry.dtype, entry.device
        words = cfg.num_bits // 64
        capacity = cfg.capacity or 1024
        if cfg.max_bytes is not None:
            share = cfg.max_bytes // len(owner.layer_ids)
            capacity = min(capacity, share // RingBuffer.entry_bytes(entry_shape, dtype, words))
            if capacity < 1:
                raise ValueError(
                    f"CacheConfig.max_bytes = {cfg.max_bytes} leaves {share} bytes per layer, less than one entry "
                    f"({RingBuffer.entry_bytes(entry_shape, dtype, words)} bytes): raise it or lower max_tokens"
                )
        self.bank = RingBuffer(capacity, words, entry_shape, dtype, device, cfg.layerwise.eviction,
                               cfg.layerwise.staleness_half_life,
                               cfg.backend)
        self.stats.bytes = self.bank.nbytes

    def _codes(self, ctx: ForwardContext, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.owner.config.layerwise.fingerprint == "embeddings":
            return ctx.codes
        start = time.perf_counter()
        codes = simhash_pooled_unchecked(hidden, ctx.mask, self.owner.planes, backend=self.owner.config.backend)
        self.stats.fingerprint_s += time.perf_counter() - start
        return codes


    def _run(self, hidden, args, kwargs, route: Rows | None, batch, ctx):
        """Run the original block on `route.rows` (None: all); returns (output, hidden_out [M, T, H], capture)."""
        if route is not None:
            rows = route.rows
            hidden = hidden.index_select(0, rows)
            args = slice_rows(args, rows, batch, route.sliced)
            kwargs = {k: slice_rows(v, rows, batch, route.sliced) for k, v in kwargs.items()}
        capture = None
        if self.owner.adapter.decoder:
            capture = KVStandIn(ctx.kv_cache)
            args, kwargs = self.cache_param.hand(capture, args, kwargs)
        output = self.original_forward(hidden, *args, **kwargs)
        out = output[0] if isinstance(output, tuple) else output
        return output, out, capture

    @staticmethod
    def _entry(out: torch.Tensor, capture) -> torch.Tensor:
        """[M, T, F]: the hidden state, and for decoders K and V flattened per position."""
        if capture is None or capture.keys is None:
            return out
        return torch.cat([out, per_position(capture.keys).to(out.dtype), per_position(capture.values).to(out.dtype)],
                         dim=-1)

    def _write_kv(self, ctx: ForwardContext, entry: torch.Tensor, capture, hidden_size: int) -> None:
        """Give the model's KV cache the merged K and V of every row (decoder prefill)."""
        switches = self.owner.current().switches
        if capture is not None and capture.keys is not None:
            self._kv_layout = (capture.keys.shape[1], capture.keys.shape[3])
            self._kv_dtypes[switches] = capture.keys.dtype
        if ctx.kv_cache is None or self._kv_layout is None:
            return
        heads, _ = self._kv_layout
        dtype = self._kv_dtypes.get(switches, entry.dtype)
        give_kv(ctx.kv_cache, *kv_split(entry[..., hidden_size:], heads), self.index, dtype)

    @staticmethod
    def _pack(output, hidden: torch.Tensor):
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


    # ---- the cached forward ------------------------------------------------------------
    def forward(self, hidden_states, *args, **kwargs):
        call = self.owner.current()
        route = call.route if call is not None else None
        if route is not None and route.context is None and call.pixels is not None and hidden_states.dim() == 3:
            route.context = pixel_context(self.owner, call.header, call.pixels, hidden_states, route.pixel_codes)
        ctx = route.context if route is not None else None
        if ctx is None:
            return self.original_forward(hidden_states, *args, **kwargs)
        # One lock from lookup to insert: a slot looked up must not be overwritten by another
        # thread's insert before it is read. Threads interleave block by block.
        with self.owner.lock:
            return self._cached_forward(ctx, hidden_states, args, kwargs)

    def _cached_forward(self, ctx, hidden_states, args, kwargs):
        if hidden_states.dim() != 3 or hidden_states.shape[:2] != ctx.mask.shape:
            return self.original_forward(hidden_states, *args, **kwargs)
        cfg = self.owner.config
        batch = ctx.batch
        hidden_size = hidden_states.shape[-1]
        self.stats.lookups += ctx.n_cacheable
        codes = self._codes(ctx, hidden_states)
        slot, served_semantic = self._lookup(ctx, codes)
        route = self._route(ctx, slot, hidden_states)
        n_compute = route.n_compute
        if n_compute == batch:
            output, out, capture = self._run(hidden_states, args, kwargs, None, batch, ctx)
            merged = self._entry(out, capture)
        else:
            output, capture = None, None
            if n_compute:
                output, out, capture = self._run(hidden_states, args, kwargs, route, batch, ctx)
                computed = self._entry(out, capture)
                if self.bank is None:  # an empty cache whose batch repeats a row: the first insert comes next
                    self._allocate(computed)
                computed = computed.to(self.bank.values.dtype)
            else:
                computed = self.bank.values.new_empty((0, hidden_states.shape[1]) + tuple(self.bank.values.shape[2:]))
            self._count_hits(route.compute, served_semantic, batch - n_compute)
            merged = self.bank.gather(route.slot, computed, route.row_of, ctx.align_end)
            if cfg.layerwise.mode == "residual":
                merged = merged.clone()
                merged[..., :hidden_size] += hidden_states * (~route.compute).view(-1, 1, 1).to(merged.dtype)
        self._write_kv(ctx, merged, capture, hidden_size)
        if n_compute:
            self._insert(ctx, hidden_states, merged, hidden_size, codes, route.compute)
        if n_compute == batch:
            return output
        hidden = merged[..., :hidden_size].to(hidden_states.dtype)
        return hidden if output is None else self._pack(output, hidden)

    @staticmethod
    def _route(ctx: ForwardContext, slot: torch.Tensor, hidden_states: torch.Tensor) -> Rows:
        """The rows to run: misses and rows whose input carries NaN/Inf (computed and, being
        non-finite, never stored); a repeat of an earlier row of the batch that missed takes that
        row's computed states instead."""
        compute = slot < 0
        if ctx.n_repeats:
            compute = compute & ctx.own
        # One host read for the count and a finiteness check of the whole input: only a
        # non-finite total needs the per-row check.
        counted, total = torch.stack([compute.sum(dtype=torch.float32), hidden_states.sum(dtype=torch.float32)]).tolist()
        n_compute = int(counted)
        if not math.isfinite(total):
            compute = compute | ~torch.isfinite(hidden_states.sum(dim=(1, 2), dtype=torch.float32))
            n_compute = int(compute.sum())
        if n_compute == ctx.batch:
            return Rows(compute, n_compute, ctx.rows)
        row_of = (compute.long().cumsum(0) - 1).clamp_min(0)
        if ctx.n_repeats:
            row_of = row_of.index_select(0, torch.where(compute, ctx.rows, ctx.source))
        return Rows(compute, n_compute, compute.nonzero().flatten(), torch.where(compute, -1, slot), row_of)

    def _lookup(self, ctx: ForwardContext, codes):
        """(slot [B] or -1, semantic-hit mask or None) for this layer's bank."""
        batch = ctx.batch
        device = ctx.tags.device
        slot = torch.full((batch,), -1, dtype=torch.int64, device=device)
        if self.bank is None:
            return slot, None
        cfg = self.owner.config
        start = time.perf_counter()
        served_semantic = None
        with self.owner.lock:
            if cfg.layerwise.exact:
                slot = self.bank.lookup_exact(ctx.keys, ctx.tags)
            if codes is not None:
                near, _ = self.bank.lookup(codes, ctx.tags, self.radius)
                served_semantic = (slot < 0) & (near >= 0)
                slot = torch.where(slot >= 0, slot, near)
        self.stats.lookup_s += time.perf_counter() - start
        return slot, served_semantic

    def _count_hits(self, compute, served_semantic, n_served: int) -> None:
        self.stats.hits += n_served
        n_semantic = int((served_semantic & ~compute).sum()) if served_semantic is not None else 0
        self.stats.semantic_hits += n_semantic
        self.stats.exact_hits += n_served - n_semantic


    def _insert(self, ctx, hidden_in, entry, hidden_size, codes, rows_mask) -> None:
        """Store the freshly computed rows that may be cached (residual mode: their layer update)."""
        cfg = self.owner.config
        rows = (ctx.store & rows_mask).nonzero().flatten()
        if rows.numel() == 0:
            return
        if cfg.layerwise.mode == "residual":
            entry = entry.clone()
            entry[..., :hidden_size] -= hidden_in.to(entry.dtype)
        if codes is None:
            codes = ctx.zero_codes(cfg.num_bits // 64)
        if self.bank is None:
            self._allocate(entry)
        evicted = self.bank.evictions
        slots = self.bank.insert(codes, ctx.keys, ctx.tags, entry.to(self.bank.values.dtype), ctx.align_end, rows,
                                 dedupe=False)
        self.stats.insertions += slots.numel()
        self.stats.evictions += self.bank.evictions - evicted
