"""Where a model's blocks are and whether they are decoder blocks: found from its structure.

`resolve(model)` unwraps what holds a `transformers` model (a sentence-transformers
`SentenceTransformer` or `CrossEncoder`: their first `PreTrainedModel`), takes its base model
(`model.base_model`; the encoder of an encoder-decoder such as T5), and finds the block list: the
`nn.ModuleList` of same-class modules inside the base model with as many blocks as the config has
layers (the largest such list otherwise). Blocks are decoder blocks when one of their attention
modules is causal (`is_causal`) and they take a KV cache: the exact tier then stores each block's
K/V beside the hidden state, so `generate()` gets exact KV entries.

A model's geometry (`Geometry`: hidden size, K/V heads and width, the KV cache argument, the
final norm) is read here once, at `accelerate`, and handed to the tiers as a frozen value.

What the structure cannot tell is said with `register_adapter(model_type, blocks=..., base=...,
decoder=...)`, which wins over the search. No model code is copied: the cache wraps each block's
own forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

# The names a base model's forward takes its KV cache under (transformers renamed it; both are accepted).
KV_CACHE_NAMES = ("cache", "past_key_values")
# ... and a block's forward (GPT-2's blocks: `layer_past`).
BLOCK_CACHE_NAMES = ("cache", "past_key_values", "layer_past")
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class Adapter:
    model_type: str
    base: str | None  # dotted path of the base model inside the model (None: model.base_model)
    blocks: str  # dotted path of the nn.ModuleList of blocks inside the base model
    decoder: bool  # blocks call cache.update(k, v, layer_idx): entries store their K and V too


_REGISTERED: dict[str, Adapter] = {}


def register_adapter(model_type: str, *, blocks: str, decoder: bool, base: str | None = None) -> None:
    """Say where the blocks of `model_type` models are, for a family whose structure misleads the search.

    Args:
        model_type: the `config.model_type` it applies to.
        blocks: dotted path of the `nn.ModuleList` of blocks inside the base model, e.g. "encoder.layer".
        decoder: the blocks write a KV cache (`cache.update(k, v, layer_idx)`).
        base: dotted path of the base model (the module taking `input_ids`) inside task models;
            None: `model.base_model`.
    """
    if not isinstance(model_type, str) or not isinstance(blocks, str) or not blocks:
        raise TypeError("register_adapter(model_type: str, blocks='path.to.ModuleList', decoder=bool, base=None)")
    _REGISTERED[model_type] = Adapter(model_type, base, blocks, bool(decoder))


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def is_sentence_transformer(model: nn.Module) -> bool:
    """A sentence-transformers `SentenceTransformer` (its forward takes the features dict)."""
    return any(c.__name__ == "SentenceTransformer" for c in type(model).__mro__)


def transformers_model(model: nn.Module) -> nn.Module:
    """The `transformers` model inside `model` (itself, or the first one a wrapper holds)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise ValueError(
        f"{type(model).__name__} holds no transformers PreTrainedModel: llmcache accelerates transformers "
        "models (and sentence-transformers models, which hold one)"
    )


def _base_of(model: nn.Module) -> nn.Module:
    config = model.config
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder()  # T5: the encoder's blocks cache; the decoder runs as it is
    return getattr(model, "base_model", model)


