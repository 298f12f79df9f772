"""The exact tier's matrix (issue #12): every supported family x the call patterns a caller makes.

For each pattern the cached model's outputs equal the uncached model's (computed before
`accelerate`, or under `llmcache.bypass`) on the first call and on the repeat, and the repeat is
served where it can be (`llmcache.stats`, `llmcache.held`, and the rows each block computed, seen
by hooks on the blocks' own submodules). Models: random 3-block configs of BERT, RoBERTa,
DistilBERT, GPT-2 and Llama, plus the real MiniLM and SmolLM2 (slow: loading SmolLM2 alone takes
tens of seconds here).

Equality is bit for bit (`assert_close` with zero tolerance) wherever a row is computed in the same
batch as the uncached call, or served from an entry computed in such a batch; CLOSE is the one
exception (`helpers.assert_outputs` states the rule and why).

The exact tier runs here with padding="masked" (served rows hold zeros at padding positions, and
are served whatever their padding): these tests are about serving at real positions;
tests/test_padding.py holds what "auto" and "exact" give at padding positions.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from helpers import CLOSE_DEEP, EXACT, assert_outputs, batch, computed_rows, leaves
from models import (
    DECODERS,
    FAMILIES,
    PAGE_TOKENS,
    VOCAB,
    decoded_pages,
    decoder_pages,
    held_rows,
    minilm,
    pages,
    real_rows,
    smollm2,
    tiny_classifier,
    tiny_model,
)

import llmcache


# ---- subjects: the models of the matrix ---------------------------------------------------------
@dataclasses.dataclass
class Subject:
    name: str
    model: torch.nn.Module
    layout: str  # the family whose padding convention `helpers.batch` follows
    decoder: bool
    takes_types: bool  # its forward takes token_type_ids
    close: dict | None = None  # its bound for rows computed in another batch composition (helpers.CLOSE by default)


_REAL: dict = {}


def _real(name: str, tokenizer: bool = False):
    """The shared real model (and with `tokenizer`, (model, tokenizer)); loaded once per session."""
    if name not in _REAL:
        _REAL[name] = minilm() if name == "minilm" else smollm2()
    return _REAL[name] if tokenizer else _REAL[name][0]


SUBJECTS = FAMILIES + [pytest.param("minilm", marks=pytest.mark.slow),
                       pytest.param("smollm2", marks=pytest.mark.slow)]


@pytest.fixture(params=SUBJECTS)
def subject(request):
    name = request.param
    if name in FAMILIES:
        model, layout = tiny_model(name), name
    else:
        model, layout = _real(name), ("bert" if name == "minilm" else "llama")
    attention = model.config._attn_implementation
    yield Subject(name, model, layout, layout in DECODERS, layout in ("bert", "roberta", "gpt2"),
                  CLOSE_DEEP if name == "smollm2" else None)
    # The real models are shared by the tests: leave them as they were found.
    if llmcache.is_accelerated(model):
        llmcache.disable(model)
    model.set_attn_implementation(attention)
    model.eval()


# ---- inputs and output comparison ---------------------------------------------------------------
def make(subject: Subject, lengths: list[int], gen, side: str | None = None) -> dict:
    """input_ids, attention_mask (and, left-padded decoders, position_ids as generate makes them)."""
    return batch(side or subject.layout, lengths, gen, positions=subject.decoder and side != "right")


def blocks_of(model: torch.nn.Module):
    return llmcache.adapters.resolve(model)[2]


def entry_features(model: torch.nn.Module) -> int:
    """F, the width of what an exact entry stores per token: the hidden size (and for decoders each
    block's K and V)."""
    cfg = model.config
    hidden = model.get_input_embeddings().weight.shape[1]
    if cfg.model_type not in DECODERS:
        return hidden
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return hidden + len(blocks_of(model)) * 2 * kv_heads * head_dim


# ---- the forward patterns -----------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    inputs: dict  # the call's keyword arguments
    mask: torch.Tensor  # [B, T] real tokens
    served: int  # rows the repeat must serve
    entries: int  # entries held after the two calls
    reason: str | None = None  # set: the whole call runs uncached, counted under this reason per row
    gaps: dict = dataclasses.field(default_factory=dict)  # reason -> rows per call computed, not cached
    computed_first: int | None = None  # rows each block computes on the first call (None: B)
    approx_first: tuple = ()
    approx_repeat: tuple = ()
    direct: bool = False  # call model.forward(...) rather than model(...)


def cached(inputs: dict, served: int | None = None, **fields) -> Case:
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    rows = mask.shape[0] if served is None else served
    return Case(inputs, mask, served=rows, entries=fields.pop("entries", rows), **fields)


def uncached(inputs: dict, reason: str, mask: torch.Tensor) -> Case:
    return Case(inputs, mask, served=0, entries=0, reason=reason)


def _repeats(s, gen):
    distinct = make(s, [6, 4, 6], gen)
    order = [0, 1, 0, 2, 0, 1]
    return cached({k: v[order] for k, v in distinct.items()}, entries=3, computed_first=3,
                  approx_first=tuple(range(6)), approx_repeat=tuple(range(6)))


def _positions(s, gen):
    inputs = make(s, [6, 6], gen, side="right")
    inputs["position_ids"] = torch.arange(3, 9).expand(2, 6).clone()
    return cached(inputs)


def _token_types(s, gen):
    if not s.takes_types:
        pytest.skip(f"{s.name} takes no token_type_ids")
    inputs = make(s, [7, 5], gen, side="right")
    inputs["token_type_ids"] = (torch.arange(7) >= 3).long().expand(2, 7).clone()
    return cached(inputs)


def _zero_token_row(s, gen):
    inputs = make(s, [5, 0, 3], gen)
    return cached(inputs, served=2, gaps={"no_tokens": 1}, approx_repeat=(1,))


def _mask_gap(s, gen):
    inputs = make(s, [6, 6], gen, side="right")
    inputs["attention_mask"][1, 2] = 0
    return cached(inputs, served=1, gaps={"mask_gaps": 1}, approx_repeat=(1,))


def _inputs_embeds(s, gen):
    inputs = make(s, [6, 4], gen)
    inputs["inputs_embeds"] = s.model.get_input_embeddings()(inputs.pop("input_ids")).detach()
    return uncached(inputs, "inputs_embeds", inputs["attention_mask"])


def _flag(flag):
    def build(s, gen):
        if flag == "output_attentions":
            s.model.set_attn_implementation("eager")  # sdpa returns no attentions
        inputs = make(s, [6, 4], gen)
        return uncached({**inputs, flag: True}, flag, inputs["attention_mask"])
    return build


def _head_mask(s, gen):
    inputs = make(s, [6, 4], gen)
    return uncached({**inputs, "head_mask": torch.ones(len(blocks_of(s.model)), 4)}, "head_mask",
                    inputs["attention_mask"])


def _mask_4d(s, gen):
    inputs = make(s, [6, 4], gen)
    mask = inputs["attention_mask"]
    full = mask[:, None, None, :].bool().expand(2, 1, 6, 6)
    if s.decoder:
        full = full & torch.ones(6, 6, dtype=torch.bool).tril()
    return uncached({**inputs, "attention_mask": full}, "attention_mask_shape", mask)


def _static_cache(s, gen):
    if not s.decoder:
        pytest.skip("encoders keep no KV cache")
    from transformers import StaticCache

    inputs = make(s, [6, 4], gen)
    case = uncached(inputs, "kv_cache_type", inputs["attention_mask"])
    case.inputs = {**inputs, "cache": lambda: StaticCache(config=s.model.config, max_cache_len=8)}
    return case


def _use_cache_false(s, gen):
    if not s.decoder:
        pytest.skip("use_cache is a decoder argument")
    return cached({**make(s, [6, 4], gen), "use_cache": False})


PATTERNS = {
    "right-padding": lambda s, gen: cached(make(s, [7, 3, 5, 7], gen, side="right")),
    "left-padding": lambda s, gen: cached(make(s, [7, 3, 5, 7], gen, side="left")),
    "batch-of-1": lambda s, gen: cached(make(s, [6], gen)),
    "no-padding": lambda s, gen: cached(make(s, [6, 6, 6], gen)),
    "in-batch-repeats": _repeats,
    "no-attention-mask": lambda s, gen: cached({"input_ids": make(s, [5, 5], gen)["input_ids"]}),
    "given-position-ids": _positions,
    "token-type-ids": _token_types,
    "return-dict-false": lambda s, gen: cached({**make(s, [6, 3], gen), "return_dict": False}),
    "zero-token-row": _zero_token_row,
    "mask-gap": _mask_gap,
    "direct-forward": lambda s, gen: dataclasses.replace(cached(make(s, [6, 3], gen)), direct=True),
    "use-cache-false": _use_cache_false,
    "inputs-embeds": _inputs_embeds,
    "output-hidden-states": _flag("output_hidden_states"),
    "output-attentions-eager": _flag("output_attentions"),
    "head-mask": _head_mask,
    "4d-mask": _mask_4d,
    "static-kv-cache": _static_cache,
}


def call(model, case: Case):
    kwargs = {k: (v() if callable(v) else v) for k, v in case.inputs.items()}
    with torch.inference_mode():
        return model.forward(**kwargs) if case.direct else model(**kwargs)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_forward_pattern(subject, pattern, gen):
    model = subject.model
    case = PATTERNS[pattern](subject, gen)
    batch_size = case.mask.shape[0]
    want = call(model, case)
    llmcache.accelerate(model, padding="masked")
    with computed_rows(model) as seen:
        first = call(model, case)
        computed_first = seen.take()
        after_first = llmcache.stats(model)
        again = call(model, case)
        computed_again = seen.take()
    st = llmcache.stats(model)
    n_blocks = len(blocks_of(model))
    # (Padding positions: the uncached model's where the call runs uncached; an encoder's rows hold
    # zeros there when the cache routes them, computed or served: test_padding.)
    full = case.reason is not None
    assert_outputs(first, want, case.mask, close_rows=case.approx_first, full=full, served=True,
                   close_tolerance=subject.close)
    assert_outputs(again, want, case.mask, close_rows=case.approx_repeat, full=case.reason is not None, served=True,
                   close_tolerance=subject.close)
    assert st.rows == 2 * batch_size and st.forwards == 2
    if case.reason is not None:
        assert st.not_cached == {case.reason: 2 * batch_size}
        assert computed_first == computed_again == [batch_size] * n_blocks
        assert st.hits == st.lookups == 0 and st.entries == 0 and llmcache.held(model).entries == []
        return
    assert st.not_cached == {reason: 2 * rows for reason, rows in case.gaps.items()}
    assert after_first.hits == 0 and st.hits == st.exact_hits == case.served
    assert st.hit_rate == case.served / (2 * batch_size)
    assert computed_first == [case.computed_first or batch_size] * n_blocks
    assert computed_again == [batch_size - case.served] * n_blocks  # served rows skip every block
    held = llmcache.held(model)
    assert len(held.entries) == st.entries == case.entries
    assert sum(e.hits for e in held.entries) == case.served
    assert sorted(len(e.ids) for e in held.entries) == sorted(set_of_rows(case.inputs, case.mask)), \
        "an entry must hold exactly its row's real tokens"


def set_of_rows(inputs: dict, mask: torch.Tensor) -> list[int]:
    """Token counts of the distinct cacheable rows (a contiguous, non-empty mask) of a call."""
    ids = inputs.get("input_ids")
    distinct = {}
    for r, row in enumerate(mask.bool()):
        idx = row.nonzero().flatten()
        if idx.numel() and idx[-1] - idx[0] + 1 == idx.numel():
            distinct[(tuple(ids[r].tolist()), tuple(row.tolist()))] = idx.numel()
    return list(distinct.values())


# ---- padding, token types, long rows ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_served_rows_are_zero_at_padding_and_exact_at_real_tokens(family, side, gen):
    model = tiny_model(family)
    base = llmcache.adapters.resolve(model)[1]
    inputs = make(Subject(family, model, family, family in DECODERS, False), [7, 2, 5], gen, side=side)
    with torch.inference_mode():
        want = base(**inputs).last_hidden_state
        llmcache.accelerate(model, padding="masked")
        base(**inputs)
        got = base(**inputs).last_hidden_state
    real = inputs["attention_mask"].bool()
    assert llmcache.stats(model).hits == 3
    assert torch.equal(got[real], want[real])
    assert torch.count_nonzero(got[~real]) == 0  # as accelerate's docstring says
    pooled = lambda h: (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)
    assert torch.equal(pooled(got), pooled(want))  # the masked pooling it prescribes is unaffected


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2"])
def test_same_ids_with_other_token_types_are_not_served(family, gen):
    model = tiny_model(family)
    inputs = batch(family, [6, 6], gen)
    zeros = {**inputs, "token_type_ids": torch.zeros_like(inputs["input_ids"])}
    ones = {**inputs, "token_type_ids": torch.ones_like(inputs["input_ids"])}
    with torch.inference_mode():
        want0, want1 = model(**zeros), model(**ones)
        llmcache.accelerate(model, padding="masked")
        model(**zeros)
        got1 = model(**ones)
        assert llmcache.stats(model).hits == 0
        again0, again1 = model(**zeros), model(**ones)
    real = inputs["attention_mask"]
    assert_outputs(got1, want1, real, full=True)
    assert_outputs(again0, want0, real)
    assert_outputs(again1, want1, real)
    assert llmcache.stats(model).hits == 4 and len(llmcache.held(model).entries) == 4
    assert {e.token_types for e in llmcache.held(model).entries} == {(0,) * 6, (1,) * 6}


def test_roberta_padding_ids_change_positions_and_are_not_confused(gen):
    """RoBERTa derives positions from the ids (padding_idx = 1): the same real tokens after left
    padding of id 1 or of id 0 have other positions, hence other outputs."""
    model = tiny_model("roberta")
    ids = torch.randint(5, VOCAB, (1, 5), generator=gen)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    pad1 = {"input_ids": torch.cat([torch.ones(1, 3, dtype=torch.long), ids], 1), "attention_mask": mask}
    pad0 = {"input_ids": torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1), "attention_mask": mask}
    with torch.inference_mode():
        want1, want0 = model(**pad1), model(**pad0)
        assert not torch.allclose(want1.last_hidden_state[:, 3:], want0.last_hidden_state[:, 3:])
        llmcache.accelerate(model, padding="masked")
        model(**pad1)
        got0 = model(**pad0)
        again1 = model(**pad1)
    real = mask.bool()  # (computed, not served pad1's entry; zeros at its padding, as an encoder's rows hold)
    assert torch.equal(got0.last_hidden_state[real], want0.last_hidden_state[real])
    assert torch.all(got0.last_hidden_state[~real] == 0)
    assert torch.equal(again1.last_hidden_state[mask.bool()], want1.last_hidden_state[mask.bool()])
    assert llmcache.stats(model).hits == 1


