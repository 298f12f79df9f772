"""save / load: round trip (exact and semantic tiers), and refusals (other model, weights,
config; corrupt or truncated files) that leave the live cache untouched (what `held` shows, and
what it serves)."""

from __future__ import annotations

import pytest
import torch
from helpers import batch
from models import output, tiny_model

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
    model, inputs = filled(gen=gen, layerwise=llmcache.Layerwise(threshold=0.99))
    path = tmp_path / "banks.safetensors"
    llmcache.save(model, path)
    fresh = tiny_model("bert")
    llmcache.accelerate(fresh, layerwise=llmcache.Layerwise(threshold=0.99))
    llmcache.load(fresh, path)
    assert llmcache.held(fresh).layers == llmcache.held(model).layers == {0: 3, 1: 3, 2: 3}
    with torch.inference_mode():
        output(fresh, inputs)
    st = llmcache.stats(fresh)
    assert [s.hits for s in st.layers] == [3, 3, 3] and st.hits == 9


def test_load_refuses_a_file_of_weights_one_element_apart(tmp_path, gen):
    """The fingerprint covers every byte of every weight, not a sample."""
    model, _ = filled(gen=gen)
    path = tmp_path / "banks.safetensors"
    llmcache.save(model, path)
    other, other_inputs = filled(gen=gen)
    with torch.no_grad():
        weight = other.encoder.layer[1].output.dense.weight
        weight[17, 5] += 0.5  # one element of 12,288 of this matrix
    with torch.inference_mode():
        output(other, other_inputs)  # (its cache now holds entries of the new weights)
    held, st = snapshot(other), llmcache.stats(other)
    with pytest.raises(ValueError, match="other weights"):
        llmcache.load(other, path)
    assert_untouched(other, other_inputs, held, st)


def _edit_file(path, edit) -> None:
    """Rewrite a saved file with `edit(tensors)` applied, keeping its header (checksums included)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no dict)
    edit(tensors)
    save_file(tensors, str(path), metadata=header)


@pytest.mark.parametrize("change", ["flipped byte", "state + 1"])
def test_load_refuses_edited_entries(change, tmp_path, gen):
    model, inputs = filled(gen=gen)
    path = tmp_path / "banks.safetensors"
    llmcache.save(model, path)

    def edit(tensors):
        states = tensors["exact.states"]
        if change == "flipped byte":
            raw = states.view(torch.uint8)
            raw[3, 11] ^= 0x10
        else:
            states[4, 7] += 1.0

    _edit_file(path, edit)
    fresh = llmcache.accelerate(tiny_model("bert"))
    with torch.inference_mode():
        output(fresh, inputs)
    held, st = snapshot(fresh), llmcache.stats(fresh)
    with pytest.raises(ValueError, match="checksum"):
        llmcache.load(fresh, path)
    assert_untouched(fresh, inputs, held, st)


def test_semantic_banks_are_checksummed_too(tmp_path, gen):
    model, _ = filled(gen=gen, layerwise=llmcache.Layerwise(threshold=0.99))
    path = tmp_path / "banks.safetensors"
    llmcache.save(model, path)
    _edit_file(path, lambda tensors: tensors["layer1.values"][0].view(-1).__setitem__(9, 3.0))
    fresh = llmcache.accelerate(tiny_model("bert"), layerwise=llmcache.Layerwise(threshold=0.99))
    with pytest.raises(ValueError, match="checksum"):
        llmcache.load(fresh, path)
    assert llmcache.held(fresh).layers == {0: 0, 1: 0, 2: 0}


def test_entries_of_every_adapter_and_autocast_state_travel(tmp_path, gen):
    """Keys carry the model state: a file holds each state's entries, served only under it."""
    model, inputs = filled(gen=gen)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        output(model, inputs)
    path = tmp_path / "banks.safetensors"
    llmcache.save(model, path)
    fresh = llmcache.accelerate(tiny_model("bert"))
    llmcache.load(fresh, path)
    assert len({e.state for e in llmcache.held(fresh).entries}) == 2
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output(fresh, inputs)
        output(fresh, inputs)
    assert llmcache.stats(fresh).hits == 6
