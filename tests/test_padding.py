"""Padding positions (CacheConfig.padding): what a served row holds where mask == 0.

"exact": every position of every output (logits, hidden states, loss, the returned KV cache)
equals the uncached model's. A decoder row's trailing padding is computed after its stored K/V,
as new tokens after a cached prefix are (within the prefix path's tolerance); other padding is
kept with the row (keyed and stored with it: served where the row comes with as much padding).
"auto" (the default): exact for a decoder, "masked" for an encoder (zeros: its callers pool with
the mask).
The issue's cases are here: transformers' own determinism and tuple/dict equivalence checks on
Llama (default) and BERT (exact), a right-padded prompt handed to generate, a masked-LM loss
with labels at padded positions, the feature-extraction pipeline, and the exact-tier matrix of
tests/test_exact_matrix.py run with padding="exact", compared at every position.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import transformers
from helpers import CLOSE, assert_outputs, batch, leaves
from models import DECODERS, VOCAB, output, tiny_model
from test_exact_matrix import PATTERNS, call, subject  # noqa: F401 (a fixture)

import llmcache

# Rows computed in another batch composition, or from cached K/V, round differently: within CLOSE
# on the random 3-block models (`helpers.assert_outputs`); up to 1.4e-4 on the real ones' outputs
# (SmolLM2's logits reach 37).
REAL_MODELS = {"rtol": 1e-4, "atol": 3e-4}


def twice(model, inputs):
    with torch.inference_mode():
        return model(**inputs), model(**inputs)


# ---- decoders: the default is exact --------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(DECODERS))
def test_a_decoders_trailing_padding_is_computed_after_its_cached_tokens(family, gen):
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    llmcache.accelerate(model)
    inputs = batch("right", [7, 3, 5, 7], gen)
    with torch.inference_mode():
        want = ref(**inputs)
    first, again = twice(model, inputs)
    s = llmcache.stats(model)
    assert s.hits == 4 and s.not_cached == {}  # the repeat is served whole: only padding computes
    assert s.last_tokens == (6 + 3 + 5 + 6, 2)  # (an unpadded row in such a batch computes its last token)
    for got in (first, again):
        assert_outputs(got, want, tolerance=CLOSE)  # every position: logits, the returned KV cache


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_a_decoders_leading_padding_is_kept_with_the_row(family, gen):
    """The uncached model computes leading padding attending to no token, which only that very row
    reproduces: a row is stored with its leading padding, served where it comes with as much
    padding again, and computed with other padding."""
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    llmcache.accelerate(model)
    inputs = batch(family, [7, 3, 5, 7], gen)  # left padding, as generate pads
    wider = {k: torch.cat([torch.zeros_like(v[:, :2]), v], 1) for k, v in inputs.items()}  # two more pads
    wider["position_ids"] = (wider["attention_mask"].cumsum(1) - 1).clamp_min(0)
    with torch.inference_mode():
        want, want_wider = output(ref, inputs), output(ref, wider)
        first, again = (output(model, inputs) for _ in range(2))
        assert torch.equal(first, want) and torch.equal(again, want)  # every position
        assert llmcache.stats(model).hits == 4
        assert torch.equal(output(model, wider), want_wider)
    assert llmcache.stats(model).hits == 4  # other padding: computed (and kept too)
    assert {e.state for e in llmcache.held(model).entries}  # (held, inspectable)


@pytest.mark.parametrize("family", sorted(DECODERS))
@pytest.mark.parametrize("padding", ["auto", "exact"])
def test_generate_serves_left_padded_prompts(family, padding, gen):
    """generate's prefill: a left-padded prompt is served and the tokens and scores are the
    uncached ones. "auto" serves it whatever its padding (zeros in the returned past_key_values
    at padding, which every step masks); "exact" keeps its padding with it, so the returned
    past_key_values equal the uncached ones at every position too."""
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    llmcache.accelerate(model, padding=padding)
    inputs = batch(family, [7, 3, 5], gen)
    inputs.pop("position_ids")
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "return_dict_in_generate": True,
                "output_scores": True}
    real = torch.cat([inputs["attention_mask"], torch.ones(3, 4, dtype=torch.long)], 1).bool()  # (the last step's
    with torch.inference_mode():  # K/V are not in the returned cache)
        want = ref.generate(**inputs, **settings)
        for _ in range(2):
            got = model.generate(**inputs, **settings)
            assert torch.equal(got.sequences, want.sequences)
            for a, b in zip(got.scores, want.scores):
                torch.testing.assert_close(a, b, **CLOSE)
            for got_layer, want_layer in zip(got.past_key_values.layers, want.past_key_values.layers):
                for a, b in ((got_layer.keys, want_layer.keys), (got_layer.values, want_layer.values)):
                    a, b = a.transpose(1, 2), b.transpose(1, 2)  # [B, T, heads, head dim]
                    if padding == "auto":
                        a, b = a[real], b[real]
                    torch.testing.assert_close(a, b, **CLOSE)
    assert llmcache.stats(model).hits == 3


def test_generate_from_a_right_padded_prompt_continues_from_its_padding_as_uncached(gen):
    """transformers' test_generate_methods_with_logits_to_keep: a lower-triangular mask, so the
    prompts' last position is padding, whose logits generate continues from."""
    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    llmcache.accelerate(model)
    ids = torch.randint(5, VOCAB, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[1, 6:] = 0
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        want = ref.generate(input_ids=ids, attention_mask=mask, **settings)
        for _ in range(2):
            assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **settings), want)
    assert llmcache.stats(model).hits == 2


