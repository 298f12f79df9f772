"""What an accelerated model's output depends on besides its input rows, seen once per forward.

A model's output is a function of its weights, its module tree as it is now, behaviour switches and
ambient state. `ModelState.check()` sorts all of it three ways. Where the extension is built, one
C++ call per forward (`csrc/watch.cpp`, `watch_stamp`) reads every value the three read, and while
none changed the last answer stands: a few microseconds on MiniLM; the Python below runs only when
something changed, or on every forward while a `register_state` hook is set
(`python -m bench.costs.bookkeeping` measures it):

- **The watch** (what changes the function for good): a parameter, buffer or plain tensor attribute
  changed in place (version counters: optimizer steps, `load_state_dict`, `p.mul_()` under no_grad
  or inference_mode), replaced or moved (identities and storages: `.to()`, `.half()`), a module
  added, removed or swapped anywhere in the tree (peft's `get_peft_model` / `add_adapter` /
  `delete_adapter`, `quantize_dynamic(inplace=True)`, `model.layer[3].mlp = ...`), a quantized
  module's packed weights replaced, and LoRA adapters merged or unmerged (peft writes the merged base weights through `.data`, which no
  version counter sees). Each moves the epoch: every entry is dropped (`stats().invalidations`).
- **The state header** (switches between functions that may each be reused): the dtype, autocast
  (enabled, and its dtype, for the model's device type), the attention implementation, the active
  LoRA adapters and whether adapters are disabled, the float32 matmul precision (and on CUDA the
  TF32, reduced-precision-reduction and SDPA backend switches), deterministic algorithms, and the
  value of every `register_state` hook. It joins every key with the namespace, so entries of
  different states coexist: switching back to an adapter serves its entries again.
- **Reasons to run uncached**, counted in `stats().not_cached`: the base model, one of its
  transformers modules, a dropout or a batch norm in training mode ("training"), a forward autograd would record ("grad"), and weights that are
  inference tensors ("inference_tensors": a model built or moved under `torch.inference_mode()`;
  inference tensors keep no version counter, so their in-place changes cannot be seen).

What nothing here can see is the user's to tell: writes through `.data` (call `llmcache.reset`),
a tensor attribute added to a module after `accelerate`, `torch.set_flush_denormal` (no getter), state a module reads from outside the
model (a global, a file: `register_state` keys on it), and forward hooks. Hooks are not watched on
purpose: most observe (record an activation, profile) and are added and removed around calls,
which would drop every entry each time; a hook that changes an output is a switch to key with
`register_state`, or a change to follow with `llmcache.reset`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import nn

from . import rows
from .ops._library import extension

_VERSION = attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr
_TRAINING = attrgetter("training")
_REQUIRES_GRAD = attrgetter("requires_grad")
_ADAPTER_SWITCHES = attrgetter("_active_adapter", "_disable_adapters")
_MERGED = attrgetter("merged_adapters")
_chain = itertools.chain.from_iterable
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
_USER_STATES: dict[int, Callable] = {}
_next_handle = itertools.count()


class StateHandle:
    """What `register_state` returns: `.remove()` takes the hook away again."""

    def __init__(self, key: int):
        self.key = key

    def remove(self) -> None:
        _USER_STATES.pop(self.key, None)


def register_state(fn: Callable[[nn.Module], object]) -> StateHandle:
    """Key every accelerated model's entries on `fn(model)` too.

    For state a model reads that the cache cannot see: a global switch a custom module reads, a
    steering vector kept outside the model, a config flag changed between calls. `fn` gets the
    accelerated model (what was passed to `accelerate`) once per forward and returns None, a
    bool, int, float, str or bytes, or a tuple of those; rows computed under one value are
    served only to calls under an equal value. Returns a handle; `handle.remove()` unregisters.

    Example:
        >>> handle = llmcache.register_state(lambda model: my_module.STEERING_STRENGTH)
    """
    if not callable(fn):
        raise TypeError(f"register_state takes a callable fn(model) -> value, got {type(fn).__name__}")
    key = next(_next_handle)
    _USER_STATES[key] = fn
    return StateHandle(key)


def _check_user_value(fn, value) -> None:
    if isinstance(value, tuple):
        for v in value:
            _check_user_value(fn, v)
    elif value is not None and not isinstance(value, (bool, int, float, str, bytes)):
        raise TypeError(f"llmcache.register_state: {fn!r} returned a {type(value).__name__}; a state value is None, "
                        "a bool, int, float, str or bytes, or a tuple of those")


def _is_tuner_layer(module: nn.Module) -> bool:
    """A peft tuner layer (LoRA and its kin): the adapters it applies are switches of the model."""
    return any(c.__name__ == "BaseTunerLayer" for c in type(module).__mro__)


@dataclass(frozen=True)
class Observed:
    """What one forward's `ModelState.check` found."""

    epoch: int  # moves whenever the watch saw the function change: entries from before are dropped
    switches: bytes  # the state header without the namespace (rows.key_header adds it)
    reason: str | None  # why this forward runs uncached, or None