def test_a_300_token_row_is_cached_and_served(gen):
    model = tiny_model("bert", max_position_embeddings=512)
    inputs = batch("bert", [300, 12], gen)
    with torch.inference_mode():
        want = model(**inputs)
        llmcache.accelerate(model, padding="masked")
        first = model(**inputs)
        again = model(**inputs)
    st = llmcache.stats(model)
    mask = inputs["attention_mask"]
    assert_outputs(first, want, mask)
    assert_outputs(again, want, mask)
    assert st.hits == 2 and st.not_cached == {}
    page = llmcache.CacheConfig().page_tokens
    assert sorted((len(e.ids), e.pages) for e in llmcache.held(model).entries) == [
        (12, -(-12 // page)), (300, -(-300 // page))]


def test_hit_rate_counts_long_rows_and_rows_too_long_for_the_budget(gen):
    model = tiny_model("bert")
    page_bytes = llmcache.CacheConfig().page_tokens * 64 * 4  # fp32, hidden 64
    # Budget for 8 pages (64 tokens): the 100-token row never fits, the others (7 pages) do.
    inputs = batch("bert", [5, 20, 20, 100], gen)
    with torch.inference_mode():
        want = model(**inputs)
        llmcache.accelerate(model, max_bytes=8 * page_bytes, padding="masked")
        outs = [model(**inputs) for _ in range(3)]
    st = llmcache.stats(model)
    for out in outs:
        assert_outputs(out, want, inputs["attention_mask"], close_rows=(3,))
    assert st.not_cached == {"too_long": 3} and st.rows == 12
    assert st.bytes <= st.bytes_reserved <= 8 * page_bytes
    held = llmcache.held(model)
    served = sum(e.hits for e in held.entries)
    assert st.hits == served > 0
    assert st.hit_rate == served / 12


def test_a_served_entry_is_never_evicted_by_a_later_row_of_its_own_batch(gen):
    """Budget for three pages, held by a (two pages) and b (one); then [a, c, d]: making room for
    c evicts b, for d the only candidate left is a, which this forward is serving: a's states
    must be read as they were (once, a freed entry's slot and pages went to d)."""
    model = tiny_model("bert")
    page_bytes = llmcache.CacheConfig().page_tokens * 64 * 4  # fp32, hidden 64
    a, b = batch("bert", [12], gen), batch("bert", [6], gen)
    c, d = batch("bert", [6], gen), batch("bert", [6], gen)
    pad = lambda x: {k: torch.nn.functional.pad(v, (0, 12 - v.shape[1])) for k, v in x.items()}
    mixed = {k: torch.cat([a[k], pad(c)[k], pad(d)[k]]) for k in a}
    with torch.inference_mode():
        want = model(**mixed)
        llmcache.accelerate(model, max_bytes=3 * page_bytes, padding="masked")
        model(**{k: torch.cat([a[k], pad(b)[k]]) for k in a})  # a and b fill the budget
        for _ in range(3):
            got = model(**mixed)
            assert_outputs(got, want, mixed["attention_mask"], close_rows=(0, 1, 2))
    st = llmcache.stats(model)
    assert st.hits >= 1 and st.bytes <= 3 * page_bytes


# ---- autograd, training, dtypes -----------------------------------------------------------------
def _loss(model, inputs):
    out = model(**inputs)
    main = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return (main * inputs["attention_mask"][..., None]).square().sum()


@pytest.mark.parametrize("family", FAMILIES + [pytest.param("smollm2", marks=pytest.mark.slow)])
def test_grad_enabled_eval_runs_uncached_and_gradients_are_the_uncached_ones(family, gen):
    if family == "smollm2":
        model, layout = _real("smollm2"), "llama"
    else:
        model, layout = tiny_model(family), family
    inputs = batch(layout, [6, 4], gen)
    params = [p for p in model.parameters() if p.requires_grad]
    _loss(model, inputs).backward()
    want = [p.grad.clone() if p.grad is not None else None for p in params]
    model.zero_grad(set_to_none=True)
    llmcache.accelerate(model, padding="masked")
    try:
        with torch.no_grad():
            model(**inputs)  # now held: a grad-enabled call must still not be served
        for _ in range(2):  # the second backward works too: nothing held is in a graph
            _loss(model, inputs).backward()
            for p, w in zip(params, want):
                assert (p.grad is None) == (w is None)
                if w is not None:
                    torch.testing.assert_close(p.grad, w, **EXACT)
            model.zero_grad(set_to_none=True)
        st = llmcache.stats(model)
        assert st.not_cached == {"grad": 4} and st.hits == 0 and st.entries == 2
    finally:
        llmcache.disable(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_grad_enabled_with_frozen_weights_is_served_without_autograd_history(family, gen):
    model = tiny_model(family).requires_grad_(False)
    inputs = batch(family, [6, 4], gen)
    want = model(**inputs)
    llmcache.accelerate(model, padding="masked")
    model(**inputs)
    got = model(**inputs)
    assert llmcache.stats(model).hits == 2 and llmcache.stats(model).not_cached == {}
    assert_outputs(got, want, inputs["attention_mask"])
    assert all(not t.requires_grad and t.grad_fn is None for _, t in leaves(got))


@pytest.mark.parametrize("family", FAMILIES)
def test_train_mode_runs_uncached_with_the_same_dropout(family, gen):
    model = tiny_model(family).train()
    inputs = batch(family, [6, 4], gen)

    def run():
        torch.manual_seed(7)
        with torch.no_grad():
            return model(**inputs)

    want = run()
    llmcache.accelerate(model, padding="masked")
    first, again = run(), run()
    assert_outputs(first, want, inputs["attention_mask"], full=True)
    assert_outputs(again, want, inputs["attention_mask"], full=True)
    st = llmcache.stats(model)
    assert st.not_cached == {"training": 4} and st.hits == 0 and st.entries == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(family, dtype, gen):
    model = tiny_model(family).to(dtype)
    inputs = batch(family, [7, 3, 5], gen)
    with torch.inference_mode():
        want = model(**inputs)
        llmcache.accelerate(model, padding="masked")
        first = model(**inputs)
        again = model(**inputs)
    # (An encoder's rows hold zeros at padding whether computed or served: test_padding.)
    assert_outputs(first, want, inputs["attention_mask"], full=family in DECODERS)
    assert_outputs(again, want, inputs["attention_mask"])
    st = llmcache.stats(model)
    assert st.hits == 3
    page = llmcache.CacheConfig().page_tokens
    per_page = page * entry_features(model) * 2  # two bytes a value: states are kept in the model's dtype
    assert [e.bytes for e in llmcache.held(model).entries] == [e.pages * per_page for e in llmcache.held(model).entries]
    assert st.bytes == sum(e.bytes for e in llmcache.held(model).entries)


@pytest.mark.parametrize("family", FAMILIES + [pytest.param("smollm2", marks=pytest.mark.slow)])
def test_labels_give_the_uncached_loss(family, gen):
    if family == "smollm2":
        model, layout = _real("smollm2"), "llama"
    else:
        model, layout = (tiny_model(family) if family in DECODERS else tiny_classifier(family)), family
    inputs = batch(layout, [6, 4], gen)
    if layout in DECODERS:
        # Right padding: with left padding transformers predicts a row's first real token from the
        # last padding position, which a served row holds as zeros (documented in accelerate).
        inputs = {"input_ids": inputs["input_ids"].flip(1), "attention_mask": inputs["attention_mask"].flip(1)}
        inputs["labels"] = torch.where(inputs["attention_mask"].bool(), inputs["input_ids"], -100)
    else:
        inputs["labels"] = torch.tensor([0, 2])
    with torch.inference_mode():
        want = model(**inputs)
        llmcache.accelerate(model, padding="masked")
        try:
            first, again = model(**inputs), model(**inputs)
            st = llmcache.stats(model)
        finally:
            llmcache.disable(model)
    assert st.hits == 2
    for name, got in (("first", first), ("repeat", again)):
        torch.testing.assert_close(got.loss, want.loss, msg=lambda m, n=name: f"loss of the {n} call: {m}", **EXACT)
    for got in (first, again):
        assert_outputs(got, want, inputs["attention_mask"])


# ---- generate -----------------------------------------------------------------------------------
GENERATE = {
    "greedy": ([6, 6], {}),
    "beam": ([6, 4], {"num_beams": 3}),
    "sampled": ([6, 4], {"do_sample": True, "top_k": 20}),
    "left-padded": ([6, 9, 4, 9], {}),
}


@pytest.mark.parametrize("family", sorted(DECODERS) + [pytest.param("smollm2", marks=pytest.mark.slow)])
@pytest.mark.parametrize("how", GENERATE)
def test_generate_gives_the_uncached_tokens(family, how, gen):
    if family == "smollm2":
        if how in ("beam", "sampled"):
            pytest.skip("greedy and left-padded suffice on the 30-block model")
        model, layout = _real("smollm2"), "llama"
    else:
        model, layout = tiny_model(family), family
    lengths, options = GENERATE[how]
    inputs = batch(layout, lengths, gen)
    # A decoder holds a page per 8 real tokens of each prompt (left-padded: 6, 9, 4, 9 tokens give
    # 1 + 2 + 1 + 2), at the positions generate gives them (those `batch` made).
    prompts, entries = sorted(real_rows(inputs)), decoder_pages(inputs)
    assert entries == pages(lengths)  # random ids: no two prompts share a first page
    inputs.pop("position_ids")  # generate derives them from the mask
    # No end token: every row runs its 5 steps (SmolLM2 may end them all early on random ids, and
    # then returns fewer columns than the pages below count).
    kwargs = {"max_new_tokens": 5, "pad_token_id": 0, "eos_token_id": None, "do_sample": False, **options}

    def run():
        torch.manual_seed(3)
        with torch.inference_mode():
            return model.generate(**inputs, **kwargs)

    want = run()
    llmcache.accelerate(model, padding="masked")
    try:
        first = run()
        after_first = llmcache.stats(model)
        again = run()
        st = llmcache.stats(model)
        held = llmcache.held(model)
    finally:
        llmcache.disable(model)
    assert torch.equal(first, want) and torch.equal(again, want)
    prefill_rows = len(lengths) * options.get("num_beams", 1)
    assert st.rows == 2 * prefill_rows  # decode steps are not rows
    assert after_first.hits == 0 and st.hits == prefill_rows  # the second prefill was served entirely
    # Beams repeat their prompt: stored once. Greedy and sampled rows also keep prompt + the 4 new
    # tokens that ran through the model, in pages (beam search reorders its cache: not followed).
    longer = _continued(inputs, first, 4) if how != "beam" else []
    assert st.decode_pages == (decoded_pages(lengths, 4) if how != "beam" else 0)
    assert len(held.entries) == entries + st.decode_pages
    extended = lambda p: len(p[0]) % PAGE_TOKENS == 0 and any(row[0][: len(p[0])] == p[0] for row in longer)
    assert held_rows(held.entries) == sorted([p for p in prompts if not extended(p)] + longer)


def _continued(inputs: dict, out: torch.Tensor, fed: int) -> list[tuple]:
    """(ids, positions, types) of each row's prompt and its first `fed` new tokens."""
    seq = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(out.shape[0], fed, dtype=torch.long)], 1)
    return real_rows({"input_ids": out[:, : seq + fed], "attention_mask": mask,
                      "position_ids": (mask.cumsum(1) - 1).clamp(min=0)})



@pytest.mark.parametrize("family", sorted(DECODERS))
def test_the_returned_kv_cache_continues_decoding_as_uncached(family, gen):
    """A hand-written decode loop: prefill, then one step on the KV cache the prefill returned."""
    model = tiny_model(family)
    inputs = batch(family, [6, 4], gen)
    step = torch.randint(5, VOCAB, (2, 1), generator=gen)

    def prefill_and_step():
        with torch.inference_mode():
            out = model(**inputs)
            held = out.cache.get_seq_length()
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], 1)
            positions = inputs["position_ids"][:, -1:] + 1
            return held, out, model(input_ids=step, attention_mask=mask, position_ids=positions, cache=out.cache)

    want_held, want_prefill, want_step = prefill_and_step()
    llmcache.accelerate(model, padding="masked")
    for _ in range(2):  # computed, then served
        got_held, got_prefill, got_step = prefill_and_step()
        assert got_held == want_held == 6, "the prefill's KV cache must hold its 6 positions"
        assert_outputs(got_prefill, want_prefill, inputs["attention_mask"])
        torch.testing.assert_close(got_step.logits, want_step.logits, **EXACT)
    assert llmcache.stats(model).hits == 2


