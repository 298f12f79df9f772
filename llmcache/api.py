"""Public API: accelerate / disable / reset / stats / cached / bypass.

`accelerate(model)` acts on a built `transformers` model in place: it points the base model's
`forward` and each cached block's `forward` at the cache (`patch.Patch` instance attributes:
weights, state_dict and module tree are untouched) and, where a semantic tier reads them, the
input embedding's (the fingerprint) and the wrapper's. `disable` removes exactly those,
restoring the original forwards.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from dataclasses import dataclass, field, fields

from torch import nn

from . import adapters, gate, ops, rows
from .cache import ModelCache
from .config import CacheConfig
from .exact import ExactTier
from .patch import patch, patched, unpatch
from .semantic import CachedLayer, LayerStats
from .verified import SemanticStats, SemanticTier

_ATTR = "_llmcache"


def owner_of(model: nn.Module) -> ModelCache:
    owner = getattr(model, _ATTR, None)
    if owner is None and patched(model) is not None:  # the base model of an accelerated one
        owner = patched(model).owner
    if owner is None:
        raise ValueError("this model is not accelerated: call llmcache.accelerate(model) first")
    return owner


def accelerate(model: nn.Module, config: CacheConfig | None = None, **overrides) -> nn.Module:
    """Patch `model` in place to reuse layer activations of earlier inputs; returns it.

    Args:
        model: a `transformers` model of a supported family (bert, roberta, distilbert, gpt2,
            llama), base or task model, on any device and dtype, already built.
        config: a CacheConfig (default: CacheConfig()); `overrides` replace its fields,
            e.g. accelerate(model, threshold=0.95, layers=range(0, 4)).
    Returns:
        The same model. With the exact tier (the default) a row whose real tokens, positions,
        token types, namespace and model state (dtype, autocast, attention implementation, LoRA
        adapters, ...: llmcache/state.py) equal a cached row's is served that row's stored
        output of the last cached block and skips every cached block; the other rows compute.
        Any change to the weights or the module tree drops every entry. Anything the cache
        cannot serve exactly runs uncached, counted by reason in `stats(model).not_cached`:
        training mode, autograd recording (grad enabled and a parameter that requires grad:
        use `torch.inference_mode()` or `torch.no_grad()`), inference-tensor weights,
        `inputs_embeds`, `output_attentions`, `output_hidden_states`, `head_mask`, a 4-D mask,
        other unknown tensor arguments, and decode steps of `generate`.

    Padding (`CacheConfig.padding`): "exact" makes every position of every output equal the
    uncached model's, padding included; "masked" serves zeros at padding positions; the
    default ("auto") is exact for decoders (but for the leading padding of generate's prefill)
    and masked for encoders, whose callers pool with the mask: pool with it, as
    sentence-transformers does, or pass padding="exact" where padding positions are read.

    Copies (`copy.deepcopy`, pickle, `torch.save`) of an accelerated model are plain models;
    torch.export, jit.trace and fx tracing record the model's own forward.

    Example:
        >>> model = llmcache.accelerate(AutoModel.from_pretrained(path).eval())
        >>> with torch.inference_mode():
        ...     model(**tokenizer(texts, padding=True, return_tensors="pt"))
        >>> print(llmcache.stats(model))
    """
    inner = adapters.transformers_model(model)
    for held_by in {id(model): model, id(inner): inner}.values():
        if getattr(held_by, _ATTR, None) is not None:
            raise ValueError(f"this model{'' if held_by is model else ' (or the transformers model inside it)'} is "
                             "already accelerated: call llmcache.disable on what you accelerated first")
    if config is not None and not isinstance(config, CacheConfig):
        raise TypeError(f"config must be a llmcache.CacheConfig, got {type(config).__name__}")
    config = (config or CacheConfig()).replace(**overrides) if overrides else (config or CacheConfig())
    adapter, base, blocks = adapters.resolve(model)
    if patched(base) is not None or any(patched(b) is not None for b in blocks):
        raise ValueError(f"the base model inside this {type(model).__name__} ({type(base).__name__}) is already "
                         "accelerated, through another object that holds it: call llmcache.disable on that one first")
    layer_ids = config.validate(len(blocks))
    embedding = base.get_input_embeddings()
    weight = next(base.parameters())
    features = _check_budget(config, base, adapter, layer_ids)
    if config.shared is not None and adapter.decoder:
        raise ValueError(f"CacheConfig.shared: {type(model).__name__} is a decoder, whose entries are chained prefix "
                         "pages that the shared tier does not hold yet: accelerate it without shared=")
    planes = ops.random_planes(_hidden_size(base), config.num_bits, seed=config.seed, device=weight.device)
    owner = ModelCache(config=config, adapter=adapter, model=model, base=base, layer_ids=layer_ids, planes=planes)
    if config.threshold is None:
        span = list(range(min(layer_ids), max(layer_ids) + 1))
        owner.exact = ExactTier(owner, blocks, span, adapter.decoder, features, weight.dtype, weight.device)
        if adapter.decoder:
            _decoder_layout(owner.exact, base, blocks, span)
        if config.semantic is not None:
            _semantic_tier(owner, model, base, adapter, embedding)  # (its refusals come before any patch)
        if config.shared is not None:
            owner.exact.shared = _shared_tier(config.shared)
        for position, index in enumerate(span):
            owner.patched.append(patch(blocks[index], functools.partial(owner.exact.block_forward, position), owner))
    else:
        for position, index in enumerate(layer_ids):
            layer = CachedLayer(owner, index, position, blocks[index])
            owner.layers[index] = layer
            owner.patched.append(patch(blocks[index], layer.forward, owner))
        owner.patched.append(patch(embedding, functools.partial(owner.embed, embedding.forward), owner))
    owner.patched.append(patch(base, owner.call, owner))
    owner.state.check()  # the first look at the model's state: later forwards are compared with it
    if owner.state.inference_tensors:
        warnings.warn(f"{type(model).__name__}'s weights are inference tensors (built or moved under "
                      "torch.inference_mode()), which keep no version counter: llmcache cannot see them change, "
                      "so it runs this model uncached (stats: not_cached['inference_tensors']). Build, load and "
                      "move the model outside inference_mode, and run it inside.", stacklevel=2)
    setattr(model, _ATTR, owner)
    if inner is not model:
        setattr(inner, _ATTR, owner)  # the wrapper and the model inside share one cache
    return model


def _semantic_tier(owner: ModelCache, model: nn.Module, base: nn.Module, adapter, embedding) -> None:
    """Attach the verified semantic tier (CacheConfig.semantic), refusing what it cannot serve."""
    semantic = owner.config.semantic
    if adapter.decoder != (semantic.tolerance == "next_token"):
        raise ValueError(f"Semantic.tolerance = {semantic.tolerance!r} does not fit {type(model).__name__}: a decoder "
                         "takes 'next_token' (the same next token), an encoder a cosine, 'label' or a callable")
    if adapter.decoder and semantic.serve != "states":
        raise ValueError("Semantic.serve = 'pooled' is for pooled encoder outputs: a decoder takes 'states'")
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(  # noqa: TRY004 (a model the tier cannot serve, not a wrong argument type)
            f"CacheConfig.semantic: {type(base).__name__} takes no token ids (its input embedding is "
            f"{type(embedding).__name__}); the verified semantic tier fingerprints token embeddings")
    semantic.check_model(model, base)
    sentence_transformer = adapters.is_sentence_transformer(model)
    owner.near = SemanticTier(semantic, owner.config.num_bits, owner.config.seed)
    if sentence_transformer:
        owner.near.pooling = _sentence_pooling(model, semantic)
    owner.read_top = model is not base and (semantic.kind != "embedding" or sentence_transformer)
    if not owner.read_top:
        return
    top_forward = model.forward

    def forward(*args, **kwargs):
        done = getattr(owner.local, "near_done", None)
        outer = done is None
        if outer:
            done = owner.local.near_done = []
        depth = len(done)
        try:
            output = top_forward(*args, **kwargs)
            for pending in done[depth:]:
                owner.finish_near(pending, output, top=True)
        finally:
            del done[depth:]
            if outer:
                owner.local.near_done = None
        return output

    owner.patched.append(patch(model, forward, owner))


def _shared_tier(settings):
    try:
        from .shared import SharedTier

        return SharedTier(settings)
    except ImportError as err:
        raise ImportError("CacheConfig.shared needs the redis client: pip install redis") from err


def flush(model: nn.Module, timeout: float = 5.0) -> bool:
    """Wait (at most `timeout` seconds) until the shared tier's writer has sent every computed
    entry it queued; True when it has (also when there is no shared tier). A process that exits
    normally flushes for up to 2 s on its own."""
    owner = owner_of(model)
    shared = owner.exact.shared if owner.exact is not None else None
    return shared.flush(timeout) if shared is not None else True


def _sentence_pooling(model: nn.Module, semantic) -> str:
    """A SentenceTransformer's pooling, "mean" or "cls"; refused for serve="pooled" when it is another."""
    modes = []
    for m in model.modules():
        if type(m).__name__ == "Pooling":  # sentence-transformers >= 5: `pooling_mode`, before: a getter
            mode = getattr(m, "pooling_mode", None) or m.get_pooling_mode_str()
            modes += [mode] if isinstance(mode, str) else list(mode)
    mode = "+".join(modes)
    if mode in ("mean", "cls"):
        return mode
    if semantic.serve == "pooled":
        raise ValueError(f"Semantic.serve = 'pooled' needs mean or CLS pooling, and this SentenceTransformer pools by "
                         f"{mode or 'nothing'}: use serve='states'")
    return semantic.pooling


def _hidden_size(base: nn.Module) -> int:
    """The width of the hidden states the blocks pass on."""
    cfg = base.config
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    return base.get_input_embeddings().weight.shape[1]


def _decoder_layout(tier, base: nn.Module, blocks, span: list[int]) -> None:
    """A decoder tier's K/V shape per block, and the final norm that prefix reuse needs: only
    when every block caches (a suffix needs the prefix's K/V at each) and the base model takes a
    KV cache argument (`cache`, or `past_key_values` in older transformers) and `position_ids`."""
    _, kv_heads, head_dim = _kv_shape(base)
    tier.kv_heads, tier.kv_width = kv_heads, 2 * kv_heads * head_dim
    params = inspect.signature(base.forward).parameters
    tier.cache_name = next((n for n in gate.KV_CACHE_NAMES if n in params), None)
    if len(span) == len(blocks) and tier.cache_name is not None and "position_ids" in params:
        tier.final_norm = adapters.final_norm(base)


def _kv_shape(base: nn.Module) -> tuple[int, int, int]:
    """(attention heads, KV heads, head dim) from a decoder's config."""
    cfg = base.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or _hidden_size(base) // heads
    return heads, kv_heads, head_dim


def _check_budget(config: CacheConfig, base: nn.Module, adapter, layer_ids: list[int]) -> int:
    """Features one stored token takes in the exact tier; refuses a max_bytes that cannot hold
    one page of one entry, saying how much that takes."""
    hidden = _hidden_size(base)
    features = hidden
    if adapter.decoder:
        _, kv_heads, head_dim = _kv_shape(base)
        features += (max(layer_ids) - min(layer_ids) + 1) * 2 * kv_heads * head_dim
    size = next(base.parameters()).element_size()
    need = config.page_tokens * features * size
    if config.threshold is None and config.max_bytes is not None and config.max_bytes < need:
        raise ValueError(
            f"CacheConfig.max_bytes = {config.max_bytes} cannot hold one page of one entry of this model: a page "
            f"of {config.page_tokens} tokens x {features} features x {size} bytes takes {need} bytes; raise max_bytes "
            "to at least that (an entry of n tokens takes ceil(n / page_tokens) pages)"
        )
    return features


def disable(model: nn.Module) -> nn.Module:
    """Undo `accelerate` exactly: the original forwards back, banks freed."""
    owner = owner_of(model)
    for module in owner.patched:
        unpatch(module)
    if owner.exact is not None:
        owner.exact.clear()
        if owner.exact.shared is not None:
            owner.exact.shared.close()
    for held_by in (owner.model, adapters.transformers_model(owner.model)):
        if getattr(held_by, _ATTR, None) is owner:
            delattr(held_by, _ATTR)
    return model


def reset(model: nn.Module) -> None:
    """Empty every bank and zero every counter (the shared tier's entries stay in Redis: other
    replicas serve them, and this one warms from them again)."""
    owner = owner_of(model)
    with owner.lock:
        if owner.exact is not None:
            owner.exact.clear()
        for layer in owner.layers.values():
            if layer.bank is not None:
                layer.bank.reset()
            layer.stats = LayerStats(layer=layer.index, bytes=layer.stats.bytes)
        if owner.near is not None:
            owner.near.clear()
        owner.counters = type(owner.counters)()
        if owner.exact is not None and owner.exact.shared is not None:
            owner.exact.shared.reset_stats()


@contextlib.contextmanager
def cached(model: nn.Module, config: CacheConfig | None = None, **overrides):
    """`with llmcache.cached(model, threshold=0.95): ...` accelerates inside, disables after."""
    accelerate(model, config, **overrides)
    try:
        yield model
    finally:
        disable(model)


@contextlib.contextmanager
def bypass(model: nn.Module):
    """Run `model` uncached inside the block, keeping the banks and their contents for after."""
    owner = owner_of(model)
    previous, owner.bypassed = owner.bypassed, True
    try:
        yield model
    finally:
        owner.bypassed = previous


@dataclass
class CacheStats:
    """A snapshot of an accelerated model's cache.

    forwards, rows: base-model calls and their batch rows seen by the cache, cached or not.
    hits: rows served from a bank (exact tier: a served row skips every cached block; semantic
    tier: summed over layers, one per row and layer served), exact_hits + semantic_hits.
    lookups: rows looked up (semantic tier: summed over layers). hit_rate: hits over all rows
    (semantic tier: over rows x cached layers). not_cached: rows that ran uncached, by reason
    (training, grad, inference_tensors, output_attentions, inputs_embeds, too_long, padding: a
    whole decoder row whose trailing padding its batch could not compute from its K/V, ...).
    repeats: rows repeating an earlier row of their own batch (exact tier): not served from the
    bank, not computed either (the first occurrence's result is copied); hits + repeats rows
    skipped the cached blocks.
    prefix_rows: decoder rows that computed only their tokens after a cached prefix.
    last_semantic_rows: the rows of the last routed forward served a neighbour's output.
    tokens_served / tokens_computed: real tokens whose states came from the bank / were computed
    in cached forwards, in total; last_tokens: (served, computed) of the last cached forward.
    entries: entries held (a decoder's: pages of token prefixes, shared by every row extending
    them); bytes: bytes of the states they hold; bytes_reserved: bytes the banks
    have allocated. invalidations: times the weights or the module tree changed (or LoRA adapters
    were merged or unmerged) and every entry was dropped.
    fingerprint_s / lookup_s: host wall time (on CUDA it counts launches, not kernels).
    layers: one LayerStats per cached layer.
    semantic: the verified semantic tier's state and evidence (`llmcache.Semantic`), None when off;
    its hits are in `hits` and `semantic_hits`.
    shared: the shared tier's counters (`llmcache.SharedStats`), None when off; its hits are
    also in `hits` (a row served from Redis is copied into the device bank and served from it).
    """

    tier: str  # "exact" or "semantic"
    forwards: int
    rows: int
    lookups: int
    hits: int
    exact_hits: int
    semantic_hits: int
    insertions: int
    evictions: int
    invalidations: int
    entries: int
    bytes: int
    bytes_reserved: int
    fingerprint_s: float
    lookup_s: float
    not_cached: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    repeats: int = 0
    prefix_rows: int = 0
    tokens_served: int = 0
    tokens_computed: int = 0
    last_tokens: tuple = (0, 0)
    semantic: SemanticStats | None = None
    last_semantic_rows: tuple = ()
    shared: object | None = None  # llmcache.SharedStats

    @property
    def hit_rate(self) -> float:
        per_row = 1 if self.tier == "exact" else len(self.layers)
        return self.hits / (self.rows * per_row) if self.rows and self.layers else 0.0

    def __repr__(self) -> str:
        return (f"CacheStats(forwards={self.forwards}, rows={self.rows}, hits={self.hits}, "
                f"hit_rate={self.hit_rate:.3f}, entries={self.entries}, bytes={self.bytes}, "
                f"bytes_reserved={self.bytes_reserved}, not_cached={self.not_cached})")

    def __str__(self) -> str:
        head = f"{'layer':>5} {'lookups':>8} {'hits':>7} {'hit%':>6} {'exact':>7} {'sem':>6} {'ins':>7} {'evict':>6}"
        lines = [head]
        for s in self.layers:
            lines.append(
                f"{s.layer:>5} {s.lookups:>8} {s.hits:>7} {100 * s.hit_rate:>5.1f}% {s.exact_hits:>7} "
                f"{s.semantic_hits:>6} {s.insertions:>7} {s.evictions:>6}"
            )
        lines.append(
            f"forwards {self.forwards}, rows {self.rows}, hits {self.hits} ({100 * self.hit_rate:.1f} %), "
            f"in-batch repeats {self.repeats}, prefix rows {self.prefix_rows}, tokens served {self.tokens_served} / "
            f"computed {self.tokens_computed}, "
            f"entries {self.entries}, held {self.bytes / 2**20:.2f} MiB of {self.bytes_reserved / 2**20:.2f} MiB "
            f"reserved, inserted {self.insertions}, evicted {self.evictions}, invalidations {self.invalidations}"
        )
        if self.not_cached:
            lines.append("not cached (rows): " + ", ".join(f"{k} {v}" for k, v in sorted(self.not_cached.items())))
        lines.append(f"lookup {1e3 * self.lookup_s:.1f} ms, fingerprint {1e3 * self.fingerprint_s:.1f} ms")
        if self.semantic is not None:
            s = self.semantic
            fmt = lambda b: "never measured" if b is None else f"{100 * b:.2f} %"
            lines.append(f"semantic tier ({s.promise}): {s.state}; served {s.served}, would-be hits {s.would_be}, "
                         f"checked {s.verified} ({s.failed} outside tolerance), explored {s.explored} "
                         f"({s.explored_failed} failed), error bound {fmt(s.error_bound)}, explored-sample bound "
                         f"{fmt(s.realised_bound)}, neighbours narrowed {s.narrowed}")
        if self.shared is not None:
            s = self.shared
            ms = lambda v: "-" if v is None else f"{1e3 * v:.2f} ms"
            lines.append(f"shared tier {s.url}: {s.state}; looked up {s.lookups} rows in {s.round_trips} round trips "
                         f"(p50 {ms(s.latency_p50_s)}, p99 {ms(s.latency_p99_s)}), hits {s.hits}, refused "
                         f"{s.refused or 0}, skipped {s.skipped or 0}, written {s.writes} ({s.bytes_written} B), "
                         f"dropped {s.write_drops or 0}, errors {s.errors or 0}")
        return "\n".join(lines)


def stats(model: nn.Module) -> CacheStats:
    """A snapshot of the cache's counters (see CacheStats)."""
    owner = owner_of(model)
    with owner.lock:
        c = owner.counters
        if owner.exact is not None:
            tier = owner.exact
            layers = [LayerStats(layer=i, lookups=c.looked_up, hits=c.served, exact_hits=c.served - c.semantic_served,
                                 semantic_hits=c.semantic_served, insertions=c.inserted, evictions=c.evicted)
                      for i in tier.span]
            entries, held, reserved = tier.index.entries, tier.held_bytes, tier.reserved_bytes
        else:
            layers = [LayerStats(**{f.name: getattr(layer.stats, f.name) for f in fields(LayerStats)})
                      for layer in owner.layers.values()]
            for layer, snapshot in zip(owner.layers.values(), layers):
                snapshot.bytes = layer.bank.nbytes if layer.bank is not None else 0
            entries = sum(layer.bank.occupied for layer in owner.layers.values() if layer.bank is not None)
            held = reserved = sum(s.bytes for s in layers)
        total = lambda name: sum(getattr(s, name) for s in layers)
        exact = owner.exact is not None
        return CacheStats(
            tier="exact" if exact else "semantic",
            forwards=c.forwards,
            rows=c.rows,
            lookups=c.looked_up if exact else total("lookups"),
            hits=c.served if exact else total("hits"),
            exact_hits=c.served - c.semantic_served if exact else total("exact_hits"),
            semantic_hits=c.semantic_served if exact else total("semantic_hits"),
            insertions=c.inserted if exact else total("insertions"),
            evictions=c.evicted if exact else total("evictions"),
            invalidations=c.invalidations,
            entries=entries,
            bytes=held,
            bytes_reserved=reserved,
            fingerprint_s=c.fingerprint_s + total("fingerprint_s"),
            lookup_s=c.lookup_s + total("lookup_s"),
            not_cached=dict(c.not_cached),
            layers=layers,
            repeats=c.repeats,
            prefix_rows=c.prefix_rows,
            tokens_served=c.tokens_served,
            tokens_computed=c.tokens_computed,
            last_tokens=tuple(c.last_tokens),
            semantic=owner.near.stats() if owner.near is not None else None,
            last_semantic_rows=tuple(c.last_semantic_rows),
            shared=owner.exact.shared.snapshot() if exact and owner.exact.shared is not None else None,
        )


@dataclass(frozen=True)
class HeldEntry:
    """One exact-tier entry: the row it answers (a decoder's: one page of a row, after the
    prefix its `parent` names) and what it takes."""

    ids: tuple[int, ...]  # the real token ids of the row (a decoder: of the page)
    positions: tuple[int, ...]
    token_types: tuple[int, ...]
    namespace: str
    pages: int
    bytes: int
    hits: int  # rows it served
    serial: int = -1  # its number, never reused
    parent: int = -1  # a decoder page: the serial of the page it extends (-1: the row's first page)
    state: str = ""  # the model state it was computed under (llmcache.state: dtype, autocast, adapters, ...)


@dataclass(frozen=True)
class Held:
    """What an accelerated model's cache holds: exact-tier entries, and semantic entries per layer."""

    entries: list  # HeldEntry, exact tier
    layers: dict  # block index -> entries held by that layer's bank (semantic tier)


def held(model: nn.Module) -> Held:
    """What the cache holds now (an inspection surface for tests and for users)."""
    owner = owner_of(model)
    with owner.lock:
        entries = []
        tier = owner.exact
        if tier is not None:
            tier.resolve_pending()
            for e in tier.index.live():
                info = tier.index.describe(e)
                key = rows.parse_key(info.key)
                entries.append(HeldEntry(tuple(key["ids"].tolist()), tuple(key["positions"].tolist()),
                                         tuple(key["types"].tolist()), key["namespace"], info.pages,
                                         info.pages * tier.arena.page_bytes, info.hits, info.serial, key["parent"],
                                         f"{key['dtype']};{key['switches']}"))
        layers = {i: (layer.bank.occupied if layer.bank is not None else 0) for i, layer in owner.layers.items()}
    return Held(entries, layers)


def is_accelerated(model: nn.Module) -> bool:
    """Whether `model` runs through a cache: it was accelerated, or it is the base model inside
    one that was (`stats`, `reset`, `disable` take either)."""
    return getattr(model, _ATTR, None) is not None or patched(model) is not None


__all__ = ["CacheStats", "Held", "HeldEntry", "accelerate", "cached", "disable", "flush", "held", "is_accelerated",
           "reset", "stats"]
