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
// workspace [d splits, B, nbits], and the last block of a (row block, word) to finish (a ticket
// counter per pair, taken with atomicAdd after a __threadfence, the CUDA guide's "last block"
// reduction) adds the splits in order and packs the bits, so no second kernel runs. Every order
// is fixed, so codes are deterministic. NaN projections give 0 bits, as in the reference.
//
// Pooled (simhash_pooled): the paper's fingerprint f(X) = SimHash(mean_t E(X)_t) over the
// tokens where mask != 0. The mean is the masked sum times 1 / count, a positive factor, so
// its projections have the signs of the sum's: the kernels hash the masked sum and never count
// (an empty row sums to the zero vector: every bit set, as the reference's mean of 0). Only a
// sum beyond the fp32 range (|sum| > 3.4e38) could differ from the mean's sign. It takes two
// launches. Pass 1 (masked_sum_kernel) is bandwidth-bound on the B*T*d read of embeds and
// spreads it over B x column tiles x T splits blocks: each lane reads 16 bytes of a token row per
// load (4 fp32 or 8 fp16/bf16), the 8 warps of a block take interleaved tokens, several loads in
// flight each, and the warps' sums are reduced in shared memory; every (T split, row) writes an
// fp32 partial sum to the workspace. The mask is read as it comes (1, 2, 4 or 8-byte integers,
// bool included), and pass 1 also zeroes the projection's tickets. Pass 2 is the projection
// kernel above, whose loader adds the T splits' partial sums. Summation orders differ from
// torch's, so a bit can differ from the reference only where the projection is within fp32
// rounding of zero.
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
inline size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

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
  __device__ float operator()(int64_t row, int64_t i) const { return to_float(x[row * d + i]); }
};

// The masked sum from pass 1's workspace: sum over T splits s of partial[s, row, i], in order.
struct PooledRows {
  const float* partial;  // [splits, B, d]
  int64_t B;
  int64_t d;
  int64_t splits;
  __device__ float operator()(int64_t row, int64_t i) const {
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += partial[(s * B + row) * d + i];
    return sum;
  }
};

