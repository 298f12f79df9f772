"""The state matrix: an accelerated model's output is a function of its weights, its module tree,
behaviour switches and ambient state, and every one of them is keyed, invalidates, or runs the
call uncached (llmcache/state.py).

Each test drives an accelerated model and an uncached deep copy of it through the same calls and
state changes, and checks after every call that the outputs are equal (bit for bit at real
positions: every row is computed in the same padded batch as the uncached call, or served from
an entry computed in one) and, through `stats` and `held`, that a repeat is served where it may
be. Models: random 3-block configs (BERT, Llama; peft LoRA adapters on both).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from helpers import batch
from models import output, tiny_classifier, tiny_model

import llmcache

peft = pytest.importorskip("peft")

KIND = {"llama": tiny_model, "bert": tiny_classifier}  # a causal LM and a sequence classifier
TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}


class Pair:
    """An accelerated model and an uncached copy, called alike and compared after each call."""

    def __init__(self, model: torch.nn.Module, inputs: dict):
        self.ref = copy.deepcopy(model)
        self.model = llmcache.accelerate(model)
        self.inputs = inputs
        self.mask = inputs["attention_mask"].bool()

    def both(self, fn) -> None:
        """Apply the same change to both models (from the same random state: new adapters match)."""
        for model in (self.model, self.ref):
            torch.manual_seed(7)
            fn(model)

    def call(self, context=contextlib.nullcontext) -> int:
        """Run both under `context()`; assert equal outputs; return the rows the call served."""
        before = llmcache.stats(self.model).hits
        with torch.inference_mode(), context():
            got = output(self.model, self.inputs)
        with torch.inference_mode(), context():
            want = output(self.ref, self.inputs)
        assert got.dtype == want.dtype
        if got.dim() == 3:
            got, want = got[self.mask], want[self.mask]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        return llmcache.stats(self.model).hits - before

    def states(self) -> set:
        return {e.state for e in llmcache.held(self.model).entries}


def lora(family: str, adapters=("one", "two"), gen=None):
    """A model of `family` with LoRA adapters (random, nonzero weights) named `adapters`, eval mode."""
    model = KIND[family]("llama" if family == "llama" else "bert")
    config = lambda: peft.LoraConfig(r=4, target_modules=TARGETS[family], init_lora_weights=False)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, config(), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, config())
    return model.eval()


@pytest.fixture(params=["llama", "bert"])
def family(request):
    return request.param


def rows_of(family: str, gen) -> dict:
    """Three rows: an encoder's right-padded (CacheConfig.padding "auto" serves them, as its callers
    read real tokens), a decoder's of one length (its padding is exact: tests/test_padding.py)."""
    return batch(family, [6, 6, 6] if family == "llama" else [5, 7, 3], gen)


# ---- LoRA adapters (peft) ----------------------------------------------------------------------
def test_lora_adapters_are_keyed_and_entries_of_each_coexist(family, gen):
    pair = Pair(lora(family), rows_of(family, gen))
    assert pair.call() == 0 and pair.call() == 3  # adapter one: computed, then served
    pair.both(lambda m: m.set_adapter("two"))
    assert pair.call() == 0 and pair.call() == 3  # two is never served one's entries
    pair.both(lambda m: m.set_adapter("one"))
    assert pair.call() == 3  # one's entries are still there: switching back serves them
    with contextlib.ExitStack() as stack:
        stack.enter_context(pair.model.disable_adapter())
        stack.enter_context(pair.ref.disable_adapter())
        assert pair.call() == 0 and pair.call() == 3  # the base model: a state of its own
    assert pair.call() == 3
    assert len(pair.states()) == 3
    assert llmcache.stats(pair.model).invalidations == 0


