"""Small random-weight models of every supported family, and loaders of the real offline ones."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
)

from llmcache.models import load_minilm, load_smollm2

VOCAB = 400
FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "llama"]
DECODERS = {"gpt2", "llama"}


def tiny_config(family: str, **overrides):
    """The config of a 3-block model of `family` with hidden size 64 (`overrides` replace fields)."""
    encoder = {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    fields, config = {
        "bert": (encoder, BertConfig),
        "roberta": (encoder, RobertaConfig),
        "distilbert": ({"n_layers": 3, "dim": 64, "hidden_dim": 128, "n_heads": 4}, DistilBertConfig),
        "gpt2": ({"n_layer": 3, "n_embd": 64, "n_head": 4, "n_positions": 128, "bos_token_id": 1, "eos_token_id": 2},
                 GPT2Config),
        "llama": ({**encoder, "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
                  LlamaConfig),
    }[family]
    return config(**{**fields, "vocab_size": VOCAB, **overrides})


BASE = {"bert": BertModel, "roberta": RobertaModel, "distilbert": DistilBertModel, "gpt2": GPT2LMHeadModel,
        "llama": LlamaForCausalLM}
CLASSIFIER = {"bert": BertForSequenceClassification, "roberta": RobertaForSequenceClassification,
              "distilbert": DistilBertForSequenceClassification, "gpt2": GPT2ForSequenceClassification,
              "llama": LlamaForSequenceClassification}


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 3-block model with hidden size 64 and random weights, in eval mode (encoders: the base
    model; decoders: the causal LM)."""
    torch.manual_seed(seed)
    return BASE[family](tiny_config(family, **overrides)).eval()


def tiny_classifier(family: str, seed: int = 0, num_labels: int = 3) -> torch.nn.Module:
    """The ...ForSequenceClassification of `tiny_config(family)`, random weights, in eval mode."""
    torch.manual_seed(seed)
    return CLASSIFIER[family](tiny_config(family, num_labels=num_labels, pad_token_id=0)).eval()


def batch(family: str, lengths: list[int], gen: torch.Generator) -> dict:
    """input_ids and attention_mask for rows of the given token counts, padded the family's way
    (right for encoders, left for decoders, as their tokenizers do for generation)."""
    width = max(lengths)
    ids = torch.randint(5, VOCAB, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        if family in DECODERS:
            mask[r, width - n :] = 1
        else:
            mask[r, :n] = 1
    ids = torch.where(mask.bool(), ids, 0)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family in DECODERS:
        # As generate() does: positions count real tokens, so padding does not shift them.
        inputs["position_ids"] = (mask.cumsum(1) - 1).clamp_min(0)
    return inputs


def output(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def minilm():
    """(model, tokenizer) of the real all-MiniLM-L6-v2, or skip where its package is missing."""
    try:
        return load_minilm()
    except ModuleNotFoundError as err:
        pytest.skip(str(err))


def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), or skip."""
    try:
        return load_smollm2()
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
