"""Public API: accelerate / disable / reset / stats / cached.

`accelerate(model)` acts on a built `transformers` model in place: it points each cached block's
`forward` at a CachedLayer (an instance attribute: weights, state_dict and module tree are
untouched), adds a pre/post hook on the base model (the per-forward context) and a hook on the
input embedding (the fingerprint). `disable` removes exactly those, restoring the original
forwards. The cache is for inference: in training mode every block runs as uncached.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, fields

from torch import nn

from . import adapters, ops
from .cache import CachedLayer, LayerStats, ModelCache
from .config import CacheConfig

_ATTR = "_llmcache"


def _owner(model: nn.Module) -> ModelCache:
    owner = getattr(model, _ATTR, None)
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
        The same model. Calls made with `input_ids` (and optionally `attention_mask`) in eval mode
        go through the cache; anything else (training, inputs_embeds only, decode steps of
        generate) runs uncached.

    Example:
        >>> model = llmcache.accelerate(AutoModel.from_pretrained(path).eval())
        >>> with torch.inference_mode():
        ...     model(**tokenizer(texts, padding=True, return_tensors="pt"))
        >>> print(llmcache.stats(model))
    """
    if getattr(model, _ATTR, None) is not None:
        raise ValueError("this model is already accelerated: call llmcache.disable(model) first")
    config = (config or CacheConfig()).replace(**overrides) if overrides else (config or CacheConfig())
    adapter, base, blocks = adapters.resolve(model)
    layer_ids = config.validate(len(blocks))
    embedding = base.get_input_embeddings()
    device = embedding.weight.device
    planes = ops.random_planes(embedding.weight.shape[1], config.num_bits, seed=config.seed, device=device)
    owner = ModelCache(config=config, adapter=adapter, base=base, layer_ids=layer_ids, planes=planes)
    for position, index in enumerate(layer_ids):
        module = blocks[index]
        layer = CachedLayer(owner, index, position, module)
        owner.layers[index] = layer
        module.forward = layer.forward
    signature = inspect.signature(base.forward)

    def before(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs", {})
        get = lambda name: bound.get(name, extra.get(name))
        kv_cache = get("cache") if get("cache") is not None else get("past_key_values")
        owner.begin(get("input_ids"), get("attention_mask"), kv_cache, get("position_ids"))

    def after(module, args, kwargs, output):
        owner.end(failed=output is None)  # always_call: also runs (with None) when forward raised

    def on_embedding(module, args, output):
        owner.fingerprint(output)

    owner.hooks = [
        base.register_forward_pre_hook(before, with_kwargs=True),
        base.register_forward_hook(after, with_kwargs=True, always_call=True),
        embedding.register_forward_hook(on_embedding),
    ]
    setattr(model, _ATTR, owner)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo `accelerate` exactly: original block forwards back, hooks removed, banks freed."""
    owner = _owner(model)
    for layer in owner.layers.values():
        if layer.module.__dict__.get("forward") == layer.forward:
            del layer.module.forward
    for hook in owner.hooks:
        hook.remove()
    delattr(model, _ATTR)
    return model


def reset(model: nn.Module) -> None:
    """Empty every bank (memory stays allocated) and zero the counters."""
    owner = _owner(model)
    with owner.lock:
        for layer in owner.layers.values():
            if layer.bank is not None:
                layer.bank.reset()
            layer.stats = LayerStats(layer=layer.index, bytes=layer.stats.bytes)
            layer._divergence_samples = 0
        owner.fingerprint_s = 0.0


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
    owner = _owner(model)
    previous, owner.bypassed = owner.bypassed, True
    try:
        yield model
    finally:
        owner.bypassed = previous


@dataclass
class CacheStats:
    """Totals over the cached layers plus `layers`, one LayerStats per cached layer.

    lookups: rows looked up (cacheable rows x cached layers); hits: rows served from a bank
    (exact_hits + semantic_hits); hit_rate = hits / lookups; bytes: held by all banks now;
    fingerprint_s / lookup_s / verify_s: seconds spent fingerprinting, looking up and measuring
    divergence (host wall time: on CUDA it counts launches, not kernel time).
    """

    lookups: int
    hits: int
    exact_hits: int
    semantic_hits: int
    insertions: int
    evictions: int
    verified: int
    bytes: int
    fingerprint_s: float
    lookup_s: float
    verify_s: float
    forwards: int
    layers: list

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def __str__(self) -> str:
        head = f"{'layer':>5} {'lookups':>8} {'hits':>7} {'hit%':>6} {'exact':>7} {'sem':>6} {'ins':>7} {'evict':>6} " \
               f"{'verif':>5} {'diverg':>7} {'lookup ms':>9} {'MiB':>8}"
        lines = [head]
        for s in self.layers:
            lines.append(
                f"{s.layer:>5} {s.lookups:>8} {s.hits:>7} {100 * s.hit_rate:>5.1f}% {s.exact_hits:>7} "
                f"{s.semantic_hits:>6} {s.insertions:>7} {s.evictions:>6} {s.verified:>5} "
                f"{s.mean_divergence:>7.4f} {1e3 * s.lookup_s:>9.1f} {s.bytes / 2**20:>8.1f}"
            )
        lines.append(
            f"{'all':>5} {self.lookups:>8} {self.hits:>7} {100 * self.hit_rate:>5.1f}% {self.exact_hits:>7} "
            f"{self.semantic_hits:>6} {self.insertions:>7} {self.evictions:>6} {self.verified:>5} {'':>7} "
            f"{1e3 * self.lookup_s:>9.1f} {self.bytes / 2**20:>8.1f}"
        )
        lines.append(f"forwards: {self.forwards}, fingerprint: {1e3 * self.fingerprint_s:.1f} ms")
        return "\n".join(lines)


def stats(model: nn.Module) -> CacheStats:
    """A snapshot of the cache's counters (see CacheStats)."""
    owner = _owner(model)
    with owner.lock:
        layers = [LayerStats(**{f.name: getattr(layer.stats, f.name) for f in fields(LayerStats)})
                  for layer in owner.layers.values()]
    for layer, snapshot in zip(owner.layers.values(), layers):
        snapshot.bytes = layer.bank.nbytes if layer.bank is not None else 0
    total = lambda name: sum(getattr(s, name) for s in layers)
    return CacheStats(
        lookups=total("lookups"),
        hits=total("hits"),
        exact_hits=total("exact_hits"),
        semantic_hits=total("semantic_hits"),
        insertions=total("insertions"),
        evictions=total("evictions"),
        verified=total("verified"),
        bytes=total("bytes"),
        fingerprint_s=owner.fingerprint_s + total("fingerprint_s"),
        lookup_s=total("lookup_s"),
        verify_s=total("verify_s"),
        forwards=owner.forwards,
        layers=layers,
    )


def is_accelerated(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


__all__ = ["CacheStats", "accelerate", "cached", "disable", "is_accelerated", "reset", "stats"]