class ModelState:
    """The watch and the state header of one accelerated model (`model`: what was passed to
    `accelerate`; `base`: the module whose blocks the cache patches)."""

    def __init__(self, model: nn.Module, base: nn.Module):
        self.model, self.base = model, base
        self.epoch = 0
        self.dtype, self.device = torch.float32, torch.device("cpu")  # of the weights, as of the last check
        self._seen: tuple | None = None
        self._switch_values: tuple | None = None
        self._switches = b""
        self._stamp: tuple | None = None
        self._observed: Observed | None = None
        self._walk()

    # ---- the module tree ---------------------------------------------------------------
    def _walk(self) -> None:
        """Collect what the per-forward check reads (again whenever the tree changed)."""
        modules = list(self.model.modules())
        base_modules = list(self.base.modules())
        self.containers = [d for m in modules for d in (m._modules, m._parameters, m._buffers)]
        # (An empty dict's entries cannot be replaced, only added: its length tells.)
        self.filled = [d for d in self.containers if d]
        tensors, opaque, seen = [], [], set()
        self.inference_tensors = False
        for m in modules:
            for t in itertools.chain(m._parameters.values(), m._buffers.values(),
                                     (v for v in vars(m).values() if isinstance(v, torch.Tensor))):
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                if t.is_inference():  # (no version counter to read)
                    self.inference_tensors = True
                else:
                    tensors.append(t)
            opaque += [(vars(m), name) for name, v in vars(m).items() if isinstance(v, torch.ScriptObject)]
        self.tensors, self.opaque = tensors, opaque
        # Modules whose forward changes with training mode: the model's own (transformers reads
        # `self.training` for attention dropout), dropout and batch norm; a leaf swapped in
        # (nn.Linear, a quantized Linear) is built in training mode and ignores it.
        self.mode_modules = [m for m in base_modules if m is self.base or isinstance(m, _MODE_DEPENDENT)
                             or type(m).__module__.startswith("transformers.")]
        self.params = [p for m in base_modules for p in m._parameters.values() if p is not None]
        self.tuners = [m for m in modules if _is_tuner_layer(m)]
        self.watched = (self.filled, self.containers, self.tensors, self.opaque, self.tuners, self.mode_modules,
                        self.params, self.base)

    def _look(self) -> tuple:
        """Everything the watch compares between forwards: the tree (the ids of its dicts' values,
        their lengths), opaque attributes, every tensor's version counter and data pointer, the
        merged adapters. One C++ pass each over the tree and the tensors where the extension is
        built (`watch.cpp`: the same values as words of one bytes object), else Python maps."""
        ext = extension()
        if ext is not None:
            tree, tensors = ext.watch_tree(self.filled, self.containers), ext.watch_tensors(self.tensors)
        else:
            tree = (list(map(id, _chain(map(dict.values, self.filled)))), list(map(len, self.containers)))
            tensors = (list(map(_VERSION, self.tensors)), list(map(_DATA_PTR, self.tensors)))
        return (tree, [id(d.get(name)) for d, name in self.opaque], tensors,
                list(map(list, map(_MERGED, self.tuners))) if self.tuners else ())

    # ---- per forward ---------------------------------------------------------------------
    def check(self) -> Observed:
        """This forward's epoch, state header and reason to run uncached. Where the extension is
        built, one C++ call (`watch.cpp`'s `watch_stamp`) reads everything below reads; while its
        stamp equals the last one (and no `register_state` hook is set), the last answer stands."""
        ext = extension()
        stamp = ext.watch_stamp(self.watched, self.device) if ext is not None else None
        if stamp is not None and stamp == self._stamp and not _USER_STATES:
            return self._observed
        observed = self._check()
        # (Stamped again: a walk or a move gives new lists to watch, the device its switches. Not
        # while a hook keys the header: once it is removed, the next check must leave its value out.)
        self._stamp = ext.watch_stamp(self.watched, self.device) if ext is not None and not _USER_STATES else None
        self._observed = observed
        return observed

    def _check(self) -> Observed:
        seen = self._look()
        if seen != self._seen:
            if self._seen is not None and seen[0] != self._seen[0]:
                self._walk()  # the tree changed: read the new one's tensors
                seen = self._look()
            if self._seen is not None:
                self.epoch += 1
            self._seen = seen
            first = self.params[0] if self.params else None
            if first is not None:
                self.dtype, self.device = first.dtype, first.device
        return Observed(self.epoch, self._header(self.dtype, self.device), self._reason())

    def _reason(self) -> str | None:
        if any(map(_TRAINING, self.mode_modules)):
            return "training"
        if torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, self.params)):
            return "grad"
        if self.inference_tensors:
            return "inference_tensors"
        return None

    def _header(self, dtype: torch.dtype, device: torch.device) -> bytes:
        kind = device.type
        config = getattr(self.base, "config", None)
        values = (str(dtype), *_autocast(kind),
                  getattr(config, "_attn_implementation", None), list(map(_ADAPTER_SWITCHES, self.tuners)),
                  _precision(kind), tuple(fn(self.model) for fn in _USER_STATES.values()))
        if values != self._switch_values:
            for fn, value in zip(_USER_STATES.values(), values[-1]):
                _check_user_value(fn, value)
            # (A copy: peft may hold a list of active adapters, compared by value next time.)
            adapters = [(list(a) if isinstance(a, list) else a, d) for a, d in values[4]]
            self._switch_values = values[:4] + (adapters,) + values[5:]
            self._switches = _encode(values)
        return self._switches


