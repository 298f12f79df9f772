// Hamming scan with AVX2 and per-query lookup tables (256-bit codes, W = 4, no tags; anything else
// runs the plain AVX2 path).
//
// The nibble-lookup popcount (hamming_avx2.cpp) spends per 4 rows and word: a xor, an and, a
// shift, an and, two vpshufb and two adds. Here the xor and the nibble split move out of the
// per-query loop: a tile's rows are transposed to byte-major order (one ymm = byte p of 16 rows in
// its low lane and byte 16 + p of the same rows in its high lane) and split into low and high
// nibbles once, and each query gets 32 tables, table[x] = popcount(x ^ its nibble) for every
// nibble position (16 entries per lane, so the two lanes use different tables). A query's
// distance to 16 rows is then, per ymm of nibbles, one vpshufb and one saturating byte add:
// 32 vpshufb + 32 adds per 16 rows and query, i.e. 4 vector ops per (row, query) instead of 8.
// Counts per lane stay <= 128; the two lanes' sum saturates at 255, which only makes the filter's
// minimum a lower bound (rows at 255 or 256 bits go through the exact rescan like any candidate).
// Like the other paths it keeps a running per-lane minimum per query (ineligible and pad rows
// read 255) and rescans a tile exactly (rescan_scalar) only where the minimum beats the k-th.
// The 16x16 byte transpose is the 4-stage unpack network (8, 16, 32, 64-bit), applied to both
// lanes at once; the order it leaves rows and bytes in is read off once, at first use.
#include <algorithm>
#include <cstring>
#include <vector>

#include "hamming_scan.h"

