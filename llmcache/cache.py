"""The layer cache spliced into a model: per-forward context, and the per-block cached forward.

Per forward pass (a pre-hook on the base model) every row gets:
  * a tag: token count, namespace and padding side packed in one int64; an entry only ever
    answers rows with the same tag (same shape, same tenant);
  * an exact key: a 64-bit hash of its token ids in order;
  * a SimHash fingerprint of the mean of its input token embeddings (the paper's), computed by
    a hook on the input embedding, when the semantic tier is on.
Per cached block: look the rows up (exact tier, then semantic tier), run the block on the rows
that missed only (a sub-batch), merge bank rows and computed rows with `gather_with_mask`, and
insert the computed rows. For decoder blocks the bank stores each row's K and V beside its
hidden state, and writes the merged K/V into the model's DynamicCache, so `generate()` keeps
decoding from correct KV entries; decode steps (past length > 0) bypass the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import ops
from .config import CacheConfig
from .ops.simhash import simhash_pooled_unchecked
from .ring_buffer import RingBuffer, finite_rows, first_index, make_tag, tag_fits

_namespace_stack = threading.local()


def current_namespace() -> str:
    stack = getattr(_namespace_stack, "names", None)
    return stack[-1] if stack else ""


@contextlib.contextmanager
def namespace(name: str):
    """Rows computed inside only match entries inserted under the same `name` (tenant isolation).

    Namespaces nest (the innermost wins) and are per thread. The default namespace is "".
    """
    if not isinstance(name, str):
        raise TypeError(f"namespace name must be a str, got {type(name).__name__}")
    stack = getattr(_namespace_stack, "names", None)
    if stack is None:
        stack = _namespace_stack.names = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping arithmetic; logical shifts through masks)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def token_keys(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 [B]: a hash of each row's real (token id, position id) pairs (padding ignored).

    Positions count because a left-padded row without explicit position_ids sits at shifted
    positions, which changes its states in models with absolute or rotary positions.
    """
    real = mask != 0
    mixed = _mix64(ids.long() * 0x9E3779B97F4A7C15 + positions.long() * 0x632BE59BD9B4E019 + 0x2545F4914F6CDD1D)
    return _mix64((mixed * real).sum(1))


@dataclass
class Plan:
    """Lockstep: one forward's lookup and insert, made by its first cached layer on an index that
    the other cached layers' banks share. The others reuse `slot` instead of looking up, and write
    their states for `rows` into `slots` instead of inserting."""

    index: RingBuffer  # the shared index
    slot: torch.Tensor  # int64 [B]: the hit slot per row, -1 for a miss
    rows: torch.Tensor  # int64 [M]: rows inserted by the first layer
    slots: torch.Tensor  # int64 [M]: their slots
    evictions: int  # valid entries that insert overwrote
    _host_slots: np.ndarray | None = None

    def host_slots(self) -> np.ndarray:
        """`slots` on the host, copied once per forward for all the layers that write them."""
        if self._host_slots is None:
            self._host_slots = self.slots.cpu().numpy()
        return self._host_slots


@dataclass
class Route:
    """Which rows of a batch a cached layer runs, and how its output is merged. In lockstep the
    first cached layer's route serves every other cached layer of the forward: they hit on the
    same slots, so they compute the same rows (see `CachedLayer._cached_forward`)."""

    compute: torch.Tensor  # bool [B]: rows the block runs on
    n_compute: int
    rows: torch.Tensor  # int64 [M]: those rows, ascending
    slot: torch.Tensor | None = None  # int64 [B]: the bank slot a served row reads, -1 where computed
    row_of: torch.Tensor | None = None  # int64 [B]: a computed row's place among `rows` (a repeat: its source's)
    sliced: dict = field(default_factory=dict)  # id(argument) -> (argument, its `rows`): each sliced once


