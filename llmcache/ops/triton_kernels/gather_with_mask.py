"""Triton gather-with-mask: out[r] = values[slot[r]] if slot[r] >= 0 else computed[row[r]], plus the slot counters.

Maths (spec in `llmcache.ops.reference.gather_with_mask`): with span = min(T, Tv), a hit row copies
span sequence positions, out[r, t] = values[slot[r], t - dst + src] for dst <= t < dst + span, where
(dst, src) = (T - span, Tv - span) with align_end (left padding) and (0, 0) otherwise; its other
positions are zero. A miss row copies computed[row[r]] whole. Every hit sets last_used[slot] = tick
and adds 1 to hit_count[slot], so a slot read by several rows counts each of them.

Design: trailing dims are flattened to F and each row seen as T * F elements; program (r, block)
copies one BLOCK-element chunk of out[r], branching once per program on hit/miss. Elements are
moved as same-width integers (the float tensors are viewed as int16/int32), so copies are
bit-exact for every dtype and zero is +0.0. The first chunk program of a hit row also updates the
counters: tl.atomic_add for hit_count (duplicate slots race), a plain store of tick for last_used
(every writer stores the same value). Offsets are int64 so large banks cannot overflow.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024
_BITS_DTYPE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _gather_with_mask_kernel(
    values_ptr,  # [N, Tv * F] raw bits
    slot_ptr,  # [B] int64
    computed_ptr,  # [M, T * F] raw bits
    row_ptr,  # [B] int64
    last_used_ptr,  # [N] int64, updated in place
    hit_count_ptr,  # [N] int64, updated in place
    out_ptr,  # [B, T * F] raw bits
    tick,
    seq,  # T
    stored,  # Tv
    features,  # F
    ALIGN_END: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    row_len = seq.to(tl.int64) * features
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < row_len
    slot = tl.load(slot_ptr + r)
    if slot >= 0:
        span = tl.minimum(seq, stored).to(tl.int64)
        if ALIGN_END:
            dst = seq - span
            src = stored - span
        else:
            dst = span * 0
            src = span * 0
        t = offs // tl.maximum(features, 1)  # F == 0 leaves no element, but must not divide by zero
        inside = in_row & (t >= dst) & (t < dst + span)
        src_offs = slot * stored * features + (t - dst + src) * features + offs % tl.maximum(features, 1)
        data = tl.load(values_ptr + src_offs, mask=inside, other=0)
        if chunk == 0:
            tl.atomic_add(hit_count_ptr + slot, 1)
            tl.store(last_used_ptr + slot, tick)
    else:
        row = tl.load(row_ptr + r)
        data = tl.load(computed_ptr + row * row_len + offs, mask=in_row, other=0)
    tl.store(out_ptr + r * row_len + offs, data, mask=in_row)


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory viewed as integers of the element's width (bit-exact copies, dtype-agnostic kernel)."""
    return t.view(_BITS_DTYPE[t.element_size()])


def gather_with_mask_triton(
    values: torch.Tensor,
    slot: torch.Tensor,
    computed: torch.Tensor,
    row: torch.Tensor,
    last_used: torch.Tensor,
    hit_count: torch.Tensor,
    tick: int,
    align_end: bool,
) -> torch.Tensor:
    """[B, T, *F] merge of bank hits and computed rows; updates last_used and hit_count in place (module doc)."""
    batch = slot.shape[0]
    seq = computed.shape[1]
    stored = values.shape[1]
    out = torch.empty((batch, seq) + tuple(computed.shape[2:]), dtype=computed.dtype, device=computed.device)
    if batch == 0:
        return out
    features = 1
    for size in computed.shape[2:]:
        features *= size
    grid = (batch, max(1, triton.cdiv(seq * features, _BLOCK)))
    _gather_with_mask_kernel[grid](
        _as_bits(values.contiguous()),
        slot.contiguous(),
        _as_bits(computed.contiguous()),
        row.contiguous(),
        last_used,
        hit_count,
        _as_bits(out),
        tick,
        seq,
        stored,
        features,
        ALIGN_END=bool(align_end),
        BLOCK=_BLOCK,
    )
    return out
