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
// conflict free), together with the rows' valid flags and tags. The tiles are double-buffered
// through registers: each thread issues its loads of tile i + 1 before the block scores tile i,
// so a block waits on DRAM once per split rather than once per tile (the bank's words would need
// two [W][257] tiles, 66 KB at W = 16, to double-buffer in static shared memory). Every warp
// holds its query's words in registers and scores 32 rows per step with __popcll (the faiss
// BinaryDistance idea: one staged tile serves every query of the block). Each warp keeps its
// running top-k as a sorted list spread over the lanes' registers (element j in lane j % 32,
// register j / 32) and offers the 32 new keys in one step: a ballot against the current k-th key
// filters them, and each survivor is inserted by a ballot-count of its position and a one-place
// shift made of shuffles. Lists only shrink their k-th key, so any order of insertion ends with
// the exact k smallest keys. The warps serving one query merge their lists through shared memory
// in a tree (log2 of the warps per query rounds); a bank kept in one split writes the answers
// directly, otherwise each split writes its sorted keys to the workspace [B, splits, k].
// Pass 2 (hamming_merge_kernel, only with several splits): one block per query reads that
// query's splits * k keys as one contiguous array, 2 coalesced loads per lane in flight and the
// next step's loads issued before the current step's keys are offered, so the whole merge waits
// on L2 about once per (splits * k / 512) keys instead of once per split (at B = 1, N = 2^20 that
// is one round trip where walking the 512 splits serially per warp took 64). The 8 warps' lists
// merge in a tree as in pass 1 and warp 0 writes dist = key >> 40, idx = key & (2^40 - 1), or the
// missing answer (dist = 64 * W + 1, idx = -1) for the positions no eligible row filled.
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
constexpr int kMergeLoads = 2;              // keys per lane per pass-2 step

static_assert(kThreads == kTile, "the tile's flags are staged one row per thread");
static_assert(kHammingMaxK <= 8 * 32, "lists hold at most 8 registers per lane");

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A warp's running k smallest keys, ascending: element j is v[j / 32] of lane j % 32. Slots
// beyond k hold larger keys or kNoKey and are never read out. All members are warp-uniform
// except v, and every method must be called by the whole warp. The methods are forced inline:
// a call would pass the list through the ABI stack (ptxas reports it as spills).
template <int KR>
struct WarpTopK {
  uint64_t v[KR];
  uint64_t kth;  // element k - 1: a key enters only when strictly smaller
  int k;
  int lane;

  __device__ __forceinline__ WarpTopK(int k_, int lane_) : kth(kNoKey), k(k_), lane(lane_) {
#pragma unroll
    for (int s = 0; s < KR; ++s) v[s] = kNoKey;
  }

  __device__ __forceinline__ uint64_t element_k_minus_1() const {
    const int slot = (k - 1) / 32;
    uint64_t mine = v[0];
#pragma unroll
    for (int s = 1; s < KR; ++s)
      if (s == slot) mine = v[s];
    return __shfl_sync(kFullMask, mine, (k - 1) % 32);
  }

  // Insert x (warp-uniform, x < kth, not already present): the list stays sorted, its last
  // element drops out.
  __device__ __forceinline__ void insert(uint64_t x) {
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
  __device__ __forceinline__ void offer(uint64_t key) {
    unsigned pending = __ballot_sync(kFullMask, key < kth);
    while (pending) {
      const int src = __ffs(pending) - 1;
      insert(__shfl_sync(kFullMask, key, src));
      pending &= pending - 1;
      pending &= __ballot_sync(kFullMask, key < kth);
    }
  }

  // The list's first k elements, kNoKey beyond, as list[j] for j < 32 * KR.
  __device__ __forceinline__ void store(uint64_t* list) const {
#pragma unroll
    for (int s = 0; s < KR; ++s) {
      const int j = s * 32 + lane;
      list[j] = j < k ? v[s] : kNoKey;
    }
  }

  // Offer another warp's stored list.
  __device__ __forceinline__ void offer_list(const uint64_t* list) {
#pragma unroll
    for (int s = 0; s < KR; ++s) offer(list[s * 32 + lane]);
  }

  // Final answers of query b: dist/idx [B, k] rows, or sorted keys into partial.
  __device__ __forceinline__ void write(int64_t b, int32_t missing, int32_t* dist, int64_t* idx) const {
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
  __device__ __forceinline__ void write_keys(uint64_t* keys) const {
#pragma unroll
    for (int s = 0; s < KR; ++s) {
      const int j = s * 32 + lane;
      if (j < k) keys[j] = v[s];
    }
  }
};

// Merges the lists of `width` consecutive warps (a power of two, block-uniform) into the first
// of them, `part` being a warp's position in its group: in round r, warps whose part is a
// multiple of 2^(r+1) take the list of the warp 2^r after them, so a round reads only lists that
// no warp writes in it. Every thread of the block must call this (it holds the barriers); the
// caller's __syncthreads must separate `lists` from any earlier use of its memory.
template <int KR>
__device__ __forceinline__ void merge_warp_lists(WarpTopK<KR>& top, uint64_t* lists, int warp,
                                                 int part, int width, bool active) {
  top.store(lists + warp * KR * 32);
  for (int step = 1; step < width; step *= 2) {
    __syncthreads();
    if (active && part % (2 * step) == 0) {
      top.offer_list(lists + (warp + step) * KR * 32);
      if (2 * step < width) top.store(lists + warp * KR * 32);
    }
  }
}

// One thread's share of a bank tile, held in registers between its loads and its stores to
// shared memory: the tile's words as one flat array [rows * W] (element threadIdx.x + i * 256 in
// words[i], coalesced), and the valid flag and tag of row threadIdx.x.
template <int W>
struct TileLoad {
  uint64_t words[W];
  int64_t tag;
  bool ok;

  __device__ __forceinline__ void load(const uint64_t* __restrict__ bank, int64_t n0, int rows,
                                       const uint8_t* __restrict__ valid,
                                       const int64_t* __restrict__ bank_tag) {
    const uint64_t* src = bank + n0 * W;
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const int e = threadIdx.x + i * kThreads;
      words[i] = e < rows * W ? __ldg(src + e) : 0;
    }
    const int64_t n = n0 + threadIdx.x;
    const bool in = static_cast<int>(threadIdx.x) < rows;
    ok = in && (valid == nullptr || valid[n] != 0);
    tag = (in && bank_tag != nullptr) ? bank_tag[n] : 0;
  }

  __device__ __forceinline__ void store(uint64_t* tile, int64_t* tile_tag, uint8_t* tile_ok,
                                        int rows) const {
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const int e = threadIdx.x + i * kThreads;
      if (e < rows * W) tile[(e % W) * kTileStride + e / W] = words[i];
    }
    tile_ok[threadIdx.x] = ok;
    tile_tag[threadIdx.x] = tag;
  }
};

