// Hamming top-k over a bank of SimHash codes on the GPU, with a fused selection.
//
// d(q, b) = sum_w popc(q[w] XOR b[w]) over the W <= 16 64-bit words. An answer is the 64-bit key
// (d << 40) | n: keys are unique per bank row and order by distance, then by the smaller index,
// so "the k smallest keys among the eligible rows" is exactly reference.hamming_topk (ties
// included). Ineligible rows get the key ~0, which never enters a list.
//
// Pass 1 (hamming_scan_kernel): the grid is (query groups) x (bank splits). A block of 8 warps
// serves 1, 2, 4 or 8 queries (fewer when B is small, so that a lone query still gets 8 warps)
// over one contiguous range of the bank. It walks that range in tiles of 256 rows staged in
// shared memory word-major with an odd padded stride ([W][257]: lane r reads word w of row r,
// conflict free), together with the rows' valid flags and tags. Every warp holds its query's
// words in registers and scores 32 rows per step with __popcll (the faiss BinaryDistance idea:
// one staged tile serves every query of the block). Each warp keeps its running top-k as a
// sorted list spread over the lanes' registers (element j in lane j % 32, register j / 32) and
// offers the 32 new keys in one step: a ballot against the current k-th key filters them, and
// each survivor is inserted by a ballot-count of its position and a one-place shift made of
// shuffles. Lists only shrink their k-th key, so any order of insertion ends with the exact k
// smallest keys. The warps serving one query merge their lists through shared memory; a bank
// kept in one split writes the answers directly, otherwise each split writes its sorted keys
// to the workspace [splits, B, k].
// Pass 2 (hamming_merge_kernel, only with several splits): one block per query; its warps
// offer the splits' lists (a sorted list stops at its first key above the k-th), merge in
// shared memory, and write dist = key >> 40, idx = key & (2^40 - 1), or the missing answer
// (dist = 64 * W + 1, idx = -1) for the positions no eligible row filled.
//
// Limits: k <= kHammingMaxK = 256 (the list takes k / 32 registers per lane), W <= 16, N < 2^40.
#include "cuda_kernels.h"

namespace llmcache {
namespace gpu {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 256;             // bank rows staged per step
constexpr int kTileStride = kTile + 1;  // odd stride: word-major stores do not pile on one bank
constexpr int kIndexBits = 40;
constexpr uint64_t kIndexMask = (uint64_t{1} << kIndexBits) - 1;
constexpr uint64_t kNoKey = ~uint64_t{0};
constexpr int64_t kTargetBlocks = 1024;     // pass-1 blocks to aim for (several per SM)
constexpr int64_t kMinRowsPerSplit = 2048;  // a split's rows amortise filling its list
constexpr int64_t kMaxSplits = 512;         // bounds pass 2's work per query

static_assert(kThreads == kTile, "the tile's flags are staged one row per thread");
static_assert(kHammingMaxK <= 8 * 32, "lists hold at most 8 registers per lane");

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A warp's running k smallest keys, ascending: element j is v[j / 32] of lane j % 32. Slots
// beyond k hold larger keys or kNoKey and are never read out. All members are warp-uniform
// except v, and every method must be called by the whole warp.
template <int KR>
struct WarpTopK {
  uint64_t v[KR];
  uint64_t kth;  // element k - 1: a key enters only when strictly smaller
  int k;
  int lane;

  __device__ WarpTopK(int k_, int lane_) : kth(kNoKey), k(k_), lane(lane_) {
#pragma unroll
    for (int s = 0; s < KR; ++s) v[s] = kNoKey;
  }

  __device__ uint64_t element_k_minus_1() const {
    const int slot = (k - 1) / 32;
    uint64_t mine = v[0];
#pragma unroll
    for (int s = 1; s < KR; ++s)
      if (s == slot) mine = v[s];
    return __shfl_sync(kFullMask, mine, (k - 1) % 32);
  }

