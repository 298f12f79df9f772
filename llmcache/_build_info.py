"""`build_info()`: what this install of llmcache was built with and what it can use here."""

from __future__ import annotations

import torch

from .ops._library import extension, extension_error, triton_error

__version__ = "0.1.0"


def build_info() -> dict:
    """A dict describing the install.

    Keys: version, torch (the runtime version), built_with_torch (the version the extension was
    compiled against, None without it), extension (bool), extension_error (why it is missing),
    cuda (bool: CUDA kernels compiled in), cuda_archs (list of 'X.Y'), cpu_features (detected
    now: avx512_vpopcntdq, avx2, popcnt), cpu_kernel (the popcount path the CPU lookup uses with
    8 or more queries), cpu_kernel_paths ({"few_queries": {"path", "why"}, "many_queries": ...}:
    the path per regime for 256-bit codes and why it was picked; other widths calibrate on their
    first call, see csrc/cpu/hamming_topk.cpp),
    openmp_threads, triton (bool: importable), cuda_device (name of GPU 0 or None).
    """
    ext = extension()
    info = {
        "version": __version__,
        "torch": torch.__version__,
        "built_with_torch": ext.built_with_torch() if ext else None,
        "extension": ext is not None,
        "extension_error": extension_error(),
        "cuda": bool(ext and ext.has_cuda()),
        "cuda_archs": ext.cuda_archs() if ext else [],
        "cpu_features": ext.cpu_features() if ext else {},
        "cpu_kernel": ext.cpu_kernel() if ext else "reference",
        "cpu_kernel_paths": ext.cpu_kernel_paths() if ext else {},
        "openmp_threads": torch.get_num_threads(),
        "triton": triton_error() is None,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info