@pytest.mark.slow
def test_minilm_tokenizer_batches_with_empty_strings_and_sentence_pairs():
    model, tok = _real("minilm", tokenizer=True)
    texts = ["", "hello", "", "A man is playing a guitar.", "hello"]
    pairs = tok(["hello", "hello"], ["a guitar", "a man"], padding=True, return_tensors="pt")
    single = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = model(**single), model(**pairs)
        with llmcache.cached(model):
            first = model(**single), model(**pairs)
            again = model(**single), model(**pairs)
            st = llmcache.stats(model)
    for got in (first, again):
        assert_outputs(got[0], want[0], single["attention_mask"], close_rows=range(5))
        assert_outputs(got[1], want[1], pairs["attention_mask"], close_rows=range(2))
    assert st.hits == 5 + 2 and st.entries == 3 + 2  # "" and "hello" repeat inside the batch


# ---- weights that change ------------------------------------------------------------------------
def _optimizer_step(model, inputs):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(3):
        model(**inputs, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _load_state_dict(model, inputs):
    model.load_state_dict(tiny_classifier("bert", seed=1).state_dict())


def _in_place(model, inputs):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)


def _replace_parameter(model, inputs):
    old = model.bert.encoder.layer[1].attention.self.query.weight
    model.bert.encoder.layer[1].attention.self.query.weight = torch.nn.Parameter(old.detach() * 1.5)


