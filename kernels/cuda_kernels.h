// llmcache CUDA kernels on raw device pointers: no torch, so CMake builds them alone
// (-DLLMCACHE_WITH_CUDA=ON) and csrc/torch_cuda.cpp wraps them as the CUDA implementations of
// the llmcache:: ops. llmcache/ops/reference.py is their specification.
//
// Every launcher only enqueues work on `stream` (no host synchronisation, no device-to-host
// copy) and returns cudaGetLastError() or cudaErrorInvalidValue for arguments it cannot serve.
// Ops that need scratch memory take a `workspace` of the size the matching *_workspace_bytes
// function returns for the same arguments (the caller allocates it; nullptr when that is 0).
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstddef>
#include <cstdint>

namespace llmcache {
namespace gpu {

// Element types of x / embeds, as passed in `dtype`.
constexpr int kFloat32 = 0;
constexpr int kFloat16 = 1;   // IEEE binary16
constexpr int kBFloat16 = 2;

// ---- simhash.cu ----
// codes[b, j/64] bit j%64 = (sum_i x[b,i] * planes[i,j] >= 0), accumulated in fp32.
// x: [B, d] of `dtype`; planes: fp32 [d, nbits] (nbits % 64 == 0); codes: int64 [B, nbits/64].
size_t simhash_workspace_bytes(int64_t B, int64_t d, int64_t nbits);
cudaError_t simhash_cuda(const void* x, int dtype, int64_t B, int64_t d, const float* planes,
                         int64_t nbits, int64_t* codes, void* workspace, cudaStream_t stream);

// SimHash of the masked mean over T: embeds [B, T, d] of `dtype`, mask [B, T] of integers of
// mask_bytes = 1, 2, 4 or 8 bytes (bool is 1; 0 = pad). A row with no token hashes the zero
// vector (every bit set). Two kernel launches.
size_t simhash_pooled_workspace_bytes(int dtype, int64_t B, int64_t T, int64_t d, int64_t nbits);
cudaError_t simhash_pooled_cuda(const void* embeds, int dtype, const void* mask, int mask_bytes,
                                int64_t B, int64_t T, int64_t d, const float* planes,
                                int64_t nbits, int64_t* codes, void* workspace,
                                cudaStream_t stream);

// ---- hamming_topk.cu ----
// For each query b the k eligible bank rows nearest in Hamming distance, ascending, ties to the
// smaller index. Eligible: (valid == nullptr || valid[n]) && (bank_tag == nullptr ||
// bank_tag[n] == query_tag[b]) (tags both or neither). Missing answers: idx = -1,
// dist = 64 * W + 1. queries int64 [B, W]; bank int64 [N, W]; valid uint8 [N];
// query_tag int64 [B]; bank_tag int64 [N]; dist int32 [B, k]; idx int64 [B, k].
constexpr int64_t kHammingMaxK = 256;
constexpr int64_t kHammingMaxWords = 16;
constexpr int64_t kHammingMaxRows = int64_t{1} << 40;  // bank indices live in 40 bits of a key
size_t hamming_topk_workspace_bytes(int64_t B, int64_t N, int64_t k);
cudaError_t hamming_topk_cuda(const int64_t* queries, int64_t B, const int64_t* bank, int64_t N,
                              int64_t W, int64_t k, const uint8_t* valid,
                              const int64_t* query_tag, const int64_t* bank_tag, int32_t* dist,
                              int64_t* idx, void* workspace, cudaStream_t stream);

// ---- gather_with_mask.cu ----
// out[r] = slot[r] >= 0 ? values[slot[r]] : computed[row[r]], rows laid out as [seq, inner]
// bytes: values [N, Tv, inner], computed [M, T, inner], out [B, T, inner]. A hit copies
// min(T, Tv) positions aligned at the start (or the end with align_end) and zero-fills the rest;
// every slot read gets last_used = tick and hit_count += 1 (atomically, per reading row).
// Out-of-range slot (>= N) or miss row (outside [0, M)) cannot be reported without a host sync:
// such an output row is zero-filled and no counter moves (the Python entry documents the ranges).
cudaError_t gather_with_mask_cuda(const void* values, int64_t N, int64_t Tv, const int64_t* slot,
                                  const void* computed, int64_t M, int64_t T, const int64_t* row,
                                  int64_t B, int64_t inner_bytes, int64_t* last_used,
                                  int64_t* hit_count, int64_t tick, bool align_end, void* out,
                                  cudaStream_t stream);

// ---- launch plans ----
// The grid, split and workspace arithmetic of each launcher, the very functions the launchers
// use, exposed so that tests check it without a GPU (csrc/torch_cuda.cpp: llmcache_plan:: ops).
// {queries_per_block, query_blocks (grid x), splits (grid y), rows_per_split, workspace bytes}
std::array<int64_t, 5> hamming_topk_plan(int64_t B, int64_t N, int64_t k);
// Projection: {row_blocks (grid x), words (grid y), d splits (grid z), d_per_split, bytes of
// the split sums, tickets (uint32 after the sums)}
std::array<int64_t, 6> simhash_plan(int64_t B, int64_t d, int64_t nbits);
// Pooled pass 1: {col_tiles, T splits (grid y), tokens_per_split, bytes of its partial sums};
// the projection's workspace follows those bytes.
std::array<int64_t, 4> simhash_pooled_plan(int dtype, int64_t B, int64_t T, int64_t d);
// {copy unit bytes, chunks_per_row, blocks (grid x)}; address_bits: the base pointers OR-ed.
std::array<int64_t, 3> gather_with_mask_plan(int64_t T, int64_t B, int64_t inner_bytes,
                                             int64_t address_bits);

}  // namespace gpu
}  // namespace llmcache