def test_padding_masked_serves_zeros_at_a_decoders_padding(gen):
    model = llmcache.accelerate(tiny_model("llama"), padding="masked")
    inputs = batch("llama", [7, 3], gen)
    with torch.inference_mode():
        _, again = (output(model, inputs) for _ in range(2))
    assert llmcache.stats(model).hits == 2
    assert torch.all(again[~inputs["attention_mask"].bool()] == 0)
    # Unlike "exact", a row that comes back with more leading padding is served too.
    wider = {k: torch.cat([torch.zeros_like(v[:, :2]), v], 1) for k, v in inputs.items()}
    wider["position_ids"] = (wider["attention_mask"].cumsum(1) - 1).clamp_min(0)
    with torch.inference_mode():
        served = output(model, wider)
    assert llmcache.stats(model).hits == 4 and llmcache.stats(model).last_tokens == (10, 0)
    real = wider["attention_mask"].bool()
    assert torch.equal(served[real], again[inputs["attention_mask"].bool()])


# ---- transformers' own checks --------------------------------------------------------------------
def random_attention_mask(shape, gen) -> torch.Tensor:
    """As transformers' tests make one: random, the first column set (so most rows have gaps, and
    the others are right-padded)."""
    mask = torch.randint(0, 2, shape, generator=gen)
    mask[:, 0] = 1
    return mask


def tester_inputs(gen, rows: int = 13, seq: int = 7) -> dict:
    ids = torch.randint(0, 99, (rows, seq), generator=gen)
    mask = random_attention_mask((rows, seq), gen)
    mask[:4] = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4, [1] + [0] * 6])  # rows that are served
    return {"input_ids": ids, "attention_mask": mask}


def hf_classes():
    """(head, config fields, padding) per family: the sizes of transformers' model testers."""
    small = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 37}
    return {"llama": ("ForCausalLM", small, "auto"), "bert": ("ForMaskedLM", {**small, "type_vocab_size": 16}, "exact")}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_transformers_determinism_and_tuple_dict_equivalence(family, gen):
    """What transformers' test_determinism and test_model_outputs_equivalence check, on the inputs
    its model testers make, with the repeat served: every output, at every position, twice."""
    head, fields, padding = hf_classes()[family]
    model = llmcache.accelerate(tiny_model(family, head, **fields), padding=padding)
    inputs = tester_inputs(gen)
    if family == "bert":
        inputs["token_type_ids"] = torch.randint(0, 16, inputs["input_ids"].shape, generator=gen)
    with torch.no_grad():
        first = model(**inputs)
        second = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
    assert llmcache.stats(model).hits > 0
    for (_, a), (_, b), (_, c) in zip(leaves(first), leaves(second), leaves(as_tuple)):
        torch.testing.assert_close(b, a, **CLOSE)
        torch.testing.assert_close(c, a, **CLOSE)


