"""What `accelerate` attaches to a model: the router of every forward through the tiers.

`ModelCache.call` wraps the base model's own `forward` (an instance attribute, so direct
`.forward(...)` calls go through it too). Per call it asks `gate` whether the call may be cached
at all, `state.ModelState` for the model's state (its header joins every key; a change of the
function drops every entry), builds one `tiers.Call`, brings the batch and what each tier asks
for (`Tier.payload`) to the host in one copy, and asks the tiers in order to route it
(`Tier.route`); the first route decides how the forward runs. Everything the router counts
lives in `Counters`; `report.stats` adds each tier's `report`.
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
from .state import ModelState
from .tiers import Call, Route


@dataclass
class Counters:
    """Counts over all forwards since the last reset (rows: batch rows)."""

    forwards: int = 0
    rows: int = 0  # every row of every forward the cache saw, cached or not (decode steps apart)
    decode_steps: int = 0  # generate()'s steps after the prefill: never cached, not counted in rows
    decode_pages: int = 0  # pages of decode steps' tokens stored (a chat's answers, for its next turn)
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


def _fill_defaults(given: np.ndarray, present: list) -> np.ndarray:
    """int64 [4, B, T] from the inputs given ([n, B, T], in order) and which of ids, mask,
    positions, types they are: a mask of ones, positions 0..T-1 and types 0 where not given."""
    if all(present):
        return given
    host = np.empty((4, *given.shape[1:]), dtype=np.int64)
    defaults = (None, 1, np.arange(given.shape[2], dtype=np.int64), 0)
    at = 0
    for i, here in enumerate(present):
        if here:
            host[i] = given[at]
            at += 1
        else:
            host[i] = defaults[i]
    return host


@dataclass
class ModelCache:
    config: CacheConfig
    adapter: object
    model: nn.Module
    base: nn.Module
    layer_ids: list[int]
    planes: torch.Tensor
    tiers: list = field(default_factory=list)  # tiers.Tier, in routing order (`api.accelerate` builds them)
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
        self.pools_with_mask = adapters.is_sentence_transformer(self.model)
        self.original_forward = self.base.forward
        self.signature = inspect.signature(self.original_forward)
        params = self.signature.parameters.values()
        self.positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.keywords = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    # ---- counting ------------------------------------------------------------------
    def count_reasons(self, counts: dict) -> None:
        """Add rows that ran uncached, {reason: rows}, to the counters."""
        with self.lock:
            for reason, n in counts.items():
                self.counters.not_cached[reason] = self.counters.not_cached.get(reason, 0) + n

    def namespace_id(self, header: bytes) -> int:
        """A small number for a key header (namespace and model state), for the per-block tier's tags."""
        with self.lock:
            return self.namespaces.setdefault(header, len(self.namespaces))

    # ---- per call ------------------------------------------------------------------
    def current(self) -> Call | None:
        stack = getattr(self.local, "calls", None)
        return stack[-1] if stack else None

    @torch.compiler.disable(recursive=False)
    def call(self, *args, **kwargs):
        """The base model's forward, routed through the cache. Under torch.compile this frame (the
        cache's bookkeeping) runs eagerly and the model's own forward is compiled."""
        call = None if self.bypassed else self._begin(args, kwargs)
        stack = getattr(self.local, "calls", None)
        if stack is None:
            stack = self.local.calls = []
        stack.append(call)  # nested calls (another model inside) see their own
        try:
            if call is None:
                return self.original_forward(*args, **kwargs)
            for tier in self.tiers:
                output = tier.run(call, self.original_forward)
                if output is not None:
                    return output
            start = time.perf_counter()
            output = self.original_forward(*args, **kwargs)
            call.elapsed = time.perf_counter() - start
            for tier in self.tiers:
                tier.finish(call, output, top=False)
            return output
        finally:
            stack.pop()
            if call is not None:
                for tier in self.tiers:
                    tier.abort(call)  # (it raised, or never reached the last cached block)

    @torch.compiler.disable
    def _begin(self, args, kwargs) -> Call | None:
        arguments = self._bind(args, kwargs)
        ids = arguments.get("input_ids")
        keyed = next((arguments.get(n) for n in ("input_ids", "pixel_values", "inputs_embeds")
                      if isinstance(arguments.get(n), torch.Tensor)), None)
        batch = keyed.shape[0] if keyed is not None and keyed.dim() >= 2 else 1
        reason = gate.call_reason(self.base, arguments)
        with self.lock:
            self.counters.forwards += 1
            if reason == "decode_step":
                self.counters.decode_steps += 1
                return self._decode_step(arguments)
            self.counters.rows += batch
            observed = self.state.check()
            if observed.epoch != self.weights_epoch:
                self._invalidate(observed.epoch)
        reason = reason or observed.reason
        if reason is not None:
            self.count_reasons({reason: batch})
            return None
        kv_cache = adapters.kv_cache(arguments)
        call = Call(arguments, kv_cache, observed.switches, rows.key_header(rows.current_namespace(), observed.switches),
                    self.padding_visible(kv_cache))
        if ids is None:
            # A pixel model: routed at its first cached block, once the patch embedding tells T.
            call.pixels = rows.pixel_hashes(arguments["pixel_values"])
            self._route(call, None)
            return call
        call.inputs = tuple(t if isinstance(t, torch.Tensor) else None for t in
                            (ids, arguments.get("attention_mask"), arguments.get("position_ids"),
                             arguments.get("token_type_ids")))
        self._route(call, call.inputs)
        return call

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by name (a `**kwargs` parameter's flattened in): by the positional
        parameters' names where that is all binding does, else by `inspect.Signature.bind_partial`."""
        if len(args) <= len(self.positional) and self.keywords.issuperset(kwargs) \
                and not any(map(kwargs.__contains__, self.positional[: len(args)])):
            return {**dict(zip(self.positional, args)), **kwargs}
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        return {**bound.pop("kwargs", {}), **bound}

    def _decode_step(self, arguments: dict) -> Call | None:
        """A decode step on a KV cache a tier follows (its prefill was routed): the model runs as
        it would, the tier records what it computes (`Tier.step`). Under the lock."""
        kv_cache = adapters.kv_cache(arguments)
        tier = next((t for t in self.tiers if t.follows(kv_cache)), None)
        if tier is None:
            return None
        observed = self.state.check()
        if observed.epoch != self.weights_epoch:
            self._invalidate(observed.epoch)
            return None
        call = Call(arguments, kv_cache, observed.switches, b"")
        call.route = tier.step(call, observed.reason)
        if call.route is None:
            return None
        call.capture = []
        return call

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

    @torch.compiler.disable
    def route_pixels(self, call: Call, seq: int) -> None:
        """Route a pixel model's forward now that its hidden states have `seq` positions."""
        call.seq = seq
        self._route(call, call.pixels)
        call.pixels = None

    def _route(self, call: Call, batch) -> None:
        """Bring `batch` (the call's `inputs`, or a pixel model's [B, 2] hashes) and each tier's
        payload to the host in one copy, then route the call through the tiers in order. `batch`
        None: a pixel model before its first block (only tiers that route on the device route it now)."""
        start = time.perf_counter()
        with self.lock:
            if batch is not None and any(t.host for t in self.tiers):
                self._host_copy(call, batch)
            for tier in self.tiers:
                if tier.host and batch is None:
                    continue
                call.route = tier.route(call)
                if call.route is not None:
                    break
            if batch is not None and self.tiers[0].host:
                self._count(call, batch, start)

    def _host_copy(self, call: Call, batch) -> None:
        """The forward's one host synchronisation: `batch` (the inputs given: ids, mask, positions,
        types, None where not given; or pixel hashes) and every tier's payload. A token batch
        lands in `call.host` as int64 [4, B, T], what was not given filled in on the host."""
        given = [t for t in batch if t is not None] if isinstance(batch, tuple) else [batch]
        shape = given[0].shape
        given = [t if t.dtype == torch.int64 else t.long() for t in given]
        payloads = [(tier, tier.payload(call)) for tier in self.tiers if tier.host]
        payloads = [(tier, p.flatten()) for tier, p in payloads if p is not None]
        device = given[0].device
        flat = [t.reshape(-1) if t.shape == shape else t.expand(shape).flatten() for t in given] \
            + [p if p.device == device else p.to(device) for _, p in payloads]
        host = (torch.cat(flat) if len(flat) > 1 else flat[0]).cpu().numpy()
        at = len(given) * given[0].numel()
        if isinstance(batch, tuple):
            call.host = _fill_defaults(host[:at].reshape(len(given), *shape), [t is not None for t in batch])
        else:
            call.host = host[:at].reshape(shape)
        for tier, p in payloads:
            call.parts[tier] = host[at : at + p.numel()]
            at += p.numel()
        call.device = device
        if call.pixels is None:
            call.seq = shape[-1]

    def _count(self, call: Call, batch, start: float) -> None:
        route, c = call.route, self.counters
        self.count_reasons(call.counts)
        call.counts = {}
        c.looked_up += batch[0].shape[0] if isinstance(batch, tuple) else batch.shape[0]
        route = route if route is not None else Route()
        c.served += route.served
        c.semantic_served += len(route.semantic_rows)
        c.repeats += route.repeats
        c.prefix_rows += route.prefix_rows
        c.last_tokens = route.tokens
        c.last_semantic_rows = route.semantic_rows
        c.tokens_served += route.tokens[0]
        c.tokens_computed += route.tokens[1]
        c.lookup_s += time.perf_counter() - start

    def _invalidate(self, epoch: int) -> None:
        """The function changed (`state.ModelState`'s watch): nothing computed before may be served."""
        with self.lock:
            self.weights_epoch = epoch
            self.counters.invalidations += 1
            for tier in self.tiers:
                tier.invalidate(self.state.dtype, self.state.device)
