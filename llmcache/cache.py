"""What `accelerate` attaches to a model: the per-forward routing and the tiers behind it.

`ModelCache.call` wraps the base model's own `forward` (an instance attribute, so direct
`.forward(...)` calls go through it too). Per call it asks `gate` whether the call may be cached
at all, checks the weights' version (entries computed with other weights are dropped), brings the
ids, mask, positions and token types to the host in one copy, and hands the forward either to the
exact tier (`exact.ExactTier`: one lookup, served rows skip every cached block) or, with a
semantic threshold, to the per-block semantic tier (`semantic.CachedLayer`). Everything the
cache counts lives in `Counters` and `semantic.LayerStats`; `api.stats` reports them.
"""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import adapters, gate, rows
from .config import CacheConfig
from .ops.simhash import simhash_pooled_unchecked
from .state import ModelState


@dataclass
class Forward:
    """One base-model call that the cache routes."""

    kv_cache: object | None
    switches: bytes = b""  # the model's state header (llmcache.state) this forward runs under
    plan: object | None = None  # exact.Plan
    pixels: tuple | None = None  # (key header, int64 [B, 2] hashes): a pixel model, routed at its first cached block
    semantic: object | None = None  # semantic.ForwardContext
    pixel_codes: torch.Tensor | None = None  # int64 [B, W]: a pixel model's patch-embedding fingerprints
    suffix: object | None = None  # prefix.SuffixPlan: the rows compute from their cached prefixes on
    arguments: dict | None = None  # the call's bound arguments (for the suffix call)
    capture: list | None = None  # the last block's outputs, recorded during the suffix call
    near: object | None = None  # verified.Pending: the verified semantic tier's checks and records
    extra_host: object | None = None  # host copy of `_route`'s extra payload (semantic codes)


@dataclass
class Counters:
    """Counts over all forwards since the last reset (rows: batch rows)."""

    forwards: int = 0
    rows: int = 0  # every row of every forward the cache saw, cached or not (decode steps apart)
    decode_steps: int = 0  # generate()'s steps after the prefill: never cached, not counted in rows
    looked_up: int = 0  # rows looked up in the exact tier
    served: int = 0  # rows served from the exact tier (semantic hits included)
    semantic_served: int = 0  # of them, rows served a neighbour's entry by the verified semantic tier
    repeats: int = 0  # rows repeating an earlier row of their batch (computed once, copied)
    prefix_rows: int = 0  # decoder rows that computed only the tokens after their cached prefix
    tokens_served: int = 0  # real tokens whose states came from the bank (whole rows and prefixes)
    tokens_computed: int = 0  # real tokens the cached forwards computed
    last_tokens: tuple = (0, 0)  # (served, computed) tokens of the last routed forward
    last_semantic_rows: tuple = ()  # rows of the last routed forward served by the verified semantic tier
    inserted: int = 0
    evicted: int = 0
    invalidations: int = 0  # times the weights changed and the entries were dropped
    not_cached: dict = field(default_factory=dict)  # reason -> rows
    fingerprint_s: float = 0.0
    lookup_s: float = 0.0