def _to_float64(model, inputs):
    model.to(torch.float64)


WEIGHT_CHANGES = {"optimizer-step": _optimizer_step, "load-state-dict": _load_state_dict, "in-place-mul": _in_place,
                  "replace-parameter": _replace_parameter, "to-float64": _to_float64}


@pytest.mark.parametrize("change", WEIGHT_CHANGES)
def test_changed_weights_are_never_served_stale_entries(change, gen):
    model = tiny_classifier("bert")
    inputs = batch("bert", [6, 4], gen)
    mask = inputs["attention_mask"]
    llmcache.accelerate(model, padding="masked")
    with torch.no_grad():
        model(**inputs)
        old = model(**inputs).logits
    before = llmcache.stats(model)
    assert before.hits == 2 and before.invalidations == 0
    WEIGHT_CHANGES[change](model, inputs)
    with torch.no_grad():
        with llmcache.bypass(model):
            want = model(**inputs)
        got = model(**inputs)
        again = model(**inputs)
    st = llmcache.stats(model)
    if change != "to-float64":  # same values in another dtype: the bit-exact comparison tells
        assert not torch.equal(want.logits, old), "the change must change the outputs"
    assert_outputs(got, want, mask, full=True)  # recomputed with the new weights
    assert_outputs(again, want, mask)  # and cached again
    assert st.invalidations >= 1 and st.hits == before.hits + 2
    assert [e.hits for e in llmcache.held(model).entries] == [1, 1]  # entries of the new weights only


