"""Triton gather-with-mask: out[r] = values[slot[r]] if slot[r] >= 0 else computed[row[r]], plus the slot counters.

Maths (spec in `llmcache.ops.reference.gather_with_mask`): with span = min(T, Tv), a hit row copies
span sequence positions, out[r, t] = values[slot[r], t - dst + src] for dst <= t < dst + span, where
(dst, src) = (T - span, Tv - span) with align_end (left padding) and (0, 0) otherwise; its other
positions are zero. A miss row copies computed[row[r]] whole. Every hit sets last_used[slot] = tick
and adds 1 to hit_count[slot], so a slot read by several rows counts each of them.

Design (as kernels/gather_with_mask.cu): trailing dims are flattened to F, a row is T * F
elements, and a hit row is one contiguous range of a bank row: out elements [dst * F, (dst + span)
* F) come from the bank row shifted by (src - dst) * F, the rest are zero. The launcher computes
those three bounds once, so the kernel does no per-element division. Program i walks the
(row, BLOCK-element chunk) items i, i + grid, ... (one axis, capped: no grid limit to overflow),
branching once per item on hit/miss. Elements move as same-width integers (floats viewed as
int16/int32): bit-exact for every dtype, and zero is +0.0. When F, the bounds and the base
pointers are multiples of 16 (Triton specialises on that), loads and stores are 16-byte vectors.
The first chunk of a hit row updates the counters: tl.atomic_add for hit_count (duplicate slots
race), a plain store of tick for last_used (every writer stores the same value).

Out of range, where a kernel cannot raise without a host sync (the reference and the CPU kernel
raise instead): a slot >= N or a miss row outside [0, M) gives a zero row and moves no counter,
exactly as the CUDA kernel does. Offsets are int64 so large banks cannot overflow.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._grid import MAX_GRID, capped_grid

# Bytes per (row, chunk) item: 32 per thread at 4 warps, two 16-byte vectors in flight; 8 KB
# chunks took 128 registers where the copy cannot vectorise (see tests/test_triton_compile.py).
_CHUNK_BYTES = 4096
_BITS_DTYPE = {2: torch.int16, 4: torch.int32}


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
    num_slots,  # N
    num_computed,  # M
    row_len,  # T * F
    stored_len,  # Tv * F
    copy_begin,  # dst * F: hit rows copy out elements [copy_begin, copy_end)
    copy_end,  # (dst + span) * F
    shift,  # (src - dst) * F: from bank row element e + shift
    chunks_per_row,
    num_items,  # B * chunks_per_row
    BLOCK: tl.constexpr,
):
    # Sizes may arrive as compile-time 1s (Triton specialises ints equal to 1): cast to int64 once.
    row_len = tl.cast(row_len, tl.int64)
    stored_len = tl.cast(stored_len, tl.int64)
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        r = tl.cast(item, tl.int64) // chunks_per_row
        chunk = tl.cast(item, tl.int64) % chunks_per_row
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        in_row = offs < row_len
        slot = tl.load(slot_ptr + r)
        if slot >= 0:
            in_bank = slot < num_slots
            inside = in_row & (offs >= copy_begin) & (offs < copy_end) & in_bank
            data = tl.load(values_ptr + slot * stored_len + shift + offs, mask=inside, other=0)
            if in_bank & (chunk == 0):
                tl.atomic_add(hit_count_ptr + slot, 1)
                tl.store(last_used_ptr + slot, tick)
        else:
            row = tl.load(row_ptr + r)
            ok = (row >= 0) & (row < num_computed)
            data = tl.load(computed_ptr + row * row_len + offs, mask=in_row & ok, other=0)
        tl.store(out_ptr + r * row_len + offs, data, mask=in_row)


class Launch(NamedTuple):
    """How `gather_with_mask_triton` launches for given sizes (also enumerated by the compile test)."""

    grid: tuple[int]
    block: int
    chunks_per_row: int
    num_items: int
    copy_begin: int
    copy_end: int
    shift: int


def launch_config(
    batch: int, seq: int, stored: int, features: int, element_size: int, align_end: bool,
    max_grid: tuple[int, ...] = MAX_GRID,
) -> Launch:  # fmt: skip
    """Grid and copy bounds for B rows of T * F elements from a bank of Tv positions."""
    block = _CHUNK_BYTES // element_size
    row_len = seq * features
    # At least one chunk per row, even an empty one: its program still counts the hit.
    chunks_per_row = max(1, triton.cdiv(row_len, block))
    num_items = batch * chunks_per_row
    span = min(seq, stored)
    dst, src = (seq - span, stored - span) if align_end else (0, 0)
    grid = capped_grid((num_items,), max_grid)
    return Launch(
        grid, block, chunks_per_row, num_items, dst * features, (dst + span) * features, (src - dst) * features
    )


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory viewed as integers of the element's width (bit-exact copies, dtype-agnostic kernel)."""
    if t.element_size() not in _BITS_DTYPE:
        raise TypeError(
            f"gather_with_mask (Triton) copies 2- or 4-byte elements, got {t.dtype}; use float32/16 or bfloat16"
        )
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
    max_grid: tuple[int, ...] = MAX_GRID,
) -> torch.Tensor:
    """[B, T, *F] merge of bank hits and computed rows; updates last_used and hit_count in place (module doc).

    values [N, Tv, *F], slot int64 [B], computed [M, T, *F], row int64 [B], last_used/hit_count
    int64 [N], as checked by `llmcache.ops.gather_with_mask`. max_grid caps the launch grid (tests).
    """
    batch = slot.shape[0]
    seq = computed.shape[1]
    stored = values.shape[1]
    out = torch.empty((batch, seq) + tuple(computed.shape[2:]), dtype=computed.dtype, device=computed.device)
    if batch == 0:
        return out
    features = 1
    for size in computed.shape[2:]:
        features *= size
    launch = launch_config(batch, seq, stored, features, computed.element_size(), align_end, max_grid)
    _gather_with_mask_kernel[launch.grid](
        _as_bits(values.contiguous()),
        slot.contiguous(),
        _as_bits(computed.contiguous()),
        row.contiguous(),
        last_used,
        hit_count,
        _as_bits(out),
        tick,
        values.shape[0],
        computed.shape[0],
        seq * features,
        stored * features,
        launch.copy_begin,
        launch.copy_end,
        launch.shift,
        launch.chunks_per_row,
        launch.num_items,
        BLOCK=launch.block,
    )
    return out