  // Insert x (warp-uniform, x < kth, not already present): the list stays sorted, its last
  // element drops out.
  __device__ void insert(uint64_t x) {
    int pos = 0;
#pragma unroll
    for (int s = 0; s < KR; ++s) pos += __popc(__ballot_sync(kFullMask, v[s] < x));
    uint64_t shifted[KR];
#pragma unroll
    for (int s = 0; s < KR; ++s) {
      const uint64_t up = __shfl_up_sync(kFullMask, v[s], 1);
      const uint64_t carry = __shfl_sync(kFullMask, v[s > 0 ? s - 1 : 0], 31);
      const uint64_t prev = lane == 0 ? carry : up;  // element j - 1 (unused for j = 0)
      const int j = s * 32 + lane;
      shifted[s] = j < pos ? v[s] : (j == pos ? x : prev);
    }
#pragma unroll
    for (int s = 0; s < KR; ++s) v[s] = shifted[s];
    kth = element_k_minus_1();
  }

  // Each lane offers one key (kNoKey to offer nothing); keys must be new to the list.
  __device__ void offer(uint64_t key) {
    unsigned pending = __ballot_sync(kFullMask, key < kth);
    while (pending) {
      const int src = __ffs(pending) - 1;
      insert(__shfl_sync(kFullMask, key, src));
      pending &= pending - 1;
      pending &= __ballot_sync(kFullMask, key < kth);
    }
  }

  // The list's first k elements, kNoKey beyond, as list[j] for j < 32 * KR.
  __device__ void store(uint64_t* list) const {
#pragma unroll
    for (int s = 0; s < KR; ++s) {
      const int j = s * 32 + lane;
      list[j] = j < k ? v[s] : kNoKey;
    }
  }

  // Offer another warp's stored list.
  __device__ void offer_list(const uint64_t* list) {
#pragma unroll
    for (int s = 0; s < KR; ++s) offer(list[s * 32 + lane]);
  }

  // Final answers of query b: dist/idx [B, k] rows, or sorted keys into partial.
  __device__ void write(int64_t b, int32_t missing, int32_t* dist, int64_t* idx) const {
#pragma unroll
    for (int s = 0; s < KR; ++s) {
      const int j = s * 32 + lane;
      if (j >= k) continue;
      const uint64_t key = v[s];
      const bool found = key != kNoKey;
      dist[b * k + j] = found ? static_cast<int32_t>(key >> kIndexBits) : missing;
      idx[b * k + j] = found ? static_cast<int64_t>(key & kIndexMask) : int64_t{-1};
    }
  }
  __device__ void write_keys(uint64_t* keys) const {
#pragma unroll
    for (int s = 0; s < KR; ++s) {
      const int j = s * 32 + lane;
      if (j < k) keys[j] = v[s];
    }
  }
};

template <int W, int KR>
struct ScanSmem {
  static constexpr int kBankBytes = W * kTileStride * 8;
  static constexpr int kListBytes = kWarps * KR * 32 * 8;
  static constexpr int kBytes = kBankBytes > kListBytes ? kBankBytes : kListBytes;
};

template <int W, int KR>
__global__ void __launch_bounds__(kThreads)
    hamming_scan_kernel(const uint64_t* __restrict__ queries, int64_t B,
                        const uint64_t* __restrict__ bank, int64_t N, int k,
                        const uint8_t* __restrict__ valid, const int64_t* __restrict__ query_tag,
                        const int64_t* __restrict__ bank_tag, int queries_per_block,
                        int64_t rows_per_split, uint64_t* __restrict__ partial,
                        int32_t* __restrict__ dist, int64_t* __restrict__ idx) {
  // The staged tile, and at the end the warps' lists (after the last tile is consumed).
  __shared__ __align__(16) unsigned char smem[ScanSmem<W, KR>::kBytes];
  __shared__ int64_t tile_tag[kTile];
  __shared__ uint8_t tile_ok[kTile];
  uint64_t* tile = reinterpret_cast<uint64_t*>(smem);  // [W][kTileStride]
  uint64_t* lists = reinterpret_cast<uint64_t*>(smem);  // [kWarps][KR * 32]

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warps_per_query = kWarps / queries_per_block;
  const int part = warp % warps_per_query;  // which rows of a tile this warp scores
  const int64_t b = static_cast<int64_t>(blockIdx.x) * queries_per_block + warp / warps_per_query;
  const bool active = b < B;  // warp-uniform
  const bool tags = bank_tag != nullptr;

  uint64_t q[W];
#pragma unroll
  for (int w = 0; w < W; ++w) q[w] = active ? queries[b * W + w] : 0;
  const int64_t qtag = (tags && active) ? query_tag[b] : 0;
  WarpTopK<KR> top(k, lane);

  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t n_end = N < n_begin + rows_per_split ? N : n_begin + rows_per_split;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
    const int rows = static_cast<int>(n_end - n0 < kTile ? n_end - n0 : kTile);
    __syncthreads();  // the previous tile is consumed
    const uint64_t* src = bank + n0 * W;
    for (int e = threadIdx.x; e < rows * W; e += kThreads) tile[(e % W) * kTileStride + e / W] = src[e];
    if (threadIdx.x < rows) {
      const int64_t n = n0 + threadIdx.x;
      tile_ok[threadIdx.x] = valid == nullptr || valid[n] != 0;
      if (tags) tile_tag[threadIdx.x] = bank_tag[n];
    }
    __syncthreads();
    if (!active) continue;
    for (int r0 = part * 32; r0 < rows; r0 += warps_per_query * 32) {
      const int r = r0 + lane;
      uint64_t key = kNoKey;
      if (r < rows && tile_ok[r] && (!tags || tile_tag[r] == qtag)) {
        int d = 0;
#pragma unroll
        for (int w = 0; w < W; ++w) d += __popcll(q[w] ^ tile[w * kTileStride + r]);
        key = (static_cast<uint64_t>(d) << kIndexBits) | static_cast<uint64_t>(n0 + r);
      }
      top.offer(key);
    }
  }

