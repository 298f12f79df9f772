"""`llmcache.accelerate` on every supported family (random 3-block models): exactness, per-row
hit/miss with only the misses computed, padding, generate, namespaces, the semantic tier, and
exact undoing. Everything is observed through the public surface (`stats`, `held`, outputs) and
through hooks on the blocks' own submodules; tests/test_exact_matrix.py holds the issue-12 matrix
(non-finite states, failing forwards, threads, weights that change, autograd).
The exact tier runs here with padding="masked" (served rows hold zeros at padding positions, and
are served whatever their padding): these tests are about serving at real positions;
tests/test_padding.py holds what "auto" and "exact" give at padding positions.
"""

from __future__ import annotations

import pytest
import torch
from helpers import CLOSE, batch, computed_rows
from models import DECODERS, FAMILIES, VOCAB, output, tiny_model

import llmcache


def real(inputs):
    return inputs["attention_mask"].bool()


@pytest.mark.parametrize("family", FAMILIES)
def test_bit_identical_empty_exact_and_disabled(family, gen):
    model = tiny_model(family)
    inputs = batch(family, [9, 5, 7, 9], gen)
    with torch.inference_mode():
        want = output(model, inputs)
        llmcache.accelerate(model, padding="masked")
        first = output(model, inputs)  # empty cache: every row computes
        second = output(model, inputs)  # every row an exact hit
        st = llmcache.stats(model)
        llmcache.disable(model)
        after = output(model, inputs)
    m = real(inputs)
    if family in DECODERS:
        assert torch.equal(first, want)
    else:  # (an encoder's rows hold zeros at padding, computed or served alike: the same output twice)
        assert torch.equal(first[m], want[m]) and torch.equal(second, first)
    assert torch.equal(second[m], want[m])
    assert torch.equal(after, want)
    assert st.hits == st.exact_hits == 4 and st.lookups == 8  # rows: a served row skips every block


@pytest.mark.parametrize("family", FAMILIES)
def test_all_hits_skip_every_block(family, gen):
    model = tiny_model(family)
    inputs = batch(family, [6, 6, 4], gen)
    with torch.inference_mode():
        llmcache.accelerate(model, padding="masked")
        output(model, inputs)
        with computed_rows(model) as seen:
            output(model, inputs)
    # Every row was served: the original blocks never ran.
    assert seen.calls == [[], [], []]
    assert llmcache.stats(model).hits == 3


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra", "modernbert"])
def test_a_batch_with_no_row_to_compute_skips_the_embeddings(family, gen):
    """Where every row is served, nothing reads the embeddings: they are not computed (a hook
    inside them does not fire) and the output is what computing them gives. A hook on the
    embeddings module itself sees what the module computes, served batch or not."""
    model = tiny_model(family)
    inputs = batch(family, [6, 6, 4], gen)
    inside, outside = [], []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: inside.append(out))
    with torch.inference_mode():
        llmcache.accelerate(model)
        first = output(model, inputs)
        ran = len(inside)
        second = output(model, inputs)
        assert len(inside) == ran == 1 and torch.equal(second, first)
        assert llmcache.stats(model).hits == 3
        other = batch(family, [6, 5], gen)  # (rows to compute: the embeddings run again)
        output(model, other)
        assert len(inside) == 2
        hook = model.embeddings.register_forward_hook(lambda module, args, out: outside.append(out))
        third = output(model, inputs)
        hook.remove()
    assert len(inside) == 3 and torch.equal(third, first)
    with torch.inference_mode(), llmcache.bypass(model):
        assert torch.equal(outside[0], model.embeddings(input_ids=inputs["input_ids"]))


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra", "modernbert"])
def test_the_embeddings_run_on_the_rows_that_compute(family, gen):
    """On the CPU a batch of served and new rows computes the embeddings of the new rows only (a
    hook inside them sees those rows' ids), and the output is what computing every row's gives."""
    model = tiny_model(family)
    cached, fresh = batch(family, [7, 7], gen), batch(family, [7, 7, 7], gen)
    mixed = {k: torch.cat([cached[k][:1], fresh[k], cached[k][1:]]) for k in cached}
    inside = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: inside.append(args[0]))
    with torch.inference_mode():
        want = output(model, mixed)
        llmcache.accelerate(model, padding="masked")
        output(model, cached)
        del inside[:]
        got = output(model, mixed)
    assert len(inside) == 1 and torch.equal(inside[0], fresh["input_ids"])
    assert llmcache.stats(model).hits == 2
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_miss_rows_compute(family, gen):
    model = tiny_model(family)
    cached = batch(family, [7, 7], gen)
    fresh = batch(family, [7, 7, 7], gen)
    mixed = {k: torch.cat([cached[k][:1], fresh[k], cached[k][1:]]) for k in cached}
    with torch.inference_mode():
        want = output(model, mixed)
        llmcache.accelerate(model, padding="masked")
        output(model, cached)
        with computed_rows(model) as seen:
            got = output(model, mixed)
    assert seen.calls == [[3], [3], [3]]  # every block ran on the 3 miss rows only
    assert llmcache.stats(model).hits == 2
    assert torch.equal(got, want)  # same width, no padding: rows match bit for bit


