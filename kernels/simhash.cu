// SimHash on the GPU: codes[b, j/64] bit j%64 = (x_b . planes[:, j] >= 0), accumulated in fp32
// (Charikar 2002: for two vectors at angle theta each bit differs with probability theta / pi).
//
// Projection (simhash_project_kernel): a block owns kRows = 8 input rows, one 64-bit word
// (64 planes) and one range of d. The rows are staged in shared memory as fp32, kChunk elements
// of d at a time; each of the 8 warps takes its own slice of the chunk, and lane l accumulates
// planes l and l + 32 for all 8 rows, so every plane load (coalesced along the contiguous nbits
// axis of planes [d, nbits]) feeds 8 FMAs. The warps' partial sums meet in shared memory in a
// fixed order, then warp w finalises row w: two __ballot_sync of (sum >= 0) give the low and
// high 32 bits of the word. When B is small the (row block, word) grid alone cannot keep the
// GPU's loads in flight, so d is also split across blocks: each writes its sums to the
// workspace [d splits, B, nbits] and simhash_finalize_kernel adds the splits in order and packs
// the bits. Every order is fixed, so codes are deterministic. NaN projections give 0 bits, as in
// the reference.
//
// Pooled (simhash_pooled): the paper's fingerprint f(X) = SimHash(mean_t E(X)_t) over the
// tokens where mask != 0. It is bandwidth-bound on the B*T*d read of embeds, so pass 1
// (masked_sum_kernel) spreads that read over B x column tiles x T splits blocks: each lane
// reads 16 bytes of a token row per load (4 fp32 or 8 fp16/bf16), the 8 warps of a block take
// interleaved tokens, several loads in flight each, and the warps' sums are reduced in shared
// memory; every (T split, row) writes an fp32 partial sum and its token count to the workspace.
// Pass 2 is the projection kernel above, whose loader adds the T splits' partial sums and
// divides by the row's count (count 0 -> divide by 1: the zero vector, every bit set).
// Summation orders differ from torch's, so a bit can differ from the reference only where the
// projection is within fp32 rounding of zero.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_kernels.h"