namespace llmcache {
namespace cpu {
namespace hamming {

#ifdef LLMCACHE_X86
namespace {

#pragma GCC push_options
#pragma GCC target("avx2")

constexpr int64_t kBlock = 16;        // rows per transposed block
constexpr int64_t kTileBlocks = 16;   // blocks per tile: 256 rows, 16 KiB of nibbles

inline __m256i load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store(uint8_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

// 16 rows of 32 bytes -> v[j]: low lane byte l = byte sigma[j] of row pi[l], high lane the same
// rows' byte 16 + sigma[j].
inline void transpose16(__m256i* v) {
  __m256i t[16];
  for (int i = 0; i < 8; ++i) {
    t[i] = _mm256_unpacklo_epi8(v[2 * i], v[2 * i + 1]);
    t[8 + i] = _mm256_unpackhi_epi8(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 8; ++i) {
    v[i] = _mm256_unpacklo_epi16(t[2 * i], t[2 * i + 1]);
    v[8 + i] = _mm256_unpackhi_epi16(t[2 * i], t[2 * i + 1]);
  }
  for (int i = 0; i < 8; ++i) {
    t[i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[8 + i] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 8; ++i) {
    v[i] = _mm256_unpacklo_epi64(t[2 * i], t[2 * i + 1]);
    v[8 + i] = _mm256_unpackhi_epi64(t[2 * i], t[2 * i + 1]);
  }
}

// The network's output order: pi[l] = row in lane byte l, sigma[j] = byte position of vector j.
struct Order {
  uint8_t pi[16], sigma[16];
  Order() {
    alignas(32) uint8_t in[16][32], out[16][32];
    for (int r = 0; r < 16; ++r)
      for (int b = 0; b < 32; ++b) in[r][b] = static_cast<uint8_t>(r | ((b & 15) << 4));
    __m256i v[16];
    for (int r = 0; r < 16; ++r) v[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(in[r]));
    transpose16(v);
    for (int j = 0; j < 16; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(out[j]), v[j]);
    for (int l = 0; l < 16; ++l) pi[l] = out[0][l] & 15;
    for (int j = 0; j < 16; ++j) sigma[j] = out[j][0] >> 4;
  }
};

const Order& order() {
  static const Order o;
  return o;
}

// A tile: per block, 16 vectors of low nibbles then 16 of high nibbles, and a penalty per lane
// byte (0xff: row invalid or past the tile).
struct Tile {
  int64_t first = 0, rows = 0, blocks = 0;
  std::vector<uint8_t> nibbles;  // [blocks][2][16] vectors of 32 bytes
  std::vector<uint8_t> penalty;  // [blocks][16]

  void load(const Scan& s, int64_t start, int64_t count) {
    first = start;
    rows = count;
    blocks = (count + kBlock - 1) / kBlock;
    nibbles.resize(kTileBlocks * 32 * 32);
    penalty.resize(kTileBlocks * 16);
    const Order& o = order();
    const __m256i low = _mm256_set1_epi8(0x0f);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t r0 = start + blk * kBlock, n = std::min<int64_t>(kBlock, start + count - r0);
      __m256i v[16];
      for (int r = 0; r < 16; ++r)
        v[r] = r < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.bank + (r0 + r) * 4))
                     : _mm256_setzero_si256();
      transpose16(v);
      uint8_t* out = &nibbles[blk * 32 * 32];
      for (int j = 0; j < 16; ++j) {
        store(out + 32 * j, _mm256_and_si256(v[j], low));
        store(out + 32 * (16 + j), _mm256_and_si256(_mm256_srli_epi16(v[j], 4), low));
      }
      uint8_t* pen = &penalty[blk * 16];
      for (int l = 0; l < 16; ++l) {
        const int64_t r = o.pi[l];
        pen[l] = r >= n || (s.valid && !s.valid[r0 + r]) ? 0xff : 0;
      }
    }
  }
};

// A query's 32 tables, `stride` bytes apart: 0..15 for the low nibbles of vectors 0..15, 16..31
// for the high ones.
void make_tables(const int64_t* query, uint8_t* tables, int64_t stride) {
  const Order& o = order();
  uint8_t q[32];
  std::memcpy(q, query, 32);
  const __m256i iota = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5,
                                        6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m256i popcount = nibble_popcounts();
  for (int j = 0; j < 16; ++j) {
    const uint8_t lo = q[o.sigma[j]], hi = q[16 + o.sigma[j]];
    const __m256i lows = _mm256_setr_m128i(_mm_set1_epi8(static_cast<char>(lo & 15)), _mm_set1_epi8(static_cast<char>(hi & 15)));
    const __m256i highs = _mm256_setr_m128i(_mm_set1_epi8(static_cast<char>(lo >> 4)), _mm_set1_epi8(static_cast<char>(hi >> 4)));
    store(tables + stride * j, _mm256_shuffle_epi8(popcount, _mm256_xor_si256(iota, lows)));
    store(tables + stride * (16 + j), _mm256_shuffle_epi8(popcount, _mm256_xor_si256(iota, highs)));
  }
}

inline uint8_t min_byte(__m128i v) {
  v = _mm_min_epu8(v, _mm_srli_si128(v, 8));
  v = _mm_min_epu8(v, _mm_srli_si128(v, 4));
  v = _mm_min_epu8(v, _mm_srli_si128(v, 2));
  v = _mm_min_epu8(v, _mm_srli_si128(v, 1));
  return static_cast<uint8_t>(_mm_cvtsi128_si32(v));
}

// Filter pass of G queries over a tile: per block of 16 rows, 32 lookups and adds per query, then
// a lane-wise running minimum; a query whose minimum beats its k-th rescans the tile exactly.
// G = 8: each nibble vector loaded serves 8 queries (the loop is bound by loads and vpshufb; at
// G = 4 it ran 1.35x slower, at G = 12 the accumulators spill). Handing two more queries per
// pass to the idle scalar POPCNT units, interleaved, made it slower still (measured, dropped).
template <int G>
void group(const Scan& s, int64_t b0, const Tile& t, const uint8_t* tables, TopK& top) {
  __m128i best[G];
  for (int g = 0; g < G; ++g) best[g] = _mm_set1_epi8(-1);
  for (int64_t blk = 0; blk < t.blocks; ++blk) {
    const uint8_t* nib = &t.nibbles[blk * 32 * 32];
    __m256i acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_si256();
    const uint8_t* table = tables + b0 * 32 * 32;  // the group's tables, step-major: [j][g]
#pragma GCC unroll 4
    for (int j = 0; j < 32; ++j, table += 32 * G) {
      const __m256i x = load(nib + 32 * j);
      for (int g = 0; g < G; ++g) acc[g] = _mm256_add_epi8(acc[g], _mm256_shuffle_epi8(load(table + 32 * g), x));
    }
    const __m128i pen = _mm_loadu_si128(reinterpret_cast<const __m128i*>(&t.penalty[blk * 16]));
    for (int g = 0; g < G; ++g) {
      const __m128i d = _mm_adds_epu8(_mm256_castsi256_si128(acc[g]), _mm256_extracti128_si256(acc[g], 1));
      best[g] = _mm_min_epu8(best[g], _mm_or_si128(d, pen));
    }
  }
  for (int g = 0; g < G; ++g) {
    const int32_t m = min_byte(best[g]), worst = top.worst(b0 + g);
    // 255: saturated or only ineligible rows; an eligible row may sit at 255 or 256 bits, so a
    // query still short of k answers that far out rescans.
    if (m < worst && (m < 255 || worst > 255)) rescan_scalar(s, b0 + g, t.first, t.first + t.rows, top);
  }
}

}  // namespace

void scan_avx2_tables(const Scan& s, int64_t begin, int64_t end, TopK& top) {
  if (s.W != 4 || s.query_tag) return scan_avx2(s, begin, end, top);
  std::vector<uint8_t> tables(s.B * 32 * 32);
  // Groups of 8 queries, then of 4, then single ones (as scored below); a group's tables are
  // step-major, so one step's tables for all its queries are adjacent.
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t G = b < s.B / 8 * 8 ? 8 : b < s.B / 8 * 8 + (s.B % 8) / 4 * 4 ? 4 : 1;
    const int64_t first = G == 8 ? b / 8 * 8 : G == 4 ? s.B / 8 * 8 : b;
    make_tables(s.queries + b * 4, &tables[first * 32 * 32 + (b - first) * 32], 32 * G);
  }
  Tile t;
  for (int64_t start = begin; start < end; start += kBlock * kTileBlocks) {
    t.load(s, start, std::min(kBlock * kTileBlocks, end - start));
    int64_t b = 0;
    for (; b + 8 <= s.B; b += 8) group<8>(s, b, t, tables.data(), top);
    for (; b + 4 <= s.B; b += 4) group<4>(s, b, t, tables.data(), top);
    for (; b < s.B; ++b) group<1>(s, b, t, tables.data(), top);
  }
}

// Eight independent lookup-and-add chains on registers: this path's rate (one vpshufb and one byte
// add count 32 nibbles of one pair, i.e. 2 of its 64-bit words).
double popcount_loop_avx2_tables(int64_t iters) {
  const __m256i table = nibble_popcounts();
  __m256i a0 = table, a1 = table, a2 = table, a3 = table, a4 = table, a5 = table, a6 = table, a7 = table;
  __m256i x0 = _mm256_set1_epi8(3), x1 = _mm256_set1_epi8(5), x2 = _mm256_set1_epi8(6), x3 = _mm256_set1_epi8(9);
  for (int64_t i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+x"(x0), "+x"(x1), "+x"(x2), "+x"(x3));  // (else the lookups are hoisted or merged)
    a0 = _mm256_add_epi8(a0, _mm256_shuffle_epi8(table, x0)); a1 = _mm256_add_epi8(a1, _mm256_shuffle_epi8(table, x1));
    a2 = _mm256_add_epi8(a2, _mm256_shuffle_epi8(table, x2)); a3 = _mm256_add_epi8(a3, _mm256_shuffle_epi8(table, x3));
    __asm__ volatile("" : "+x"(x0), "+x"(x1), "+x"(x2), "+x"(x3));
    a4 = _mm256_add_epi8(a4, _mm256_shuffle_epi8(table, x0)); a5 = _mm256_add_epi8(a5, _mm256_shuffle_epi8(table, x1));
    a6 = _mm256_add_epi8(a6, _mm256_shuffle_epi8(table, x2)); a7 = _mm256_add_epi8(a7, _mm256_shuffle_epi8(table, x3));
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(a6), "+x"(a7));
  }
  const __m256i a = _mm256_add_epi8(_mm256_add_epi8(_mm256_add_epi8(a0, a1), _mm256_add_epi8(a2, a3)),
                                    _mm256_add_epi8(_mm256_add_epi8(a4, a5), _mm256_add_epi8(a6, a7)));
  return 16.0 * iters + 0.0 * _mm256_extract_epi64(a, 0);  // 8 lookups x 2 words
}

#pragma GCC pop_options
#else
double popcount_loop_avx2_tables(int64_t iters) { return popcount_loop_scalar(iters); }
void scan_avx2_tables(const Scan& s, int64_t begin, int64_t end, TopK& top) { scan_scalar(s, begin, end, top); }
#endif

}  // namespace hamming
}  // namespace cpu
}  // namespace llmcache
