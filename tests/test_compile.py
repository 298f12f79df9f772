"""torch.compile(llmcache.accelerate(model)): correct under inference_mode and no_grad, repeats
served, and the cache's bookkeeping kept out of the graphs with a bounded number of breaks.

Compiled code may fuse and reorder floating-point work, so outputs are compared with the
uncached eager model within COMPILE_TOLERANCE (inductor's fp32 kernels differ from eager by
~1e-6 here); a served repeat must equal the compiled first call bit for bit (it is that call's
stored output)."""

from __future__ import annotations

import pytest
import torch
from helpers import batch
from models import tiny_model

import llmcache

COMPILE_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.slow
@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
def test_compiled_accelerated_model_is_correct_and_serves_repeats(mode, gen):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_model("bert")
    inputs = [batch("bert", [5, 7, 6, 7], gen) for _ in range(2)]
    with mode():
        want = [model(**i).last_hidden_state for i in inputs]
    compiled = torch.compile(llmcache.accelerate(model))
    counters.clear()
    with mode():
        first = [compiled(**i).last_hidden_state for i in inputs]
        again = [compiled(**i).last_hidden_state for i in inputs]
    st = llmcache.stats(model)
    llmcache.disable(model)
    for i, f, a, w in zip(inputs, first, again, want):
        real = i["attention_mask"].bool()
        torch.testing.assert_close(f[real], w[real], **COMPILE_TOLERANCE)
        assert torch.equal(a[real], f[real])
    assert st.hits == 8 and st.forwards == 4 and st.not_cached == {}
    # Each cached block call is a non-traced frame between compiled ones; nothing else breaks.
    breaks = sum(counters["graph_break"].values())
    assert 0 < breaks <= 2 * len(st.layers) + 2, dict(counters["graph_break"])


@pytest.mark.slow
def test_fullgraph_compile_records_the_models_own_forward(gen):
    """fullgraph=True allows no graph break (generate compiles so for a static cache): the cache
    steps aside, as under torch.export, and the compiled model is the uncached one."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    inputs = batch("llama", [6, 4, 6], gen)
    with torch.inference_mode():
        want = model(**inputs).logits
    compiled = torch.compile(llmcache.accelerate(model), fullgraph=True)
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(compiled(**inputs).logits, want, **COMPILE_TOLERANCE)
        for _ in range(2):  # eager, beside it: the cache computes, then serves, as before
            assert torch.equal(model(**inputs).logits, want)
    st = llmcache.stats(model)
    assert st.forwards == 2 and st.hits == 3  # the compiled calls never reached the cache
