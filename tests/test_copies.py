"""Copies, pickles and tracers of an accelerated model (llmcache/patch.py).

A copy (copy.deepcopy, pickle, torch.save / torch.load, quantize_dynamic's default copy) is a
plain model: it gives the uncached outputs, shares nothing with the original (whose cache goes on
serving), and `accelerate` gives it a cache of its own. torch.export and torch.jit.trace record
the model's own forward: the program they make equals the uncached model's.
"""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import batch
from models import output, tiny_model

import llmcache

FAMILIES = ["bert", "llama"]


def warmed(family: str, gen):
    """(accelerated model with its rows cached, uncached twin, inputs)."""
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    llmcache.accelerate(model)
    inputs = batch(family, [6, 6, 6] if family in ("llama", "gpt2") else [5, 7, 3], gen)
    with torch.inference_mode():
        output(model, inputs)
    return model, ref, inputs


def via_pickle(model):
    return pickle.loads(pickle.dumps(model))


def via_torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("how", [copy.deepcopy, via_pickle, via_torch_save], ids=["deepcopy", "pickle", "torch.save"])
def test_a_copy_is_a_plain_model_and_the_original_keeps_its_cache(family, how, gen):
    model, ref, inputs = warmed(family, gen)
    copied = how(model)
    assert not llmcache.is_accelerated(copied)
    with torch.inference_mode():
        assert torch.equal(output(copied, inputs), output(ref, inputs))
        assert torch.equal(output(model, inputs)[inputs["attention_mask"].bool()],
                           output(ref, inputs)[inputs["attention_mask"].bool()])
    assert llmcache.stats(model).hits == 3  # the original served its repeat
    llmcache.accelerate(copied)  # a cache of its own, empty
    with torch.inference_mode():
        output(copied, inputs)
        output(copied, inputs)
    assert llmcache.stats(copied).hits == 3 and llmcache.stats(model).hits == 3
    assert llmcache.stats(copied).entries == llmcache.stats(model).entries


def test_a_pickle_loads_where_llmcache_is_not_installed(gen, tmp_path):
    """The file names no llmcache code: a process without the library loads the plain model."""
    model, ref, inputs = warmed("bert", gen)
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(model))
    torch.save(inputs, tmp_path / "inputs.pt")
    script = (
        "import sys, pickle, torch\n"
        "sys.modules['llmcache'] = None  # (importing it would raise)\n"
        f"model = pickle.loads(open({str(tmp_path / 'model.pkl')!r}, 'rb').read())\n"
        f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "with torch.inference_mode():\n"
        f"    torch.save(model(**inputs).last_hidden_state, {str(tmp_path / 'out.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    with torch.inference_mode():
        assert torch.equal(torch.load(tmp_path / "out.pt"), output(ref, inputs))


def test_quantize_dynamic_copy_of_an_accelerated_model(gen):
    model, ref, inputs = warmed("llama", gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.ao.quantization's own deprecation notice)
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        want = torch.ao.quantization.quantize_dynamic(ref, {torch.nn.Linear}, dtype=torch.qint8)
    assert not llmcache.is_accelerated(quantized) and llmcache.is_accelerated(model)
    with torch.inference_mode():
        assert torch.equal(output(quantized, inputs), output(want, inputs))


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_torch_export_records_the_models_own_forward(family, gen):
    model, ref, inputs = warmed(family, gen)
    inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
    if family != "bert":
        inputs["use_cache"] = False  # (an exported program returns tensors, not a DynamicCache)
    with torch.inference_mode():
        output(model, inputs)  # rows served: an export must not freeze that into the program
    exported = torch.export.export(model, args=(), kwargs=inputs)
    plain = torch.export.export(ref, args=(), kwargs=inputs)
    assert len(exported.graph.nodes) == len(plain.graph.nodes)
    with torch.inference_mode():
        want = output(ref, inputs)
        assert torch.equal(output(exported.module(), inputs), want)
    assert llmcache.is_accelerated(model)


def test_jit_trace_records_the_models_own_forward(gen):
    model, ref, inputs = warmed("bert", gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tracer's notes on python values in the graph)
        traced = torch.jit.trace(model, example_kwarg_inputs=inputs, strict=False)
    other = batch("bert", [4, 6], gen)  # other shapes and ids: a traced cache lookup would not follow them
    with torch.inference_mode():
        got = traced(**other)["last_hidden_state"]
        assert torch.equal(got, output(ref, other))