@dataclass
class ForwardContext:
    """What one forward pass of the base model knows about its rows."""

    mask: torch.Tensor  # [B, T] 1 = token
    tags: torch.Tensor  # int64 [B]; negative = never cached
    keys: torch.Tensor  # int64 [B]
    cacheable: torch.Tensor  # bool [B]
    store: torch.Tensor  # bool [B]: cacheable, and the first row of the batch with its key
    rows: torch.Tensor  # int64 [B]: 0..B-1
    source: torch.Tensor  # int64 [B]: a cacheable row repeating an earlier row's key: that row; else itself
    own: torch.Tensor  # bool [B]: source == rows
    n_repeats: int  # rows with source != themselves
    align_end: bool  # left padding
    codes: torch.Tensor | None = None  # int64 [B, W] input-embedding fingerprints
    kv_cache: object | None = None  # the model's DynamicCache, when decoding with one
    n_cacheable: int = 0
    plan: Plan | None = None  # lockstep: what the first cached layer decided, for the others
    route: Route | None = None  # lockstep: the first cached layer's routing, for the others
    locked: bool = False  # this forward holds the model's lock from begin to end (lockstep)
    broken: bool = False  # a cached layer ran uncached: later layers must not insert (lockstep)
    _zero_codes: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    def zero_codes(self, words: int) -> torch.Tensor:
        """int64 [B, words] of zeros: the codes stored when the semantic tier is off."""
        if self._zero_codes is None or self._zero_codes.shape[1] != words:
            self._zero_codes = torch.zeros(self.batch, words, dtype=torch.int64, device=self.mask.device)
        return self._zero_codes


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
    verified: int = 0
    divergence_evictions: int = 0
    mean_divergence: float = 0.0
    semantic_enabled: bool = True
    fingerprint_s: float = 0.0
    lookup_s: float = 0.0
    verify_s: float = 0.0
    bytes: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class _CapturingKV:
    """Stands in for the model's KV cache while a block runs on a sub-batch: records K and V."""

    def __init__(self, real):
        self.real = real
        self.keys = self.values = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys, self.values = key_states, value_states
        return key_states, value_states

    def __getattr__(self, name):
        return getattr(self.real, name)


def _slice_rows(value, rows: torch.Tensor, batch: int, memo: dict):
    """Rows of every batch-major tensor (ndim >= 2, size(0) == batch) in an argument tree. `memo`
    keeps each slice for `rows`: the layers of one forward pass the same masks to every block."""
    if isinstance(value, torch.Tensor):
        if value.dim() < 2 or value.shape[0] != batch:
            return value
        seen = memo.get(id(value))
        if seen is None or seen[0] is not value:
            seen = memo[id(value)] = (value, value.index_select(0, rows))
        return seen[1]
    if isinstance(value, tuple):
        return tuple(_slice_rows(v, rows, batch, memo) for v in value)
    if isinstance(value, list):
        return [_slice_rows(v, rows, batch, memo) for v in value]
    return value