def _block_list(base: nn.Module, config) -> nn.ModuleList | None:
    """The ModuleList of same-class blocks the base model iterates."""
    candidates = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                  and len({type(b) for b in m}) == 1]
    layers = next((getattr(config, n) for n in _LAYER_COUNTS if isinstance(getattr(config, n, None), int)), None)
    exact = [m for m in candidates if len(m) == layers]
    pool = exact or candidates
    return max(pool, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def _is_decoder(block: nn.Module) -> bool:
    takes_cache = any(n in inspect.signature(block.forward).parameters for n in BLOCK_CACHE_NAMES)
    return takes_cache and any(getattr(m, "is_causal", False) is True for m in block.modules())


def resolve(model: nn.Module) -> tuple[Adapter, nn.Module, nn.ModuleList]:
    """(adapter, base model, block list) of a model, or a ValueError saying which part was not found."""
    inner = transformers_model(model)
    config = inner.config
    model_type = getattr(config, "model_type", None)
    registered = _REGISTERED.get(model_type)
    if registered is not None:
        base = _get(inner, registered.base) if registered.base else _base_of(inner)
        blocks = _get(base, registered.blocks) if base is not None else None
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"register_adapter({model_type!r}): no nn.ModuleList at '{registered.blocks}' inside "
                             f"{type(base).__name__}; fix the path")
        return registered, base, blocks
    base = _base_of(inner)
    if not hasattr(base, "get_input_embeddings") or base.get_input_embeddings() is None:
        raise ValueError(f"{type(inner).__name__}: its base model {type(base).__name__} has no input embeddings; "
                         "name it with llmcache.register_adapter(model_type, base='...', blocks='...', decoder=...)")
    blocks = _block_list(base, config)
    if blocks is None:
        raise ValueError(f"{type(inner).__name__} (model_type {model_type!r}): found no nn.ModuleList of blocks in "
                         f"{type(base).__name__}; name it with llmcache.register_adapter({model_type!r}, "
                         "blocks='path.to.ModuleList', decoder=...)")
    path = next(name for name, m in base.named_modules() if m is blocks)
    return Adapter(model_type, None, path, _is_decoder(blocks[0])), base, blocks


FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm")


def final_norm(base: nn.Module) -> nn.Module | None:
    """The per-position norm a decoder's base model applies after its last block (`norm` in Llama,
    Qwen2, Mistral, Gemma, Phi-3; `ln_f` in GPT-2), or None. Prefix reuse applies it to the
    stored last-block states of the prefix, which is what the model itself does to them."""
    for name in FINAL_NORMS:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module) and not list(module.children()):
            return module
    return None


def kv_cache(arguments: dict):
    """The KV cache a call was given, under either name, or None."""
    return next((arguments[n] for n in KV_CACHE_NAMES if arguments.get(n) is not None), None)


def hidden_size(base: nn.Module) -> int:
    """The width of the hidden states the blocks pass on."""
    cfg = base.config
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    return base.get_input_embeddings().weight.shape[1]


def kv_shape(base: nn.Module) -> tuple[int, int, int]:
    """(attention heads, KV heads, head dim) from a decoder's config."""
    cfg = base.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden_size(base) // heads
    return heads, kv_heads, head_dim


@dataclass(frozen=True)
class Geometry:
    """What the exact tier stores per token and how a decoder hands K/V around.

    hidden: the blocks' hidden size. kv_heads, kv_width: per span block, the K/V heads and the
    width of K|V per token (2 x kv_heads x head dim; 0 for an encoder). blocks: the span's
    length. features: one stored token's width, hidden + blocks x kv_width. cache_name: the base
    model's KV cache argument (None: none). final_norm: the norm after the last block, which
    prefix reuse applies to stored states (None: no prefix reuse, whole rows only).
    """

    decoder: bool
    hidden: int
    blocks: int
    kv_heads: int = 0
    kv_width: int = 0
    cache_name: str | None = None
    final_norm: nn.Module | None = None

    @property
    def features(self) -> int:
        return self.hidden + self.blocks * self.kv_width


def geometry(base: nn.Module, decoder: bool, span: list[int], num_blocks: int) -> Geometry:
    """The geometry of a model whose blocks `span` cache. Prefix reuse needs every block cached
    (a suffix needs the prefix's K/V at each) and a base model that takes a KV cache argument
    (`cache`, or `past_key_values` in older transformers) and `position_ids`."""
    hidden = hidden_size(base)
    if not decoder:
        return Geometry(False, hidden, len(span))
    _, kv_heads, head_dim = kv_shape(base)
    params = inspect.signature(base.forward).parameters
    cache_name = next((n for n in KV_CACHE_NAMES if n in params), None)
    norm = final_norm(base) if len(span) == num_blocks and cache_name is not None and "position_ids" in params \
        else None
    return Geometry(True, hidden, len(span), kv_heads, 2 * kv_heads * head_dim, cache_name, norm)
