"""Triton Hamming top-k: the k eligible bank codes nearest to each query, ties to the smaller index.

Maths (spec in `llmcache.ops.reference.hamming_topk`): dist(b, n) = sum_w popcount(q[b, w] ^ bank[n, w])
over the W <= 16 int64 words. Each candidate becomes one packed int64 key = dist << 40 | n, so that
ordering keys orders by distance then index; ineligible slots (valid[n] false, or bank_tag[n] !=
query_tag[b]) get the sentinel INT64_MAX, which no real key reaches (dist <= 1024, n < 2^40).
Inside a tile the key is int32, dist << 11 | column: the same order at half the registers.

Popcount: compiled, the hardware instruction (libdevice popc -> PTX popc.b64, two POPC); under
TRITON_INTERPRET=1, which has no extern calls, portable SWAR (Hacker's Delight 5-1) on uint64 with
the byte-lane counts of all W words summed before one horizontal fold. The words are a runtime
loop, so W neither multiplies the compiled variants nor keeps W loads live at once.

Design:
- `_topk_kernel`: program (query block, bank split) scans its contiguous share of the bank in
  [BLOCK_Q, BLOCK_N] tiles and keeps each query's best k keys in registers [BLOCK_Q, K_PAD],
  unsorted. For k == 1 that is a running min. For k > 1 tile keys enter by insertion: while some
  query has a tile key below its current k-th best (the list's max), that key replaces the max.
  A tile that improves nothing costs one min-reduction; the first costs k rounds. Each split
  writes its k candidates; the launcher finishes with one torch.topk over the splits * k
  candidates per query and decodes the keys. No host synchronisation anywhere.
- Large k (> _MAX_REGISTER_K): `_keys_kernel` writes every key [B, N] and torch.topk selects.
- Grids: query blocks on axis 0; the few splits on axis 1, their count capped at its limit; the
  keys kernel's bank tiles on axis 1, capped (`_grid.capped_grid`) and walked by grid-stride
  loops, so N > 8.4 M cannot overflow axis 1.
- N == 0 or B == 0 are decided from shapes and return the "missing" answers without a launch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._grid import MAX_GRID, capped_grid, interpreted

_IDX_BITS = 40
_SENTINEL = (1 << 63) - 1
# Every real key is below 2^51 (dist <= 1024); a split's empty entries are near INT64_MAX.
_MISSING = 1 << 62
# A tile holds BLOCK_Q * BLOCK_N keys: up to 16 queries (fewer for small batches, so one query
# does not pay for 16) times the bank rows that fill the rest. Large running lists get smaller
# tiles so that list and tile fit in registers together (limits in tests/test_triton_compile.py).
_MAX_BLOCK_Q = 16
_TILE = {1: 1024, 16: 1024, 64: 512}  # keys per tile, by K_PAD
# Beyond this k the running list would not fit in registers; write all keys and let torch select.
_MAX_REGISTER_K = 64


@triton.jit
def _tile_keys(
    queries_ptr,
    bank_ptr,
    valid_ptr,
    query_tag_ptr,
    bank_tag_ptr,
    queries,  # [BLOCK_Q] int64 query rows
    slots,  # [BLOCK_N] int64 bank rows, consecutive
    num_queries,
    slot_end,  # slots >= slot_end are out of this program's range
    words,
    has_valid,
    has_tags,
    HW_POPC: tl.constexpr,
):
    """Tile-local int32 keys dist << 11 | column for a [BLOCK_Q, BLOCK_N] tile; INT32_MAX where ineligible.

    Local keys order as the global ones (slot = first slot + column) at half their registers.
    """
    tl.static_assert(slots.shape[0] <= 2048, "the column must fit in the 11 low bits of a local key")
    q_ok = queries < num_queries
    n_ok = slots < slot_end
    if HW_POPC:
        dist = tl.zeros((queries.shape[0], slots.shape[0]), dtype=tl.int32)
        for w in range(words):
            q = tl.load(queries_ptr + queries * words + w, mask=q_ok, other=0)
            b = tl.load(bank_ptr + slots * words + w, mask=n_ok, other=0)
            dist += libdevice.popc(q[:, None] ^ b[None, :])
    else:
        # SWAR, deferred: per word only reduce to 8 byte lanes of <= 8 set bits each and add the
        # lanes up across words (<= 8 * 16 = 128 per lane, no carry); fold to 16-bit lanes and sum
        # them once per tile. uint64 so that shifts are logical and wrap-around is defined.
        lanes = tl.zeros((queries.shape[0], slots.shape[0]), dtype=tl.uint64)
        for w in range(words):
            q = tl.load(queries_ptr + queries * words + w, mask=q_ok, other=0).to(tl.uint64, bitcast=True)
            b = tl.load(bank_ptr + slots * words + w, mask=n_ok, other=0).to(tl.uint64, bitcast=True)
            x = q[:, None] ^ b[None, :]
            x = x - ((x >> 1) & 0x5555555555555555)
            x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
            lanes += (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
        lanes = (lanes & 0x00FF00FF00FF00FF) + ((lanes >> 8) & 0x00FF00FF00FF00FF)
        dist = ((lanes * 0x0001000100010001) >> 48).to(tl.int32)
    ok = q_ok[:, None] & n_ok[None, :]
    # Runtime flags, not constexprs: a uniform branch per tile costs less than 4x the variants.
    if has_valid:
        valid = tl.load(valid_ptr + slots, mask=n_ok, other=0)
        ok = ok & (valid != 0)[None, :]
    if has_tags:
        q_tag = tl.load(query_tag_ptr + queries, mask=q_ok, other=0)
        b_tag = tl.load(bank_tag_ptr + slots, mask=n_ok, other=0)
        ok = ok & (q_tag[:, None] == b_tag[None, :])
    return tl.where(ok, (dist << 11) | tl.arange(0, slots.shape[0])[None, :], 0x7FFFFFFF)


@triton.jit
def _global_key(local, first_slot):
    """The packed int64 key dist << 40 | slot of a tile-local key; the local sentinel becomes INT64_MAX."""
    key = ((local >> 11).to(tl.int64) << 40) | (first_slot + (local & 2047))  # 40 = _IDX_BITS
    return tl.where(local == 0x7FFFFFFF, 0x7FFFFFFFFFFFFFFF, key)


@triton.jit
def _topk_kernel(
    queries_ptr,  # [B, W] int64
    bank_ptr,  # [N, W] int64
    valid_ptr,  # [N] uint8 (has_valid)
    query_tag_ptr,  # [B] int64 (has_tags)
    bank_tag_ptr,  # [N] int64 (has_tags)
    cand_ptr,  # [B, splits, k] int64 out: each split's best keys, unsorted
    num_queries,
    num_slots,
    words,
    slots_per_split,  # a multiple of BLOCK_N
    k,
    has_valid,
    has_tags,
    K_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HW_POPC: tl.constexpr,
):
    col = tl.arange(0, K_PAD)[None, :]
    split = tl.program_id(1)
    start = tl.cast(split, tl.int64) * slots_per_split
    end = tl.minimum(start + slots_per_split, num_slots)
    q_block = tl.program_id(0)
    queries = tl.cast(q_block, tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    # Empty columns hold INT64_MAX - col: above every key, and distinct, so the max (the
    # entry to replace) is one column. Columns >= k hold -1, below every key: never replaced.
    best = tl.where(col < k, 0x7FFFFFFFFFFFFFFF - col.to(tl.int64), -1) + tl.zeros((BLOCK_Q, K_PAD), tl.int64)
    for tile in range(start, end, BLOCK_N):
        slots = tile + tl.arange(0, BLOCK_N).to(tl.int64)
        key = _tile_keys(
            queries_ptr, bank_ptr, valid_ptr, query_tag_ptr, bank_tag_ptr,
            queries, slots, num_queries, end, words, has_valid, has_tags, HW_POPC,
        )  # fmt: skip
        low = tl.min(key, axis=1)
        if K_PAD == 1:
            best = tl.minimum(best, _global_key(low, tile)[:, None])
        else:
            kth = tl.max(best, axis=1)
            candidate = _global_key(low, tile)
            while tl.max((candidate < kth).to(tl.int32), axis=0) > 0:
                take = (best == kth[:, None]) & (candidate < kth)[:, None]
                best = tl.where(take, candidate[:, None], best)
                kth = tl.max(best, axis=1)
                # Next tile key above this one (keys are distinct per query); a minimum not
                # taken now never will be. The tile stays read-only: no tile-sized loop state.
                low = tl.min(tl.where(key > low[:, None], key, 0x7FFFFFFF), axis=1)
                candidate = _global_key(low, tile)
    out = cand_ptr + (queries[:, None] * tl.num_programs(1) + split) * k + col
    tl.store(out, best, mask=(queries[:, None] < num_queries) & (col < k))


@triton.jit
def _keys_kernel(
    queries_ptr,
    bank_ptr,
    valid_ptr,
    query_tag_ptr,
    bank_tag_ptr,
    keys_ptr,  # [B, N] int64 out
    num_queries,
    num_slots,
    words,
    q_blocks,
    slot_blocks,
    has_valid,
    has_tags,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HW_POPC: tl.constexpr,
):
    for slot_block in range(tl.program_id(1), slot_blocks, tl.num_programs(1)):
        first = tl.cast(slot_block, tl.int64) * BLOCK_N
        slots = first + tl.arange(0, BLOCK_N)
        for q_block in range(tl.program_id(0), q_blocks, tl.num_programs(0)):
            queries = tl.cast(q_block, tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
            key = _tile_keys(
                queries_ptr, bank_ptr, valid_ptr, query_tag_ptr, bank_tag_ptr,
                queries, slots, num_queries, num_slots, words, has_valid, has_tags, HW_POPC,
            )  # fmt: skip
            ok = (queries[:, None] < num_queries) & (slots[None, :] < num_slots)
            tl.store(keys_ptr + queries[:, None] * num_slots + slots[None, :], _global_key(key, first), mask=ok)


class Launch(NamedTuple):
    """How `hamming_topk_triton` launches for given sizes (also enumerated by the compile test)."""

    all_keys: bool  # k > _MAX_REGISTER_K: `_keys_kernel`, else `_topk_kernel`
    grid: tuple[int, int]
    q_blocks: int
    slot_blocks: int  # bank splits (`_topk_kernel`) or bank tiles (`_keys_kernel`)
    slots_per_split: int
    k_pad: int
    block_q: int
    block_n: int


def _k_pad(k: int) -> int:
    """Width of the running list: 1 (a running min), 16 or 64; few widths keep few compiled variants."""
    return 1 if k == 1 else 16 if k <= 16 else 64


def launch_config(
    num_queries: int, num_slots: int, k: int, num_sms: int, max_grid: tuple[int, ...] = MAX_GRID
) -> Launch:
    """Kernel, tile and grid for B = num_queries >= 1, N = num_slots >= 1 on a device of num_sms SMs."""
    block_q = min(_MAX_BLOCK_Q, triton.next_power_of_2(num_queries))
    q_blocks = triton.cdiv(num_queries, block_q)
    if k > _MAX_REGISTER_K:
        block_n = _TILE[1] // block_q
        tiles = triton.cdiv(num_slots, block_n)
        grid = capped_grid((q_blocks, tiles), max_grid)
        return Launch(True, grid, q_blocks, tiles, block_n, 0, block_q, block_n)
    k_pad = _k_pad(k)
    block_n = _TILE[k_pad] // block_q
    tiles = triton.cdiv(num_slots, block_n)
    # Enough splits to fill the GPU with a few programs per SM, but no split without a tile and
    # never more than axis 1 allows: one program per (query block, split), no grid-stride loop
    # (outer loops made ptxas spill). Axis 0 holds B / 16 query blocks: 2^31 - 1 is out of reach.
    splits = max(1, min(tiles, triton.cdiv(4 * num_sms, q_blocks), max_grid[1]))
    slots_per_split = triton.cdiv(tiles, splits) * block_n
    splits = triton.cdiv(num_slots, slots_per_split)
    if q_blocks > max_grid[0]:
        raise ValueError(f"{num_queries} queries need {q_blocks} programs on grid axis 0, over {max_grid[0]}")
    return Launch(False, (q_blocks, splits), q_blocks, splits, slots_per_split, k_pad, block_q, block_n)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """SMs to fill (a few programs under the interpreter, which runs them in turn)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def hamming_topk_triton(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    valid: torch.Tensor | None,
    query_tag: torch.Tensor | None,
    bank_tag: torch.Tensor | None,
    max_grid: tuple[int, ...] = MAX_GRID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dist int32 [B, k], idx int64 [B, k]) with the exact semantics of `reference.hamming_topk` (module doc).

    queries int64 [B, W], bank int64 [N, W], valid bool [N] or None, query_tag/bank_tag int64 [B]/[N]
    or None, as checked by `llmcache.ops.hamming_topk`. max_grid caps the launch grid (tests).
    """
    num_queries, words = queries.shape
    num_slots = bank.shape[0]
    device = queries.device
    if num_slots >= 1 << _IDX_BITS:
        raise ValueError(f"bank has {num_slots} rows; the Triton kernel packs indices in {_IDX_BITS} bits")
    missing = 64 * words + 1
    if num_queries == 0 or num_slots == 0:
        dist = torch.full((num_queries, k), missing, dtype=torch.int32, device=device)
        return dist, torch.full((num_queries, k), -1, dtype=torch.int64, device=device)
    queries = queries.contiguous()
    bank = bank.contiguous()
    has_valid = valid is not None
    has_tags = query_tag is not None
    # Absent inputs get dummies of the same dtypes, so presence does not change the compiled variant.
    valid_arg = (valid.contiguous() if has_valid else bank).view(torch.uint8)
    query_tag_arg = query_tag.contiguous() if has_tags else queries
    bank_tag_arg = bank_tag.contiguous() if has_tags else bank
    common = (queries, bank, valid_arg, query_tag_arg, bank_tag_arg)
    launch = launch_config(num_queries, num_slots, k, _sm_count(device), max_grid)
    hw_popc = not interpreted(_topk_kernel)
    blocks = {"BLOCK_Q": launch.block_q, "BLOCK_N": launch.block_n, "HW_POPC": hw_popc}
    if launch.all_keys:
        cand = torch.empty((num_queries, num_slots), dtype=torch.int64, device=device)
        _keys_kernel[launch.grid](
            *common, cand, num_queries, num_slots, words, launch.q_blocks, launch.slot_blocks, has_valid, has_tags,
            **blocks,
        )  # fmt: skip
    else:
        cand = torch.empty((num_queries, launch.slot_blocks, k), dtype=torch.int64, device=device)
        _topk_kernel[launch.grid](
            *common, cand, num_queries, num_slots, words, launch.slots_per_split, k, has_valid, has_tags,
            K_PAD=launch.k_pad, **blocks,
        )  # fmt: skip
        cand = cand.view(num_queries, launch.slot_blocks * k)
    best = cand.topk(min(k, cand.shape[1]), dim=1, largest=False, sorted=True).values
    if best.shape[1] < k:
        pad = torch.full((num_queries, k - best.shape[1]), _SENTINEL, dtype=torch.int64, device=device)
        best = torch.cat([best, pad], dim=1)
    found = best < _MISSING
    dist = torch.where(found, best >> _IDX_BITS, missing).to(torch.int32)
    idx = torch.where(found, best & ((1 << _IDX_BITS) - 1), -1)
    return dist, idx