def test_lora_merge_unmerge_add_delete_and_load_invalidate(family, gen, tmp_path):
    pair = Pair(lora(family), rows_of(family, gen))
    pair.call()
    invalidations = lambda: llmcache.stats(pair.model).invalidations
    # merge_adapter writes the base weights through .data (no version counter sees it)
    pair.both(lambda m: m.merge_adapter())
    assert pair.call() == 0 and invalidations() == 1 and pair.call() == 3
    pair.both(lambda m: m.unmerge_adapter())
    assert pair.call() == 0 and invalidations() == 2
    # a new adapter (new modules in the tree), one deleted, one loaded from disk
    pair.both(lambda m: m.add_adapter("c", peft.LoraConfig(r=2, target_modules=TARGETS[family],
                                                          init_lora_weights=False)))
    assert pair.call() == 0 and invalidations() == 3
    pair.both(lambda m: m.set_adapter("c"))
    assert pair.call() == 0 and pair.call() == 3
    pair.ref.save_pretrained(tmp_path / "saved", selected_adapters=["c"])
    pair.both(lambda m: m.delete_adapter("c"))
    assert pair.call() == 0 and invalidations() == 4
    pair.both(lambda m: m.load_adapter(tmp_path / "saved" / "c", adapter_name="c"))
    pair.both(lambda m: (m.set_adapter("c"), m.eval()))
    assert pair.call() == 0 and invalidations() == 5 and pair.call() == 3


def test_get_peft_model_after_accelerate_swaps_modules_in_and_is_seen(family, gen):
    base = KIND[family]("llama" if family == "llama" else "bert")
    inputs = rows_of(family, gen)
    model = llmcache.accelerate(base)
    ref = copy.deepcopy(base)
    with torch.inference_mode():
        model(**inputs)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, target_modules=TARGETS[family], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config).eval()
    torch.manual_seed(1)
    ref = peft.get_peft_model(ref, config).eval()
    with torch.inference_mode():
        got, want = wrapped(**inputs).logits, ref(**inputs).logits
        again = wrapped(**inputs).logits
    m = inputs["attention_mask"].bool()
    pick = (lambda t: t[m]) if got.dim() == 3 else (lambda t: t)
    assert torch.equal(pick(got), pick(want)) and torch.equal(pick(again), pick(want))
    s = llmcache.stats(base)
    assert s.invalidations == 1 and s.hits == 3


def test_lora_dropout_in_training_mode_runs_uncached(gen):
    model = KIND["bert"]("bert")
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=TARGETS["bert"], lora_dropout=0.5))
    # get_peft_model leaves the new modules in training mode: its dropout would draw at random
    model.base_model.model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p == 0.5:
            m.train()
    llmcache.accelerate(model)
    with torch.inference_mode():
        model(**rows_of("bert", gen))
    assert llmcache.stats(model).not_cached == {"training": 3}


# ---- autocast, attention implementation, dtype -------------------------------------------------
def test_autocast_is_keyed_both_ways(family, gen):
    pair = Pair(KIND[family](family), rows_of(family, gen))
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    assert pair.call(autocast) == 0 and pair.call(autocast) == 3
    assert pair.call() == 0 and pair.call() == 3  # an entry computed under autocast is not served without
    assert pair.call(autocast) == 3
    assert len(pair.states()) == 2


def test_generate_under_autocast_continues_from_served_kv(gen):
    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    llmcache.accelerate(model)
    inputs = batch("llama", [5, 7, 3], gen)
    inputs.pop("position_ids")
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        model.generate(**inputs, **settings)  # computed without autocast: K/V in float32
        for _ in range(2):  # computed, then served, under autocast: K/V handed back in bfloat16
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = model.generate(**inputs, **settings)
                want = ref.generate(**inputs, **settings)
            assert torch.equal(got, want)
    assert llmcache.stats(model).hits == 3


def test_attention_implementation_is_keyed(family, gen):
    pair = Pair(KIND[family](family), rows_of(family, gen))
    assert pair.call() == 0 and pair.call() == 3
    pair.both(lambda m: m.set_attn_implementation("eager"))
    assert pair.call() == 0 and pair.call() == 3
    pair.both(lambda m: m.set_attn_implementation("sdpa"))
    assert pair.call() == 3


def test_dtype_change_invalidates(family, gen):
    pair = Pair(KIND[family](family), rows_of(family, gen))
    pair.call()
    pair.both(lambda m: m.to(torch.bfloat16))
    assert pair.call() == 0 and pair.call() == 3
    assert llmcache.stats(pair.model).invalidations == 1
    assert {e.state.split(";")[0] for e in llmcache.held(pair.model).entries} == {"torch.bfloat16"}