  __syncthreads();  // the tile's memory now holds the lists
  top.store(lists + warp * KR * 32);
  __syncthreads();
  if (!active || part != 0) return;
  for (int p = 1; p < warps_per_query; ++p) top.offer_list(lists + (warp + p) * KR * 32);
  if (partial != nullptr) {
    top.write_keys(partial + (static_cast<int64_t>(blockIdx.y) * B + b) * k);
  } else {
    top.write(b, 64 * W + 1, dist, idx);
  }
}

template <int KR>
__global__ void __launch_bounds__(kThreads)
    hamming_merge_kernel(const uint64_t* __restrict__ partial, int64_t splits, int64_t B, int k,
                         int32_t missing, int32_t* __restrict__ dist, int64_t* __restrict__ idx) {
  __shared__ uint64_t lists[kWarps][KR * 32];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t b = blockIdx.x;
  WarpTopK<KR> top(k, lane);
  for (int64_t s = warp; s < splits; s += kWarps) {
    const uint64_t* keys = partial + (s * B + b) * k;
    for (int c = 0; c < k; c += 32) {
      const uint64_t key = c + lane < k ? keys[c + lane] : kNoKey;
      // Lists are sorted: once a chunk starts at or above the k-th key, so does the rest.
      if (__shfl_sync(kFullMask, key, 0) >= top.kth) break;
      top.offer(key);
    }
  }
  top.store(&lists[warp][0]);
  __syncthreads();
  if (warp != 0) return;
  for (int p = 1; p < kWarps; ++p) top.offer_list(&lists[p][0]);
  top.write(b, missing, dist, idx);
}

// How the bank and the queries are split; the workspace size and the launch both derive from it.
struct Plan {
  int queries_per_block = 1;
  int64_t query_blocks = 0;
  int64_t splits = 1;
  int64_t rows_per_split = kTile;
  size_t workspace_bytes = 0;
};

Plan make_plan(int64_t B, int64_t N, int64_t k) {
  Plan p;
  while (p.queries_per_block < kWarps && p.queries_per_block < B) p.queries_per_block *= 2;
  p.query_blocks = ceil_div(B, p.queries_per_block);
  int64_t splits = ceil_div(kTargetBlocks, p.query_blocks > 0 ? p.query_blocks : 1);
  const int64_t by_rows = N > kMinRowsPerSplit ? ceil_div(N, kMinRowsPerSplit) : 1;
  splits = splits < by_rows ? splits : by_rows;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  p.rows_per_split = ceil_div(ceil_div(N > 0 ? N : 1, splits), kTile) * kTile;
  p.splits = N > 0 ? ceil_div(N, p.rows_per_split) : 1;
  if (p.splits > 1) p.workspace_bytes = static_cast<size_t>(p.splits * B * k) * sizeof(uint64_t);
  return p;
}

struct Args {
  const uint64_t* queries;
  int64_t B;
  const uint64_t* bank;
  int64_t N;
  int k;
  const uint8_t* valid;
  const int64_t* query_tag;
  const int64_t* bank_tag;
  int32_t* dist;
  int64_t* idx;
  uint64_t* partial;
};

template <int W, int KR>
cudaError_t launch(const Args& a, const Plan& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.query_blocks), static_cast<unsigned>(p.splits));
  uint64_t* partial = p.splits > 1 ? a.partial : nullptr;
  hamming_scan_kernel<W, KR><<<grid, kThreads, 0, stream>>>(
      a.queries, a.B, a.bank, a.N, a.k, a.valid, a.query_tag, a.bank_tag, p.queries_per_block,
      p.rows_per_split, partial, a.dist, a.idx);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.splits == 1) return err;
  hamming_merge_kernel<KR><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(
      a.partial, p.splits, a.B, a.k, 64 * W + 1, a.dist, a.idx);
  return cudaGetLastError();
}

