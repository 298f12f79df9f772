"""Small random-weight models of every supported family, and loaders of the real offline ones."""

from __future__ import annotations

import pytest
import torch
import transformers

from llmcache.models import load_minilm, load_smollm2

VOCAB = 400
LAYERS = 3
ENCODER = {"num_hidden_layers": LAYERS, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
           "vocab_size": VOCAB, "pad_token_id": 0}
DECODER = {**ENCODER, "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": 2}

# The tiny config of every family the tests build: family -> (transformers class prefix, config
# fields, decoder). 3 blocks of hidden size 64 (ELECTRA embeds in 32 and projects; Gemma's heads
# are 16 wide). RoBERTa keeps its own padding_idx 1 (positions count from it) and GPT-2 has no
# padding token, as their configs define them.
TINY = {
    "bert": ("Bert", ENCODER, False),
    "roberta": ("Roberta", {**ENCODER, "pad_token_id": 1}, False),
    "xlm-roberta": ("XLMRoberta", {**ENCODER, "max_position_embeddings": 130}, False),
    "distilbert": ("DistilBert", {"n_layers": LAYERS, "dim": 64, "hidden_dim": 128, "n_heads": 4,
                                  "vocab_size": VOCAB, "pad_token_id": 0}, False),
    "electra": ("Electra", {**ENCODER, "embedding_size": 32}, False),
    "modernbert": ("ModernBert", {**ENCODER, "global_attn_every_n_layers": 2, "local_attention": 8,
                                  "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2},
                   False),
    "gpt2": ("GPT2", {"n_layer": LAYERS, "n_embd": 64, "n_head": 4, "n_positions": 128, "vocab_size": VOCAB,
                      "bos_token_id": 1, "eos_token_id": 2}, True),
    "llama": ("Llama", DECODER, True),
    "qwen2": ("Qwen2", DECODER, True),
    "mistral": ("Mistral", DECODER, True),
    "gemma": ("Gemma", {**DECODER, "head_dim": 16}, True),
    "phi3": ("Phi3", DECODER, True),
}
FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "llama"]  # the families most tests run
DECODERS = {family for family in FAMILIES if TINY[family][2]}
HEADS = ["Model", "ForSequenceClassification", "ForMaskedLM", "ForCausalLM", "ForTokenClassification"]
HEAD_FIELDS = {"ForSequenceClassification": {"num_labels": 3, "pad_token_id": 0},  # (a batch needs a pad id)
               "ForTokenClassification": {"num_labels": 5}}


def model_class(family: str, head: str):
    """The transformers class of `family` with `head` ("Model": the base model), or None."""
    prefix = TINY[family][0]
    if prefix == "GPT2" and head == "ForCausalLM":
        head = "LMHeadModel"
    return getattr(transformers, prefix + head, None)


def tiny_config(family: str, head: str = "Model", **overrides):
    """The tiny config of `family` (`TINY`), with the fields `head` needs; `overrides` replace fields."""
    return model_class(family, head).config_class(**{**TINY[family][1], **HEAD_FIELDS.get(head, {}), **overrides})


def tiny_model(family: str, head: str | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    """A model of `tiny_config(family, head, **overrides)` with random weights (seeded), in eval
    mode. `head` (one of HEADS) defaults to the base model of an encoder, the causal LM of a decoder."""
    head = head or ("ForCausalLM" if TINY[family][2] else "Model")
    config = tiny_config(family, head, **overrides)
    torch.manual_seed(seed)
    return model_class(family, head)(config).eval()


def tiny_classifier(family: str, seed: int = 0, num_labels: int = 3) -> torch.nn.Module:
    """The ...ForSequenceClassification of `tiny_config(family)`, random weights, in eval mode."""
    return tiny_model(family, "ForSequenceClassification", seed, num_labels=num_labels)


VIT = {"image_size": 32, "patch_size": 8, "num_channels": 3, "hidden_size": 32, "num_hidden_layers": 3,
       "num_attention_heads": 4, "intermediate_size": 64}


def tiny_vit(head: str = "ViTModel", seed: int = 0) -> torch.nn.Module:
    """A 3-block ViT of 32x32 images ("ViTModel" or "ViTForImageClassification", 3 labels)."""
    torch.manual_seed(seed)
    if head == "ViTModel":
        return transformers.ViTModel(transformers.ViTConfig(**VIT)).eval()
    return transformers.ViTForImageClassification(transformers.ViTConfig(**VIT, num_labels=3)).eval()


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


def decoded_pages(lengths, fed: int, page: int = PAGE_TOKENS) -> int:
    """Pages `generate` stores from its decode steps for prompts of these real-token counts when
    `fed` new tokens ran through the model (max_new_tokens - 1): the whole pages they complete,
    and when it returns each row's last partial page."""
    if fed <= 0:
        return 0
    return sum((n + fed) // page - n // page + ((n + fed) % page > 0) for n in lengths)


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
