"""save / load: round trip (exact and semantic tiers), and refusals (other model, weights,
config; corrupt or truncated files) that leave the live cache untouched (what `held` shows, and
what it serves)."""

from __future__ import annotations

import pytest
import torch
from models import batch, output, tiny_model

import llmcache


def filled(family="bert", seed=0, gen=None, **config):
    model = tiny_model(family, seed=seed)
    inputs = batch(family, [6, 6, 4], gen)
    with torch.inference_mode():
        llmcache.accelerate(model, **config)
        output(model, inputs)
    return model, inputs


def test_round_trip_serves_the_saved_entries(tmp_path, gen):
    model, inputs = filled(gen=gen)
    path = tmp_path / "banks.safetensors"
    with llmcache.namespace("a"), torch.inference_mode():
        output(model, inputs)
    llmcache.save(model, path)
    fresh = tiny_model("bert")
    with torch.inference_mode():
        want = output(fresh, inputs)
        llmcache.accelerate(fresh)
        llmcache.load(fresh, path)
        assert snapshot(fresh) == snapshot(model)  # the same entries, hit counts included
        assert llmcache.stats(fresh).entries == 6
        got = output(fresh, inputs)
        with llmcache.namespace("a"):
            output(fresh, inputs)
    assert llmcache.stats(fresh).hits == 2 * 3
    m = inputs["attention_mask"].bool()
    assert torch.equal(got[m], want[m])


def snapshot(model):
    return sorted(llmcache.held(model).entries, key=lambda e: (e.namespace, e.ids))


@pytest.mark.parametrize("change", ["weights", "config", "architecture"])
def test_load_refuses_another_model_and_keeps_the_live_cache(change, tmp_path, gen):
    model, _inputs = filled(gen=gen)
    path = tmp_path / "banks.safetensors"
    llmcache.save(model, path)
    if change == "weights":
        other, other_inputs = filled(seed=1, gen=gen)
        match = "other weights"
    elif change == "config":
        other, other_inputs = filled(gen=gen, capacity=77)
        match = "another cache config"
    else:
        other, other_inputs = filled("roberta", gen=gen)
        match = "written for"
    held, st = snapshot(other), llmcache.stats(other)
    with pytest.raises(ValueError, match=match):
        llmcache.load(other, path)
    assert_untouched(other, other_inputs, held, st)


def assert_untouched(model, inputs, held, st):
    """The live cache holds what it held, and still serves it with the uncached outputs."""
    assert snapshot(model) == held and llmcache.stats(model).bytes == st.bytes
    with torch.inference_mode():
        got = output(model, inputs)
        with llmcache.bypass(model):
            want = output(model, inputs)
    m = inputs["attention_mask"].bool()
    assert torch.equal(got[m], want[m])
    assert llmcache.stats(model).hits == st.hits + inputs["input_ids"].shape[0]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not-llmcache"])
def test_load_refuses_damaged_files(damage, tmp_path, gen):
    model, inputs = filled(gen=gen)
    path = tmp_path / "banks.safetensors"
    llmcache.save(model, path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64 + data[64:])
    else:
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, path, metadata={"format": "pt"})
    held, st = snapshot(model), llmcache.stats(model)
    with pytest.raises(ValueError):
        llmcache.load(model, path)
    assert_untouched(model, inputs, held, st)


def test_semantic_tier_round_trip(tmp_path, gen):
    model, inputs = filled(gen=gen, threshold=0.99)
    path = tmp_path / "banks.safetensors"
    llmcache.save(model, path)
    fresh = tiny_model("bert")
    llmcache.accelerate(fresh, threshold=0.99)
    llmcache.load(fresh, path)
    assert llmcache.held(fresh).layers == llmcache.held(model).layers == {0: 3, 1: 3, 2: 3}
    with torch.inference_mode():
        output(fresh, inputs)
    st = llmcache.stats(fresh)
    assert [s.hits for s in st.layers] == [3, 3, 3] and st.hits == 9