# ---- namespaces and threads ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_identical_rows_in_two_namespaces_are_never_served_across(family, gen):
    model = tiny_model(family)
    inputs = batch(family, [6, 4], gen)
    mask = inputs["attention_mask"]
    with torch.inference_mode():
        want = model(**inputs)
        llmcache.accelerate(model, padding="masked")
        with llmcache.namespace("tenant-a"):
            model(**inputs)
        with llmcache.namespace("tenant-b"):
            got_b = model(**inputs)
        got_default = model(**inputs)
        assert llmcache.stats(model).hits == 0
        with llmcache.namespace("tenant-a"):
            again_a = model(**inputs)
    assert_outputs(got_b, want, mask, full=family in DECODERS)
    assert_outputs(got_default, want, mask, full=family in DECODERS)
    assert_outputs(again_a, want, mask)
    assert llmcache.stats(model).hits == 2
    held = llmcache.held(model).entries
    assert sorted(e.namespace for e in held) == ["", "", "tenant-a", "tenant-a", "tenant-b", "tenant-b"]
    assert {e.namespace: e.hits for e in held if e.hits} == {"tenant-a": 1}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_threads_sharing_one_model_get_the_uncached_outputs(family, gen):
    model = tiny_model(family)
    shared = batch(family, [7, 5, 7, 3], gen)  # every thread also runs these rows
    work = [[shared] + [batch(family, [7, 5, 7, 3], gen) for _ in range(2)] for _ in range(4)]
    with torch.inference_mode():
        want = [[model(**b) for b in thread] for thread in work]
    llmcache.accelerate(model, capacity=24, padding="masked")  # < 36 distinct rows: inserts evict while others read
    got = [[[] for _ in thread] for thread in work]
    errors = []

    def run(t):
        try:
            with torch.inference_mode():
                for _ in range(3):
                    for i, b in enumerate(work[t]):
                        got[t][i].append(model(**b))
        except Exception as err:  # noqa: BLE001 - reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(len(work))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors and not any(th.is_alive() for th in threads)
    for t, thread in enumerate(work):
        for i, b in enumerate(thread):
            for out in got[t][i]:
                assert_outputs(out, want[t][i], b["attention_mask"], close_rows=range(4))
    st = llmcache.stats(model)
    held = llmcache.held(model).entries
    # 36 distinct rows were each stored once into 24 entries: evictions are certain; which rows
    # hit depends on how the threads interleaved, so hits are checked after, on one thread.
    assert st.evictions >= 36 - 24 and st.rows == 4 * 3 * 3 * 4
    assert len(held) == st.entries <= 24
    keys = [(e.ids, e.positions, e.token_types, e.namespace) for e in held]
    assert len(keys) == len(set(keys))  # no row stored twice
    with torch.inference_mode():
        model(**shared)  # served or stored, depending on what the threads left
        before = llmcache.stats(model).hits
        again = model(**shared)
    assert llmcache.stats(model).hits - before == 4
    assert_outputs(again, want[0][0], shared["attention_mask"], close_rows=range(4))