@dataclass
class ModelCache:
    config: CacheConfig
    adapter: object
    model: nn.Module
    base: nn.Module
    layer_ids: list[int]
    planes: torch.Tensor
    exact: object | None = None  # exact.ExactTier (threshold None)
    near: object | None = None  # verified.SemanticTier (CacheConfig.semantic set)
    read_top: bool = False  # the semantic tier judges the accelerated wrapper's output, not the base model's
    layers: dict = field(default_factory=dict)  # block index -> semantic.CachedLayer (threshold set)
    patched: list = field(default_factory=list)  # the modules whose forward is a `patch.Patch` of this cache
    namespaces: dict = field(default_factory=dict)  # key header (namespace + state) -> its id in semantic tags
    lock: threading.RLock = field(default_factory=threading.RLock)
    local: threading.local = field(default_factory=threading.local)
    counters: Counters = field(default_factory=Counters)
    bypassed: bool = False
    weights_epoch: int = 0

    def __reduce__(self):
        # A copy or pickle of an accelerated model is a plain model (llmcache.patch): no cache.
        return type(None), ()

    def __post_init__(self):
        self.state = ModelState(self.model, self.base)  # (`accelerate` takes its first look once it has patched)
        self.positions_from_ids = hasattr(getattr(self.base, "embeddings", None), "padding_idx")
        self.pools_with_mask = adapters.is_sentence_transformer(self.model)
        self.original_forward = self.base.forward
        self.signature = inspect.signature(self.original_forward)

    # ---- counting ------------------------------------------------------------------
    def count_not_cached(self, reason: str, n: int) -> None:
        self.count_reasons({reason: n})

    def count_reasons(self, counts: dict) -> None:
        """Add rows that ran uncached, {reason: rows}, to the counters."""
        with self.lock:
            for reason, n in counts.items():
                self.counters.not_cached[reason] = self.counters.not_cached.get(reason, 0) + n

    def namespace_id(self, header: bytes) -> int:
        """A small number for a key header (namespace and model state), for the semantic tier's tags."""
        with self.lock:
            return self.namespaces.setdefault(header, len(self.namespaces))

    # ---- per call ------------------------------------------------------------------
    def current(self) -> Forward | None:
        stack = getattr(self.local, "forwards", None)
        return stack[-1] if stack else None

    @torch.compiler.disable(recursive=False)
    def call(self, *args, **kwargs):
        """The base model's forward, routed through the cache. Under torch.compile this frame (the
        cache's bookkeeping) runs eagerly and the model's own forward is compiled."""
        forward = None if self.bypassed else self._begin(args, kwargs)
        stack = getattr(self.local, "forwards", None)
        if stack is None:
            stack = self.local.forwards = []
        stack.append(forward)  # nested calls (another model inside) see their own
        try:
            if forward is not None and forward.suffix is not None:
                from .prefix import suffix_forward

                return suffix_forward(self.exact, forward.suffix, forward.arguments, forward, self.original_forward)
            start = time.perf_counter()
            output = self.original_forward(*args, **kwargs)
            if forward is not None and forward.plan is not None and self.exact.shared is not None:
                self.exact.shared.computed(time.perf_counter() - start, forward.plan.tokens[1])
            if forward is not None and forward.near is not None:
                self.finish_near(forward.near, output, top=False)
            return output
        finally:
            stack.pop()
            for plan in (forward.plan, forward.suffix) if forward is not None else ():
                if plan is not None and plan.entries:
                    self.exact.abort(plan)  # it raised (or never reached the last cached block)

    @torch.compiler.disable
    def _begin(self, args, kwargs) -> Forward | None:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        arguments = {**bound.pop("kwargs", {}), **bound}
        ids = arguments.get("input_ids")
        pixels = arguments.get("pixel_values") if ids is None else None
        keyed = next((arguments.get(n) for n in ("input_ids", "pixel_values", "inputs_embeds")
                      if isinstance(arguments.get(n), torch.Tensor)), None)
        batch = keyed.shape[0] if keyed is not None and keyed.dim() >= 2 else 1
        reason = gate.call_reason(self.base, arguments)
        with self.lock:
            self.counters.forwards += 1
            if reason == "decode_step":
                self.counters.decode_steps += 1
                return None
            self.counters.rows += batch
            observed = self.state.check()
            if observed.epoch != self.weights_epoch:
                self._invalidate(observed.epoch)
        reason = reason or observed.reason
        if reason is not None:
            self.count_not_cached(reason, batch)
            return None
        kv_cache = gate.kv_cache(arguments)
        forward = Forward(kv_cache, observed.switches)
        header = rows.key_header(rows.current_namespace(), observed.switches)
        if pixels is not None:
            # Routed at the first cached block, once the patch embedding tells the sequence length.
            forward.pixels = (header, rows.pixel_hashes(pixels))
            return forward
        mask = arguments.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.expand_as(ids)
        seq = ids.shape[1]
        positions = arguments.get("position_ids")
        positions = torch.arange(seq, device=ids.device).expand_as(ids) if positions is None else positions.expand_as(ids)
        types = arguments.get("token_type_ids")
        types = torch.zeros_like(ids) if types is None else types.expand_as(ids)
        if self.exact is None:
            from .semantic import semantic_context

            forward.semantic = semantic_context(self, header, ids, mask, positions, types, kv_cache)
            return forward
        batch_host = torch.stack([ids.long(), mask.long(), positions.long(), types.long()])
        padding = self.padding_visible(kv_cache)
        codes = near = None
        if self.near is not None:
            from .verified import Pending

            forward.near = Pending(mask)
            codes = self.token_codes(ids, mask)
            pooled = self.near.semantic.serve == "pooled"
            near = lambda host, ids_before: (self.near, forward.near, rows.near_keys(header, host, ids_before, pooled,
                                                                                     padding),
                                             forward.extra_host.reshape(codes.shape).view(np.uint64))
        if self.adapter.decoder:
            from . import prefix

            forward.arguments = arguments
            prefixes = self.exact.final_norm is not None
            self._route(forward, batch_host, seq, lambda host, counts, pending: prefix.route(
                self.exact, header, host, seq, ids.device, counts, pending, prefixes,
                near(host, False) if near else None, padding), extra=codes)
            return forward
        # RoBERTa-style embeddings number positions from the ids themselves, padding included.
        ids_before = arguments.get("position_ids") is None and self.positions_from_ids
        self._route(forward, batch_host, seq, lambda host, counts, pending: self.exact.route(
            self.exact.token_row_keys(header, host, ids_before, counts, padding), seq, ids.device, counts, pending,
            near(host, ids_before) if near else None), extra=codes)
        return forward

    def padding_visible(self, kv_cache) -> tuple[bool, bool]:
        """(leading, trailing): whether a served row must hold the uncached values at its padding
        before / after its real tokens (CacheConfig.padding). "auto": a decoder's trailing padding
        always; its leading padding unless the call is given a KV cache (generate's prefill,
        which masks that padding in every later step and reads the last position only: keeping it
        with the row would key a prompt's pages on its batch's padding, and prompts sharing a
        prefix would no longer share pages); an encoder's and a SentenceTransformer's never
        (their callers pool with the mask or read a real token)."""
        mode = self.config.padding
        if mode == "auto":
            if self.pools_with_mask or not self.adapter.decoder:
                return False, False
            return kv_cache is None, True
        return (True, True) if mode == "exact" else (False, False)

    def token_codes(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """int64 [B, W]: SimHash of each row's mean input token embedding (the word embeddings
        of its real tokens: what the verified semantic tier looks neighbours up by)."""
        start = time.perf_counter()
        embeds = self.base.get_input_embeddings()(ids)
        codes = simhash_pooled_unchecked(embeds, mask, self.planes, backend=self.config.backend)
        self.counters.fingerprint_s += time.perf_counter() - start
        return codes

    def finish_near(self, pending, output, top: bool) -> None:
        """The forward ran: judge its semantic checks on `output` (the base model's, or with
        `top` the accelerated wrapper's, which `read_top` says the tier reads)."""
        if top != self.read_top:
            done = getattr(self.local, "near_done", None)
            if not top and done is not None:  # (None: the base model called without its wrapper: no output to judge)
                done.append(pending)
            return
        with self.lock:
            self.near.finish(pending, output, self.exact.index)

    @torch.compiler.disable
    def route_pixels(self, forward: Forward, seq: int) -> None:
        """Route a pixel model's forward now that its hidden states have `seq` positions."""
        header, hashes = forward.pixels
        forward.pixels = None
        self._route(forward, hashes, seq, lambda host, counts, pending: self.exact.route(
            [(rows.pixel_key(header, row, seq), 0, seq) for row in host], seq, hashes.device, counts, pending))

    def _route(self, forward: Forward, batch_host: torch.Tensor, seq: int, router, extra=None) -> None:
        """Bring `batch_host` (with the pending finiteness flags, and `extra`, int64, whose host
        copy lands in `forward.extra_host`) to the host in one copy and route the forward:
        `router(host array, counts, pending)` returns its plan (`exact.Plan`, a
        `prefix.SuffixPlan` or None)."""
        start = time.perf_counter()
        with self.lock:
            pending, flags = self.exact.take_pending()
            payload = batch_host.flatten()
            if extra is not None:
                payload = torch.cat([extra.flatten().to(payload.device), payload])
            if flags is not None:
                payload = torch.cat([payload, flags.to(payload.device)])
            host = payload.cpu().numpy()  # the forward's one host synchronisation
            if extra is not None:
                forward.extra_host, host = host[: extra.numel()], host[extra.numel() :]
            size = batch_host.numel()
            counts: dict = {}
            evicted = self.exact.index.evictions
            plan = router(host[:size].reshape(batch_host.shape), counts, (pending, host[size:]))
            self.count_reasons(counts)
            c = self.counters
            c.evicted += self.exact.index.evictions - evicted
            c.looked_up += batch_host.shape[-2] if batch_host.dim() == 3 else batch_host.shape[0]
            if plan is None:
                c.last_tokens = (0, 0)
            elif hasattr(plan, "prefix"):  # prefix.SuffixPlan
                forward.suffix = plan
                c.served += plan.host["whole"]  # (computing their last token only)
                c.prefix_rows += plan.host["prefix"]
                c.last_tokens = (plan.served_tokens, plan.computed_tokens)
            else:
                forward.plan = plan
                c.served += plan.served
                c.semantic_served += forward.near.served if forward.near is not None else 0
                c.repeats += plan.repeats
                c.last_tokens = getattr(plan, "tokens", None) or (0, 0)
            c.last_semantic_rows = tuple(forward.near.served_rows) if forward.near is not None else ()
            c.tokens_served += c.last_tokens[0]
            c.tokens_computed += c.last_tokens[1]
            c.lookup_s += time.perf_counter() - start

    def _invalidate(self, epoch: int) -> None:
        """The function changed (`state.ModelState`'s watch): nothing computed before may be served."""
        with self.lock:
            self.weights_epoch = epoch
            self.counters.invalidations += 1
            if self.exact is not None:
                self.exact.clear(self.state.dtype, self.state.device)
                self.exact.shared_fingerprint = None  # (hashed again, from the new weights, at the next lookup)
            for layer in self.layers.values():
                if layer.bank is not None:
                    layer.bank.reset()
            if self.near is not None:
                self.near.clear(prior=False)

    def embed(self, original, *args, **kwargs):
        """The input embedding's forward (`original`), fingerprinted for the semantic tier."""
        output = original(*args, **kwargs)
        self.fingerprint(output)
        return output

    def fingerprint(self, embeds: torch.Tensor) -> None:
        """The semantic tier's fingerprint of the input embeddings `embeds` [B, T, D] (the input
        embedding's output): SimHash of the mean over real tokens; for a pixel model, of all its patches."""
        forward = self.current()
        if forward is None or self.config.fingerprint != "embeddings" or embeds.dim() != 3:
            return
        ctx = forward.semantic
        if ctx is not None and embeds.shape[:2] == ctx.mask.shape:
            mask = ctx.mask
        elif forward.pixels is not None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.int64, device=embeds.device)
        else:
            return
        start = time.perf_counter()
        # Unchecked: embeds, mask and planes are the cache's own, valid by construction.
        codes = simhash_pooled_unchecked(embeds, mask, self.planes, backend=self.config.backend)
        if ctx is not None:
            ctx.codes = codes
        else:
            forward.pixel_codes = codes
        self.counters.fingerprint_s += time.perf_counter() - start
