"""The `llmcache` torch.library namespace, the compiled extension, and backend selection.

Schemas are defined once, in Python, by the op files (simhash.py, hamming_topk.py,
gather_with_mask.py) so that they exist with or without the compiled extension. The extension
`llmcache._C` then registers its C++ (CPU) and CUDA kernels for them; `fill_missing_kernels`
registers the Triton or reference implementation for any device key the extension left empty.

Backends, in the order `auto` prefers them per device:
    cpu:  cpp (llmcache._C) > reference
    cuda: cuda (llmcache._C built with CUDA) > triton > reference
`LLMCACHE_BACKEND` or a `backend=` argument forces one; an unavailable one raises and says why.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

LIB = torch.library.Library("llmcache", "DEF")

BACKENDS = ("cpp", "cuda", "triton", "reference")

_ext = None
_ext_error: str | None = None


def extension():
    """The compiled `llmcache._C` module, or None (see `extension_error()` for why)."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        if os.environ.get("LLMCACHE_SKIP_EXT") == "1":
            _ext_error = "LLMCACHE_SKIP_EXT=1 is set"
        else:
            try:
                _ext = importlib.import_module("llmcache._C")
            except ImportError as err:
                _ext_error = (
                    f"llmcache._C could not be imported ({err}); reinstall with "
                    "`pip install --no-build-isolation -e .` (without LLMCACHE_SKIP_EXT) to build it"
                )
    return _ext


def direct(*tensors) -> object | None:
    """The extension, where its CPU kernels may be called without the dispatcher (whose entry
    costs microseconds, as much as a small host op's work): every tensor a plain CPU tensor,
    outside compile and export (fake and functional subclasses go through the op); else None."""
    if all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors) and not torch.compiler.is_compiling():
        return extension()
    return None


def extension_error() -> str | None:
    extension()
    return _ext_error


def extension_has_cuda() -> bool:
    ext = extension()
    return bool(ext is not None and ext.has_cuda())


def triton_error() -> str | None:
    """None when Triton can run kernels here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not importable ({err}); `pip install triton`"
    return None


def _why_unavailable(backend: str, device: torch.device) -> str | None:
    if backend == "reference":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, these are on {device}"
        return extension_error()
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, these are on {device}"
        if extension_error():
            return extension_error()
        if not extension_has_cuda():
            return (
                "llmcache._C was built without CUDA kernels (no CUDA toolkit or a CPU build of "
                "torch at build time); reinstall on a machine with nvcc and a CUDA torch, or "
                "set LLMCACHE_FORCE_CUDA=1"
            )
        return None
    if backend == "triton":
        why = triton_error()
        if why:
            return why
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1"
        return None
    return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'"


# os.environ.get of an unset variable raises and catches a KeyError inside (~0.8 us here, more than
# a small lookup's whole scan); the mapping behind os.environ answers a miss without one. It is
# CPython's own (POSIX: bytes keys, Windows: upper-case str keys), kept in step by os.environ's
# setters; where it is missing the public path runs.
_ENV_DATA = getattr(os.environ, "_data", None)
_BACKEND_KEY = (os.environ.encodekey("LLMCACHE_BACKEND") if _ENV_DATA is not None and hasattr(os.environ, "encodekey")
                else None)


def _forced_backend() -> str | None:
    if _BACKEND_KEY is None:
        return os.environ.get("LLMCACHE_BACKEND")
    value = _ENV_DATA.get(_BACKEND_KEY)
    return None if value is None else os.environ.decodevalue(value)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend an op call uses: the forced one (argument, then LLMCACHE_BACKEND, read per call) or 'auto'."""
    name = backend or _forced_backend() or "auto"
    if name == "auto":
        return "auto"
    why = _why_unavailable(name, device)
    if why:
        reasons = "; ".join(f"{b}: {_why_unavailable(b, device) or 'available'}" for b in BACKENDS)
        raise RuntimeError(f"llmcache backend {name!r} is unavailable for {device} tensors: {why}. ({reasons})")
    return name


def available_backends(device: str | torch.device) -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if _why_unavailable(b, device) is None]


def fill_missing_kernels(op: str, triton_impl: Callable | None, reference_impl: Callable) -> None:
    """Register Python kernels for `llmcache::op` on the device keys the extension did not fill."""
    qualname = f"llmcache::{op}"
    extension()
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU"):
        LIB.impl(op, reference_impl, "CPU")
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"):
        cuda_impl = triton_impl if (triton_impl is not None and triton_error() is None) else reference_impl
        LIB.impl(op, cuda_impl, "CUDA")


def check(cond: bool, message: str) -> None:
    """Raise ValueError(message) unless cond: the one way every op validates its arguments."""
    if not cond:
        raise ValueError(message)


def check_tensor(name: str, t, *, dtypes=None, ndim: int | None = None, device=None) -> None:
    """Validate one tensor argument, naming it in the error. The messages are built only on failure:
    ops are called per forward, where formatting them every time cost more than the op."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004 (ops raise ValueError)
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other arguments are on {device}; move it")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() on it")