# ---- failures: a block that raises, non-finite states ------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_a_failed_forward_stores_nothing_and_releases_the_model(family, gen):
    model = tiny_model(family)
    inputs = batch(family, [6, 6, 4], gen)
    more = batch(family, [5, 5], gen)
    with torch.inference_mode():
        want = model(**more)
        llmcache.accelerate(model, padding="masked")
        model(**inputs)
        held = llmcache.held(model)

        def boom(module, args, kwargs):
            raise RuntimeError("boom")

        handle = next(blocks_of(model)[-1].children()).register_forward_pre_hook(boom, with_kwargs=True)
        with pytest.raises(RuntimeError, match="boom"):
            model(**more)
        handle.remove()
        assert llmcache.held(model) == held  # nothing half-stored
        done = []
        def other_thread():
            with torch.inference_mode():
                done.append(model(**inputs))

        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join(timeout=60)
        assert done, "another thread could not run the model after the failed forward"
        got = model(**more)
        again = model(**more)
    assert_outputs(got, want, more["attention_mask"], full=True)
    assert_outputs(again, want, more["attention_mask"])
    assert llmcache.stats(model).hits == 3 + 2


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_with_non_finite_states_are_computed_and_never_served(family, gen, tmp_path):
    model = tiny_model(family)
    inputs = batch(family, [5, 5], gen)
    mask = inputs["attention_mask"]
    with torch.inference_mode():
        want = model(**inputs)
        llmcache.accelerate(model, padding="masked")

        def nan_row0(module, args, output):
            return output.index_fill(0, torch.tensor([0]), float("nan"))

        handle = model.get_input_embeddings().register_forward_hook(nan_row0)
        poisoned = model(**inputs)
        handle.remove()
        leaf = dict(leaves(poisoned))
        main = leaf["out.logits"] if "out.logits" in leaf else leaf["out.last_hidden_state"]
        assert torch.isnan(main[0]).all() and torch.isfinite(main[1]).all()
        llmcache.save(model, tmp_path / "after-nan.safetensors")
        got = model(**inputs)  # row 0 computes again (its entry was not kept), row 1 is served
        again = model(**inputs)
    st = llmcache.stats(model)
    assert_outputs(got, want, mask, close_rows=(0,))
    assert_outputs(again, want, mask, close_rows=(0,))
    assert st.not_cached == {"non_finite": 1}
    assert st.hits == 1 + 2
    assert all(torch.isfinite(t).all() for _, t in leaves(got))
    # What was saved after the poisoned forward loads (no non-finite entry reached the file).
    fresh = tiny_model(family)
    llmcache.accelerate(fresh, padding="masked")
    llmcache.load(fresh, tmp_path / "after-nan.safetensors")
    with torch.inference_mode():
        loaded = fresh(**inputs)
    assert_outputs(loaded, want, mask, close_rows=(0,))
    assert llmcache.stats(fresh).hits <= 1


