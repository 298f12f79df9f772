"""Triton SimHash: codes[b, j // 64] bit j % 64 = (sum_i x[b, i] * planes[i, j] >= 0), fp32 accumulation.

Maths (Charikar 2002, spec in `llmcache.ops.reference.simhash`): project each row on nbits random
hyperplanes and keep the signs. The pooled fingerprint first takes the masked mean over tokens,
mean[b] = sum_t [mask[b, t] != 0] * embeds[b, t] / max(count_b, 1), then hashes it.

Design:
- `_simhash_kernel`: one program per (block of rows, 64-bit word). It walks d in BLOCK_D chunks,
  upcasts x and planes to fp32 and accumulates an fp32 [BLOCK_B, 64] projection with an IEEE
  fp32 `tl.dot` (no TF32, so the signs match the fp32 reference up to summation order). The 64
  sign bits are packed by summing (bit << j) in int64: the bits are distinct, so the sum is an OR,
  and bit 63 lands on the sign bit exactly as in `reference.pack_bits`.
- `_masked_mean_kernel`: one program per (row, block of d) reads its slice of embeds once, sums
  the masked tokens in fp32 and divides by the token count (as fp32, 0 -> 1) with a correctly
  rounded division. The embeddings are read in one pass; only the tiny fp32 [B, d] mean is written
  and re-read by `_simhash_kernel` (hashing in the same kernel would re-read embeds once per word
  or hold a [rows, nbits] accumulator). Masked tokens are multiplied by 0, as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# tl.dot needs every block dimension >= 16.
_BLOCK_B = 16
_BLOCK_D = 32
_BLOCK_T = 16
_BLOCK_MEAN_D = 128


@triton.jit
def _simhash_kernel(
    x_ptr,  # [B, d] float, contiguous
    planes_ptr,  # [d, nbits] float, contiguous
    codes_ptr,  # [B, nbits // 64] int64
    num_rows,
    dim,
    nbits,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    word = tl.program_id(1)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    bits = tl.arange(0, 64)
    cols = word.to(tl.int64) * 64 + bits
    row_ok = rows < num_rows
    proj = tl.zeros((BLOCK_B, 64), dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        feat = start + tl.arange(0, BLOCK_D).to(tl.int64)
        feat_ok = feat < dim
        x = tl.load(x_ptr + rows[:, None] * dim + feat[None, :], mask=row_ok[:, None] & feat_ok[None, :], other=0.0)
        p = tl.load(planes_ptr + feat[:, None] * nbits + cols[None, :], mask=feat_ok[:, None], other=0.0)
        proj = tl.dot(x.to(tl.float32), p.to(tl.float32), acc=proj, input_precision="ieee")
    weights = (proj >= 0).to(tl.int64) << bits.to(tl.int64)[None, :]
    code = tl.sum(weights, axis=1)
    tl.store(codes_ptr + rows * (nbits // 64) + word, code, mask=row_ok)


@triton.jit
def _masked_mean_kernel(
    embeds_ptr,  # [B, T, d] float, contiguous
    mask_ptr,  # [B, T] integer (bool viewed as uint8)
    mean_ptr,  # [B, d] fp32 out
    seq,
    dim,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    feat = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    feat_ok = feat < dim
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    count = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for start in range(0, seq, BLOCK_T):
        tok = start + tl.arange(0, BLOCK_T).to(tl.int64)
        tok_ok = tok < seq
        keep = tl.load(mask_ptr + row * seq + tok, mask=tok_ok, other=0)
        weight = (keep != 0).to(tl.float32)
        emb = tl.load(
            embeds_ptr + (row * seq + tok)[:, None] * dim + feat[None, :],
            mask=tok_ok[:, None] & feat_ok[None, :],
            other=0.0,
        )
        total += tl.sum(emb.to(tl.float32) * weight[:, None], axis=0)
        count += weight
    denom = tl.maximum(tl.sum(count, axis=0), 1.0)
    mean = tl.math.div_rn(total, tl.zeros_like(total) + denom)
    tl.store(mean_ptr + row * dim + feat, mean, mask=feat_ok)


def simhash_triton(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """SimHash codes int64 [B, nbits // 64] of x float [B, d] with planes float [d, nbits] (see module doc)."""
    num_rows, dim = x.shape
    nbits = planes.shape[1]
    codes = torch.empty((num_rows, nbits // 64), dtype=torch.int64, device=x.device)
    if num_rows == 0:
        return codes
    x = x.contiguous()
    # fp32 planes only (what random_planes makes): half-precision planes took 246 registers on sm_80.
    planes = planes.contiguous().float()
    grid = (triton.cdiv(num_rows, _BLOCK_B), nbits // 64)
    _simhash_kernel[grid](x, planes, codes, num_rows, dim, nbits, BLOCK_B=_BLOCK_B, BLOCK_D=_BLOCK_D)
    return codes


def simhash_pooled_triton(embeds: torch.Tensor, mask: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """SimHash of the masked token mean: embeds float [B, T, d], mask bool/int [B, T] -> int64 [B, nbits // 64]."""
    num_rows, seq, dim = embeds.shape
    mean = torch.empty((num_rows, dim), dtype=torch.float32, device=embeds.device)
    if num_rows and dim:
        embeds = embeds.contiguous()
        mask = mask.contiguous()
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
        grid = (num_rows, triton.cdiv(dim, _BLOCK_MEAN_D))
        _masked_mean_kernel[grid](embeds, mask, mean, seq, dim, BLOCK_T=_BLOCK_T, BLOCK_D=_BLOCK_MEAN_D)
    return simhash_triton(mean, planes)
