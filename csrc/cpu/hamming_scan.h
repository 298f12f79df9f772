// Internals of hamming_topk (hamming_topk.cpp): the running top-k, what one scan sees, and the
// popcount paths, one file each: hamming_scalar.cpp (the POPCNT instruction on rows as stored),
// hamming_avx2.cpp (nibble-lookup popcount on transposed tiles, plain or Harley-Seal),
// hamming_avx2_tables.cpp (per-query lookup tables on byte-transposed tiles) and
// hamming_avx512.cpp (VPOPCNTDQ: rows transposed in registers for few queries, tiles for many).
//
// The contract every path keeps, which makes all of them return the same integers: rows are
// visited in increasing index per query, and a row enters a query's top-k only when its distance
// is strictly below the current k-th and it is eligible ("strictly below" is the tie rule "smaller
// index first"). Eligibility is checked on candidates only, never on every row.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMCACHE_X86 1
#endif

namespace llmcache {
namespace cpu {
namespace hamming {
#ifdef LLMCACHE_X86
// popcount(x) for x = 0..15 in both 128-bit lanes: the table of the AVX2 paths' vpshufb lookups.
__attribute__((target("avx2"))) inline __m256i nibble_popcounts() {
  return _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
}
#endif
}  // namespace hamming
}  // namespace cpu
}  // namespace llmcache

namespace llmcache {
namespace cpu {
namespace hamming {

// One thread's running answers: k (dist, idx) pairs per query, ascending.
struct TopK {
  int64_t k;
  std::vector<int32_t> dist;
  std::vector<int64_t> idx;
  TopK(int64_t B, int64_t k_, int32_t missing) : k(k_), dist(B * k_, missing), idx(B * k_, -1) {}
  int32_t worst(int64_t q) const { return dist[q * k + k - 1]; }
  // Insert (d, n) for query q; callers guarantee d < worst(q).
  void insert(int64_t q, int32_t d, int64_t n) {
    int32_t* ds = dist.data() + q * k;
    int64_t* is = idx.data() + q * k;
    int64_t pos = k - 1;
    while (pos > 0 && ds[pos - 1] > d) {
      ds[pos] = ds[pos - 1];
      is[pos] = is[pos - 1];
      --pos;
    }
    ds[pos] = d;
    is[pos] = n;
  }
};

// The queries and the bank of one call. queries [B, W], bank [N, W] row-major int64.
struct Scan {
  const int64_t* queries;
  const int64_t* query_tag;  // [B] or nullptr
  int64_t B;
  int64_t W;
  const int64_t* bank;
  const uint8_t* valid;      // [N] or nullptr
  const int64_t* bank_tag;   // [N] or nullptr (with query_tag)

  bool eligible(int64_t b, int64_t n) const {
    return (!valid || valid[n]) && (!query_tag || bank_tag[n] == query_tag[b]);
  }
  // Row n at distance d from query b, d < top.worst(b) already: enters when eligible.
  void offer(TopK& top, int64_t b, int32_t d, int64_t n) const {
    if (eligible(b, n)) top.insert(b, d, n);
  }
};

// A path: scores bank rows [begin, end) against every query into `top` (the contract above).
using RangeScan = void (*)(const Scan&, int64_t begin, int64_t end, TopK& top);

// Rows of about this many bytes are scored against every query while they sit in L1.
constexpr int64_t kTileBytes = 16 * 1024;
inline int64_t tile_rows(int64_t W) {
  const int64_t rows = kTileBytes / (8 * W) / 8 * 8;
  return rows < 8 ? 8 : rows;
}

// fn(std::integral_constant<int, W>{}) for the call's W (1 <= W <= 16, checked by the callers):
// the paths are templates on W so their word loops unroll.
template <typename Fn>
void for_words(int64_t W, Fn&& fn) {
  switch (W) {
#define LLMCACHE_CASE(w) \
  case w:                \
    return fn(std::integral_constant<int, w>{});
    LLMCACHE_CASE(1) LLMCACHE_CASE(2) LLMCACHE_CASE(3) LLMCACHE_CASE(4) LLMCACHE_CASE(5)
    LLMCACHE_CASE(6) LLMCACHE_CASE(7) LLMCACHE_CASE(8) LLMCACHE_CASE(9) LLMCACHE_CASE(10)
    LLMCACHE_CASE(11) LLMCACHE_CASE(12) LLMCACHE_CASE(13) LLMCACHE_CASE(14) LLMCACHE_CASE(15)
    LLMCACHE_CASE(16)
#undef LLMCACHE_CASE
    default:
      return;
  }
}

void scan_scalar(const Scan& s, int64_t begin, int64_t end, TopK& top);
// Query b alone over rows [begin, end): the exact pass the vector paths' filters fall back to.
void rescan_scalar(const Scan& s, int64_t b, int64_t begin, int64_t end, TopK& top);
void scan_avx2(const Scan& s, int64_t begin, int64_t end, TopK& top);
void scan_avx2_harley_seal(const Scan& s, int64_t begin, int64_t end, TopK& top);
void scan_avx2_tables(const Scan& s, int64_t begin, int64_t end, TopK& top);
void scan_avx512(const Scan& s, int64_t begin, int64_t end, TopK& top);

// Register-resident loops of each path's popcount: 64-bit words counted per call of `iters`.
double popcount_loop_scalar(int64_t iters);
double popcount_loop_avx2(int64_t iters);
double popcount_loop_avx2_tables(int64_t iters);
double popcount_loop_avx512(int64_t iters);
// The loop of a path by name (hamming_topk.cpp).
double popcount_loop(const std::string& path, int64_t iters);

}  // namespace hamming
}  // namespace cpu
}  // namespace llmcache