# ---- configuration, stats, reset ---------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("padding", "zeros"), ("layerwise", 0.9), ("backend", "nonsense"),
                                         ("num_bits", 63), ("max_bytes", 0), ("page_tokens", 0),
                                         ("num_bits", 100), ("eviction", "fifo"), ("capacity", 1.5)])
def test_config_errors_come_at_construction(field, value):
    with pytest.raises(ValueError, match=f"CacheConfig.{field}"):
        llmcache.CacheConfig(**{field: value})
    with pytest.raises(ValueError, match=f"CacheConfig.{field}"):
        llmcache.CacheConfig().replace(**{field: value})


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_budget_below_one_page_is_refused_with_the_size_needed(family):
    model = tiny_model(family)
    need = llmcache.CacheConfig().page_tokens * entry_features(model) * 4
    with pytest.raises(ValueError, match=f"max_bytes = 1000 .*{need} bytes"):
        llmcache.accelerate(model, max_bytes=1000, padding="masked")
    assert not llmcache.is_accelerated(model)
    llmcache.accelerate(model, max_bytes=need, padding="masked")  # exactly one page: accepted
    with torch.inference_mode():
        model(input_ids=torch.tensor([[5, 6, 7]]))
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert llmcache.stats(model).hits == 1


def test_reset_zeroes_every_counter_and_empties_the_cache(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [6, 0, 4], gen)
    llmcache.accelerate(model, padding="masked")
    with torch.inference_mode():
        model(**inputs)
        model(**inputs)
        model(inputs_embeds=torch.zeros(1, 3, 64))
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.mul_(1.0)  # a version bump: one invalidation
        model(**inputs)
    st = llmcache.stats(model)
    assert st.hits and st.entries and st.not_cached and st.invalidations and st.bytes_reserved
    llmcache.reset(model)
    st = llmcache.stats(model)
    for f in dataclasses.fields(st):
        value = getattr(st, f.name)
        if f.name == "tier":
            assert value == "exact"
        elif f.name == "layers":
            assert all(getattr(s, n) == 0 for s in value for n in ("lookups", "hits", "insertions", "evictions"))
        elif f.name == "last_tokens":  # (served, computed), (0, 0) after a reset
            assert value == (0, 0), f"{f.name} = {value!r} after reset"
        else:
            assert not value, f"{f.name} = {value!r} after reset"
    assert st.hit_rate == 0.0 and llmcache.held(model).entries == []
    with torch.inference_mode():
        model(**inputs)
    assert llmcache.stats(model).hits == 0 and llmcache.stats(model).forwards == 1


