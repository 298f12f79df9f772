"""SimHash fingerprints: `simhash(x, planes)` and the paper's pooled fingerprint `simhash_pooled`.

Bit j of a code is set when the projection of the input on random hyperplane j is >= 0
(Charikar 2002); for two vectors at angle theta each bit differs with probability theta / pi.
The projection accumulates in fp32 whatever the input dtype. Kernels: csrc/cpu/simhash.cpp
(CPU), kernels/simhash.cu (CUDA), llmcache/ops/triton_kernels/simhash.py (Triton), and
reference.simhash (the specification).
"""

from __future__ import annotations

import torch

from . import reference
from ._library import LIB, check, check_tensor, fill_missing_kernels, resolve_backend

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MASKS = (torch.bool, torch.int32, torch.int64, torch.uint8)
MAX_BITS = 1024

LIB.define("simhash(Tensor x, Tensor planes) -> Tensor")
LIB.define("simhash_pooled(Tensor embeds, Tensor mask, Tensor planes) -> Tensor")


@torch.library.register_fake("llmcache::simhash")
def _simhash_fake(x, planes):
    return x.new_empty((x.shape[0], planes.shape[1] // 64), dtype=torch.int64)


@torch.library.register_fake("llmcache::simhash_pooled")
def _simhash_pooled_fake(embeds, mask, planes):
    return embeds.new_empty((embeds.shape[0], planes.shape[1] // 64), dtype=torch.int64)


def _triton_simhash(x, planes):
    from .triton_kernels.simhash import simhash_triton

    return simhash_triton(x, planes)


def _triton_simhash_pooled(embeds, mask, planes):
    from .triton_kernels.simhash import simhash_pooled_triton

    return simhash_pooled_triton(embeds, mask, planes)


fill_missing_kernels("simhash", _triton_simhash, reference.simhash)
fill_missing_kernels("simhash_pooled", _triton_simhash_pooled, reference.simhash_pooled)


def _check_planes(planes: torch.Tensor, dim: int, device: torch.device) -> None:
    check_tensor("planes", planes, dtypes=FLOATS, ndim=2, device=device)
    check(planes.shape[0] == dim, f"planes must have shape [d={dim}, nbits], got {tuple(planes.shape)}")
    nbits = planes.shape[1]
    check(
        nbits > 0 and nbits % 64 == 0 and nbits <= MAX_BITS,
        f"planes.shape[1] (nbits) must be a positive multiple of 64 up to {MAX_BITS}, got {nbits}",
    )


def simhash(x: torch.Tensor, planes: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """SimHash codes of a batch of vectors.

    Args:
        x: float32/float16/bfloat16 [B, d].
        planes: float [d, nbits], nbits a multiple of 64 up to 1024 (see `random_planes`).
        backend: None/'auto', 'cpp', 'cuda', 'triton' or 'reference' (default: LLMCACHE_BACKEND or auto).
    Returns:
        int64 [B, nbits // 64]: bit j (word j // 64, bit j % 64) is set when x . planes[:, j] >= 0.

    Example:
        >>> planes = random_planes(384, 256)
        >>> simhash(torch.randn(8, 384), planes).shape
        torch.Size([8, 4])
    """
    check_tensor("x", x, dtypes=FLOATS, ndim=2)
    _check_planes(planes, x.shape[1], x.device)
    name = resolve_backend(backend, x.device)
    if name == "reference":
        return reference.simhash(x, planes)
    if name == "triton":
        return _triton_simhash(x, planes)
    return torch.ops.llmcache.simhash(x, planes)


def simhash_pooled(
    embeds: torch.Tensor, mask: torch.Tensor, planes: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """The paper's fingerprint f(X) = SimHash(Avg(E(X))) in one pass over the embeddings.

    Args:
        embeds: float32/float16/bfloat16 [B, T, d] token embeddings.
        mask: bool or integer [B, T]; tokens where it is 0 (padding) are left out of the mean.
        planes: float [d, nbits] as for `simhash`.
    Returns:
        int64 [B, nbits // 64], equal to `simhash(masked_mean(embeds, mask), planes)` up to the
        rounding of projections within float error of zero. A row with no token hashes the zero
        vector (every bit set).
    """
    check_tensor("embeds", embeds, dtypes=FLOATS, ndim=3)
    check_tensor("mask", mask, dtypes=MASKS, ndim=2, device=embeds.device)
    check(
        tuple(mask.shape) == tuple(embeds.shape[:2]),
        f"mask must have shape [B, T] = {tuple(embeds.shape[:2])}, got {tuple(mask.shape)}",
    )
    _check_planes(planes, embeds.shape[2], embeds.device)
    return simhash_pooled_unchecked(embeds, mask, planes, backend=backend)


def simhash_pooled_unchecked(
    embeds: torch.Tensor, mask: torch.Tensor, planes: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """`simhash_pooled` without its argument checks, for internal callers whose arguments are
    valid by construction (the cache fingerprints every forward, where the checks cost about as
    much as the two kernels). Same arguments and result; invalid ones are undefined."""
    name = resolve_backend(backend, embeds.device)
    if name == "reference":
        return reference.simhash_pooled(embeds, mask, planes)
    if name == "triton":
        return _triton_simhash_pooled(embeds, mask, planes)
    return torch.ops.llmcache.simhash_pooled(embeds, mask, planes)


def random_planes(
    dim: int, nbits: int, *, seed: int = 0, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Gaussian hyperplanes float32 [dim, nbits] from a fixed seed (same seed, same planes everywhere)."""
    check(nbits > 0 and nbits % 64 == 0 and nbits <= MAX_BITS, f"nbits must be a positive multiple of 64 up to {MAX_BITS}, got {nbits}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, nbits, generator=gen).to(device)
