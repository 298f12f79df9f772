"""Triton Hamming top-k: the k eligible bank codes nearest to each query, ties to the smaller index.

Maths (spec in `llmcache.ops.reference.hamming_topk`): dist(b, n) = sum_w popcount(q[b, w] ^ bank[n, w])
over the W <= 16 int64 words. Each candidate becomes one packed int64 key = dist << 40 | n, so that
ordering keys orders by distance then index; ineligible slots (valid[n] false, or bank_tag[n] !=
query_tag[b]) get the sentinel INT64_MAX, which no real key reaches (dist <= 1024, n < 2^40).

Popcount is portable SWAR (Hacker's Delight 5-1) on uint64, with the byte-lane counts of all W words
summed before one horizontal fold per tile: plain integer ops on GPUs and numpy under
TRITON_INTERPRET=1, no inline asm or libdevice.

Design:
- `_topk_kernel`: program (query block, bank split) scans its contiguous share of the bank in
  [BLOCK_Q, BLOCK_N] key tiles. It keeps each query's best k keys in registers [BLOCK_Q, K_PAD].
  For k == 1 that is a running min. For k > 1 a tile is merged only when some query has a tile key
  below its current k-th best; the merge extracts the k smallest keys of (running list U tile) by k
  masked min-reductions, each taking the smallest key above the previous one (keys are distinct).
  Each split writes its k candidates; the launcher finishes with one torch.topk over the
  SPLITS * k candidates per query and decodes the keys. No host synchronisation anywhere.
- Large k (> _MAX_REGISTER_K): `_keys_kernel` writes every key [B, N] and torch.topk selects.
- N == 0 or B == 0 are decided from shapes and return the "missing" answers without a launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_IDX_BITS = 40
_SENTINEL = (1 << 63) - 1
# A tile holds _TILE keys: up to 16 queries (fewer for small batches, so one query does not pay for
# 16) times the bank rows that fill the rest.
_MAX_BLOCK_Q = 16
_TILE = 2048
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
    slots,  # [BLOCK_N] int64 bank rows
    num_queries,
    slot_end,  # slots >= slot_end are out of this program's range
    W: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_TAGS: tl.constexpr,
):
    """Packed keys dist << 40 | slot for a [BLOCK_Q, BLOCK_N] tile; the sentinel where ineligible."""
    q_ok = queries < num_queries
    n_ok = slots < slot_end
    # SWAR popcount, deferred: per word only reduce to 8 byte lanes of <= 8 set bits each and add
    # the lanes up across words (<= 8 * 16 = 128 per lane, no carry); fold to 16-bit lanes and sum
    # them once per tile. uint64 so that shifts are logical and wrap-around is defined.
    lanes = tl.zeros((queries.shape[0], slots.shape[0]), dtype=tl.uint64)
    for w in tl.static_range(W):
        q = tl.load(queries_ptr + queries * W + w, mask=q_ok, other=0).to(tl.uint64, bitcast=True)
        b = tl.load(bank_ptr + slots * W + w, mask=n_ok, other=0).to(tl.uint64, bitcast=True)
        x = q[:, None] ^ b[None, :]
        x = x - ((x >> 1) & 0x5555555555555555)
        x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
        lanes += (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    lanes = (lanes & 0x00FF00FF00FF00FF) + ((lanes >> 8) & 0x00FF00FF00FF00FF)
    dist = ((lanes * 0x0001000100010001) >> 48).to(tl.int64)
    ok = q_ok[:, None] & n_ok[None, :]
    if HAS_VALID:
        valid = tl.load(valid_ptr + slots, mask=n_ok, other=0)
        ok = ok & (valid != 0)[None, :]
    if HAS_TAGS:
        q_tag = tl.load(query_tag_ptr + queries, mask=q_ok, other=0)
        b_tag = tl.load(bank_tag_ptr + slots, mask=n_ok, other=0)
        ok = ok & (q_tag[:, None] == b_tag[None, :])
    key = (dist << 40) | slots[None, :]  # 40 = _IDX_BITS
    return tl.where(ok, key, 0x7FFFFFFFFFFFFFFF)


@triton.jit
def _topk_kernel(
    queries_ptr,  # [B, W] int64
    bank_ptr,  # [N, W] int64
    valid_ptr,  # [N] uint8 (HAS_VALID)
    query_tag_ptr,  # [B] int64 (HAS_TAGS)
    bank_tag_ptr,  # [N] int64 (HAS_TAGS)
    cand_ptr,  # [B, SPLITS, k] int64 out: each split's best keys, ascending
    num_queries,
    num_slots,
    slots_per_split,  # a multiple of BLOCK_N
    k,
    W: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_TAGS: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    queries = pid_q.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    start = split.to(tl.int64) * slots_per_split
    end = tl.minimum(start + slots_per_split, num_slots)
    col = tl.arange(0, K_PAD)[None, :]
    # Columns >= k hold -1: below every key, so they neither count as the k-th best nor get extracted.
    best = tl.where(col < k, 0x7FFFFFFFFFFFFFFF, -1).to(tl.int64) + tl.zeros((BLOCK_Q, K_PAD), dtype=tl.int64)
    for tile in range(start, end, BLOCK_N):
        slots = tile + tl.arange(0, BLOCK_N).to(tl.int64)
        key = _tile_keys(
            queries_ptr, bank_ptr, valid_ptr, query_tag_ptr, bank_tag_ptr,
            queries, slots, num_queries, end, W, HAS_VALID, HAS_TAGS,
        )  # fmt: skip
        if K_PAD == 1:
            best = tl.minimum(best, tl.min(key, axis=1)[:, None])
        else:
            improves = tl.min(key, axis=1) < tl.max(best, axis=1)
            if tl.max(improves.to(tl.int32), axis=0) > 0:
                merged = tl.full((BLOCK_Q, K_PAD), -1, dtype=tl.int64)
                prev = tl.full((BLOCK_Q,), -1, dtype=tl.int64)
                for i in range(k):
                    from_tile = tl.min(tl.where(key > prev[:, None], key, 0x7FFFFFFFFFFFFFFF), axis=1)
                    from_best = tl.min(tl.where(best > prev[:, None], best, 0x7FFFFFFFFFFFFFFF), axis=1)
                    prev = tl.minimum(from_tile, from_best)
                    merged = tl.where(col == i, prev[:, None], merged)
                best = merged
    out = cand_ptr + (queries[:, None] * num_splits + split) * k + col
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
    W: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_TAGS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    queries = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    slots = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    key = _tile_keys(
        queries_ptr, bank_ptr, valid_ptr, query_tag_ptr, bank_tag_ptr,
        queries, slots, num_queries, num_slots, W, HAS_VALID, HAS_TAGS,
    )  # fmt: skip
    ok = (queries[:, None] < num_queries) & (slots[None, :] < num_slots)
    tl.store(keys_ptr + queries[:, None] * num_slots + slots[None, :], key, mask=ok)


def _num_splits(q_blocks: int, tiles: int, device: torch.device) -> int:
    """Bank splits so that the grid fills the GPU (a few under the interpreter, which runs programs in turn)."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(tiles, triton.cdiv(target, q_blocks)))