@pytest.mark.parametrize("family", FAMILIES)
def test_repeats_inside_one_batch_compute_once(family, gen):
    model = tiny_model(family)
    distinct = batch(family, [7, 7, 7], gen)
    order = [0, 1, 0, 2, 0, 1]  # rows 2, 4 repeat row 0; row 5 repeats row 1
    inputs = {k: v[order] for k, v in distinct.items()}
    with torch.inference_mode():
        want = output(model, inputs)
        llmcache.accelerate(model, padding="masked")
        with computed_rows(model) as seen:
            got = output(model, inputs)
        st = llmcache.stats(model)
    assert seen.calls == [[3], [3], [3]]  # the three distinct rows, at every block
    assert torch.equal(got, want)
    assert st.insertions == st.entries == 3
    assert sorted(len(e.ids) for e in llmcache.held(model).entries) == [7, 7, 7]


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_rows_one_by_one(family, gen):
    model = tiny_model(family)
    lengths = [8, 3, 6, 8, 5]
    inputs = batch(family, lengths, gen)
    with torch.inference_mode():
        alone = []
        for r, n in enumerate(lengths):
            row = {k: v[r : r + 1] for k, v in inputs.items()}
            keep = real(row)[0]
            alone.append(output(model, {k: v[:, keep] for k, v in row.items()})[0])
        llmcache.accelerate(model, padding="masked")
        output(model, {k: v[[1, 3]] for k, v in inputs.items()})  # rows 1 and 3 get cached
        got = output(model, inputs)
    assert llmcache.stats(model).hits > 0
    for r in range(len(lengths)):
        torch.testing.assert_close(got[r][real(inputs)[r]], alone[r], **CLOSE)


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_generate_with_exact_repeats_equals_uncached(family, gen):
    model = tiny_model(family)
    inputs = batch(family, [6, 9, 4], gen)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        want = model.generate(**inputs, **kwargs)
        llmcache.accelerate(model, padding="masked")
        first = model.generate(**inputs, **kwargs)
        again = model.generate(**inputs, **kwargs)
        st = llmcache.stats(model)
    assert torch.equal(first, want) and torch.equal(again, want)
    assert st.hits == 3  # the second prefill was served entirely from the cache


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_namespaces_never_share_entries(family, gen):
    model = tiny_model(family)
    inputs = batch(family, [5, 5], gen)
    with torch.inference_mode():
        llmcache.accelerate(model, padding="masked")
        with llmcache.namespace("tenant-a"):
            output(model, inputs)
        with llmcache.namespace("tenant-b"):
            output(model, inputs)
        assert llmcache.stats(model).hits == 0
        with llmcache.namespace("tenant-a"):
            output(model, inputs)
        assert llmcache.stats(model).hits == 2
    assert sorted(e.namespace for e in llmcache.held(model).entries) == ["tenant-a"] * 2 + ["tenant-b"] * 2


def test_disable_restores_the_original_forward():
    model = tiny_model("bert")
    blocks = model.encoder.layer
    before = [b.forward for b in blocks]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    llmcache.accelerate(model, layers=[0, 1], padding="masked")
    # The exact tier patches the span first..last cached block (served rows skip all of it).
    assert ["forward" in b.__dict__ for b in blocks] == [True, True, False]
    assert "forward" in model.__dict__  # the base model's forward routes each call once
    llmcache.disable(model)
    assert all("forward" not in b.__dict__ for b in blocks) and "forward" not in model.__dict__
    assert [b.forward for b in blocks] == before
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not llmcache.is_accelerated(model)