@dataclass
class ModelCache:
    """Everything `accelerate` attaches to one model (as `model._llmcache`)."""

    config: CacheConfig
    adapter: object
    base: nn.Module
    layer_ids: list[int]
    planes: torch.Tensor
    layers: dict = field(default_factory=dict)  # block index -> CachedLayer
    hooks: list = field(default_factory=list)
    namespaces: dict = field(default_factory=lambda: {"": 0})
    lock: threading.RLock = field(default_factory=threading.RLock)
    local: threading.local = field(default_factory=threading.local)
    fingerprint_s: float = 0.0
    forwards: int = 0
    bypassed: bool = False  # llmcache.bypass: run uncached, banks kept
    shared_index: RingBuffer | None = None  # lockstep: the index every cached layer's bank shares

    @property
    def context(self) -> ForwardContext | None:
        stack = getattr(self.local, "contexts", None)
        return stack[-1] if stack else None

    def _push(self, ctx: ForwardContext | None) -> None:
        """Contexts stack per thread, so a forward nested in another (its own begin/end) leaves
        the outer one's context, and lock, as they were."""
        if getattr(self.local, "contexts", None) is None:
            self.local.contexts = []
        self.local.contexts.append(ctx)

    def namespace_id(self, name: str) -> int:
        with self.lock:
            return self.namespaces.setdefault(name, len(self.namespaces))

    def semantic_on(self) -> bool:
        return self.config.threshold is not None

    @property
    def lockstep(self) -> bool:
        """With the exact tier alone every cached layer hits and inserts the same rows, so the
        layers share one index: the first cached layer of a forward looks up and inserts, the
        others reuse its decision and only write their own states. Such a forward holds the
        model's lock from begin to end (the others' reuse must not see another thread's insert)."""
        return self.config.threshold is None

    # ---- per forward -------------------------------------------------------------------
    def begin(self, input_ids, attention_mask, kv_cache, position_ids=None) -> None:
        """Push the context of one base-model forward (None: this forward runs uncached)."""
        self._push(None)
        if self.bypassed or input_ids is None or self.base.training or input_ids.dim() != 2:
            return
        if kv_cache is not None and (
            not hasattr(kv_cache, "get_seq_length") or kv_cache.get_seq_length() > 0 or not _is_dynamic(kv_cache)
        ):
            return  # a decode step (or a cache type whose update we cannot stand in for)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        if mask.dim() != 2 or mask.shape != input_ids.shape:
            return
        batch, seq = input_ids.shape
        if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] != seq:
            position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0)
        positions = position_ids.expand(batch, seq)
        ntokens = (mask != 0).sum(1)
        left_padded = bool(((mask[:, 0] == 0) & (mask[:, -1] != 0)).any())
        cfg = self.config
        cacheable = (ntokens > 0) & (ntokens <= cfg.max_tokens)
        first = torch.where(mask != 0, torch.arange(seq, device=mask.device), seq).amin(1).clamp_max(seq - 1)
        first_position = positions.gather(1, first.unsqueeze(1)).squeeze(1)
        cacheable &= tag_fits(first_position, ntokens)
        ns = self.namespace_id(current_namespace())
        tags = make_tag(ns, first_position.clamp_min(0), ntokens, left_padded)
        never = -1 - torch.arange(mask.shape[0], device=mask.device)
        tags = torch.where(cacheable, tags, never)
        keys = token_keys(input_ids, mask, positions)
        # A cacheable row repeating an earlier row of the same batch (same ids at the same positions)
        # is never computed or stored itself: every layer serves it its first occurrence's states.
        rows = torch.arange(batch, device=mask.device)
        source = torch.where(cacheable, first_index(keys), rows)
        own = source == rows
        store = cacheable & own
        n_cacheable = int(cacheable.sum())
        ctx = ForwardContext(
            mask=mask, tags=tags, keys=keys, cacheable=cacheable, store=store, rows=rows, source=source, own=own,
            n_repeats=n_cacheable - int(store.sum()), align_end=left_padded, kv_cache=kv_cache,
            n_cacheable=n_cacheable,
        )
        if self.lockstep:
            self.lock.acquire()  # released by end(), which the base model's hook always calls
            ctx.locked = True
        self.local.contexts[-1] = ctx

    def fingerprint(self, embeds: torch.Tensor) -> None:
        ctx = self.context
        if ctx is None or not self.semantic_on() or self.config.fingerprint != "embeddings":
            return
        start = time.perf_counter()
        # Unchecked: embeds, mask and planes are the cache's own, valid by construction.
        ctx.codes = simhash_pooled_unchecked(embeds, ctx.mask, self.planes, backend=self.config.backend)
        self.fingerprint_s += time.perf_counter() - start

    def end(self, failed: bool = False) -> None:
        """After a base-model forward (also when it raised: `failed`)."""
        stack = getattr(self.local, "contexts", None)
        ctx = stack.pop() if stack else None
        if ctx is None:
            return
        try:
            with self.lock:
                if failed:
                    self.abandon(ctx)
                self.forwards += 1
                indexes = {id(layer.bank.index): layer.bank.index for layer in self.layers.values() if layer.bank}
                for index in indexes.values():
                    index.advance()
        finally:
            if ctx.locked:
                self.lock.release()

    def abandon(self, ctx: ForwardContext) -> None:
        """Lockstep: some layer will not write its states for the entries this forward inserted
        (it ran uncached, or the forward raised): forget them, in every layer, and insert no more."""
        ctx.broken = True
        if ctx.plan is not None and ctx.plan.slots.numel():
            ctx.plan.index.evict(ctx.plan.slots)
            ctx.plan = dataclasses.replace(ctx.plan, rows=ctx.plan.rows[:0], slots=ctx.plan.slots[:0], _host_slots=None)


def _is_dynamic(kv_cache) -> bool:
    return type(kv_cache).__name__ in ("DynamicCache",)


