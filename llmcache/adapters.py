"""One small adapter per model family: where the blocks are, and whether they keep a KV cache.

Adding a family is one entry in ADAPTERS: the `model_type` of its config, the attribute path of
its base model (the module taking input_ids and attention_mask) inside a task model, the path of
its block list inside the base model, and whether its blocks are decoder blocks (they write a
KV cache, which the bank then stores beside the hidden state). No model code is copied: the
cache wraps each block's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Adapter:
    model_type: str
    base_prefixes: tuple[str, ...]  # attribute of the base model inside task models
    blocks: str  # dotted path of the nn.ModuleList of blocks inside the base model
    decoder: bool  # blocks call cache.update(k, v, layer_idx): the bank stores K and V too


ADAPTERS = {
    a.model_type: a
    for a in (
        Adapter("bert", ("bert",), "encoder.layer", decoder=False),
        Adapter("roberta", ("roberta",), "encoder.layer", decoder=False),
        Adapter("distilbert", ("distilbert",), "transformer.layer", decoder=False),
        Adapter("gpt2", ("transformer",), "h", decoder=True),
        Adapter("llama", ("model",), "layers", decoder=True),
    )
}


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def resolve(model: nn.Module) -> tuple[Adapter, nn.Module, nn.ModuleList]:
    """(adapter, base model, block list) of a transformers model, or a ValueError saying how to add it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise ValueError(
            f"llmcache does not support model_type {model_type!r} ({type(model).__name__}); supported: "
            f"{', '.join(sorted(ADAPTERS))}. To add a family, add an Adapter to llmcache/adapters.py naming "
            "its base-model attribute, its block list and whether its blocks are decoder blocks."
        )
    for base in [model] + [_get(model, p) for p in adapter.base_prefixes]:
        blocks = _get(base, adapter.blocks) if base is not None else None
        if isinstance(blocks, nn.ModuleList):
            return adapter, base, blocks
    raise ValueError(f"{type(model).__name__}: no block list at '{adapter.blocks}' for model_type {model_type!r}")