namespace llmcache {
namespace gpu {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = kWarps;            // rows per projection block: warp w finalises row w
constexpr int kChunk = 256;              // elements of d staged per step
constexpr int kSlice = kChunk / kWarps;  // elements of a chunk each warp projects
constexpr int kUnroll = 4;               // token loads in flight per warp in the masked sum
constexpr int64_t kTargetBlocks = 1024;  // enough blocks to keep every SM's loads in flight
constexpr int64_t kMaxSplits = 64;       // splits of T (masked sum) or of d (projection)
constexpr int64_t kMinTokensPerSplit = 64;

static_assert(kChunk % kWarps == 0, "each warp gets an equal slice of a chunk");

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// ---------------------------------------------------------------- projection
// Lane l holds the projections on planes l (lo) and l + 32 (hi) of one word; lane 0 stores it.
__device__ __forceinline__ void pack_word(float lo, float hi, int lane, int64_t* code) {
  const unsigned bits_lo = __ballot_sync(kFullMask, lo >= 0.0f);
  const unsigned bits_hi = __ballot_sync(kFullMask, hi >= 0.0f);
  if (lane == 0 && code != nullptr)
    *code = static_cast<int64_t>((static_cast<uint64_t>(bits_hi) << 32) | bits_lo);
}

// Loaders give element i of row `row` of the projection's input as fp32.
template <typename T>
struct DenseRows {
  const T* x;  // [B, d]
  int64_t d;
  __device__ float denominator(int64_t) const { return 1.0f; }
  __device__ float operator()(int64_t row, int64_t i, float) const { return to_float(x[row * d + i]); }
};

// The masked mean from pass 1's workspace: sum over splits of partial[s, row, i] / count.
struct PooledRows {
  const float* partial;  // [splits, B, d]
  const int* counts;     // [splits, B]
  int64_t B;
  int64_t d;
  int64_t splits;
  __device__ float denominator(int64_t row) const {
    int64_t count = 0;
    for (int64_t s = 0; s < splits; ++s) count += counts[s * B + row];
    return count > 0 ? static_cast<float>(count) : 1.0f;
  }
  __device__ float operator()(int64_t row, int64_t i, float denom) const {
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += partial[(s * B + row) * d + i];
    return sum / denom;
  }
};

// Sums of rows [row0, row0 + 8) times planes [64 * word, 64 * word + 64) over the d range of
// blockIdx.z: packed into codes when the block covers all of d, else written to sums
// [gridDim.z, B, nbits] for simhash_finalize_kernel.
template <typename Rows>
__global__ void __launch_bounds__(kThreads)
    simhash_project_kernel(Rows rows, int64_t B, int64_t d, int64_t d_per_split,
                           const float* __restrict__ planes, int64_t nbits,
                           int64_t* __restrict__ codes, float* __restrict__ sums) {
  __shared__ float staged[kRows][kChunk];
  __shared__ float partial[kWarps][kRows][64];
  __shared__ float denom[kRows];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t word = blockIdx.y;
  const float* plane_col = planes + word * 64 + lane;

  if (threadIdx.x < kRows) {
    const int64_t row = row0 + threadIdx.x;
    denom[threadIdx.x] = row < B ? rows.denominator(row) : 1.0f;
  }
  float lo[kRows], hi[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) lo[r] = hi[r] = 0.0f;

  const int64_t d_begin = static_cast<int64_t>(blockIdx.z) * d_per_split;
  const int64_t d_end = d < d_begin + d_per_split ? d : d_begin + d_per_split;
  for (int64_t c0 = d_begin; c0 < d_end; c0 += kChunk) {
    const int len = static_cast<int>(d_end - c0 < kChunk ? d_end - c0 : kChunk);
    __syncthreads();  // denominators written / previous chunk consumed
    for (int e = threadIdx.x; e < kRows * kChunk; e += kThreads) {
      const int r = e / kChunk, i = e % kChunk;
      const int64_t row = row0 + r;
      staged[r][i] = (row < B && i < len) ? rows(row, c0 + i, denom[r]) : 0.0f;
    }
    __syncthreads();
    const int i_begin = warp * kSlice;
    const int i_end = len < i_begin + kSlice ? len : i_begin + kSlice;
#pragma unroll 8
    for (int i = i_begin; i < i_end; ++i) {
      const float* p = plane_col + (c0 + i) * nbits;
      const float p_lo = __ldg(p), p_hi = __ldg(p + 32);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        lo[r] = fmaf(staged[r][i], p_lo, lo[r]);
        hi[r] = fmaf(staged[r][i], p_hi, hi[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    partial[warp][r][lane] = lo[r];
    partial[warp][r][lane + 32] = hi[r];
  }
  __syncthreads();
  float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    sum_lo += partial[w][warp][lane];
    sum_hi += partial[w][warp][lane + 32];
  }
  const int64_t row = row0 + warp;
  if (sums != nullptr) {
    if (row < B) {
      float* out = sums + (blockIdx.z * B + row) * nbits + word * 64;
      out[lane] = sum_lo;
      out[lane + 32] = sum_hi;
    }
    return;
  }
  pack_word(sum_lo, sum_hi, lane, row < B ? codes + row * (nbits / 64) + word : nullptr);
}

// Adds the d splits' sums in order; one warp per (row, word).
__global__ void __launch_bounds__(kThreads)
    simhash_finalize_kernel(const float* __restrict__ sums, int64_t splits, int64_t B,
                            int64_t nbits, int64_t* __restrict__ codes) {
  const int lane = threadIdx.x % 32;
  const int64_t words = nbits / 64;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (pair >= B * words) return;  // whole warps leave: no barrier follows
  const int64_t row = pair / words, word = pair % words;
  float sum_lo = 0.0f, sum_hi = 0.0f;
  for (int64_t s = 0; s < splits; ++s) {
    const float* in = sums + (s * B + row) * nbits + word * 64;
    sum_lo += in[lane];
    sum_hi += in[lane + 32];
  }
  pack_word(sum_lo, sum_hi, lane, codes + row * words + word);
}

// How the projection is split; the workspace size and the launch both derive from it.
struct ProjectPlan {
  int64_t row_blocks = 0;
  int64_t words = 0;
  int64_t splits = 1;       // ranges of d
  int64_t d_per_split = 0;  // a multiple of kChunk
  size_t bytes = 0;         // fp32 sums [splits, B, nbits] when splits > 1
};

ProjectPlan plan_project(int64_t B, int64_t d, int64_t nbits) {
  ProjectPlan p;
  p.row_blocks = ceil_div(B, kRows);
  p.words = nbits / 64;
  const int64_t chunks = d > 0 ? ceil_div(d, kChunk) : 1;
  int64_t splits = ceil_div(kTargetBlocks, p.row_blocks * p.words > 0 ? p.row_blocks * p.words : 1);
  splits = splits < chunks ? splits : chunks;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  const int64_t chunks_per_split = ceil_div(chunks, splits);
  p.splits = ceil_div(chunks, chunks_per_split);
  p.d_per_split = chunks_per_split * kChunk;
  if (p.splits > 1) p.bytes = static_cast<size_t>(p.splits * B * nbits) * sizeof(float);
  return p;
}

template <typename Rows>
cudaError_t launch_project(const Rows& rows, int64_t B, int64_t d, const float* planes,
                           int64_t nbits, int64_t* codes, void* workspace, cudaStream_t stream) {
  const ProjectPlan p = plan_project(B, d, nbits);
  if (p.row_blocks > 0x7fffffff || p.words > 65535) return cudaErrorInvalidValue;
  if (p.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  float* sums = p.splits > 1 ? static_cast<float*>(workspace) : nullptr;
  const dim3 grid(static_cast<unsigned>(p.row_blocks), static_cast<unsigned>(p.words),
                  static_cast<unsigned>(p.splits));
  simhash_project_kernel<<<grid, kThreads, 0, stream>>>(rows, B, d, p.d_per_split, planes, nbits,
                                                        codes, sums);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || sums == nullptr) return err;
  const int64_t blocks = ceil_div(B * p.words, kWarps);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  simhash_finalize_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(sums, p.splits, B,
                                                                                 nbits, codes);
  return cudaGetLastError();
}

// ---------------------------------------------------------------- masked sum (pooled pass 1)
template <typename T>
struct Vec {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  static constexpr int kColumns = 32 * kElems;                       // columns per block
};

// Adds the kElems elements of one token row at column `col` into v (zeros where off or past d).
template <typename T, bool kAligned>
__device__ __forceinline__ void load_token(const T* token, int64_t col, int64_t d, bool on,
                                           float (&v)[Vec<T>::kElems]) {
  constexpr int E = Vec<T>::kElems;
  if (kAligned) {
    // d % E == 0 and 16-byte aligned rows: col < d implies the whole vector is in range.
    if (on && col < d) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(token + col));
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < E; ++j) v[j] = to_float(e[j]);
    } else {
#pragma unroll
      for (int j = 0; j < E; ++j) v[j] = 0.0f;
    }
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) v[j] = (on && col + j < d) ? to_float(token[col + j]) : 0.0f;
  }
}

