"""Hamming top-k lookup of SimHash codes in a bank, and the cosine-threshold -> radius map.

Distances are popcount(q XOR b) summed over the W 64-bit words. Ties go to the smaller bank
index so every backend returns the same integers. Kernels: csrc/cpu/hamming_topk.cpp (CPU: five
popcount paths in csrc/cpu/hamming_*.cpp, the fastest the CPU runs picked at first use, see
build_info()["cpu_kernel_paths"]), kernels/hamming_topk.cu (CUDA),
llmcache/ops/triton_kernels/hamming_topk.py (Triton), reference.hamming_topk (specification).
"""

from __future__ import annotations

import math

import torch

from . import reference
from ._library import LIB, check, check_tensor, direct, fill_missing_kernels, resolve_backend

MAX_WORDS = 16

LIB.define(
    "hamming_topk(Tensor queries, Tensor bank, int k, Tensor? valid, Tensor? query_tag, "
    "Tensor? bank_tag) -> (Tensor, Tensor)"
)


@torch.library.register_fake("llmcache::hamming_topk")
def _hamming_topk_fake(queries, bank, k, valid, query_tag, bank_tag):
    shape = (queries.shape[0], k)
    return queries.new_empty(shape, dtype=torch.int32), queries.new_empty(shape, dtype=torch.int64)


def _reference(queries, bank, k, valid, query_tag, bank_tag):
    return reference.hamming_topk(queries, bank, k, valid, query_tag, bank_tag)


def _triton(queries, bank, k, valid, query_tag, bank_tag):
    from .triton_kernels.hamming_topk import hamming_topk_triton

    return hamming_topk_triton(queries, bank, k, valid, query_tag, bank_tag)


fill_missing_kernels("hamming_topk", _triton, _reference)


def hamming_topk(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    valid: torch.Tensor | None = None,
    *,
    query_tag: torch.Tensor | None = None,
    bank_tag: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest eligible bank codes to each query, by Hamming distance.

    Args:
        queries: int64 [B, W] codes (W = nbits // 64, 1 <= W <= 16).
        bank: int64 [N, W] codes; N may be 0.
        k: answers per query, >= 1 (k > N is fine: the extra answers are missing).
        valid: bool [N] or None; invalid slots are never returned.
        query_tag, bank_tag: int64 [B] and [N], both or neither; slot n only answers query b
            when bank_tag[n] == query_tag[b] (token count, namespace: see llmcache.tiers.layerwise.context).
        backend: None/'auto', 'cpp', 'cuda', 'triton' or 'reference'.
    Returns:
        dist int32 [B, k] and idx int64 [B, k], ascending by distance, ties broken by the smaller
        index; where fewer than k slots are eligible the rest are idx = -1, dist = 64 * W + 1.

    Example:
        >>> q = torch.tensor([[0b1011]]); bank = torch.tensor([[0b0011], [0b1111]])
        >>> hamming_topk(q, bank, k=2)
        (tensor([[1, 1]], dtype=torch.int32), tensor([[0, 1]]))
    """
    # Plain CPU tensors go straight to the C++ kernel, which checks every argument itself (the checks
    # below cost as much as scanning a few thousand codes); a call it refuses is explained below.
    ext = direct(queries, bank)
    if ext is not None and resolve_backend(backend, queries.device) in ("auto", "cpp"):
        try:
            return ext.hamming_topk(queries, bank, k, valid, query_tag, bank_tag)
        except (RuntimeError, TypeError) as refused:
            _check_arguments(queries, bank, k, valid, query_tag, bank_tag)
            raise ValueError(str(refused)) from refused
    _check_arguments(queries, bank, k, valid, query_tag, bank_tag)
    return hamming_topk_unchecked(queries, bank, k, valid, query_tag, bank_tag, backend=backend)


def _check_arguments(queries, bank, k, valid, query_tag, bank_tag) -> None:
    """hamming_topk's argument checks, each failure named in a ValueError."""
    check_tensor("queries", queries, dtypes=(torch.int64,), ndim=2)
    device = queries.device
    check_tensor("bank", bank, dtypes=(torch.int64,), ndim=2, device=device)
    words = queries.shape[1]
    if not (1 <= words <= MAX_WORDS and bank.shape[1] == words and isinstance(k, int) and k >= 1):
        check(1 <= words <= MAX_WORDS, f"queries.shape[1] (words) must be in 1..{MAX_WORDS}, got {words}")
        check(bank.shape[1] == words, f"bank must have shape [N, W={words}], got {tuple(bank.shape)}")
        check(isinstance(k, int) and k >= 1, f"k must be an int >= 1, got {k!r}")
    if valid is not None:
        check_tensor("valid", valid, dtypes=(torch.bool,), ndim=1, device=device)
        if valid.shape[0] != bank.shape[0]:
            check(False, f"valid must have shape [N={bank.shape[0]}], got {tuple(valid.shape)}")
    check((query_tag is None) == (bank_tag is None), "query_tag and bank_tag go together: pass both or neither")
    if query_tag is not None:
        check_tensor("query_tag", query_tag, dtypes=(torch.int64,), ndim=1, device=device)
        check_tensor("bank_tag", bank_tag, dtypes=(torch.int64,), ndim=1, device=device)
        if query_tag.shape[0] != queries.shape[0]:
            check(False, f"query_tag must have shape [B={queries.shape[0]}]")
        if bank_tag.shape[0] != bank.shape[0]:
            check(False, f"bank_tag must have shape [N={bank.shape[0]}]")


def hamming_topk_unchecked(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    valid: torch.Tensor | None,
    query_tag: torch.Tensor | None,
    bank_tag: torch.Tensor | None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`hamming_topk` without its argument checks, for internal callers whose arguments are valid
    by construction (the ring buffer's lookups). Same arguments and result; invalid ones are undefined."""
    name = resolve_backend(backend, queries.device)
    if name == "reference":
        return _reference(queries, bank, k, valid, query_tag, bank_tag)
    if name == "triton":
        return _triton(queries, bank, k, valid, query_tag, bank_tag)
    ext = direct(queries, bank)
    if ext is not None:
        return ext.hamming_topk(queries, bank, k, valid, query_tag, bank_tag)
    return torch.ops.llmcache.hamming_topk(queries, bank, k, valid, query_tag, bank_tag)


def hamming_radius(threshold: float, nbits: int) -> int:
    """The largest Hamming distance whose SimHash cosine estimate is still >= threshold.

    SimHash bits differ with probability theta / pi for vectors at angle theta, so a distance d
    over nbits estimates theta = pi * d / nbits. cos(pi * d / nbits) >= tau  <=>
    d <= nbits * arccos(tau) / pi. threshold = 1 gives radius 0 (identical codes only).

    Args: threshold: cosine tau in (0, 1]; nbits: code length. Returns an int in [0, nbits].
    """
    check(0.0 < threshold <= 1.0, f"threshold (cosine tau) must be in (0, 1], got {threshold}")
    return math.floor(nbits * math.acos(threshold) / math.pi + 1e-9)