def test_stats_repr_is_short_and_str_is_a_table(gen):
    model = tiny_model("llama")
    llmcache.accelerate(model, padding="masked")
    with torch.inference_mode():
        for lengths in ([6, 4, 0], [6, 4, 0], [3]):
            model(**batch("llama", lengths, gen))
        model(inputs_embeds=torch.zeros(1, 3, 64), output_hidden_states=True)
    st = llmcache.stats(model)
    assert len(repr(st)) < 300, repr(st)
    assert "hit_rate" in repr(st) and "entries" in repr(st)
    text = str(st)
    assert "entries" in text and "not cached" in text and len(text.splitlines()) >= len(st.layers) + 2


# ---- save / load, memory ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_save_then_load_into_a_fresh_model_serves_the_same_rows(family, gen, tmp_path):
    model = tiny_model(family)
    inputs = batch(family, [7, 3, 5], gen)
    mask = inputs["attention_mask"]
    with torch.inference_mode():
        want = model(**inputs)
        llmcache.accelerate(model, padding="masked")
        model(**inputs)
        with llmcache.namespace("a"):
            model(**inputs)
    llmcache.save(model, tmp_path / "cache.safetensors")
    fresh = tiny_model(family)
    llmcache.accelerate(fresh, padding="masked")
    llmcache.load(fresh, tmp_path / "cache.safetensors")
    held = lambda m: sorted((e.ids, e.positions, e.token_types, e.namespace, e.pages, e.bytes)
                            for e in llmcache.held(m).entries)
    assert held(fresh) == held(model)
    assert llmcache.stats(fresh).entries == 6 and llmcache.stats(fresh).bytes == llmcache.stats(model).bytes
    with torch.inference_mode():
        got = fresh(**inputs)
        with llmcache.namespace("a"):
            got_a = fresh(**inputs)
    assert_outputs(got, want, mask)
    assert_outputs(got_a, want, mask)
    assert llmcache.stats(fresh).hits == 6 and llmcache.stats(fresh).insertions == 0


def test_save_file_size_follows_the_entries_held(gen, tmp_path):
    sizes, held = [], []
    for rows in (16, 32):
        model = tiny_model("bert")
        llmcache.accelerate(model, padding="masked")
        with torch.inference_mode():
            model(**batch("bert", [7] * rows, gen))
        path = tmp_path / f"{rows}.safetensors"
        llmcache.save(model, path)
        sizes.append(path.stat().st_size)
        held.append(llmcache.stats(model).bytes)
        assert llmcache.stats(model).entries == rows
    assert 1.6 <= sizes[1] / sizes[0] <= 2.4, sizes  # proportional, up to the fixed header
    assert sizes[1] <= 1.5 * held[1] + 64 * 1024  # what is held, not what is reserved


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_held_follows_the_real_tokens_stored(family, gen):
    model = tiny_model(family)
    budget = 1 << 22
    llmcache.accelerate(model, max_bytes=budget, padding="masked")
    with torch.inference_mode():
        for _ in range(4):
            model(**batch(family, [7] * 16, gen))
    st = llmcache.stats(model)
    held = llmcache.held(model).entries
    real_bytes = sum(len(e.ids) for e in held) * entry_features(model) * 4
    assert st.entries == len(held) == 64
    assert st.bytes == sum(e.bytes for e in held)
    assert real_bytes <= st.bytes <= 1.5 * real_bytes
    assert st.bytes <= st.bytes_reserved <= budget