// partial[split, b, cols of this tile] = sum over unmasked tokens t of this split of embeds[b, t];
// counts[split, b] = number of those tokens (written by the first column tile).
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    masked_sum_kernel(const T* __restrict__ embeds, const uint8_t* __restrict__ mask, int64_t B,
                      int64_t T_len, int64_t d, int64_t col_tiles, int64_t tokens_per_split,
                      float* __restrict__ partial, int* __restrict__ counts) {
  constexpr int E = Vec<T>::kElems;
  constexpr int C = Vec<T>::kColumns;
  __shared__ float sums[kWarps][C];
  __shared__ int warp_counts[kWarps];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t b = blockIdx.x / col_tiles;
  const int64_t tile = blockIdx.x % col_tiles;
  const int64_t split = blockIdx.y;
  const int64_t t_begin = split * tokens_per_split;
  const int64_t t_end = T_len < t_begin + tokens_per_split ? T_len : t_begin + tokens_per_split;
  const int64_t col = tile * C + lane * E;
  const T* rows = embeds + b * T_len * d;
  const uint8_t* mask_row = mask + b * T_len;

  float acc[E];
#pragma unroll
  for (int j = 0; j < E; ++j) acc[j] = 0.0f;
  int count = 0;
  for (int64_t t = t_begin + warp; t < t_end; t += kWarps * kUnroll) {
    float v[kUnroll][E];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t tu = t + u * kWarps;
      const bool on = tu < t_end && mask_row[tu] != 0;
      count += on;
      load_token<T, kAligned>(rows + tu * d, col, d, on, v[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < E; ++j) acc[j] += v[u][j];
  }
#pragma unroll
  for (int j = 0; j < E; ++j) sums[warp][lane * E + j] = acc[j];
  if (lane == 0) warp_counts[warp] = count;
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += kThreads) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += sums[w][c];
    const int64_t out_col = tile * C + c;
    if (out_col < d) partial[(split * B + b) * d + out_col] = s;
  }
  if (tile == 0 && threadIdx.x == 0) {
    int total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_counts[w];
    counts[split * B + b] = total;
  }
}

// How pass 1 splits the work; the workspace size and the launch both derive from it.
struct PooledPlan {
  int64_t col_tiles = 1;
  int64_t splits = 1;
  int64_t tokens_per_split = 0;
  size_t partial_bytes = 0;  // fp32 [splits, B, d]
  size_t bytes = 0;          // + int32 counts [splits, B]
};

