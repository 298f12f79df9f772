"""What decode steps compute is stored as pages (llmcache/tiers/exact/extend.py): a chat's next turn
prefills from the end of the previous answer, and nothing a cache did not compute under the
prompt's own state is ever stored.

Each check compares with an uncached copy of the same weights: `generate` tokens identical, a
forward's outputs within PREFIX_TOLERANCE (rows computed against cached K/V).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import PREFIX_TOLERANCE, assert_outputs
from models import tiny_model
from transformers import DynamicCache

import llmcache

PAGE = 8
SMALL = {"vocab_size": 101, "hidden_size": 32, "intermediate_size": 64, "pad_token_id": None}
SIZES = {"llama": SMALL, "qwen2": {**SMALL, "bos_token_id": None, "eos_token_id": None},
         "gpt2": {"vocab_size": 101, "n_embd": 32, "n_positions": 256}}
GREEDY = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}


def build(family: str = "llama"):
    """(accelerated causal LM, uncached copy of the same weights)."""
    model = tiny_model(family, "ForCausalLM", **SIZES[family])
    return llmcache.accelerate(copy.deepcopy(model)), model


@pytest.fixture
def tokens(gen):
    return lambda n: torch.randint(3, 101, (n,), generator=gen)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids[None]).logits


def decode(model, ids: torch.Tensor, steps: int, between=None) -> tuple[torch.Tensor, DynamicCache]:
    """A greedy decode loop of one's own: prefill `ids` with a DynamicCache, then `steps` one-token
    steps; `between(step)` runs before each step. Returns (every token fed or chosen, the cache)."""
    cache = DynamicCache()
    with torch.inference_mode():
        out = model(input_ids=ids[None], past_key_values=cache, use_cache=True)
        seq = torch.cat([ids, out.logits[0, -1:].argmax(-1)])
        for step in range(steps):
            if between is not None:
                between(step)
            position = torch.tensor([[len(seq) - 1]])
            out = model(input_ids=seq[None, -1:], past_key_values=cache, use_cache=True, position_ids=position)
            seq = torch.cat([seq, out.logits[0, -1:].argmax(-1)])
    return seq, cache


@pytest.mark.parametrize("family", sorted(SIZES))
def test_the_next_turn_prefills_from_the_end_of_the_last_answer(family, tokens):
    """The answer's whole pages, and (when generate returns) its last partial page, which the next
    prompt continues: it computes from the answer's last token on, as a kept KV cache would."""
    model, ref = build(family)
    prompt = tokens(13)
    with torch.inference_mode():
        out = model.generate(input_ids=prompt[None], max_new_tokens=11, **GREEDY)
        assert torch.equal(out, ref.generate(input_ids=prompt[None], max_new_tokens=11, **GREEDY))
    # 13 + 10 tokens ran through the model (the last new one is only chosen): a whole page after
    # the prompt's first, then a partial page of 7.
    assert llmcache.stats(model).decode_pages == 2
    turn = torch.cat([out[0], tokens(5)])
    assert_outputs(logits(model, turn), logits(ref, turn), tolerance=PREFIX_TOLERANCE)
    assert llmcache.stats(model).last_tokens == (23, len(turn) - 23)
    with torch.inference_mode():
        got = model.generate(input_ids=turn[None], max_new_tokens=4, **GREEDY)
    assert torch.equal(got, ref.generate(input_ids=turn[None], max_new_tokens=4, **GREEDY))


def test_a_left_padded_batch_stores_every_rows_answer(tokens):
    model, ref = build()
    prompts = [tokens(n) for n in (5, 17, 11)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **GREEDY)
        assert torch.equal(out, ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **GREEDY))
    for r, p in enumerate(prompts):
        turn = torch.cat([out[r, width - len(p) :], tokens(3)])
        assert_outputs(logits(model, turn), logits(ref, turn), tolerance=PREFIX_TOLERANCE)
        # Every token that ran through the model: its whole pages, then its last partial page.
        assert llmcache.stats(model).last_tokens[0] == len(p) + 9