def hamming_topk_triton(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    valid: torch.Tensor | None,
    query_tag: torch.Tensor | None,
    bank_tag: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dist int32 [B, k], idx int64 [B, k]) with the exact semantics of `reference.hamming_topk` (module doc)."""
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
    valid_arg = valid.contiguous().view(torch.uint8) if has_valid else bank
    query_tag_arg = query_tag.contiguous() if has_tags else queries
    bank_tag_arg = bank_tag.contiguous() if has_tags else bank
    common = (queries, bank, valid_arg, query_tag_arg, bank_tag_arg)
    block_q = min(_MAX_BLOCK_Q, triton.next_power_of_2(num_queries))
    block_n = _TILE // block_q
    flags = {"W": words, "HAS_VALID": has_valid, "HAS_TAGS": has_tags, "BLOCK_Q": block_q, "BLOCK_N": block_n}
    q_blocks = triton.cdiv(num_queries, block_q)
    tiles = triton.cdiv(num_slots, block_n)
    if k <= _MAX_REGISTER_K:
        splits = _num_splits(q_blocks, tiles, device)
        slots_per_split = triton.cdiv(tiles, splits) * block_n
        splits = triton.cdiv(num_slots, slots_per_split)
        cand = torch.empty((num_queries, splits, k), dtype=torch.int64, device=device)
        _topk_kernel[(q_blocks, splits)](
            *common, cand, num_queries, num_slots, slots_per_split, k, K_PAD=triton.next_power_of_2(k), **flags
        )
        cand = cand.view(num_queries, splits * k)
    else:
        cand = torch.empty((num_queries, num_slots), dtype=torch.int64, device=device)
        _keys_kernel[(q_blocks, tiles)](*common, cand, num_queries, num_slots, **flags)
    best = cand.topk(min(k, cand.shape[1]), dim=1, largest=False, sorted=True).values
    if best.shape[1] < k:
        pad = torch.full((num_queries, k - best.shape[1]), _SENTINEL, dtype=torch.int64, device=device)
        best = torch.cat([best, pad], dim=1)
    found = best != _SENTINEL
    dist = torch.where(found, best >> _IDX_BITS, missing).to(torch.int32)
    idx = torch.where(found, best & ((1 << _IDX_BITS) - 1), -1)
    return dist, idx