// Sums of rows [row0, row0 + 8) times planes [64 * word, 64 * word + 64) over the d range of
// blockIdx.z, packed into codes when the block covers all of d (sums == nullptr). Otherwise they
// go to sums [gridDim.z, B, nbits] and the last of the gridDim.z blocks of this (row block, word)
// to take its ticket (tickets[blockIdx.x * gridDim.y + blockIdx.y], zero before the launch) adds
// them in split order and packs them.
template <typename Rows>
__global__ void __launch_bounds__(kThreads, 2)
    simhash_project_kernel(Rows rows, int64_t B, int64_t d, int64_t d_per_split,
                           const float* __restrict__ planes, int64_t nbits,
                           int64_t* __restrict__ codes, float* sums,
                           unsigned* __restrict__ tickets) {
  __shared__ float staged[kRows][kChunk];
  __shared__ float partial[kWarps][kRows][64];
  __shared__ bool last;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t word = blockIdx.y;
  const int64_t words = nbits / 64;
  const float* plane_col = planes + word * 64 + lane;

  float lo[kRows], hi[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) lo[r] = hi[r] = 0.0f;

  const int64_t d_begin = static_cast<int64_t>(blockIdx.z) * d_per_split;
  const int64_t d_end = d < d_begin + d_per_split ? d : d_begin + d_per_split;
  for (int64_t c0 = d_begin; c0 < d_end; c0 += kChunk) {
    const int len = static_cast<int>(d_end - c0 < kChunk ? d_end - c0 : kChunk);
    __syncthreads();  // the previous chunk is consumed
    for (int e = threadIdx.x; e < kRows * kChunk; e += kThreads) {
      const int r = e / kChunk, i = e % kChunk;
      const int64_t row = row0 + r;
      staged[r][i] = (row < B && i < len) ? rows(row, c0 + i) : 0.0f;
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
  const int64_t row = row0 + warp;  // warp-uniform
  if (sums == nullptr) {
    pack_word(sum_lo, sum_hi, lane, row < B ? codes + row * words + word : nullptr);
    return;
  }
  if (row < B) {
    float* out = sums + (blockIdx.z * B + row) * nbits + word * 64;
    out[lane] = sum_lo;
    out[lane + 32] = sum_hi;
  }
  __threadfence();  // this block's sums are visible device-wide before its ticket is taken
  __syncthreads();
  if (threadIdx.x == 0)
    last = atomicAdd(tickets + blockIdx.x * gridDim.y + blockIdx.y, 1u) == gridDim.z - 1;
  __syncthreads();
  if (!last || row >= B) return;  // whole warps leave: no barrier follows
  __threadfence();
  sum_lo = sum_hi = 0.0f;
  for (int64_t s = 0; s < gridDim.z; ++s) {
    // L2 loads: other blocks wrote these after this SM's L1 could have cached anything here.
    const float* in = sums + (s * B + row) * nbits + word * 64;
    sum_lo += __ldcg(in + lane);
    sum_hi += __ldcg(in + lane + 32);
  }
  pack_word(sum_lo, sum_hi, lane, codes + row * words + word);
}

// How the projection is split; the workspace size and the launch both derive from it.
struct ProjectPlan {
  int64_t row_blocks = 0;
  int64_t words = 0;
  int64_t splits = 1;        // ranges of d
  int64_t d_per_split = 0;   // a multiple of kChunk
  size_t sums_bytes = 0;     // fp32 sums [splits, B, nbits] when splits > 1
  int64_t tickets = 0;       // uint32 [row_blocks * words] after the sums, when splits > 1
  size_t bytes = 0;
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
  if (p.splits > 1) {
    p.sums_bytes = align16(static_cast<size_t>(p.splits * B * nbits) * sizeof(float));
    p.tickets = p.row_blocks * p.words;
    p.bytes = p.sums_bytes + static_cast<size_t>(p.tickets) * sizeof(unsigned);
  }
  return p;
}

unsigned* tickets_of(const ProjectPlan& p, void* workspace) {
  return p.splits > 1 ? reinterpret_cast<unsigned*>(static_cast<char*>(workspace) + p.sums_bytes)
                      : nullptr;
}

// Launches the projection; with several d splits its tickets must already be zero.
template <typename Rows>
cudaError_t launch_project(const Rows& rows, int64_t B, int64_t d, const float* planes,
                           int64_t nbits, int64_t* codes, const ProjectPlan& p, void* workspace,
                           cudaStream_t stream) {
  if (p.row_blocks > 0x7fffffff || p.words > 65535) return cudaErrorInvalidValue;
  if (p.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  float* sums = p.splits > 1 ? static_cast<float*>(workspace) : nullptr;
  const dim3 grid(static_cast<unsigned>(p.row_blocks), static_cast<unsigned>(p.words),
                  static_cast<unsigned>(p.splits));
  simhash_project_kernel<<<grid, kThreads, 0, stream>>>(rows, B, d, p.d_per_split, planes, nbits,
                                                        codes, sums, tickets_of(p, workspace));
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

// mask[i] != 0 for a mask of 1, 2, 4 or 8-byte integers (bool is one byte of 0 or 1).
__device__ __forceinline__ bool mask_on(const void* mask, int mask_bytes, int64_t i) {
  switch (mask_bytes) {
    case 8:
      return static_cast<const int64_t*>(mask)[i] != 0;
    case 4:
      return static_cast<const int32_t*>(mask)[i] != 0;
    case 2:
      return static_cast<const int16_t*>(mask)[i] != 0;
    default:
      return static_cast<const uint8_t*>(mask)[i] != 0;
  }
}

// partial[split, b, cols of this tile] = sum over unmasked tokens t of this split of embeds[b, t].
// The grid also zeroes tickets[0, n_tickets) for the projection that follows.
// Both kernels state 2 blocks per SM (<= 128 registers): with __launch_bounds__(256) alone,
// ptxas 13 spills the unaligned bf16 pass 1 at 80 registers.
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads, 2)
    masked_sum_kernel(const T* __restrict__ embeds, const void* __restrict__ mask, int mask_bytes,
                      int64_t B, int64_t T_len, int64_t d, int64_t col_tiles,
                      int64_t tokens_per_split, float* __restrict__ partial,
                      unsigned* __restrict__ tickets, int64_t n_tickets) {
  constexpr int E = Vec<T>::kElems;
  constexpr int C = Vec<T>::kColumns;
  __shared__ float sums[kWarps][C];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t linear_block = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t grid_threads = static_cast<int64_t>(gridDim.x) * gridDim.y * kThreads;
  for (int64_t i = linear_block * kThreads + threadIdx.x; i < n_tickets; i += grid_threads) tickets[i] = 0;

  const int64_t b = blockIdx.x / col_tiles;
  const int64_t tile = blockIdx.x % col_tiles;
  const int64_t split = blockIdx.y;
  const int64_t t_begin = split * tokens_per_split;
  const int64_t t_end = T_len < t_begin + tokens_per_split ? T_len : t_begin + tokens_per_split;
  const int64_t col = tile * C + lane * E;
  const T* rows = embeds + b * T_len * d;

  float acc[E];
#pragma unroll
  for (int j = 0; j < E; ++j) acc[j] = 0.0f;
  for (int64_t t = t_begin + warp; t < t_end; t += kWarps * kUnroll) {
    float v[kUnroll][E];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t tu = t + u * kWarps;
      const bool on = tu < t_end && mask_on(mask, mask_bytes, b * T_len + tu);
      load_token<T, kAligned>(rows + tu * d, col, d, on, v[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < E; ++j) acc[j] += v[u][j];
  }
#pragma unroll
  for (int j = 0; j < E; ++j) sums[warp][lane * E + j] = acc[j];
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += kThreads) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += sums[w][c];
    const int64_t out_col = tile * C + c;
    if (out_col < d) partial[(split * B + b) * d + out_col] = s;
  }
}

// How pass 1 splits the work; the workspace size and the launch both derive from it.
struct PooledPlan {
  int64_t col_tiles = 1;
  int64_t splits = 1;
  int64_t tokens_per_split = 0;
  size_t bytes = 0;  // fp32 partial sums [splits, B, d], padded to 16 bytes
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
  p.bytes = align16(static_cast<size_t>(p.splits * B * d) * sizeof(float));
  return p;
}

template <typename T>
cudaError_t launch_masked_sum(const void* embeds, const void* mask, int mask_bytes, int64_t B,
                              int64_t T_len, int64_t d, const PooledPlan& p, float* partial,
                              unsigned* tickets, int64_t n_tickets, cudaStream_t stream) {
  const int64_t blocks = B * p.col_tiles;
  if (blocks > 0x7fffffff || p.splits > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.splits));
  const T* e = static_cast<const T*>(embeds);
  const bool aligned = d % Vec<T>::kElems == 0 && reinterpret_cast<uintptr_t>(embeds) % 16 == 0;
  if (aligned) {
    masked_sum_kernel<T, true><<<grid, kThreads, 0, stream>>>(
        e, mask, mask_bytes, B, T_len, d, p.col_tiles, p.tokens_per_split, partial, tickets, n_tickets);
  } else {
    masked_sum_kernel<T, false><<<grid, kThreads, 0, stream>>>(
        e, mask, mask_bytes, B, T_len, d, p.col_tiles, p.tokens_per_split, partial, tickets, n_tickets);
  }
  return cudaGetLastError();
}

bool valid_shape(int dtype, int64_t B, int64_t d, int64_t nbits) {
  return (dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16) && B >= 0 && d >= 0 &&
         nbits > 0 && nbits % 64 == 0;
}

}  // namespace

