"""Whether a call's arguments let the cache serve it, and why not.

A forward runs uncached, counted under its reason in `stats(model).not_cached`, when the cache
could not serve it exactly: an input it does not key on or cannot serve (inputs_embeds,
head_mask, a 4-D mask, encoder states, any unknown tensor argument), outputs it cannot give for
served rows (attentions, per-layer hidden states), or a KV cache it cannot stand in for (a
decode step, a cache that is not an empty DynamicCache). What the model's own state rules out
(training mode, autograd recording, inference-tensor weights) is `llmcache.state`'s to say.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import kv_cache

# Arguments of a base model's forward that the cache understands: keyed on, or harmless.
KEYED = {"input_ids", "attention_mask", "position_ids", "token_type_ids", "pixel_values"}
HARMLESS = {"use_cache", "return_dict", "cache_position", "kwargs", "self", "past_key_values", "cache",
            "output_attentions", "output_hidden_states"}


def call_reason(model: nn.Module, arguments: dict) -> str | None:
    """Why this call of the base model cannot be cached, or None. `arguments`: its bound arguments."""
    config = getattr(model, "config", None)
    for flag in ("output_attentions", "output_hidden_states"):
        value = arguments.get(flag)
        if value is None:
            value = getattr(config, flag, False)
        if value:
            return flag
    if arguments.get("input_ids") is None:
        pixels = arguments.get("pixel_values")
        if isinstance(pixels, torch.Tensor) and pixels.dim() >= 2 and pixels.is_floating_point():
            return _other_arguments(arguments)
        return "inputs_embeds" if arguments.get("inputs_embeds") is not None else "no_input_ids"
    kv = kv_cache(arguments)
    if kv is not None:
        if type(kv).__name__ != "DynamicCache" or not hasattr(kv, "get_seq_length"):
            return "kv_cache_type"
        if kv.get_seq_length() > 0:
            return "decode_step"
    ids = arguments["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return "input_ids_shape"
    for name in ("attention_mask", "position_ids", "token_type_ids"):
        value = arguments.get(name)
        if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 2
                                  or value.shape[1] != ids.shape[1] or value.shape[0] not in (1, ids.shape[0])):
            return f"{name}_shape"
    return _other_arguments(arguments)


def _other_arguments(arguments: dict) -> str | None:
    for name, value in arguments.items():
        if name in KEYED or name in HARMLESS or value is None or value is False:
            continue
        return name  # inputs_embeds with input_ids, head_mask, encoder_hidden_states, anything unknown
    return None
