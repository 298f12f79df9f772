"""The fused gather-with-mask: merge bank hits and freshly computed rows in one pass.

out[r] = values[slot[r]] if slot[r] >= 0 else computed[row[r]], and every slot read gets
last_used = tick and hit_count += 1 (per reading row). It is how a cached layer scatters the
sub-batch it actually ran back among the rows it served from the bank. Kernels:
csrc/cpu/gather_with_mask.cpp, kernels/gather_with_mask.cu,
llmcache/ops/triton_kernels/gather_with_mask.py, reference.gather_with_mask.
"""

from __future__ import annotations

import torch

from . import reference
from ._library import LIB, check, check_tensor, fill_missing_kernels, resolve_backend

LIB.define(
    "gather_with_mask(Tensor values, Tensor slot, Tensor computed, Tensor row, "
    "Tensor(a!) last_used, Tensor(b!) hit_count, int tick, bool align_end) -> Tensor"
)

VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.register_fake("llmcache::gather_with_mask")
def _gather_fake(values, slot, computed, row, last_used, hit_count, tick, align_end):
    return computed.new_empty((slot.shape[0],) + tuple(computed.shape[1:]))


def _triton(values, slot, computed, row, last_used, hit_count, tick, align_end):
    from .triton_kernels.gather_with_mask import gather_with_mask_triton

    return gather_with_mask_triton(values, slot, computed, row, last_used, hit_count, tick, align_end)


fill_missing_kernels("gather_with_mask", _triton, reference.gather_with_mask)


def gather_with_mask(
    values: torch.Tensor,
    slot: torch.Tensor,
    computed: torch.Tensor,
    row: torch.Tensor,
    last_used: torch.Tensor,
    hit_count: torch.Tensor,
    tick: int,
    align_end: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Rows from the bank where they hit, from `computed` where they missed, in one kernel.

    Args:
        values: float [N, Tv, *F], the bank's stored states (sequence axis 1).
        slot: int64 [B]; slot[r] >= 0 is a hit on that bank slot, -1 a miss.
        computed: [M, T, *F], same dtype and trailing shape as values: the rows the layer ran on
            (M may be 0 when every row hit).
        row: int64 [B]; for a miss, the row of `computed` it takes. Must be in [0, M) for misses.
        last_used, hit_count: int64 [N], updated in place for the slots read.
        tick: the value written to last_used.
        align_end: entries line up with the end of the sequence axis (left padding) rather than
            its start. Hit positions beyond the stored Tv are zero.
    Returns:
        [B, T, *F] in computed's dtype.
    """
    check_tensor("values", values, dtypes=VALUE_DTYPES)
    device = values.device
    check(values.dim() >= 2, f"values must be [N, Tv, *F], got shape {tuple(values.shape)}")
    check_tensor("slot", slot, dtypes=(torch.int64,), ndim=1, device=device)
    check_tensor("computed", computed, dtypes=(values.dtype,), ndim=values.dim(), device=device)
    check(
        tuple(computed.shape[2:]) == tuple(values.shape[2:]),
        f"computed's trailing shape {tuple(computed.shape[2:])} must equal values' {tuple(values.shape[2:])}",
    )
    check_tensor("row", row, dtypes=(torch.int64,), ndim=1, device=device)
    check(row.shape == slot.shape, f"row must have shape [B={slot.shape[0]}], got {tuple(row.shape)}")
    for name, t in (("last_used", last_used), ("hit_count", hit_count)):
        check_tensor(name, t, dtypes=(torch.int64,), ndim=1, device=device)
        check(t.shape[0] == values.shape[0], f"{name} must have shape [N={values.shape[0]}], got {tuple(t.shape)}")
    return gather_with_mask_unchecked(values, slot, computed, row, last_used, hit_count, tick, align_end, backend=backend)


def gather_with_mask_unchecked(
    values: torch.Tensor,
    slot: torch.Tensor,
    computed: torch.Tensor,
    row: torch.Tensor,
    last_used: torch.Tensor,
    hit_count: torch.Tensor,
    tick: int,
    align_end: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """`gather_with_mask` without its argument checks, for internal callers whose arguments are
    valid by construction (the ring buffer's reads): at cache batch sizes the six tensor checks
    cost about as much as the copy. Same arguments and result; invalid ones are undefined."""
    name = resolve_backend(backend, values.device)
    args = (values, slot, computed, row, last_used, hit_count, int(tick), bool(align_end))
    if name == "reference":
        return reference.gather_with_mask(*args)
    if name == "triton":
        return _triton(*args)
    return torch.ops.llmcache.gather_with_mask(*args)
