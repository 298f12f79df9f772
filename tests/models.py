"""Small random-weight models of every supported family, and loaders of the real offline ones."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaModel,
)

from llmcache.models import load_minilm, load_smollm2

VOCAB = 400
FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "llama"]
DECODERS = {"gpt2", "llama"}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A 3-block model with hidden size 64 and random weights, in eval mode."""
    torch.manual_seed(seed)
    if family == "bert":
        model = BertModel(BertConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4, vocab_size=VOCAB))
    elif family == "roberta":
        model = RobertaModel(RobertaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                           num_attention_heads=4, vocab_size=VOCAB))
    elif family == "distilbert":
        model = DistilBertModel(DistilBertConfig(n_layers=3, dim=64, hidden_dim=128, n_heads=4, vocab_size=VOCAB))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128,
                                           bos_token_id=1, eos_token_id=2))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                             bos_token_id=1, eos_token_id=2, pad_token_id=0))
    else:
        raise ValueError(family)
    return model.eval()


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