def test_a_decode_loop_of_ones_own_stores_a_page_every_page_of_steps(tokens):
    model, ref = build()
    seq, _ = decode(model, tokens(6), 2 * PAGE + 3)
    want, _ = decode(ref, seq[:6], 2 * PAGE + 3)
    assert torch.equal(seq, want)
    # 6 + 19 tokens ran through the model: each page written once complete, the last 1 token not.
    assert llmcache.stats(model).decode_pages == 3
    assert_outputs(logits(model, seq), logits(ref, seq), tolerance=PREFIX_TOLERANCE)
    assert llmcache.stats(model).last_tokens[0] == 3 * PAGE


def test_a_step_under_another_state_ends_what_is_stored(tokens):
    """Autocast switched on for the later steps: their K/V are another state's, never stored under
    the prompt's."""
    model, ref = build()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    seq, _ = decode(model, tokens(4), 3 * PAGE, between=lambda step: autocast.__enter__() if step == 2 else None)
    autocast.__exit__(None, None, None)
    assert llmcache.stats(model).decode_pages == 0  # the first page was complete only after the switch
    assert_outputs(logits(model, seq), logits(ref, seq), tolerance=PREFIX_TOLERANCE)
    assert llmcache.stats(model).last_tokens[0] == 4  # the prompt's own partial page, computed before it


def test_weights_edited_mid_decode_store_nothing_stale(tokens):
    model, ref = build()
    weight = next(p for n, p in model.named_parameters() if n.endswith("q_proj.weight"))
    twin = dict(ref.named_parameters())[next(n for n, p in model.named_parameters() if p is weight)]

    def edit(step):
        if step == PAGE:
            with torch.no_grad():
                weight.add_(0.05)
                twin.add_(0.05)

    seq, _ = decode(model, tokens(9), 3 * PAGE, between=edit)
    assert llmcache.stats(model).invalidations == 1  # (what was stored before the edit is dropped)
    assert_outputs(logits(model, seq), logits(ref, seq), tolerance=PREFIX_TOLERANCE)
    assert llmcache.stats(model).last_tokens[0] == 0


def test_reordered_or_cropped_caches_are_not_followed(tokens):
    model, ref = build()
    prompt = tokens(7)
    with torch.inference_mode():
        beams = model.generate(input_ids=prompt[None], max_new_tokens=12, num_beams=3, **GREEDY)
        assert torch.equal(beams, ref.generate(input_ids=prompt[None], max_new_tokens=12, num_beams=3, **GREEDY))
    assert llmcache.stats(model).decode_pages == 0  # beam search reorders the cache after every step

    def crop(step):
        if step == 1:  # (6 + 1 tokens ran: no page complete yet)
            cache.crop(-2)  # (the loop then feeds tokens at the wrong places: its business)

    cache = None
    original = DynamicCache.__init__

    def keep(self, *args, **kwargs):
        nonlocal cache
        original(self, *args, **kwargs)
        cache = self

    DynamicCache.__init__ = keep
    try:
        seq, _ = decode(model, tokens(6), 2 * PAGE, between=crop)
    finally:
        DynamicCache.__init__ = original
    assert llmcache.stats(model).decode_pages == 0
    assert_outputs(logits(model, seq), logits(ref, seq), tolerance=PREFIX_TOLERANCE)


def test_disable_removes_the_generate_wrapper_and_copies_have_none(tokens):
    model, _ = build()
    assert "generate" in vars(model)
    clone = copy.deepcopy(model)
    assert not llmcache.is_accelerated(clone) and clone.generate.__func__ is type(clone).generate
    with torch.inference_mode():
        clone.generate(input_ids=tokens(5)[None], max_new_tokens=2, **GREEDY)
    llmcache.disable(model)
    assert "generate" not in vars(model) and "forward" not in vars(model.model)