# ---- encoders: exact on request ------------------------------------------------------------------
def test_masked_lm_loss_with_labels_at_padded_positions(gen):
    model = tiny_model("bert", "ForMaskedLM")
    ref = copy.deepcopy(model)
    llmcache.accelerate(model, padding="exact")
    inputs = batch("bert", [7, 4, 7], gen)
    inputs["labels"] = torch.randint(5, VOCAB, inputs["input_ids"].shape, generator=gen)  # padding too
    with torch.inference_mode():
        want = ref(**inputs).loss
        losses = [model(**inputs).loss for _ in range(2)]
    assert all(torch.equal(loss, want) for loss in losses)
    assert llmcache.stats(model).hits == 3  # the padded row is kept with its padding


def test_an_encoders_default_is_masked(gen):
    """An encoder's default: zeros at every padding position (mask == 0) of the output wherever
    the cache routes the call, whether a row computed or was served, and for a row with gaps in its
    mask (never cached) as much: the same call gives the same output each time (transformers'
    test_determinism reads every position); at real tokens the uncached model's values."""
    model = tiny_model("bert")
    ref = copy.deepcopy(model)
    llmcache.accelerate(model)
    inputs = batch("bert", [7, 4, 5], gen)
    inputs["attention_mask"][2] = torch.tensor([1, 0, 1, 1, 0, 1, 0])  # (gaps: computed each time)
    pad = ~inputs["attention_mask"].bool()
    with torch.inference_mode():
        want = output(ref, inputs)
        first, again = (output(model, inputs) for _ in range(2))
        alone = output(model, {k: v[2:] for k, v in inputs.items()})  # (the row with gaps, nothing else to route)
    st = llmcache.stats(model)
    assert st.hits == 2 and st.not_cached == {"mask_gaps": 3}
    assert torch.all(first[pad] == 0) and torch.equal(again, first) and torch.all(alone[0][pad[2]] == 0)
    torch.testing.assert_close(first[~pad], want[~pad], **CLOSE)


def _first_block(model):
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))[0]


def _seen_widths(model):
    """(list of the [rows, positions] the first Linear of the first block sees, its hook handle)."""
    seen = []
    linear = next(m for m in _first_block(model).modules() if isinstance(m, torch.nn.Linear))
    return seen, linear.register_forward_pre_hook(lambda _, a: seen.append(tuple(a[0].shape[:2])))


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_an_encoders_computing_rows_run_only_to_their_last_real_token(family, gen):
    """With the default (masked) padding, rows that compute beside a longer row that is served run
    over their own positions only (the uncached call pads them to the longest row): the first
    block sees [2, 6] of the [3, 9] batch (6: the longer of the two); at real tokens they equal the
    uncached model, at the positions cut off they hold zeros, as a served row does at its padding."""
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    llmcache.accelerate(model)
    inputs = batch(family, [9, 4, 6], gen)
    with torch.inference_mode():
        want = output(ref, inputs)
        output(model, {k: v[:1] for k, v in inputs.items()})  # the long row, cached
        seen, hook = _seen_widths(model)
        got = output(model, inputs)
        hook.remove()
    assert seen == [(2, 6)] and llmcache.stats(model).hits == 1
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], **CLOSE)
    assert torch.all(got[1:, 6:] == 0)


def test_rows_run_every_position_when_a_block_argument_has_positions_that_are_not_a_mask(gen):
    """An argument the cut cannot read (here a [B, T, 5] tensor every block is handed) keeps the
    computing rows at the batch's width, this call and every later one, and the outputs right."""
    model = tiny_model("bert")
    ref = copy.deepcopy(model)
    llmcache.accelerate(model)

    def extra(module, args, kwargs):  # (BertLayer hands unknown keywords on to attention, which ignores them)
        return args, {**kwargs, "extra": torch.zeros(args[0].shape[0], args[0].shape[1], 5)}

    for block in next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList)):
        block.register_forward_pre_hook(extra, with_kwargs=True)
    inputs = batch("bert", [9, 4, 6], gen)
    with torch.inference_mode():
        want = output(ref, inputs)
        output(model, {k: v[:1] for k, v in inputs.items()})
        seen, hook = _seen_widths(model)
        first, again = output(model, inputs), output(model, {k: v[1:] for k, v in inputs.items()})
        hook.remove()
    assert seen == [(2, 9)]  # (the second call: every row served)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(first[real], want[real], **CLOSE)
    torch.testing.assert_close(again[real[1:]], want[1:][real[1:]], **CLOSE)