def test_training_mode_bypasses_the_cache(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [4, 4], gen)
    llmcache.accelerate(model, padding="masked")
    model.train()
    output(model, inputs)
    output(model, inputs)
    st = llmcache.stats(model)
    assert st.lookups == 0 and st.bytes == 0 and st.entries == 0
    assert st.not_cached == {"training": 4} and st.rows == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_and_no_grad(dtype, gen):
    model = tiny_model("llama").to(dtype)
    inputs = batch("llama", [5, 7], gen)
    with torch.no_grad():
        want = output(model, inputs)
        llmcache.accelerate(model, padding="masked")
        output(model, inputs)
        got = output(model, inputs)
    st = llmcache.stats(model)
    assert st.hits == 2
    assert torch.equal(got[real(inputs)], want[real(inputs)])
    # States are held in the model's dtype: an entry's bytes are its pages x page_tokens x F x 2,
    # F = hidden + 3 blocks x (K + V) x 2 kv heads x head dim 16.
    page_bytes = llmcache.CacheConfig().page_tokens * (64 + 3 * 2 * 2 * 16) * 2
    assert [e.bytes for e in llmcache.held(model).entries] == [e.pages * page_bytes for e in llmcache.held(model).entries]


def test_semantic_tier_serves_near_duplicates(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [12, 12], gen)
    near = {k: v.clone() for k, v in inputs.items()}
    near["input_ids"][:, 5] = (near["input_ids"][:, 5] + 1) % VOCAB  # one token changed
    with torch.inference_mode():
        llmcache.accelerate(model, layerwise=llmcache.Layerwise(threshold=0.5))
        output(model, inputs)
        output(model, near)
        st = llmcache.stats(model)
    assert st.semantic_hits == 2 * 3 and st.exact_hits == 0


def test_max_tokens_limits_the_semantic_tier_only(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [10, 4], gen)
    with torch.inference_mode():
        llmcache.accelerate(model, layerwise=llmcache.Layerwise(threshold=0.99, max_tokens=6))
        output(model, inputs)
        output(model, inputs)
        st = llmcache.stats(model)
        llmcache.disable(model)
        llmcache.accelerate(model, padding="masked")
        output(model, inputs)
        output(model, inputs)
    # Semantic tier: per-layer banks of max_tokens positions, only the 4-token row is cacheable.
    assert st.lookups == 3 * 2 and st.hits == 3 and st.hit_rate == 3 / (4 * 3)
    assert llmcache.stats(model).hits == 2  # exact tier: no length limit but the budget


def test_max_bytes_bounds_every_bank(gen):
    model = tiny_model("bert")
    budget = 200_000  # 97 pages of 2 KiB: the 160 rows below evict
    with torch.inference_mode():
        llmcache.accelerate(model, max_bytes=budget, padding="masked")
        for _ in range(10):
            output(model, batch("bert", [8] * 16, gen))
            st = llmcache.stats(model)
            assert st.bytes <= st.bytes_reserved <= budget
    assert st.evictions > 0 and st.bytes > 0 and st.entries == len(llmcache.held(model).entries)


def test_residual_mode_matches_within_rounding(gen):
    model = tiny_model("roberta")
    inputs = batch("roberta", [7, 7], gen)
    with torch.inference_mode():
        want = output(model, inputs)
        llmcache.accelerate(model, layerwise=llmcache.Layerwise(threshold=1.0, mode="residual"))
        output(model, inputs)
        got = output(model, inputs)
    st = llmcache.stats(model)
    assert st.hits == 2 * len(st.layers) and st.exact_hits == st.hits  # both rows, at every block
    torch.testing.assert_close(got, want, **CLOSE)


def test_a_module_that_is_no_transformers_model_is_refused_saying_what_is_accelerated():
    class Other(torch.nn.Module):
        config = type("C", (), {"model_type": "t5"})()

    with pytest.raises(ValueError, match="no transformers PreTrainedModel: llmcache accelerates transformers models"):
        llmcache.accelerate(Other())
    assert not llmcache.is_accelerated(Other())


@pytest.mark.parametrize(
    "field,value",
    [("num_bits", 100), ("capacity", 0), ("eviction", "fifo"), ("layers", [7])],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"CacheConfig.{field}"):
        llmcache.accelerate(tiny_model("bert"), **{field: value})