def _autocast(kind: str) -> tuple:
    """(enabled, dtype) of autocast for a device type (a model on the meta device has none)."""
    try:
        return torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)
    except RuntimeError:
        return False, None


def _precision(kind: str) -> tuple:
    """Global switches that change how a device computes the same model (precision settings
    resolved as torch reads them: "none" defers to the level above, down to "ieee"; a legacy
    getter that torch refuses once the newer per-backend API is set reads None)."""
    flags = (_legacy(torch.get_float32_matmul_precision), torch.are_deterministic_algorithms_enabled())
    if kind == "cuda":
        m, cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cuda, torch.backends.cudnn
        flags += (_resolved(m, cuda), _legacy(lambda: m.allow_tf32), _legacy(lambda: cudnn.allow_tf32),
                  m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction,
                  getattr(m, "allow_fp16_accumulation", None), str(cuda.preferred_blas_library()),
                  _resolved(getattr(cudnn, "conv", None), cudnn), cudnn.enabled, cudnn.benchmark, cudnn.deterministic,
                  cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
                  cuda.cudnn_sdp_enabled())
    elif kind == "cpu":
        mkldnn = torch.backends.mkldnn
        flags += tuple(_resolved(getattr(mkldnn, op, None), mkldnn) for op in ("matmul", "conv", "rnn"))
        flags += (mkldnn.enabled, mkldnn.deterministic)
    else:
        flags += (_resolved(),)
    return flags