std::array<int64_t, 6> simhash_plan(int64_t B, int64_t d, int64_t nbits) {
  const ProjectPlan p = plan_project(B, d, nbits);
  return {p.row_blocks, p.words, p.splits, p.d_per_split, static_cast<int64_t>(p.sums_bytes), p.tickets};
}

std::array<int64_t, 4> simhash_pooled_plan(int dtype, int64_t B, int64_t T, int64_t d) {
  const PooledPlan p = plan_pooled(dtype, B, T, d);
  return {p.col_tiles, p.splits, p.tokens_per_split, static_cast<int64_t>(p.bytes)};
}

size_t simhash_workspace_bytes(int64_t B, int64_t d, int64_t nbits) {
  if (B <= 0 || d < 0 || nbits <= 0 || nbits % 64 != 0) return 0;
  return plan_project(B, d, nbits).bytes;
}

cudaError_t simhash_cuda(const void* x, int dtype, int64_t B, int64_t d, const float* planes,
                         int64_t nbits, int64_t* codes, void* workspace, cudaStream_t stream) {
  if (!valid_shape(dtype, B, d, nbits)) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  const ProjectPlan p = plan_project(B, d, nbits);
  if (p.splits > 1) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    const cudaError_t err =
        cudaMemsetAsync(tickets_of(p, workspace), 0, p.tickets * sizeof(unsigned), stream);
    if (err != cudaSuccess) return err;
  }
  switch (dtype) {
    case kFloat32:
      return launch_project(DenseRows<float>{static_cast<const float*>(x), d}, B, d, planes, nbits,
                            codes, p, workspace, stream);
    case kFloat16:
      return launch_project(DenseRows<__half>{static_cast<const __half*>(x), d}, B, d, planes,
                            nbits, codes, p, workspace, stream);
    default:
      return launch_project(DenseRows<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(x), d}, B,
                            d, planes, nbits, codes, p, workspace, stream);
  }
}