@pytest.mark.parametrize(
    "field,value",
    [("threshold", 1.5), ("threshold", 0.0), ("mode", "delta"), ("fingerprint", "ids"), ("max_tokens", 0),
     ("eviction", "fifo"), ("staleness_half_life", 0)],
)
def test_bad_layerwise_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"Layerwise.{field}"):
        llmcache.Layerwise(**{"threshold": 0.9, field: value})


def test_a_threshold_per_layer_must_fit_the_cached_layers():
    with pytest.raises(ValueError, match="Layerwise.threshold"):
        llmcache.accelerate(tiny_model("bert"), layerwise=llmcache.Layerwise(threshold=(0.9, 0.95)), layers=[0, 1, 2])


@pytest.mark.parametrize("field", ["threshold", "mode", "max_tokens"])
def test_a_per_block_field_given_flat_says_where_it_moved(field):
    value = {"threshold": 0.9, "mode": "residual", "max_tokens": 8}[field]
    with pytest.raises(TypeError, match=f"{field}: moved to the per-block tier's own section.*Layerwise"):
        llmcache.accelerate(tiny_model("bert"), **{field: value})
    with pytest.raises(TypeError, match="threshold"):
        llmcache.CacheConfig(threshold=0.9)


def test_cached_context_manager_and_reset(gen):
    model = tiny_model("distilbert")
    inputs = batch("distilbert", [5, 5], gen)
    with torch.inference_mode(), llmcache.cached(model, capacity=8):
        output(model, inputs)
        llmcache.reset(model)
        output(model, inputs)
        assert llmcache.stats(model).hits == 0
        output(model, inputs)
        assert llmcache.stats(model).hits == 2
    assert not llmcache.is_accelerated(model)


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_left_padding_without_position_ids_never_reuses_across_offsets(family, gen):
    model = tiny_model(family)
    short = batch(family, [5, 8], gen)
    short.pop("position_ids")  # positions now shift with the padding (arange)
    row = {k: v[:1, 3:] for k, v in short.items()}  # the same 5 tokens with no padding
    with torch.inference_mode():
        want = output(model, row)
        llmcache.accelerate(model, padding="masked")
        output(model, short)
        got = output(model, row)
    assert llmcache.stats(model).hits == 0
    assert torch.equal(got, want)


def test_bypass_runs_uncached_and_keeps_the_banks(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [6, 6], gen)
    with torch.inference_mode():
        llmcache.accelerate(model, padding="masked")
        output(model, inputs)
        with llmcache.bypass(model):
            output(model, inputs)
        assert llmcache.stats(model).hits == 0
        output(model, inputs)
    assert llmcache.stats(model).hits == 2


def test_reset_outside_inference_mode_after_filling_inside_it(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [5, 5], gen)
    llmcache.accelerate(model, padding="masked")
    with torch.inference_mode():
        output(model, inputs)
    llmcache.reset(model)  # banks made under inference mode: reset must still work outside it
    with torch.no_grad():
        output(model, inputs)
    assert llmcache.stats(model).hits == 0 and llmcache.stats(model).insertions == 2


def test_a_served_entry_counts_one_hit_per_forward(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [6, 6], gen)
    with torch.inference_mode():
        llmcache.accelerate(model, padding="masked")
        for _ in range(3):
            output(model, inputs)
    # Two forwards were served each entry (once per forward, not once per block).
    assert [e.hits for e in llmcache.held(model).entries] == [2, 2]
    assert llmcache.stats(model).hits == 4


def test_semantic_tier_keeps_one_bank_per_layer(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [6, 6], gen)
    with torch.inference_mode():
        llmcache.accelerate(model, layerwise=llmcache.Layerwise(threshold=0.99), layers=[0, 2])
        output(model, inputs)
        output(model, inputs)
    held = llmcache.held(model)
    assert held.entries == [] and held.layers == {0: 2, 2: 2}
    st = llmcache.stats(model)
    assert st.tier == "semantic" and [s.layer for s in st.layers] == [0, 2]
    assert [(s.lookups, s.hits, s.insertions) for s in st.layers] == [(4, 2, 2), (4, 2, 2)]
    assert st.hits == 4 and st.hit_rate == 4 / (4 * 2)  # summed over layers, rate over rows x layers
