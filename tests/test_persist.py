"""save / load: round trip, and refusals (other model, weights, config; corrupt or truncated
files) that leave the live cache untouched."""

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
        banks = [layer.bank for layer in llmcache.api._owner(fresh).layers.values()]
        assert all(b.index is banks[0] for b in banks)  # the layers share one index again
        got = output(fresh, inputs)
        with llmcache.namespace("a"):
            output(fresh, inputs)
    assert llmcache.stats(fresh).hits == 2 * 3 * 3
    m = inputs["attention_mask"].bool()
    assert torch.equal(got[m], want[m])


@pytest.mark.parametrize("change", ["weights", "config", "architecture"])
def test_load_refuses_another_model_and_keeps_the_live_cache(change, tmp_path, gen):
    model, _inputs = filled(gen=gen)
    path = tmp_path / "banks.safetensors"
    llmcache.save(model, path)
    if change == "weights":
        other, _ = filled(seed=1, gen=gen)
        match = "other weights"
    elif change == "config":
        other, _ = filled(gen=gen, capacity=77)
        match = "another cache config"
    else:
        other, _ = filled("roberta", gen=gen)
        match = "written for"
    live = {i: (layer.bank, layer.bank.values[layer.bank.valid].clone())
            for i, layer in llmcache.api._owner(other).layers.items()}
    with pytest.raises(ValueError, match=match):
        llmcache.load(other, path)
    for i, layer in llmcache.api._owner(other).layers.items():
        bank, stored = live[i]
        assert layer.bank is bank and torch.equal(bank.values[bank.valid], stored)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not-llmcache"])
def test_load_refuses_damaged_files(damage, tmp_path, gen):
    model, _ = filled(gen=gen)
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
    banks = {i: layer.bank for i, layer in llmcache.api._owner(model).layers.items()}
    with pytest.raises(ValueError):
        llmcache.load(model, path)
    assert all(layer.bank is banks[i] for i, layer in llmcache.api._owner(model).layers.items())