def test_feature_extraction_pipeline_with_batches(gen):
    from test_wrappers import UNIQUE_TEXTS, minilm_path, minilm_tokenizer

    tok = minilm_tokenizer()
    model = transformers.AutoModel.from_pretrained(minilm_path()).eval()
    pipe = transformers.pipeline("feature-extraction", model=model, tokenizer=tok, batch_size=2, device="cpu",
                                 return_tensors=True)
    want = pipe(UNIQUE_TEXTS)
    llmcache.accelerate(model, padding="exact")
    for _ in range(2):
        for got, w in zip(pipe(UNIQUE_TEXTS), want):
            assert torch.equal(got, w)  # each row at its batch's padded width, padding included
    assert llmcache.stats(model).hits > 0


# ---- the exact-tier matrix at every position -----------------------------------------------------
CACHED_PATTERNS = ["right-padding", "left-padding", "batch-of-1", "no-padding", "in-batch-repeats",
                   "no-attention-mask", "given-position-ids", "token-type-ids", "return-dict-false",
                   "zero-token-row", "mask-gap", "direct-forward", "use-cache-false"]


@pytest.mark.parametrize("pattern", CACHED_PATTERNS)
def test_forward_pattern_with_exact_padding_equals_the_uncached_model_everywhere(subject, pattern, gen):  # noqa: F811
    model = subject.model
    case = PATTERNS[pattern](subject, gen)
    want = call(model, case)
    llmcache.accelerate(model, padding="exact")
    first, again = call(model, case), call(model, case)
    tolerance = CLOSE if subject.name in DECODERS | {"bert", "roberta", "distilbert"} else REAL_MODELS
    for got in (first, again):
        assert_outputs(got, want, tolerance=tolerance, equal_nan=True)
    assert llmcache.stats(model).hits == case.served  # a row repeated with its padding is served


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_kv_cache_given_under_either_name_is_filled_where_padding_is_computed(name, gen):
    """transformers' test_bc_cache_name_forward: the cache argument under its old name too."""
    from transformers import DynamicCache

    model = tiny_model("llama").model  # the base model, called directly with the argument
    ref = copy.deepcopy(model)
    llmcache.accelerate(model)
    inputs = batch("right", [6, 4], gen)
    deprecated = pytest.warns(FutureWarning, match="past_key_values") if name == "past_key_values" \
        else contextlib.nullcontext()
    with torch.inference_mode():
        want = ref(**inputs, **{name: DynamicCache(config=ref.config)})
        for _ in range(2):  # computed, then served with its trailing padding computed
            given = DynamicCache(config=model.config)
            with deprecated:  # (transformers' deprecation warning, as uncached: the test checks it)
                got = model(**inputs, **{name: given})
            assert got.past_key_values is given and given.get_seq_length() == 6
            torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **CLOSE)
    assert llmcache.stats(model).hits == 2


def test_stats_hold_plain_python_numbers(gen):
    """stats go to JSON and Prometheus: counts are ints, not numpy scalars. Here a whole row's
    trailing padding cannot be computed from its K/V (a row with a gap in its mask keeps the batch
    in its own layout), so it computes, counted under "padding"."""
    import json

    model = llmcache.accelerate(tiny_model("llama"))
    inputs = batch("right", [6, 4, 6], gen)
    inputs["attention_mask"][2, 2] = 0
    with torch.inference_mode():
        model(**inputs)
        model(**inputs)
    s = llmcache.stats(model)
    assert s.not_cached == {"mask_gaps": 2, "padding": 1} and s.hits == 1
    json.dumps({"not_cached": s.not_cached, "last_tokens": s.last_tokens})
    assert all(type(v) is int for v in (*s.not_cached.values(), *s.last_tokens))