PooledPlan plan_pooled(int dtype, int64_t B, int64_t T, int64_t d) {
  PooledPlan p;
  const int64_t columns = dtype == kFloat32 ? Vec<float>::kColumns : Vec<__half>::kColumns;
  p.col_tiles = d > 0 ? ceil_div(d, columns) : 1;
  if (T > 0) {
    int64_t splits = ceil_div(kTargetBlocks, B > 0 ? B * p.col_tiles : 1);
    const int64_t by_tokens = ceil_div(T, kMinTokensPerSplit);
    splits = splits < by_tokens ? splits : by_tokens;
    splits = splits < kMaxSplits ? splits : kMaxSplits;
    p.tokens_per_split = ceil_div(T, splits);
    p.splits = ceil_div(T, p.tokens_per_split);
  }
  p.partial_bytes = static_cast<size_t>(p.splits * B * d) * sizeof(float);
  p.bytes = p.partial_bytes + static_cast<size_t>(p.splits * B) * sizeof(int);
  return p;
}

template <typename T>
cudaError_t launch_masked_sum(const void* embeds, const uint8_t* mask, int64_t B, int64_t T_len,
                              int64_t d, const PooledPlan& p, float* partial, int* counts,
                              cudaStream_t stream) {
  const int64_t blocks = B * p.col_tiles;
  if (blocks > 0x7fffffff || p.splits > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.splits));
  const T* e = static_cast<const T*>(embeds);
  const bool aligned = d % Vec<T>::kElems == 0 && reinterpret_cast<uintptr_t>(embeds) % 16 == 0;
  if (aligned) {
    masked_sum_kernel<T, true><<<grid, kThreads, 0, stream>>>(e, mask, B, T_len, d, p.col_tiles,
                                                               p.tokens_per_split, partial, counts);
  } else {
    masked_sum_kernel<T, false><<<grid, kThreads, 0, stream>>>(e, mask, B, T_len, d, p.col_tiles,
                                                                p.tokens_per_split, partial, counts);
  }
  return cudaGetLastError();
}

bool valid_shape(int dtype, int64_t B, int64_t d, int64_t nbits) {
  return (dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16) && B >= 0 && d >= 0 &&
         nbits > 0 && nbits % 64 == 0;
}

// The pooled workspace: pass 1's sums and counts, then the projection's split sums (16-byte
// aligned).
size_t projection_offset(const PooledPlan& p) { return (p.bytes + 15) / 16 * 16; }

}  // namespace

size_t simhash_workspace_bytes(int64_t B, int64_t d, int64_t nbits) {
  if (B <= 0 || d < 0 || nbits <= 0 || nbits % 64 != 0) return 0;
  return plan_project(B, d, nbits).bytes;
}

cudaError_t simhash_cuda(const void* x, int dtype, int64_t B, int64_t d, const float* planes,
                         int64_t nbits, int64_t* codes, void* workspace, cudaStream_t stream) {
  if (!valid_shape(dtype, B, d, nbits)) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  switch (dtype) {
    case kFloat32:
      return launch_project(DenseRows<float>{static_cast<const float*>(x), d}, B, d, planes, nbits,
                            codes, workspace, stream);
    case kFloat16:
      return launch_project(DenseRows<__half>{static_cast<const __half*>(x), d}, B, d, planes,
                            nbits, codes, workspace, stream);
    default:
      return launch_project(DenseRows<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(x), d}, B,
                            d, planes, nbits, codes, workspace, stream);
  }
}

size_t simhash_pooled_workspace_bytes(int dtype, int64_t B, int64_t T, int64_t d, int64_t nbits) {
  if (B <= 0 || T < 0 || d < 0 || nbits <= 0 || nbits % 64 != 0) return 0;
  return projection_offset(plan_pooled(dtype, B, T, d)) + plan_project(B, d, nbits).bytes;
}

cudaError_t simhash_pooled_cuda(const void* embeds, int dtype, const uint8_t* mask, int64_t B,
                                int64_t T, int64_t d, const float* planes, int64_t nbits,
                                int64_t* codes, void* workspace, cudaStream_t stream) {
  if (!valid_shape(dtype, B, d, nbits) || T < 0) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  if (workspace == nullptr) return cudaErrorInvalidValue;
  const PooledPlan p = plan_pooled(dtype, B, T, d);
  char* base = static_cast<char*>(workspace);
  float* partial = reinterpret_cast<float*>(base);
  int* counts = reinterpret_cast<int*>(base + p.partial_bytes);
  cudaError_t err;
  switch (dtype) {
    case kFloat32:
      err = launch_masked_sum<float>(embeds, mask, B, T, d, p, partial, counts, stream);
      break;
    case kFloat16:
      err = launch_masked_sum<__half>(embeds, mask, B, T, d, p, partial, counts, stream);
      break;
    default:
      err = launch_masked_sum<__nv_bfloat16>(embeds, mask, B, T, d, p, partial, counts, stream);
      break;
  }
  if (err != cudaSuccess) return err;
  return launch_project(PooledRows{partial, counts, B, d, p.splits}, B, d, planes, nbits, codes,
                        base + projection_offset(p), stream);
}

}  // namespace gpu
}  // namespace llmcache