size_t simhash_pooled_workspace_bytes(int dtype, int64_t B, int64_t T, int64_t d, int64_t nbits) {
  if (B <= 0 || T < 0 || d < 0 || nbits <= 0 || nbits % 64 != 0) return 0;
  return plan_pooled(dtype, B, T, d).bytes + plan_project(B, d, nbits).bytes;
}

cudaError_t simhash_pooled_cuda(const void* embeds, int dtype, const void* mask, int mask_bytes,
                                int64_t B, int64_t T, int64_t d, const float* planes,
                                int64_t nbits, int64_t* codes, void* workspace,
                                cudaStream_t stream) {
  if (!valid_shape(dtype, B, d, nbits) || T < 0) return cudaErrorInvalidValue;
  if (mask_bytes != 1 && mask_bytes != 2 && mask_bytes != 4 && mask_bytes != 8)
    return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  const PooledPlan pooled = plan_pooled(dtype, B, T, d);
  const ProjectPlan project = plan_project(B, d, nbits);
  if (workspace == nullptr && pooled.bytes + project.bytes > 0) return cudaErrorInvalidValue;
  // [pass 1's partial sums][the projection's sums and tickets]
  float* partial = static_cast<float*>(workspace);
  void* project_space = workspace != nullptr ? static_cast<char*>(workspace) + pooled.bytes : nullptr;
  unsigned* tickets = tickets_of(project, project_space);
  cudaError_t err;
  switch (dtype) {
    case kFloat32:
      err = launch_masked_sum<float>(embeds, mask, mask_bytes, B, T, d, pooled, partial, tickets,
                                     project.tickets, stream);
      break;
    case kFloat16:
      err = launch_masked_sum<__half>(embeds, mask, mask_bytes, B, T, d, pooled, partial, tickets,
                                      project.tickets, stream);
      break;
    default:
      err = launch_masked_sum<__nv_bfloat16>(embeds, mask, mask_bytes, B, T, d, pooled, partial,
                                             tickets, project.tickets, stream);
      break;
  }
  if (err != cudaSuccess) return err;
  return launch_project(PooledRows{partial, B, d, pooled.splits}, B, d, planes, nbits, codes,
                        project, project_space, stream);
}

}  // namespace gpu
}  // namespace llmcache