def test_matmul_precision_is_keyed(gen):
    pair = Pair(tiny_model("bert"), rows_of("bert", gen))
    assert pair.call() == 0
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium" if previous == "highest" else "highest")
        assert pair.call() == 0 and pair.call() == 3
    finally:
        torch.set_float32_matmul_precision(previous)
    assert pair.call() == 3


# torch's newer per-backend API (once one is set, `torch.get_float32_matmul_precision` refuses to
# answer): each level is set to two values in turn, then back to "none".
FP32_PRECISION = {"generic": (torch.backends, ("tf32", "bf16")),
                  "mkldnn": (torch.backends.mkldnn, ("bf16", "tf32")),
                  "mkldnn_matmul": (torch.backends.mkldnn.matmul, ("bf16", "tf32"))}


@pytest.mark.parametrize("level", sorted(FP32_PRECISION))
def test_fp32_precision_api_is_keyed(level, gen):
    holder, values = FP32_PRECISION[level]
    pair = Pair(tiny_model("bert"), rows_of("bert", gen))
    assert pair.call() == 0 and pair.call() == 3
    try:
        for value in values:
            holder.fp32_precision = value
            assert pair.call() == 0 and pair.call() == 3
    finally:
        holder.fp32_precision = "none"
    assert pair.call() == 3
    assert len(pair.states()) == 3


@pytest.mark.parametrize("flags", [{"enabled": False}, {"enabled": True, "deterministic": True}], ids=["off", "deterministic"])
def test_onednn_switches_are_keyed(flags, gen):
    pair = Pair(tiny_model("bert"), rows_of("bert", gen))
    assert pair.call() == 0 and pair.call() == 3
    with torch.backends.mkldnn.flags(**flags):
        assert pair.call() == 0 and pair.call() == 3
    assert pair.call() == 3
    assert len(pair.states()) == 2


@contextlib.contextmanager
def _attribute(holder, name: str, value):
    before = getattr(holder, name)
    setattr(holder, name, value)
    try:
        yield
    finally:
        setattr(holder, name, before)


@contextlib.contextmanager
def _flash_sdp(value: bool):
    before = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(value)
    try:
        yield
    finally:
        torch.backends.cuda.enable_flash_sdp(before)