template <int W, int KR>
struct ScanSmem {
  static constexpr int kBankBytes = W * kTileStride * 8;
  static constexpr int kListBytes = kWarps * KR * 32 * 8;
  static constexpr int kBytes = kBankBytes > kListBytes ? kBankBytes : kListBytes;
};

// Blocks per SM the scan is compiled for. With __launch_bounds__(256) alone, ptxas 13 picks its
// own register target and spills at some (W, KR); stating the occupancy caps registers at
// 65536 / (256 * blocks): 128 keeps W <= 8 (every code up to 512 bits) spill-free at 2 blocks per
// SM, and wider codes (their query, tile share and list take up to 190 registers) run 1 block.
template <int W>
constexpr int scan_blocks_per_sm() { return W <= 8 ? 2 : 1; }

template <int W, int KR>
__global__ void __launch_bounds__(kThreads, scan_blocks_per_sm<W>())
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
  const auto rows_at = [&](int64_t n0) { return static_cast<int>(n_end - n0 < kTile ? n_end - n0 : kTile); };
  TileLoad<W> next;
  if (n_begin < n_end) next.load(bank, n_begin, rows_at(n_begin), valid, bank_tag);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
    const int rows = rows_at(n0);
    __syncthreads();  // the previous tile is consumed
    next.store(tile, tile_tag, tile_ok, rows);
    __syncthreads();
    // Issued now, waited for only by the next iteration's stores: the loads of tile i + 1 are in
    // flight while the warps score tile i.
    if (n0 + kTile < n_end) next.load(bank, n0 + kTile, rows_at(n0 + kTile), valid, bank_tag);
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
  merge_warp_lists(top, lists, warp, part, warps_per_query, active);
  if (!active || part != 0) return;
  if (partial != nullptr) {
    top.write_keys(partial + (b * gridDim.y + blockIdx.y) * k);
  } else {
    top.write(b, 64 * W + 1, dist, idx);
  }
}

// Loads keys [base + u * 32 + lane] of one query's flat [splits * k] keys (kNoKey past the end).
__device__ __forceinline__ void load_keys(const uint64_t* __restrict__ keys, int64_t total,
                                          int64_t base, int lane, uint64_t (&out)[kMergeLoads]) {
#pragma unroll
  for (int u = 0; u < kMergeLoads; ++u) {
    const int64_t e = base + u * 32 + lane;
    out[u] = e < total ? __ldcg(keys + e) : kNoKey;
  }
}

template <int KR>
__global__ void __launch_bounds__(kThreads, 1)
    hamming_merge_kernel(const uint64_t* __restrict__ partial, int64_t splits, int k,
                         int32_t missing, int32_t* __restrict__ dist, int64_t* __restrict__ idx) {
  __shared__ uint64_t lists[kWarps * KR * 32];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t b = blockIdx.x;
  const int64_t total = splits * k;
  const uint64_t* keys = partial + b * total;
  constexpr int64_t kWarpKeys = 32 * kMergeLoads;    // keys a warp takes per step
  constexpr int64_t kStep = kWarps * kWarpKeys;       // keys the block takes per step
  WarpTopK<KR> top(k, lane);
  uint64_t next[kMergeLoads];
  int64_t base = warp * kWarpKeys;  // warp-uniform
  load_keys(keys, total, base, lane, next);
  for (; base < total; base += kStep) {
    uint64_t current[kMergeLoads];
#pragma unroll
    for (int u = 0; u < kMergeLoads; ++u) current[u] = next[u];
    if (base + kStep < total) load_keys(keys, total, base + kStep, lane, next);
#pragma unroll
    for (int u = 0; u < kMergeLoads; ++u) top.offer(current[u]);
  }
  merge_warp_lists(top, lists, warp, warp, kWarps, true);
  if (warp == 0) top.write(b, missing, dist, idx);
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
      a.partial, p.splits, a.k, 64 * W + 1, a.dist, a.idx);
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

std::array<int64_t, 5> hamming_topk_plan(int64_t B, int64_t N, int64_t k) {
  const Plan p = make_plan(B, N, k);
  return {p.queries_per_block, p.query_blocks, p.splits, p.rows_per_split,
          static_cast<int64_t>(p.workspace_bytes)};
}

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
  // Pass 2 runs one block per query (grid x holds up to 2^31 - 1 blocks).
  if (p.query_blocks > 0x7fffffff || (p.splits > 1 && B > 0x7fffffff) ||
      (p.workspace_bytes > 0 && workspace == nullptr))
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
