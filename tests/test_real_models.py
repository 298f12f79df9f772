"""The cache on the real models shipped as offline packages: all-MiniLM-L6-v2 (BERT) and
SmolLM2-135M-Instruct (Llama). Skipped where their packages are not installed."""

from __future__ import annotations

import pytest
import torch
from models import minilm, smollm2

import llmcache

pytestmark = pytest.mark.slow

SENTENCES = [
    "A man is playing a guitar.",
    "The stock market fell sharply on Monday after weak earnings.",
    "A woman is slicing an onion in the kitchen.",
    "Two dogs are running through a field of tall grass.",
    "The president will visit three countries next week.",
    "Researchers found a new species of frog in the rainforest.",
]


@pytest.fixture(scope="module")
def encoder():
    return minilm()


@pytest.fixture(scope="module")
def decoder():
    return smollm2()


def test_minilm_bit_identity(encoder):
    model, tok = encoder
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    m = enc["attention_mask"].bool()
    with torch.inference_mode():
        want = model(**enc).last_hidden_state
        with llmcache.cached(model):
            first = model(**enc).last_hidden_state
            second = model(**enc).last_hidden_state
            st = llmcache.stats(model)
        after = model(**enc).last_hidden_state
    # (Masked padding, an encoder's default: zeros there, computed or served alike.)
    assert torch.equal(first[m], want[m]) and torch.all(first[~m] == 0) and torch.equal(second, first)
    assert torch.equal(after, want)
    assert st.hits == len(SENTENCES) and st.entries == len(SENTENCES)  # rows: a served row skips all 6 blocks


def test_minilm_mixed_batch_matches_uncached_rows(encoder):
    model, tok = encoder
    with torch.inference_mode():
        with llmcache.cached(model):
            model(**tok(SENTENCES[::2], padding=True, return_tensors="pt"))
            enc = tok(SENTENCES, padding=True, return_tensors="pt")
            got = model(**enc).last_hidden_state
            st = llmcache.stats(model)
        want = model(**enc).last_hidden_state
    m = enc["attention_mask"].bool()
    assert st.hits == 3
    # Hit rows were computed in another batch (another padded width): equal up to the kernel's
    # summation order, which the width can change.
    torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=2e-5)


def test_minilm_namespaces_on_identical_texts(encoder):
    model, tok = encoder
    enc = tok(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.inference_mode(), llmcache.cached(model, layerwise=llmcache.Layerwise(threshold=0.8)):
        with llmcache.namespace("a"):
            model(**enc)
        with llmcache.namespace("b"):
            model(**enc)
        assert llmcache.stats(model).hits == 0


def test_smollm2_generate_with_exact_repeats(decoder):
    model, tok = decoder
    prompts = ["The capital of France is", "Once upon a time, there was a little"]
    enc = tok(prompts, padding=True, return_tensors="pt")
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id or tok.eos_token_id}
    with torch.inference_mode():
        want = model.generate(**enc, **kwargs)
        with llmcache.cached(model):
            first = model.generate(**enc, **kwargs)
            again = model.generate(**enc, **kwargs)
            st = llmcache.stats(model)
    assert torch.equal(first, want) and torch.equal(again, want)
    assert st.hits == 2 and st.rows == 2 * 2  # the second prefill was served; decode steps are not rows


def test_smollm2_logits_bit_identical_on_repeats(decoder):
    model, tok = decoder
    enc = tok(["Water boils at one hundred degrees."], return_tensors="pt")
    with torch.inference_mode():
        want = model(**enc).logits
        with llmcache.cached(model):
            model(**enc)
            got = model(**enc).logits
            assert llmcache.stats(model).hit_rate == 0.5
    assert torch.equal(got, want)
