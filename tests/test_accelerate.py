"""`llmcache.accelerate` on every supported family (random 3-block models): exactness, per-row
hit/miss with only the misses computed, padding, generate, namespaces, and exact undoing."""

from __future__ import annotations

import pytest
import torch
from models import DECODERS, FAMILIES, VOCAB, batch, output, tiny_model

import llmcache


def real(inputs):
    return inputs["attention_mask"].bool()


def count_block_rows(model):
    """Rows each block saw per call: list of lists, filled by forward pre-hooks."""
    _, _, blocks = llmcache.adapters.resolve(model)
    seen = [[] for _ in blocks]
    handles = [
        b.register_forward_pre_hook(lambda m, args, kwargs, i=i: seen[i].append(
            (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
        for i, b in enumerate(blocks)
    ]
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_bit_identical_empty_exact_and_disabled(family, gen):
    model = tiny_model(family)
    inputs = batch(family, [9, 5, 7, 9], gen)
    with torch.inference_mode():
        want = output(model, inputs)
        llmcache.accelerate(model)
        first = output(model, inputs)  # empty cache: every row computes
        second = output(model, inputs)  # every row an exact hit
        st = llmcache.stats(model)
        llmcache.disable(model)
        after = output(model, inputs)
    m = real(inputs)
    assert torch.equal(first, want)
    assert torch.equal(second[m], want[m])
    assert torch.equal(after, want)
    assert st.hits == st.exact_hits == 4 * 3 and st.lookups == 8 * 3


@pytest.mark.parametrize("family", FAMILIES)
def test_all_hits_skip_every_block(family, gen):
    model = tiny_model(family)
    inputs = batch(family, [6, 6, 4], gen)
    with torch.inference_mode():
        llmcache.accelerate(model)
        output(model, inputs)
        seen, handles = count_block_rows(model)
        output(model, inputs)
    for h in handles:
        h.remove()
    # The pre-hooks see the wrapped call (the full batch) ...
    assert all(rows == [3] for rows in seen)
    # ... and every row of every layer was served: the original blocks never ran.
    assert llmcache.stats(model).hits == 3 * 3


@pytest.mark.parametrize("family", FAMILIES)
def test_only_miss_rows_compute(family, gen):
    model = tiny_model(family)
    cached = batch(family, [7, 7], gen)
    fresh = batch(family, [7, 7, 7], gen)
    mixed = {k: torch.cat([cached[k][:1], fresh[k], cached[k][1:]]) for k in cached}
    with torch.inference_mode():
        want = output(model, mixed)
        llmcache.accelerate(model)
        output(model, cached)
        calls = []

        def counting(forward):
            def run(hidden, *args, **kwargs):
                calls.append(hidden.shape[0])
                return forward(hidden, *args, **kwargs)

            return run

        for layer in llmcache.api._owner(model).layers.values():
            layer.original_forward = counting(layer.original_forward)
        got = output(model, mixed)
    assert calls == [3, 3, 3]  # the block ran on the 3 miss rows only, at every layer
    assert torch.equal(got, want)  # same shapes, no padding: rows match bit for bit


@pytest.mark.parametrize("family", FAMILIES)
def test_repeats_inside_one_batch_compute_once(family, gen):
    model = tiny_model(family)
    distinct = batch(family, [7, 7, 7], gen)
    order = [0, 1, 0, 2, 0, 1]  # rows 2, 4 repeat row 0; row 5 repeats row 1
    inputs = {k: v[order] for k, v in distinct.items()}
    with torch.inference_mode():
        want = output(model, inputs)
        llmcache.accelerate(model)
        calls = []
        for layer in llmcache.api._owner(model).layers.values():
            forward = layer.original_forward
            layer.original_forward = lambda hidden, *a, _f=forward, **k: calls.append(hidden.shape[0]) or _f(hidden, *a, **k)
        got = output(model, inputs)
        st = llmcache.stats(model)
    assert calls == [3, 3, 3]  # the three distinct rows, at every layer
    assert torch.equal(got, want)
    assert st.hits == st.exact_hits == 3 * 3 and st.insertions == 3 * 3


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
        llmcache.accelerate(model)
        output(model, {k: v[[1, 3]] for k, v in inputs.items()})  # rows 1 and 3 get cached
        got = output(model, inputs)
    assert llmcache.stats(model).hits > 0
    for r in range(len(lengths)):
        torch.testing.assert_close(got[r][real(inputs)[r]], alone[r], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_generate_with_exact_repeats_equals_uncached(family, gen):
    model = tiny_model(family)
    inputs = batch(family, [6, 9, 4], gen)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        want = model.generate(**inputs, **kwargs)
        llmcache.accelerate(model)
        first = model.generate(**inputs, **kwargs)
        again = model.generate(**inputs, **kwargs)
        st = llmcache.stats(model)
    assert torch.equal(first, want) and torch.equal(again, want)
    assert st.hits == 3 * 3  # the second prefill was served entirely from the banks


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_namespaces_never_share_entries(family, gen):
    model = tiny_model(family)
    inputs = batch(family, [5, 5], gen)
    with torch.inference_mode():
        llmcache.accelerate(model)
        with llmcache.namespace("tenant-a"):
            output(model, inputs)
        with llmcache.namespace("tenant-b"):
            output(model, inputs)
        assert llmcache.stats(model).hits == 0
        with llmcache.namespace("tenant-a"):
            output(model, inputs)
        assert llmcache.stats(model).hits == 2 * 3


def test_disable_restores_the_original_forward():
    model = tiny_model("bert")
    blocks = model.encoder.layer
    before = [b.forward for b in blocks]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    llmcache.accelerate(model, layers=[0, 2])
    assert "forward" in blocks[0].__dict__ and "forward" not in blocks[1].__dict__
    llmcache.disable(model)
    assert all("forward" not in b.__dict__ for b in blocks)
    assert [b.forward for b in blocks] == before
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not llmcache.is_accelerated(model)


def test_training_mode_bypasses_the_cache(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [4, 4], gen)
    llmcache.accelerate(model)
    model.train()
    output(model, inputs)
    output(model, inputs)
    assert llmcache.stats(model).lookups == 0 and llmcache.stats(model).bytes == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_and_no_grad(dtype, gen):
    model = tiny_model("llama").to(dtype)
    inputs = batch("llama", [5, 7], gen)
    with torch.no_grad():
        want = output(model, inputs)
        llmcache.accelerate(model)
        output(model, inputs)
        got = output(model, inputs)
    assert llmcache.stats(model).hits == 6
    assert torch.equal(got[real(inputs)], want[real(inputs)])
    assert llmcache.api._owner(model).layers[0].bank.values.dtype == dtype


def test_semantic_tier_serves_near_duplicates_and_monitors_divergence(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [12, 12], gen)
    near = {k: v.clone() for k, v in inputs.items()}
    near["input_ids"][:, 5] = (near["input_ids"][:, 5] + 1) % VOCAB  # one token changed
    with torch.inference_mode():
        llmcache.accelerate(model, threshold=0.5, verify_rate=0.0)
        output(model, inputs)
        output(model, near)
        st = llmcache.stats(model)
        assert st.semantic_hits == 2 * 3 and st.exact_hits == 0
        llmcache.disable(model)
        # Monitoring every hit with a bound no reuse meets: entries evicted, the layers switched off.
        llmcache.accelerate(model, threshold=0.5, verify_rate=1.0, max_divergence=1e-9)
        for _ in range(5):
            output(model, inputs)
            output(model, near)
        st = llmcache.stats(model)
    assert st.verified > 0 and st.semantic_hits == 0
    assert all(layer.divergence_evictions > 0 for layer in st.layers)
    assert not any(layer.semantic_enabled for layer in st.layers)


def test_rows_longer_than_max_tokens_always_compute(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [10, 4], gen)
    with torch.inference_mode():
        llmcache.accelerate(model, max_tokens=6)
        output(model, inputs)
        output(model, inputs)
    st = llmcache.stats(model)
    assert st.lookups == 3 * 2 and st.hits == 3  # only the 4-token row is cacheable


def test_max_bytes_bounds_every_bank(gen):
    model = tiny_model("bert")
    budget = 3 * 200_000
    with torch.inference_mode():
        llmcache.accelerate(model, max_bytes=budget, max_tokens=16)
        for _ in range(10):
            output(model, batch("bert", [8] * 16, gen))
            assert llmcache.stats(model).bytes <= budget
    st = llmcache.stats(model)
    assert st.evictions > 0 and st.bytes > 0


def test_residual_mode_matches_within_rounding(gen):
    model = tiny_model("roberta")
    inputs = batch("roberta", [7, 7], gen)
    with torch.inference_mode():
        want = output(model, inputs)
        llmcache.accelerate(model, mode="residual")
        output(model, inputs)
        got = output(model, inputs)
    assert llmcache.stats(model).hits == 6
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unsupported_model_lists_the_supported_ones():
    class Other(torch.nn.Module):
        config = type("C", (), {"model_type": "t5"})()

    with pytest.raises(ValueError, match="bert, distilbert, gpt2, llama, roberta"):
        llmcache.accelerate(Other())


@pytest.mark.parametrize(
    "field,value",
    [("threshold", 1.5), ("threshold", 0.0), ("num_bits", 100), ("capacity", 0), ("eviction", "fifo"),
     ("mode", "delta"), ("layers", [7]), ("fingerprint", "ids"), ("max_tokens", 0)],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"CacheConfig.{field}"):
        llmcache.accelerate(tiny_model("bert"), **{field: value})


def test_cached_context_manager_and_reset(gen):
    model = tiny_model("distilbert")
    inputs = batch("distilbert", [5, 5], gen)
    with torch.inference_mode(), llmcache.cached(model, capacity=8):
        output(model, inputs)
        llmcache.reset(model)
        output(model, inputs)
        assert llmcache.stats(model).hits == 0
        output(model, inputs)
        assert llmcache.stats(model).hits == 6
    assert not llmcache.is_accelerated(model)


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_left_padding_without_position_ids_never_reuses_across_offsets(family, gen):
    model = tiny_model(family)
    short = batch(family, [5, 8], gen)
    short.pop("position_ids")  # positions now shift with the padding (arange)
    row = {k: v[:1, 3:] for k, v in short.items()}  # the same 5 tokens with no padding
    with torch.inference_mode():
        want = output(model, row)
        llmcache.accelerate(model)
        output(model, short)
        got = output(model, row)
    assert llmcache.stats(model).hits == 0
    assert torch.equal(got, want)


def test_bypass_runs_uncached_and_keeps_the_banks(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [6, 6], gen)
    with torch.inference_mode():
        llmcache.accelerate(model)
        output(model, inputs)
        with llmcache.bypass(model):
            output(model, inputs)
        assert llmcache.stats(model).hits == 0
        output(model, inputs)
    assert llmcache.stats(model).hits == 2 * 3


def test_rows_carrying_nan_are_computed_and_never_stored(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [5, 5], gen)
    with torch.inference_mode():
        llmcache.accelerate(model)
        output(model, inputs)  # every layer holds both rows
        owner = llmcache.api._owner(model)
        first = owner.layers[0]
        first.bank.evict(first.bank.lookup_exact(owner_keys(model, inputs)[:1], first.bank.tags[:1]))
        clean = first.original_forward

        def nan_for_row0(hidden, *args, **kwargs):
            return clean(hidden, *args, **kwargs).index_fill(0, torch.tensor([0]), float("nan"))

        first.original_forward = nan_for_row0
        before = [layer.bank.occupied for layer in owner.layers.values()]
        out = output(model, inputs)
        st = llmcache.stats(model)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    # Layer 0 recomputed row 0 (NaN now) and did not store it; layers 1 and 2 held row 0 but
    # computed it from its NaN input instead of serving it.
    assert [layer.bank.occupied for layer in owner.layers.values()] == before
    assert [s.hits for s in st.layers] == [1, 1, 1]  # only row 1, at every layer


def owner_keys(model, inputs):
    owner = llmcache.api._owner(model)
    owner.begin(inputs["input_ids"], inputs["attention_mask"], None)
    ctx = owner.local.contexts.pop()
    if ctx.locked:
        owner.lock.release()
    return ctx.keys


def test_reset_outside_inference_mode_after_filling_inside_it(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [5, 5], gen)
    llmcache.accelerate(model)
    with torch.inference_mode():
        output(model, inputs)
    llmcache.reset(model)  # banks made under inference mode: reset must still work outside it
    with torch.no_grad():
        output(model, inputs)
    assert llmcache.stats(model).hits == 0 and llmcache.stats(model).insertions == 6


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_tier_layers_share_one_index_and_a_failed_forward_leaves_no_half_entry(family, gen):
    import threading

    model = tiny_model(family)
    inputs = batch(family, [6, 6, 4], gen)
    more = batch(family, [5, 5], gen)
    with torch.inference_mode():
        want = output(model, more)
        llmcache.accelerate(model)
        output(model, inputs)
        owner = llmcache.api._owner(model)
        banks = [layer.bank for layer in owner.layers.values()]
        assert all(b.index is banks[0] for b in banks)  # one index, per-layer states
        assert sum(b.nbytes for b in banks[1:]) == sum(b.values.numel() * b.values.element_size() for b in banks[1:])
        occupied = banks[0].occupied
        # The last block raises: the first layer has inserted `more`'s rows, the last never wrote them.
        last = owner.layers[owner.layer_ids[-1]]
        forward = last.original_forward

        def boom(*args, **kwargs):
            raise RuntimeError("boom")

        last.original_forward = boom
        with pytest.raises(RuntimeError, match="boom"):
            output(model, more)
        last.original_forward = forward
        assert banks[0].occupied == occupied  # those entries were taken back, in every layer
        # The forward's lock was released: another thread can run the model.
        done = []
        worker = threading.Thread(target=lambda: done.append(owner.lock.acquire(timeout=5) and owner.lock.release()))
        worker.start()
        worker.join()
        assert done == [None]
        got = output(model, more)  # computed again, not served half-written entries
        assert llmcache.stats(model).hits == 0
        again = output(model, more)  # now stored at every layer
    assert torch.equal(got, want) and torch.equal(again[real(more)], want[real(more)])
    assert llmcache.stats(model).hits == 2 * 3


def test_lockstep_counts_a_served_entry_once_per_forward(gen):
    model = tiny_model("bert")
    inputs = batch("bert", [6, 6], gen)
    with torch.inference_mode():
        llmcache.accelerate(model)
        for _ in range(3):
            output(model, inputs)
    index = llmcache.api._owner(model).shared_index
    # Two forwards read each entry, at three layers: the first layer stamps, the others only read.
    assert index.hit_count[index.valid].tolist() == [2, 2]
    assert index.last_used[index.valid].tolist() == [2, 2]


def test_semantic_tier_keeps_one_index_per_layer(gen):
    model = tiny_model("bert")
    with torch.inference_mode():
        llmcache.accelerate(model, threshold=0.99)
        output(model, batch("bert", [6, 6], gen))
    banks = [layer.bank for layer in llmcache.api._owner(model).layers.values()]
    assert all(b.index is b for b in banks)