template <int KR>
cudaError_t launch_words(int64_t W, const Args& a, const Plan& p, cudaStream_t stream) {
  switch (W) {
#define LLMCACHE_WORDS_CASE(w) \
  case w:                      \
    return launch<w, KR>(a, p, stream);
    LLMCACHE_WORDS_CASE(1) LLMCACHE_WORDS_CASE(2) LLMCACHE_WORDS_CASE(3) LLMCACHE_WORDS_CASE(4)
    LLMCACHE_WORDS_CASE(5) LLMCACHE_WORDS_CASE(6) LLMCACHE_WORDS_CASE(7) LLMCACHE_WORDS_CASE(8)
    LLMCACHE_WORDS_CASE(9) LLMCACHE_WORDS_CASE(10) LLMCACHE_WORDS_CASE(11) LLMCACHE_WORDS_CASE(12)
    LLMCACHE_WORDS_CASE(13) LLMCACHE_WORDS_CASE(14) LLMCACHE_WORDS_CASE(15) LLMCACHE_WORDS_CASE(16)
#undef LLMCACHE_WORDS_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

size_t hamming_topk_workspace_bytes(int64_t B, int64_t N, int64_t k) {
  if (B <= 0 || N < 0 || k < 1 || k > kHammingMaxK) return 0;
  return make_plan(B, N, k).workspace_bytes;
}

cudaError_t hamming_topk_cuda(const int64_t* queries, int64_t B, const int64_t* bank, int64_t N,
                              int64_t W, int64_t k, const uint8_t* valid,
                              const int64_t* query_tag, const int64_t* bank_tag, int32_t* dist,
                              int64_t* idx, void* workspace, cudaStream_t stream) {
  if (B < 0 || N < 0 || N >= kHammingMaxRows || W < 1 || W > kHammingMaxWords || k < 1 ||
      k > kHammingMaxK || (query_tag == nullptr) != (bank_tag == nullptr))
    return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  const Plan p = make_plan(B, N, k);
  if (p.query_blocks > 0x7fffffff || (p.workspace_bytes > 0 && workspace == nullptr))
    return cudaErrorInvalidValue;
  const Args a{reinterpret_cast<const uint64_t*>(queries),
               B,
               reinterpret_cast<const uint64_t*>(bank),
               N,
               static_cast<int>(k),
               valid,
               query_tag,
               bank_tag,
               dist,
               idx,
               static_cast<uint64_t*>(workspace)};
  if (k <= 32) return launch_words<1>(W, a, p, stream);
  if (k <= 64) return launch_words<2>(W, a, p, stream);
  if (k <= 128) return launch_words<4>(W, a, p, stream);
  return launch_words<8>(W, a, p, stream);
}

}  // namespace gpu
}  // namespace llmcache
