"""Every family of issue #13, found from its structure: no adapter entry, no registration.

Each family is built from a tiny random config (3 blocks, hidden 64) as its base model and every
task head it has (...ForSequenceClassification, ...ForMaskedLM, ...ForCausalLM,
...ForTokenClassification). For each: `llmcache.accelerate` works as it is; the outputs of the
first call and of an exact repeat are bit-identical (`helpers.assert_outputs`) to the uncached model's at
the real positions of every row (per-row logits: the whole row); the repeat is served
(`stats(model).hits`, and the blocks' own code computes no row). Decoders: `generate` (greedy,
and sampling under a seed) gives the uncached model's tokens, and its prefill repeated is served.

`llmcache.register_adapter` adds a family in one line: a custom model whose structure misleads
the search (a decoy list of same-class modules), an existing family under an explicit path, and a
decoder; and the errors when the structure has no block list name `register_adapter`.

The exact tier runs here with padding="masked" (served rows hold zeros at padding positions, and
are served whatever their padding): these tests are about serving at real positions;
tests/test_padding.py holds what "auto" and "exact" give at padding positions.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import assert_outputs, batch, computed_rows
from models import (
    DECODER,
    ENCODER,
    HEADS,
    LAYERS,
    TINY,
    VOCAB,
    decoded_pages,
    decoder_pages,
    held_rows,
    model_class,
    pages,
    real_rows,
    tiny_model,
)
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

import llmcache

CASES = [pytest.param(family, head, id=f"{family}-{head}")
         for family in TINY for head in HEADS if model_class(family, head) is not None]
CAUSAL = [pytest.param(family, id=family) for family, (_, _, decoder) in TINY.items() if decoder]


# ---- every family and head, found from its structure -------------------------------------------
@pytest.mark.parametrize("family,head", CASES)
def test_family_exact_repeat(family, head, gen):
    decoder = TINY[family][2]
    model = tiny_model(family, head)
    inputs = batch(family, [7, 12, 3, 9], gen)
    # An encoder holds one entry per row; a decoder one per page of a row's real tokens (here
    # 1 + 2 + 1 + 2, rows of random ids sharing no first page).
    entries = decoder_pages(inputs) if decoder else 4
    assert not decoder or entries == pages([7, 12, 3, 9]) == 6
    with torch.inference_mode():
        want = model(**inputs)
    llmcache.accelerate(model, padding="masked")  # nothing registered
    try:
        with torch.inference_mode(), computed_rows(model) as seen:
            first = model(**inputs)
            assert seen.rows == [4] * LAYERS  # every row computed once
            s = llmcache.stats(model)
            assert (s.hits, s.insertions, s.not_cached) == (0, entries, {}), s
            if decoder:  # the page chains held are the four rows
                assert held_rows(llmcache.held(model).entries) == sorted(real_rows(inputs))
            again = model(**inputs)
            assert seen.rows == [4] * LAYERS, "the repeat ran the blocks"
        # (The KV cache a decoder's forward returns: test_decoder_forward_returns_kv_cache.)
        assert_outputs(first, want, inputs["attention_mask"], kv=False)
        assert_outputs(again, want, inputs["attention_mask"], kv=False)
        s = llmcache.stats(model)
        assert (s.rows, s.hits, s.entries, s.insertions) == (8, 4, entries, entries), s
    finally:
        llmcache.disable(model)
    with torch.inference_mode():
        assert_outputs(model(**inputs), want, inputs["attention_mask"])


@pytest.mark.parametrize("family,head", [c for c in CASES if TINY[c.values[0]][2]
                                         and c.values[1] != "ForTokenClassification"])  # (returns no cache)
def test_decoder_forward_returns_kv_cache(family, head, gen):
    """A decoder's plain forward (use_cache defaults to True) returns the KV cache the uncached
    model returns, at every real position, on the first call and on the served repeat."""
    model = tiny_model(family, head)
    inputs = batch("left", [7, 12, 3, 9], gen)
    with torch.inference_mode():
        want = model(**inputs)
    assert getattr(want, "cache", None) is not None
    llmcache.accelerate(model, padding="masked")
    try:
        with torch.inference_mode():
            for call in ("first", "repeat"):
                got = model(**inputs)
                assert_outputs(got, want, inputs["attention_mask"])  # first call, then the repeat
        assert llmcache.stats(model).hits == 4
    finally:
        llmcache.disable(model)


@pytest.mark.parametrize("family,head", [c for c in CASES if c.values[1] == "Model"])
def test_family_partial_batch(family, head, gen):
    """A batch mixing cached rows and new ones: the cached rows are served (equal bit for bit to the
    uncached model on the batch they were computed in), the new rows compute."""
    model = tiny_model(family, head)
    seen_rows = batch(family, [6, 10], gen)
    new_rows = batch(family, [8, 10], gen)
    mixed = {k: torch.cat([seen_rows[k], new_rows[k]]) for k in seen_rows}
    with torch.inference_mode():
        want_seen = model(**seen_rows)
        want_mixed = model(**mixed)
    llmcache.accelerate(model, padding="masked")
    try:
        with torch.inference_mode():
            model(**seen_rows)
            with computed_rows(model) as seen:
                got = model(**mixed)
            assert seen.rows == [2] * LAYERS
        assert llmcache.stats(model).hits == 2
        mask = mixed["attention_mask"]
        # Served: the blocks' output is the stored one, bit for bit; the pooler after the blocks
        # runs on four rows instead of two, so it is only close.
        assert_outputs(got, want_seen, mask, rows=[0, 1], kv=False, close=("pooler_output",))
        # computed as two of four rows, so only close to the uncached four-row batch
        assert_outputs(got, want_mixed, mask, rows=[2, 3], close_rows=(2, 3), kv=False)
    finally:
        llmcache.disable(model)


@pytest.mark.parametrize("family,head", [c for c in CASES if c.values[1] in ("Model", "ForCausalLM")])
def test_family_save_load_fresh_model(family, head, gen, tmp_path):
    """Entries saved, loaded into a fresh copy of the model: its first forward is served whole
    (no block has run in that process yet) and equals the uncached model bit for bit."""
    decoder = TINY[family][2]
    inputs = batch(family, [5, 11, 8], gen)
    model = tiny_model(family, head)
    with torch.inference_mode():
        want = model(**inputs)
    llmcache.accelerate(model, padding="masked")
    with torch.inference_mode():
        model(**inputs)
    llmcache.save(model, tmp_path / "bank.safetensors")
    llmcache.disable(model)
    fresh = llmcache.accelerate(tiny_model(family, head), padding="masked")
    try:
        llmcache.load(fresh, tmp_path / "bank.safetensors")
        held = llmcache.held(fresh).entries
        if decoder:  # pages of the rows (5, 11, 8 tokens: 1 + 2 + 1), their chains intact
            assert len(held) == decoder_pages(inputs) == pages([5, 11, 8]) == 4
            assert held_rows(held) == sorted(real_rows(inputs))
        else:
            assert len(held) == 3
        with torch.inference_mode(), computed_rows(fresh) as seen:
            got = fresh(**inputs)
        assert seen.rows == [0] * LAYERS, "a loaded entry was computed again"
        assert llmcache.stats(fresh).hits == 3
        assert_outputs(got, want, inputs["attention_mask"])
    finally:
        llmcache.disable(fresh)


@pytest.mark.parametrize("family", CAUSAL)
def test_decoder_forward_then_decode_step(family, gen):
    """A prompt's forward, then one decode step on the KV cache it returned (a hand-written decode
    loop): the step's logits equal the uncached model's, first call and repeat."""
    model = tiny_model(family, "ForCausalLM")
    inputs = batch("left", [6, 10], gen)
    step = {"input_ids": torch.tensor([[11], [12]]),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1),
            "position_ids": inputs["position_ids"][:, -1:] + 1}

    def run():
        with torch.inference_mode():
            prompt = model(**inputs, use_cache=True)
            return prompt.logits[:, -1], model(**step, cache=prompt.cache).logits

    want_prompt, want_step = run()
    llmcache.accelerate(model, padding="masked")
    try:
        for call in range(2):
            got_prompt, got_step = run()
            assert torch.equal(got_prompt, want_prompt), f"prompt logits, call {call}"
            assert torch.equal(got_step, want_step), f"decode step on the returned cache, call {call}"
        assert llmcache.stats(model).hits == 2
    finally:
        llmcache.disable(model)


@pytest.mark.parametrize("family", CAUSAL)
def test_decoder_generate(family, gen):
    """generate (greedy, then sampling under a seed) gives the uncached model's tokens; each
    prefill repeated is served."""
    model = tiny_model(family, "ForCausalLM")
    inputs = batch("left", [5, 9, 7], gen)
    entries = decoder_pages(inputs)  # the prompts' pages (at the positions generate gives them)
    assert entries == pages([5, 9, 7]) == 4  # 1 + 2 + 1: random ids share no first page
    inputs.pop("position_ids")  # generate makes them from the mask
    kw = {"max_new_tokens": 6, "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():
        greedy = model.generate(**inputs, do_sample=False, **kw)
        torch.manual_seed(1234)
        sampled = model.generate(**inputs, do_sample=True, top_k=0, **kw)
    assert greedy.shape == (3, 9 + 6)
    llmcache.accelerate(model, padding="masked")
    try:
        with torch.inference_mode():
            for call in range(2):
                assert torch.equal(model.generate(**inputs, do_sample=False, **kw), greedy), f"greedy, call {call}"
            s = llmcache.stats(model)
            # The second prefill is served; the first generate also stored the pages its decode
            # steps completed (5 of the 6 new tokens ran through the model), but for a cache of
            # sliding-window layers (Mistral's), which is not followed.
            decoded = 0 if family == "mistral" else decoded_pages((5, 9, 7), 5)
            assert s.hits == 3 and s.entries == entries + decoded and s.decode_pages == decoded, s
            for call in range(2):
                torch.manual_seed(1234)
                out = model.generate(**inputs, do_sample=True, top_k=0, **kw)
                assert torch.equal(out, sampled), f"sampled, call {call}"
            assert llmcache.stats(model).hits == 9
    finally:
        llmcache.disable(model)


# ---- a family in one line: register_adapter ------------------------------------------------------
class OddConfig(PretrainedConfig):
    model_type = "llmcache_test_odd"

    def __init__(self, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        super().__init__(**kwargs)


class OddBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mix = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, hidden_states, attention_mask=None):
        weights = attention_mask[:, None, :].float() if attention_mask is not None else 1.0
        context = (hidden_states * weights.transpose(1, 2)).sum(1, keepdim=True) / weights.sum(-1, keepdim=True)
        return self.norm(hidden_states + torch.tanh(self.mix(hidden_states + context)))


class OddModel(PreTrainedModel):
    """Blocks at an unusual path (`trunk.stages.blocks`), beside a decoy: a list of as many
    same-class modules as there are layers, with more parameters than the blocks, that the model
    applies after them. The structure alone cannot tell which list is the blocks."""

    config_class = OddConfig
    base_model_prefix = ""

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.trunk = nn.Module()
        self.trunk.stages = nn.Module()
        blocks = [OddBlock(config.hidden_size) for _ in range(config.num_hidden_layers)]
        self.trunk.stages.blocks = nn.ModuleList(blocks)
        self.decoy = nn.ModuleList([nn.Linear(config.hidden_size, 4 * config.hidden_size)
                                    for _ in range(config.num_hidden_layers)])
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, return_dict=None):
        h = self.embed(input_ids)
        for block in self.trunk.stages.blocks:
            h = block(h, attention_mask)
        h = h + sum(lin(h)[..., : h.shape[-1]] for lin in self.decoy)
        return BaseModelOutput(last_hidden_state=h)


def test_register_adapter_custom_model(gen):
    llmcache.register_adapter("llmcache_test_odd", blocks="trunk.stages.blocks", decoder=False)
    torch.manual_seed(0)
    model = OddModel(OddConfig()).eval()
    inputs = batch("right", [4, 9, 6], gen)
    with torch.inference_mode():
        want = model(**inputs)
    llmcache.accelerate(model, padding="masked")
    try:
        with torch.inference_mode(), computed_rows(model.trunk.stages.blocks) as seen:
            first = model(**inputs)
            again = model(**inputs)
        assert seen.rows == [3] * LAYERS  # the registered blocks ran for the first call only
        assert_outputs(first, want, inputs["attention_mask"])
        assert_outputs(again, want, inputs["attention_mask"])
        assert llmcache.stats(model).hits == 3
    finally:
        llmcache.disable(model)


def test_register_adapter_existing_family_explicit_path(gen):
    """An existing family under another model_type, its blocks named explicitly (base model too)."""

    class NamedBertConfig(transformers.BertConfig):
        model_type = "llmcache_test_bert"

    llmcache.register_adapter("llmcache_test_bert", blocks="encoder.layer", decoder=False, base="bert")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(NamedBertConfig(**ENCODER, num_labels=2)).eval()
    inputs = batch("right", [5, 11], gen)
    with torch.inference_mode():
        want = model(**inputs)
    llmcache.accelerate(model, padding="masked")
    try:
        with torch.inference_mode(), computed_rows(model.bert.encoder.layer) as seen:
            first, again = model(**inputs), model(**inputs)
        assert seen.rows == [2] * LAYERS
        assert_outputs(first, want, inputs["attention_mask"])
        assert_outputs(again, want, inputs["attention_mask"])
        assert llmcache.stats(model).hits == 2
    finally:
        llmcache.disable(model)


def test_register_adapter_decoder(gen):
    """A decoder registered by hand: generate's tokens equal the uncached model's, prefill served."""

    class NamedLlamaConfig(transformers.LlamaConfig):
        model_type = "llmcache_test_llama"

    llmcache.register_adapter("llmcache_test_llama", blocks="layers", decoder=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(NamedLlamaConfig(**DECODER)).eval()
    inputs = batch("left", [4, 8], gen)
    inputs.pop("position_ids")
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():
        want = model.generate(**inputs, **kw)
    llmcache.accelerate(model, padding="masked")
    try:
        with torch.inference_mode():
            assert torch.equal(model.generate(**inputs, **kw), want)
            assert torch.equal(model.generate(**inputs, **kw), want)
        assert llmcache.stats(model).hits == 2
    finally:
        llmcache.disable(model)


def test_register_adapter_wrong_path_names_it():
    class MisnamedBertConfig(transformers.BertConfig):
        model_type = "llmcache_test_misnamed"

    llmcache.register_adapter("llmcache_test_misnamed", blocks="encoder.blocks", decoder=False)
    model = transformers.BertModel(MisnamedBertConfig(**ENCODER)).eval()
    with pytest.raises(ValueError, match="encoder.blocks"):
        llmcache.accelerate(model, padding="masked")
    assert not llmcache.is_accelerated(model)


@pytest.mark.parametrize("bad", [{"blocks": ""}, {"blocks": 3}, {"blocks": None}])
def test_register_adapter_refuses_bad_arguments(bad):
    with pytest.raises(TypeError, match="register_adapter"):
        llmcache.register_adapter("llmcache_test_bad", decoder=False, **bad)


class FlatConfig(PretrainedConfig):
    model_type = "llmcache_test_flat"

    def __init__(self, vocab_size=VOCAB, hidden_size=32, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kwargs)


class FlatModel(PreTrainedModel):
    """Blocks held as separate attributes: no nn.ModuleList to find."""

    config_class = FlatConfig
    base_model_prefix = ""

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.block0 = OddBlock(config.hidden_size)
        self.block1 = OddBlock(config.hidden_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None):
        return BaseModelOutput(last_hidden_state=self.block1(self.block0(self.embed(input_ids), attention_mask),
                                                             attention_mask))


class NoEmbeddingsModel(FlatModel):
    config_class = FlatConfig

    def get_input_embeddings(self):
        return None


@pytest.mark.parametrize("cls", [FlatModel, NoEmbeddingsModel], ids=["no-block-list", "no-input-embeddings"])
def test_unfound_structure_names_register_adapter(cls):
    model = cls(FlatConfig()).eval()
    with pytest.raises(ValueError, match="register_adapter") as err:
        llmcache.accelerate(model, padding="masked")
    assert "llmcache_test_flat" in str(err.value) or cls.__name__ in str(err.value)
    assert not llmcache.is_accelerated(model)


def test_not_a_transformers_model_says_so():
    with pytest.raises(ValueError, match="PreTrainedModel"):
        llmcache.accelerate(nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8)))
