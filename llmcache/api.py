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
import warnings

from torch import nn

from . import adapters, ops
from .config import CacheConfig
from .patch import patch, patched, unpatch
from .router import ModelCache
from .tiers.exact import Embeddings, ExactTier, Remote, Store
from .tiers.layerwise import LayerwiseTier
from .tiers.verified import SemanticTier

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
            e.g. accelerate(model, layers=range(0, 4), padding="exact").
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
    _refuse_accelerated(model, inner)
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
    planes = ops.random_planes(adapters.hidden_size(base), config.num_bits, seed=config.seed, device=weight.device)
    owner = ModelCache(config=config, adapter=adapter, model=model, base=base, layer_ids=layer_ids, planes=planes)
    if config.layerwise is None:
        _exact_tiers(owner, model, base, adapter, blocks, embedding, weight)
    else:
        _layerwise_tier(owner, blocks, embedding)
    _attach(owner, inner)
    return model


def _attach(owner: ModelCache, inner: nn.Module) -> None:
    """Route the base model's forward through the cache and take the first look at its state."""
    model = owner.model
    owner.patched.append(patch(owner.base, owner.call, owner))
    owner.state.check()  # the first look at the model's state: later forwards are compared with it
    if owner.state.inference_tensors:
        warnings.warn(f"{type(model).__name__}'s weights are inference tensors (built or moved under "
                      "torch.inference_mode()), which keep no version counter: llmcache cannot see them change, "
                      "so it runs this model uncached (stats: not_cached['inference_tensors']). Build, load and "
                      "move the model outside inference_mode, and run it inside.", stacklevel=3)
    setattr(model, _ATTR, owner)
    if inner is not model:
        setattr(inner, _ATTR, owner)  # the wrapper and the model inside share one cache


def _refuse_accelerated(model: nn.Module, inner: nn.Module) -> None:
    for held_by in {id(model): model, id(inner): inner}.values():
        if getattr(held_by, _ATTR, None) is not None:
            raise ValueError(f"this model{'' if held_by is model else ' (or the transformers model inside it)'} is "
                             "already accelerated: call llmcache.disable on what you accelerated first")


def _layerwise_tier(owner: ModelCache, blocks, embedding) -> None:
    """The per-block tier (CacheConfig.layerwise); patches its blocks and the input embedding."""
    tier = LayerwiseTier(owner, blocks, owner.layer_ids)
    owner.tiers = [tier]
    for index, layer in tier.layers.items():
        owner.patched.append(patch(blocks[index], layer.forward, owner))
    owner.patched.append(patch(embedding, functools.partial(tier.embed, embedding.forward), owner))


def _exact_tiers(owner: ModelCache, model: nn.Module, base: nn.Module, adapter, blocks, embedding, weight) -> None:
    """The exact tier over the span first..last cached block, with the verified and shared tiers
    behind it where the config asks for them; patches the span's blocks."""
    config = owner.config
    span = list(range(min(owner.layer_ids), max(owner.layer_ids) + 1))
    geometry = adapters.geometry(base, adapter.decoder, span, len(blocks))
    _check_budget(config, geometry, weight.element_size())
    store = Store(config, geometry.features, weight.dtype, weight.device)
    near = _verified_tier(owner, model, base, adapter, embedding, store) if config.semantic is not None else None
    remote = Remote(config.shared) if config.shared is not None else None
    exact = ExactTier(owner, base, blocks, span, geometry, store, near, remote)
    owner.tiers = [t for t in (exact, near, remote) if t is not None]
    if near is not None and near.read_top:
        owner.patched.append(patch(model, near.wrap_top(model.forward), owner))
    for position, index in enumerate(span):
        owner.patched.append(patch(blocks[index], functools.partial(exact.splice.forward, position), owner))
    embeddings = getattr(base, "embeddings", None)
    if not adapter.decoder and near is None and span[0] == 0 and isinstance(embeddings, nn.Module):
        exact.embeddings = Embeddings(exact, embeddings, embeddings.forward)  # (not computed where nothing reads them)
        owner.patched.append(patch(embeddings, exact.embeddings.forward, owner))
    if adapter.decoder and callable(getattr(model, "generate", None)):
        owner.patched.append(patch(model, _generating(exact, model.generate), owner, name="generate"))


def _generating(exact: ExactTier, generate):
    """`model.generate` that stores, when it returns, the pages its decode steps completed."""

    @functools.wraps(generate)
    def run(*args, **kwargs):
        with exact.generating():
            return generate(*args, **kwargs)

    return run


def _verified_tier(owner: ModelCache, model: nn.Module, base: nn.Module, adapter, embedding, store) -> SemanticTier:
    """The verified semantic tier (CacheConfig.semantic), refusing what it cannot serve."""
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
    cfg = owner.config
    return SemanticTier(semantic, cfg.num_bits, cfg.seed, store, embedding, owner.planes, cfg.backend, owner.lock,
                        read_top=model is not base and (semantic.kind != "embedding" or sentence_transformer),
                        pooling=_sentence_pooling(model, semantic) if sentence_transformer else None)


def flush(model: nn.Module, timeout: float = 5.0) -> bool:
    """Wait (at most `timeout` seconds) until the shared tier's writer has sent every computed
    entry it queued; True when it has (also when there is no shared tier). A process that exits
    normally flushes for up to 2 s on its own."""
    return all(tier.flush(timeout) for tier in owner_of(model).tiers)


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


def _check_budget(config: CacheConfig, geometry, element_size: int) -> None:
    """Refuse a max_bytes that cannot hold one page of one entry, saying how much that takes."""
    need = config.page_tokens * geometry.features * element_size
    if config.max_bytes is not None and config.max_bytes < need:
        raise ValueError(
            f"CacheConfig.max_bytes = {config.max_bytes} cannot hold one page of one entry of this model: a page "
            f"of {config.page_tokens} tokens x {geometry.features} features x {element_size} bytes takes {need} "
            "bytes; raise max_bytes to at least that (an entry of n tokens takes ceil(n / page_tokens) pages)"
        )


def disable(model: nn.Module) -> nn.Module:
    """Undo `accelerate` exactly: the original forwards back, banks freed."""
    owner = owner_of(model)
    for module in owner.patched:
        unpatch(module)
    for tier in owner.tiers:
        tier.close()
    for held_by in (owner.model, adapters.transformers_model(owner.model)):
        if getattr(held_by, _ATTR, None) is owner:
            delattr(held_by, _ATTR)
    return model


def reset(model: nn.Module) -> None:
    """Empty every bank and zero every counter (the shared tier's entries stay in Redis: other
    replicas serve them, and this one warms from them again)."""
    owner = owner_of(model)
    with owner.lock:
        for tier in owner.tiers:
            tier.clear()
            tier.reset_stats()
        owner.counters = type(owner.counters)()


@contextlib.contextmanager
def cached(model: nn.Module, config: CacheConfig | None = None, **overrides):
    """`with llmcache.cached(model, padding="exact"): ...` accelerates inside, disables after."""
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


def is_accelerated(model: nn.Module) -> bool:
    """Whether `model` runs through a cache: it was accelerated, or it is the base model inside
    one that was (`stats`, `reset`, `disable` take either)."""
    return getattr(model, _ATTR, None) is not None or patched(model) is not None


__all__ = ["accelerate", "bypass", "cached", "disable", "flush", "is_accelerated", "owner_of", "reset"]