def _legacy(read: Callable):
    """What a legacy precision getter answers, or None where torch refuses to read it: once a
    backend's `fp32_precision` (the newer API) is set, `get_float32_matmul_precision` and
    `backends.cuda.matmul.allow_tf32` raise, and the resolved per-backend values tell the state."""
    try:
        return read()
    except RuntimeError:
        return None


def _resolved(*levels) -> str:
    for level in (*levels, torch.backends):
        value = getattr(level, "fp32_precision", "none")
        if value != "none":
            return value
    return "ieee"


def _encode(values: tuple) -> bytes:
    """The switches as key bytes: the same state gives the same bytes in every process."""
    dtype, autocast, autocast_dtype, attention, adapters, precision, user = values
    distinct = sorted({(tuple(a) if isinstance(a, list) else (a,), bool(d)) for a, d in adapters})
    parts = [f"autocast={autocast_dtype if autocast else None}", f"attn={attention}",
             f"adapters={distinct if adapters else None}", f"precision={precision}", f"user={user!r}"]
    return rows.switches_bytes(dtype, ";".join(parts))


def _platform(device: torch.device) -> list:
    """What decides the bits a forward computes besides the model: the torch build and the
    kernels it picks (the CPU's vector ISA, or the GPU model)."""
    kind = device.type
    if kind == "cuda":
        where = torch.cuda.get_device_name(device)
    elif kind == "cpu":
        where = torch.backends.cpu.get_cpu_capability()
    else:
        where = kind
    return [torch.__version__, kind, where]


def model_fingerprint(base: nn.Module, span: list[int], features: int, dtype: torch.dtype) -> bytes:
    """32 bytes naming what an entry's states depend on: the model's class and config (its
    attention implementation included), every weight and buffer (all their bytes, not a
    sample), the dtype, the cached blocks, the entry layout, and the platform (torch version,
    device kind, CPU vector ISA or GPU model), so that a served state is bit for bit what this
    replica would compute. Two replicas of one model on like machines agree; other weights,
    dtype, span or platform do not."""
    digest = hashlib.blake2b(digest_size=32)
    config = base.config.to_dict() if hasattr(base, "config") else {}
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}
    attention = getattr(getattr(base, "config", None), "_attn_implementation", None)
    device = next(base.parameters()).device
    digest.update(json.dumps([type(base).__name__, config, attention, str(dtype), span, features, rows.LAYOUT_VERSION,
                              _platform(device)], sort_keys=True, default=str).encode())
    for name, value in base.state_dict().items():
        digest.update(name.encode())
        _digest_value(digest, value)
    return digest.digest()


def _digest_value(digest, value) -> None:
    """Every byte of a state_dict value: a tensor, a quantized tensor (its integers, scales and
    zero points), or what a quantized module packs (a tuple of those)."""
    if isinstance(value, (tuple, list)):
        for v in value:
            _digest_value(digest, v)
        return
    if not isinstance(value, torch.Tensor):
        digest.update(repr(value).encode())
        return
    t = value.detach()
    digest.update(f":{tuple(t.shape)}:{t.dtype}".encode())
    if t.is_quantized:
        scheme = t.qscheme()
        digest.update(str(scheme).encode())
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            digest.update(repr((t.q_scale(), t.q_zero_point())).encode())
        else:
            _digest_value(digest, (t.q_per_channel_scales(), t.q_per_channel_zero_points()))
        t = t.int_repr()
    if t.numel():
        digest.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())  # (its buffer: no copy)


__all__ = ["ModelState", "Observed", "StateHandle", "model_fingerprint", "register_state"]