_CUDA = torch.backends.cuda
CUDA_SWITCHES = {  # (each a context that changes one switch a CUDA model's output depends on)
    "matmul_fp32_precision": lambda: _attribute(_CUDA.matmul, "fp32_precision", "tf32"),
    "cudnn_conv_fp32_precision": lambda: _attribute(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
    "allow_tf32": lambda: _attribute(_CUDA.matmul, "allow_tf32", True),
    "fp16_reduction": lambda: _attribute(_CUDA.matmul, "allow_fp16_reduced_precision_reduction", False),
    "bf16_reduction": lambda: _attribute(_CUDA.matmul, "allow_bf16_reduced_precision_reduction", False),
    "fp16_accumulation": lambda: _attribute(_CUDA.matmul, "allow_fp16_accumulation", True),
    "cudnn_enabled": lambda: _attribute(torch.backends.cudnn, "enabled", False),
    "cudnn_benchmark": lambda: _attribute(torch.backends.cudnn, "benchmark", True),
    "cudnn_deterministic": lambda: _attribute(torch.backends.cudnn, "deterministic", True),
    "flash_sdp": lambda: _flash_sdp(False),
}


@pytest.mark.parametrize("switch", sorted(CUDA_SWITCHES))
def test_a_cuda_models_switches_are_read_under_either_precision_api(switch):
    """Without a GPU, the header and the stamp of a CUDA model (the switches are the process's):
    each moves with the switch, and neither raises once the newer fp32_precision API is set
    (torch's legacy getters do: every CUDA forward raised)."""
    from llmcache.ops._library import extension
    from llmcache.state import _precision

    ext = extension()
    state = llmcache.api.owner_of(llmcache.accelerate(tiny_model("bert"))).state
    stamp = (lambda: ext.watch_stamp(state.watched, torch.device("cuda"))) if ext is not None else (lambda: None)
    for newer in (False, True):
        with _attribute(torch.backends.cuda.matmul, "fp32_precision", "ieee") if newer else contextlib.nullcontext():
            header, words = _precision("cuda"), stamp()
            with CUDA_SWITCHES[switch]():
                assert _precision("cuda") != header
                assert ext is None or stamp() != words
            assert _precision("cuda") == header


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("switch", sorted(CUDA_SWITCHES))
def test_cuda_switches_are_keyed(switch, gen):
    inputs = {k: v.cuda() for k, v in rows_of("bert", gen).items()}
    pair = Pair(tiny_model("bert").cuda(), inputs)
    assert pair.call() == 0 and pair.call() == 3
    with CUDA_SWITCHES[switch]():
        assert pair.call() == 0 and pair.call() == 3
    assert pair.call() == 3


def test_deterministic_algorithms_are_keyed(gen):
    pair = Pair(tiny_model("bert"), rows_of("bert", gen))
    assert pair.call() == 0 and pair.call() == 3
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(not before)
        assert pair.call() == 0 and pair.call() == 3
    finally:
        torch.use_deterministic_algorithms(before)
    assert pair.call() == 3
    assert len(pair.states()) == 2


def test_training_mode_and_autograd_run_uncached_and_back_serves_again(family, gen):
    pair = Pair(KIND[family](family), rows_of(family, gen))
    assert pair.call() == 0 and pair.call() == 3
    pair.model.train()
    with torch.inference_mode():
        output(pair.model, pair.inputs)
    pair.model.eval()
    assert pair.call() == 3
    output(pair.model, pair.inputs)  # autograd records: the weights require grad
    assert pair.call() == 3
    assert llmcache.stats(pair.model).not_cached == {"training": 3, "grad": 3}


# ---- the module tree ---------------------------------------------------------------------------
def _swap(model: torch.nn.Module, family: str) -> None:
    torch.manual_seed(5)
    if family == "llama":
        model.model.layers[1].mlp.up_proj = torch.nn.Linear(64, 128, bias=False)
    else:
        model.bert.encoder.layer[1].intermediate.dense = torch.nn.Linear(64, 128)


def test_a_module_swapped_in_after_accelerate_is_watched(family, gen):
    pair = Pair(KIND[family](family), rows_of(family, gen))
    pair.call()
    pair.both(lambda m: _swap(m, family))  # (a new nn.Linear is in training mode: it ignores it)
    assert pair.call() == 0 and pair.call() == 3
    # an in-place change to the swapped-in module's weight is seen too
    pair.both(lambda m: next(p for n, p in m.named_parameters() if "up_proj" in n or "intermediate.dense" in n)
              .data.mul_(1.0))  # (.data: unseen, and changes nothing)
    with torch.no_grad():
        pair.both(lambda m: next(p for n, p in m.named_parameters() if "layers.1.mlp.up_proj" in n
                                 or "layer.1.intermediate.dense.weight" in n).mul_(1.5))
    assert pair.call() == 0 and llmcache.stats(pair.model).invalidations == 2


def test_quantize_dynamic_in_place_after_accelerate(family, gen):
    pair = Pair(KIND[family](family), rows_of(family, gen))
    pair.call()
    quantize = lambda m: torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    pair.both(quantize)
    assert pair.call() == 0 and pair.call() == 3
    # a quantized module's packed weights replaced (set_weight_bias: no parameter, no buffer)
    def repack(m):
        q = next(x for x in m.modules() if type(x).__name__ == "Linear" and hasattr(x, "set_weight_bias"))
        weight, bias = q.weight(), q.bias()
        q.set_weight_bias(torch.quantize_per_tensor(weight.dequantize() * 0.5, 0.05, 0, torch.qint8), bias)
    pair.both(repack)
    assert pair.call() == 0 and pair.call() == 3
    assert llmcache.stats(pair.model).invalidations == 2


def test_quantize_dynamic_before_accelerate(gen):
    model = torch.ao.quantization.quantize_dynamic(tiny_model("llama"), {torch.nn.Linear}, dtype=torch.qint8)
    pair = Pair(model, rows_of("llama", gen))
    assert pair.call() == 0 and pair.call() == 3


def test_weights_loaded_under_inference_mode_invalidate(family, gen):
    pair = Pair(KIND[family](family), rows_of(family, gen))
    pair.call()
    other = KIND[family](family, seed=3).state_dict()
    with torch.inference_mode():
        pair.both(lambda m: m.load_state_dict(other))
    assert pair.call() == 0 and pair.call() == 3
    assert llmcache.stats(pair.model).invalidations == 1


def test_a_model_built_under_inference_mode_runs_uncached_and_says_why(gen):
    with torch.inference_mode():
        model = tiny_model("bert")
    with pytest.warns(UserWarning, match="inference tensors"):
        llmcache.accelerate(model)
    inputs = rows_of("bert", gen)
    with torch.inference_mode():
        model(**inputs)
        model(**inputs)
    s = llmcache.stats(model)
    assert s.hits == 0 and s.not_cached == {"inference_tensors": 6}


def test_an_observing_hook_does_not_drop_entries(gen):
    pair = Pair(tiny_model("bert"), rows_of("bert", gen))
    pair.call()
    seen = []
    handle = pair.model.encoder.layer[0].register_forward_hook(lambda module, args, output: seen.append(1))
    assert pair.call() == 3
    handle.remove()
    assert llmcache.stats(pair.model).invalidations == 0


# ---- the user's own state ----------------------------------------------------------------------
class Steered(torch.nn.Module):
    """A module that reads a global the cache cannot see: a steering strength."""

    strength = 0.0

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return (out[0] + Steered.strength,) + tuple(out[1:]) if isinstance(out, tuple) else out + Steered.strength


def test_register_state_keys_a_switch_the_cache_cannot_see(gen):
    model = tiny_model("bert")
    model.encoder.layer[1].attention.output = Steered(model.encoder.layer[1].attention.output)
    pair = Pair(model, rows_of("bert", gen))
    handle = llmcache.register_state(lambda m: ("steering", Steered.strength))
    try:
        assert pair.call() == 0 and pair.call() == 3
        Steered.strength = 0.25
        assert pair.call() == 0 and pair.call() == 3
        Steered.strength = 0.0
        assert pair.call() == 3
    finally:
        handle.remove()
        Steered.strength = 0.0


def test_a_removed_register_state_hook_keys_no_more(gen):
    first, second = rows_of("bert", gen), rows_of("bert", gen)  # (other ids, the same lengths)
    pair = Pair(tiny_model("bert"), first)
    assert pair.call() == 0
    handle = llmcache.register_state(lambda m: "on")
    try:
        pair.inputs = second
        assert pair.call() == 0 and pair.call() == 3
    finally:
        handle.remove()
    pair.inputs = first  # keyed as before the hook again: its entries are served
    assert pair.call() == 3
    assert len(pair.states()) == 2


def test_register_state_refuses_what_cannot_be_a_key(gen):
    model = llmcache.accelerate(tiny_model("bert"))
    handle = llmcache.register_state(lambda m: [1, 2])
    try:
        with pytest.raises(TypeError, match="register_state"), torch.inference_mode():
            model(**rows_of("bert", gen))
    finally:
        handle.remove()
    with pytest.raises(TypeError, match="callable"):
        llmcache.register_state("not a function")


# ---- one cache per base model ------------------------------------------------------------------
def test_accelerate_refuses_a_base_model_already_accelerated_through_another_object():
    model = llmcache.accelerate(tiny_model("llama"))
    assert llmcache.is_accelerated(model.model)  # the LlamaModel inside runs through the cache
    with pytest.raises(ValueError, match="already accelerated"):
        llmcache.accelerate(model.model)
    base = tiny_model("llama")
    llmcache.accelerate(base.model)
    with pytest.raises(ValueError, match="already accelerated"):
        llmcache.accelerate(base)
    assert llmcache.is_accelerated(base.model) and llmcache.stats(base.model).forwards == 0
