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


# ---- a decoder's exact tier holds pages: one entry per `page` real tokens of a row ---------------
PAGE_TOKENS = 8  # llmcache.CacheConfig().page_tokens, the default


def pages(lengths, page: int = PAGE_TOKENS) -> int:
    """Entries a decoder's exact tier holds for distinct rows of these real-token counts that share
    no first page: ceil(n / page) pages per row (its last page may be partial)."""
    return sum(-(-n // page) for n in lengths)


def real_rows(inputs: dict) -> list[tuple]:
    """(ids, positions, token types) of the real tokens of each cacheable row (a contiguous,
    non-empty mask) of a call. Positions: the call's position_ids, else 0..T-1 (as the model
    numbers them); token types: token_type_ids, else zeros."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    positions = inputs.get("position_ids")
    positions = torch.arange(ids.shape[1]).expand_as(ids) if positions is None else positions.expand_as(ids)
    types = inputs.get("token_type_ids")
    types = torch.zeros_like(ids) if types is None else types.expand_as(ids)
    out = []
    for r in range(ids.shape[0]):
        idx = mask[r].nonzero().flatten()
        if idx.numel() and idx[-1] - idx[0] + 1 == idx.numel():
            out.append(tuple(tuple(t[r, idx].tolist()) for t in (ids, positions, types)))
    return out


def decoder_pages(inputs: dict, page: int = PAGE_TOKENS) -> int:
    """Distinct pages a decoder's exact tier holds once every cacheable row of `inputs` is stored.
    A page is named by its row's real tokens (ids, positions and token types) from the row's start
    to the page's end, so rows whose first k pages are equal hold them once; a partial last page
    of n tokens is another page than a full one."""
    names = set()
    for row in real_rows(inputs):
        tokens = list(zip(*row))
        names.update(tuple(tokens[:end]) for end in range(page, len(tokens) + page, page))
    return len(names)


def held_rows(entries, page: int = PAGE_TOKENS) -> list[tuple]:
    """The rows a decoder's exact tier holds, rebuilt from its page chains (`HeldEntry.parent`):
    for each page no other page extends, the (ids, positions, token types) from its row's start to
    its end, sorted. Checks on the way that every page's parent is held and that every page but a
    row's last is full."""
    by_serial = {e.serial: e for e in entries}
    assert len(by_serial) == len(entries), "two held pages share a serial number"
    extended = {e.parent for e in entries}
    rows = []
    for leaf in entries:
        if leaf.serial in extended:
            continue
        chain, e = [], leaf
        while True:
            chain.append(e)
            if e.parent < 0:
                break
            assert e.parent in by_serial, f"page {e.serial} extends page {e.parent}, which is not held"
            e = by_serial[e.parent]
        chain.reverse()
        assert all(len(p.ids) == page for p in chain[:-1]), "a page before a row's last is not full"
        assert 0 < len(chain[-1].ids) <= page
        rows.append(tuple(sum((getattr(p, name) for p in chain), ()) for name in ("ids", "positions", "token_types")))
    return sorted(rows)