class CachedLayer:
    """The cached forward of one block; `module.forward` points at `self.forward` while active."""

    def __init__(self, owner: ModelCache, index: int, position: int, module: nn.Module):
        self.owner = owner
        self.index = index
        self.module = module
        self.original_forward = module.forward
        cfg = owner.config
        self.threshold = cfg.layer_threshold(position)
        self.radius = ops.hamming_radius(self.threshold, cfg.num_bits) if self.threshold is not None else -1
        self.bank: RingBuffer | None = None
        self.stats = LayerStats(layer=index)
        self._signature = inspect.signature(self.original_forward)
        names = [n for n in ("cache", "past_key_values", "layer_past") if n in self._signature.parameters]
        if owner.adapter.decoder and not names:
            raise ValueError(f"{type(module).__name__}.forward takes no KV cache argument: cannot cache a decoder block")
        self._cache_param = names[0] if names else None
        # Where the block takes its KV cache positionally: its index in `args` (after the hidden
        # states), or None when it is keyword-only.
        self._cache_index = None
        if self._cache_param is not None:
            params = list(self._signature.parameters.values())
            param = self._signature.parameters[self._cache_param]
            positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            if param.kind in positional and all(p.kind in positional for p in params[: params.index(param)]):
                self._cache_index = params.index(param) - 1
        self._kv_layout = None  # (kv heads, head dim, dtype) of this block's K/V, once seen
        self._divergence_samples = 0
        self.first = position == 0  # lockstep: the layer that looks up and inserts for all

    # ---- helpers -----------------------------------------------------------------------
    def _allocate(self, entry: torch.Tensor, plan: Plan | None = None) -> None:
        """This layer's bank, sized for entries like `entry` ([M, T, *F]: max_tokens x F per slot).
        Lockstep: it shares the model's index when one of the same size exists."""
        owner = self.owner
        cfg = owner.config
        entry_shape, dtype, device = (cfg.max_tokens,) + tuple(entry.shape[2:]), entry.dtype, entry.device
        words = cfg.num_bits // 64
        capacity = cfg.capacity
        if cfg.max_bytes is not None:
            share = cfg.max_bytes // len(owner.layer_ids)
            capacity = min(capacity, share // RingBuffer.entry_bytes(entry_shape, dtype, words))
            if capacity < 1:
                raise ValueError(
                    f"CacheConfig.max_bytes = {cfg.max_bytes} leaves {share} bytes per layer, less than one entry "
                    f"({RingBuffer.entry_bytes(entry_shape, dtype, words)} bytes): raise it or lower max_tokens"
                )
        index = plan.index if plan is not None else owner.shared_index if self.first else None
        if not owner.lockstep or index is None or (index.capacity, tuple(index.values.shape[1:]), index.values.dtype,
                                                   index.values.device) != (capacity, entry_shape, dtype, device):
            index = None
        self.bank = RingBuffer(
            capacity, words, entry_shape, dtype, device, cfg.eviction, cfg.staleness_half_life, cfg.backend, index
        )
        if owner.lockstep and owner.shared_index is None and self.first:
            owner.shared_index = self.bank
        self.stats.bytes = self.bank.nbytes

    def _codes(self, ctx: ForwardContext, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.owner.config.fingerprint == "embeddings":
            return ctx.codes
        start = time.perf_counter()
        codes = simhash_pooled_unchecked(hidden, ctx.mask, self.owner.planes, backend=self.owner.config.backend)
        self.stats.fingerprint_s += time.perf_counter() - start
        return codes

    def _run(self, hidden, args, kwargs, route: Route | None, batch, ctx):
        """Run the original block on `route.rows` (None: all); returns (output, hidden_out [M, T, H], capture)."""
        if route is not None:
            rows = route.rows
            hidden = hidden.index_select(0, rows)
            args = _slice_rows(args, rows, batch, route.sliced)
            kwargs = {k: _slice_rows(v, rows, batch, route.sliced) for k, v in kwargs.items()}
        capture = None
        if self.owner.adapter.decoder:
            # Whether the block takes its KV cache by position or by name, hand it the stand-in.
            capture = _CapturingKV(ctx.kv_cache)
            index = self._cache_index
            if index is not None and index < len(args):
                args = args[:index] + (capture,) + args[index + 1 :]
            else:
                kwargs = {**kwargs, self._cache_param: capture}
        output = self.original_forward(hidden, *args, **kwargs)
        out = output[0] if isinstance(output, tuple) else output
        return output, out, capture

    @staticmethod
    def _entry(out: torch.Tensor, capture) -> torch.Tensor:
        """[M, T, F]: the hidden state, and for decoders K and V flattened per position."""
        if capture is None or capture.keys is None:
            return out
        m, t = out.shape[:2]
        k = capture.keys.transpose(1, 2).reshape(m, t, -1).to(out.dtype)
        v = capture.values.transpose(1, 2).reshape(m, t, -1).to(out.dtype)
        return torch.cat([out, k, v], dim=-1)

    def _write_kv(self, ctx: ForwardContext, entry: torch.Tensor, capture, hidden_size: int) -> None:
        """Give the model's KV cache the merged K and V of every row (decoder prefill)."""
        if capture is not None and capture.keys is not None:
            self._kv_layout = (capture.keys.shape[1], capture.keys.shape[3], capture.keys.dtype)
        if ctx.kv_cache is None or self._kv_layout is None:
            return
        heads, head_dim, dtype = self._kv_layout
        b, t = entry.shape[:2]
        kv = entry[..., hidden_size:]
        keys = kv[..., : heads * head_dim].reshape(b, t, heads, head_dim).transpose(1, 2)
        values = kv[..., heads * head_dim :].reshape(b, t, heads, head_dim).transpose(1, 2)
        ctx.kv_cache.update(keys.to(dtype).contiguous(), values.to(dtype).contiguous(), self.index)

    @staticmethod
    def _pack(output, hidden: torch.Tensor):
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    # ---- the cached forward ------------------------------------------------------------
    def forward(self, hidden_states, *args, **kwargs):
        ctx = self.owner.context
        if ctx is None or self.module.training:
            return self.original_forward(hidden_states, *args, **kwargs)
        # One lock from lookup to insert: a slot looked up must not be overwritten by another
        # thread's insert before it is read. Threads interleave block by block.
        with self.owner.lock:
            return self._cached_forward(ctx, hidden_states, args, kwargs)

    def _cached_forward(self, ctx, hidden_states, args, kwargs):
        owner = self.owner
        if (
            hidden_states.dim() != 3
            or hidden_states.shape[0] != ctx.batch
            or hidden_states.shape[1] != ctx.mask.shape[1]
        ):
            if ctx.locked:
                owner.abandon(ctx)  # this layer writes nothing for the entries inserted so far
            return self.original_forward(hidden_states, *args, **kwargs)
        cfg = owner.config
        batch = ctx.batch
        hidden_size = hidden_states.shape[-1]
        plan = self._plan_to_follow(ctx)
        self.stats.lookups += ctx.n_cacheable
        codes = served_semantic = verify = None
        if plan is not None:
            # Lockstep: this layer hits on the first layer's slots, so it runs the same rows (the
            # first layer set ctx.route before its plan). Its input needs no NaN check of its own:
            # a served row's input is what the bank served, finite by construction, and a computed
            # row is computed anyway.
            slot, route = plan.slot, ctx.route
        else:
            semantic = self.threshold is not None and self.stats.semantic_enabled
            codes = self._codes(ctx, hidden_states) if semantic else None
            slot, served_semantic, verify = self._lookup(ctx, codes)
            route = self._route(ctx, slot, hidden_states, verify)
            if ctx.locked and self.first:
                ctx.route = route
        n_compute = route.n_compute
        if n_compute == batch:
            # Every row computes: the block runs exactly as uncached.
            output, out, capture = self._run(hidden_states, args, kwargs, None, batch, ctx)
            merged = computed = self._entry(out, capture)
        else:
            output, capture = None, None
            if n_compute:
                output, out, capture = self._run(hidden_states, args, kwargs, route, batch, ctx)
                computed = self._entry(out, capture)
                if self.bank is None:  # an empty cache whose batch repeats a row: the first insert comes next
                    with owner.lock:
                        self._allocate(computed, plan)
                computed = computed.to(self.bank.values.dtype)
            else:
                computed = self.bank.values.new_empty((0, hidden_states.shape[1]) + tuple(self.bank.values.shape[2:]))
            self._count_hits(route.compute, served_semantic, batch - n_compute)
            # A follower's reads need no LRU stamp: the first layer stamped these slots this forward.
            merged = self.bank.gather(route.slot, computed, route.row_of, ctx.align_end, stamp=plan is None)
            if cfg.mode == "residual":
                merged = merged.clone()
                merged[..., :hidden_size] += hidden_states * (~route.compute).view(-1, 1, 1).to(merged.dtype)
        self._write_kv(ctx, merged, capture, hidden_size)
        if verify is not None and bool(verify.any()):
            self._measure(slot, verify, merged, hidden_states, ctx)
        if plan is not None and n_compute and self.bank is None:
            with owner.lock:
                self._allocate(merged, plan)
        if plan is not None and self.bank.index is plan.index:
            if plan.rows.numel():
                self._write_planned(ctx, plan, route, hidden_states, merged, computed, hidden_size)
        elif n_compute and not ctx.broken and (not ctx.locked or self.first or ctx.plan is not None):
            # (Lockstep without a plan: only the first layer may insert into the shared index.)
            fresh = route.compute if verify is None else route.compute & ~verify  # new to the bank
            self._insert(ctx, hidden_states, merged, hidden_size, codes, fresh, slot)
        elif ctx.locked and self.first and ctx.plan is None and self.bank is not None and not ctx.broken:
            ctx.plan = Plan(self.bank.index, slot, slot[:0], slot[:0], 0)  # nothing to insert: hits only
        if n_compute == batch:
            return output
        hidden = merged[..., :hidden_size].to(hidden_states.dtype)
        return hidden if output is None else self._pack(output, hidden)

    @staticmethod
    def _route(ctx: ForwardContext, slot: torch.Tensor, hidden_states: torch.Tensor, verify) -> Route:
        """The rows to run: misses, rows whose input carries NaN/Inf (computed and, being non-finite,
        never stored) and sampled hits to verify; a repeat of an earlier row of the batch that
        missed takes that row's computed states instead."""
        compute = slot < 0
        if ctx.n_repeats:
            compute = compute & ctx.own
        if verify is not None:
            compute = compute | verify
        # One host read for the count and a finiteness check of the whole input: only a
        # non-finite total needs the per-row check.
        counted, total = torch.stack([compute.sum(dtype=torch.float32), hidden_states.sum(dtype=torch.float32)]).tolist()
        n_compute = int(counted)
        if not math.isfinite(total):
            compute = compute | ~torch.isfinite(hidden_states.sum(dim=(1, 2), dtype=torch.float32))
            n_compute = int(compute.sum())
        if n_compute == ctx.batch:
            return Route(compute, n_compute, ctx.rows)
        row_of = (compute.long().cumsum(0) - 1).clamp_min(0)
        if ctx.n_repeats:
            row_of = row_of.index_select(0, torch.where(compute, ctx.rows, ctx.source))
        return Route(compute, n_compute, compute.nonzero().flatten(), torch.where(compute, -1, slot), row_of)

    def _plan_to_follow(self, ctx: ForwardContext) -> Plan | None:
        """Lockstep: the plan of this forward's first cached layer, when this layer's bank shares
        its index (or has no bank yet and the plan serves no hit from it)."""
        plan = ctx.plan
        if plan is None or ctx.broken:
            return None
        if self.bank is not None:
            return plan if self.bank.index is plan.index else None
        if bool((plan.slot >= 0).any()):
            # Entries this layer never stored (it cannot happen in lockstep: kept for safety).
            self.owner.abandon(ctx)
            return None
        return plan

    def _write_planned(self, ctx, plan: Plan, route: Route, hidden_in, merged, computed, hidden_size) -> None:
        """Lockstep follower: this layer's states for the rows the first layer inserted (all the
        rows it computed, unless some were not storable: then picked from `merged`)."""
        rows = plan.rows
        source = computed if rows.numel() == route.n_compute else merged.index_select(0, rows)
        if self.owner.config.mode == "residual":
            source = source.clone()
            source[..., :hidden_size] -= (hidden_in if rows.numel() == ctx.batch else hidden_in.index_select(0, rows)).to(
                source.dtype
            )
        source = source.to(self.bank.values.dtype)
        n_finite = rows.numel()
        finite = finite_rows(source)
        if finite is not None:
            # A state that cannot be stored at this layer: its entry goes, in every layer.
            n_finite = int(finite.sum())
            plan.index.evict(plan.slots[~finite])
        self.bank.write_values(plan.slots, source, ctx.align_end, plan.host_slots())
        self.stats.insertions += n_finite
        self.stats.evictions += plan.evictions

    def _lookup(self, ctx: ForwardContext, codes):
        """(slot [B] or -1, semantic-hit mask or None, verify mask or None) for this layer's bank."""
        batch = ctx.batch
        device = ctx.tags.device
        slot = torch.full((batch,), -1, dtype=torch.int64, device=device)
        if self.bank is None:
            return slot, None, None
        cfg = self.owner.config
        start = time.perf_counter()
        served_semantic = verify = None
        with self.owner.lock:
            if cfg.exact:
                slot = self.bank.lookup_exact(ctx.keys, ctx.tags)
            if codes is not None:
                near, _ = self.bank.lookup(codes, ctx.tags, self.radius)
                served_semantic = (slot < 0) & (near >= 0)
                slot = torch.where(slot >= 0, slot, near)
                if cfg.verify_rate > 0:
                    verify = served_semantic & (torch.rand(batch, device=device) < cfg.verify_rate)
        self.stats.lookup_s += time.perf_counter() - start
        return slot, served_semantic, verify

    def _count_hits(self, compute, served_semantic, n_served: int) -> None:
        self.stats.hits += n_served
        n_semantic = int((served_semantic & ~compute).sum()) if served_semantic is not None else 0
        self.stats.semantic_hits += n_semantic
        self.stats.exact_hits += n_served - n_semantic

    def _insert(self, ctx, hidden_in, entry, hidden_size, codes, rows_mask, slot) -> None:
        """Store the freshly computed rows that may be cached (residual mode: their layer update).
        Lockstep: the first cached layer of the forward records what it did as the plan."""
        cfg = self.owner.config
        rows = (ctx.store & rows_mask).nonzero().flatten()
        if rows.numel() == 0:
            if ctx.locked and self.first and ctx.plan is None and self.bank is not None:
                ctx.plan = Plan(self.bank.index, slot, rows, rows, 0)
            return
        if cfg.mode == "residual":
            entry = entry.clone()
            entry[..., :hidden_size] -= hidden_in.to(entry.dtype)
        if codes is None:
            codes = ctx.zero_codes(cfg.num_bits // 64)
        with self.owner.lock:
            if self.bank is None:
                self._allocate(entry)
            evicted = self.bank.evictions
            rows, slots = self.bank.insert(
                codes, ctx.keys, ctx.tags, entry.to(self.bank.values.dtype), ctx.align_end, rows, dedupe=False,
                return_rows=True,
            )
            self.stats.insertions += slots.numel()
            self.stats.evictions += self.bank.evictions - evicted
            if ctx.locked and self.first and ctx.plan is None:
                ctx.plan = Plan(self.bank.index, slot, rows, slots, self.bank.evictions - evicted)

    def _measure(self, slot, verify, truth_entry, hidden_in, ctx) -> None:
        """Divergence monitoring: 1 - cosine between what a sampled semantic hit would have served
        and the row's true hidden state (real tokens only); evict entries past the bound, and stop
        semantic reuse in a layer whose running mean passes it."""
        start = time.perf_counter()
        cfg = self.owner.config
        rows = verify.nonzero().flatten()
        slots = slot.index_select(0, rows)
        hidden_size = hidden_in.shape[-1]
        truth = truth_entry.index_select(0, rows)[..., :hidden_size].float()
        seq = truth.shape[1]
        last_used, hit_count = self.bank.last_used.clone(), self.bank.hit_count.clone()
        with self.owner.lock:
            served = ops.gather_with_mask(
                self.bank.values, slots, truth_entry[:0].to(self.bank.values.dtype), torch.zeros_like(slots),
                last_used, hit_count, 0, ctx.align_end, backend=cfg.backend,
            )[..., :hidden_size].float()
        if cfg.mode == "residual":
            served = served + hidden_in.index_select(0, rows).float()
        mask = ctx.mask.index_select(0, rows).unsqueeze(-1).float()
        deviation = 1.0 - torch.nn.functional.cosine_similarity(
            (served * mask).reshape(rows.numel(), seq * hidden_size),
            (truth * mask).reshape(rows.numel(), seq * hidden_size),
            dim=1,
        )
        bad = deviation > cfg.max_divergence
        with self.owner.lock:
            self.bank.divergence[slots] = torch.maximum(self.bank.divergence[slots], deviation)
            if bool(bad.any()):
                self.bank.evict(slots[bad])
                self.stats.divergence_evictions += int(bad.sum())
        n = rows.numel()
        total = self.stats.mean_divergence * self._divergence_samples + float(deviation.sum())
        self._divergence_samples += n
        self.stats.verified += n
        self.stats.mean_divergence = total / self._divergence_samples
        if self._divergence_samples >= 8 and self.stats.mean_divergence > cfg.max_divergence:
            self.stats.semantic_enabled = False
        self.stats.verify_s += time.perf_counter() - start
