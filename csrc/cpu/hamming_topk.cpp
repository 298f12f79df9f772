// Hamming top-k over a bank of SimHash codes on the CPU.
//
// d(q, b) = sum_w popcount(q[w] XOR b[w]). OpenMP threads claim contiguous chunks of the bank
// (up to 32 tiles) in increasing order; each thread walks a chunk in tiles of ~16 KiB,
// transposes a tile to word-major order (tile[w][r]) so that one vector load holds word w of 8
// (AVX-512) or 4 (AVX2) consecutive rows, and scores every query against the tile while it sits
// in L1 (several queries per pass reuse each load). A lane enters the query's running top-k only
// when its distance is strictly below the current k-th; each thread visits its rows in
// increasing index, so "strictly below" is exactly the tie rule "smaller index first". The
// per-thread lists are merged by (distance, index) at the end.
//
// AVX-512 path (VPOPCNTDQ, vpopcntq: 8 words per instruction), per tile:
//   * the tile is transposed with vpermt2q (W = 4; scalar stores otherwise) and the next tile's
//     rows are prefetched while this one is scored, so the bank streams in behind the popcounts;
//   * G queries per pass (G = 4 at W = 4) are sized so that the G * W broadcast query words, G
//     accumulators and G running minima fit the 32 zmm registers (GCC 12 keeps 15 of the 16
//     query vectors in registers and reads one as a folded memory operand; G = 8 needed 56);
//   * a filter pass keeps, per query, a lane-wise running minimum of the eligible distances (one
//     masked vpminuq per 8 rows, eligibility = valid bitmask & tag compare, no branch), so the
//     loop is xor + popcount + add per word and one min per 8 rows. Only a query whose minimum
//     ends below its current k-th rescans the tile exactly (rescan_avx512), which for k = 1 is a
//     handful of tiles per query over the whole bank.
// Measured on Zen 4 (this project's bench machine): 8 independent zmm vpopcntq take ~8 cycles,
// 8 vpxorq ~4, and 4 vpopcntq + 8 vpxorq/vpaddq ~6, so popcounts and the logic/add ops compete
// for the same vector pipes; xor + popcount + add per word and one min per 8 rows bound this loop
// at ~2/3 of the popcount-only rate (the "floor"), and it runs at ~90 % of that bound. A
// Harley-Seal carry-save step (vpternlogq) saves one popcount in three words but adds more
// xor/ternlog/add ops than it frees, so it is not used.
//
// Other paths, picked at run time (cpu_features): AVX2 (Mula's nibble-lookup popcount with
// vpshufb, summed with vpsadbw), scalar (__builtin_popcountll). The ISA-specific code is compiled
// with `#pragma GCC target`, never -march, so one build runs on any x86-64 machine.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMCACHE_X86 1
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace llmcache {
namespace cpu {
namespace {

enum class Isa { Scalar, Avx2, Avx512 };

Isa pick_isa() {
  const CpuFeatures f = cpu_features();
  Isa best = f.avx512_vpopcntdq && f.avx512f && f.avx512bw ? Isa::Avx512
             : f.avx2                                       ? Isa::Avx2
                                                            : Isa::Scalar;
  const char* cap = std::getenv("LLMCACHE_CPU_ISA");
  if (cap && std::strcmp(cap, "scalar") == 0) best = Isa::Scalar;
  if (cap && std::strcmp(cap, "avx2") == 0 && best == Isa::Avx512) best = Isa::Avx2;
  return best;
}

constexpr int64_t kTileBytes = 16 * 1024;
constexpr int64_t kGroup = 8;  // queries scored per pass over a tile
constexpr int64_t kChunkTiles = 32;  // tiles per chunk that a thread claims

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

// A tile of the bank in word-major order, rows padded to a multiple of 8 (pad rows ineligible).
struct Tile {
  int64_t rows = 0;     // real rows
  int64_t padded = 0;   // multiple of 8
  int64_t first = 0;    // bank index of row 0
  std::vector<int64_t> words;   // [W][padded]
  std::vector<uint8_t> valid;   // [padded] 0/1
  std::vector<uint8_t> live;    // AVX-512 path only: [padded / 8], bit l of live[c / 8] = valid[c + l]
  std::vector<int64_t> tag;     // [padded] when tags are used

  void load(const int64_t* bank, int64_t W, int64_t start, int64_t count, int64_t cap,
            const uint8_t* valid_in, const int64_t* tag_in) {
    first = start;
    rows = count;
    padded = (count + 7) / 8 * 8;
    // Sized once per thread (resize keeps the buffer); only the pad rows need clearing.
    words.resize(W * cap);
    valid.resize(cap);
    if (tag_in) tag.resize(cap);
    for (int64_t r = count; r < padded; ++r) {
      for (int64_t w = 0; w < W; ++w) words[w * padded + r] = 0;
      valid[r] = 0;
      if (tag_in) tag[r] = 0;
    }
    for (int64_t r = 0; r < count; ++r) {
      const int64_t* src = bank + (start + r) * W;
      for (int64_t w = 0; w < W; ++w) words[w * padded + r] = src[w];
      valid[r] = valid_in ? (valid_in[start + r] != 0) : 1;
      if (tag_in) tag[r] = tag_in[start + r];
    }
  }
};

struct Query {
  const int64_t* codes;  // [B, W]
  const int64_t* tags;   // [B] or nullptr
  int64_t B;
  int64_t W;
};

// ---------------- scalar ----------------
void scan_scalar(const Query& q, const Tile& t, TopK& top) {
  for (int64_t b = 0; b < q.B; ++b) {
    const int64_t* qc = q.codes + b * q.W;
    int32_t worst = top.worst(b);
    for (int64_t r = 0; r < t.rows; ++r) {
      if (!t.valid[r] || (q.tags && t.tag[r] != q.tags[b])) continue;
      int32_t d = 0;
      for (int64_t w = 0; w < q.W; ++w)
        d += __builtin_popcountll(static_cast<uint64_t>(qc[w] ^ t.words[w * t.padded + r]));
      if (d < worst) {
        top.insert(b, d, t.first + r);
        worst = top.worst(b);
      }
    }
  }
}

#ifdef LLMCACHE_X86
// ---------------- AVX2: nibble-lookup popcount ----------------
#pragma GCC push_options
#pragma GCC target("avx2,popcnt")

inline __m256i popcount_bytes_avx2(__m256i x) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2,
                                       1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(x, low));
  __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), low));
  return _mm256_add_epi8(lo, hi);
}

template <int G>
void scan_group_avx2(const Query& q, int64_t b0, const Tile& t, TopK& top) {
  int32_t worst[G];
  for (int g = 0; g < G; ++g) worst[g] = top.worst(b0 + g);
  alignas(32) int64_t lanes[4];
  for (int64_t c = 0; c < t.padded; c += 4) {
    __m256i bytes[G];
    for (int g = 0; g < G; ++g) bytes[g] = _mm256_setzero_si256();
    for (int64_t w = 0; w < q.W; ++w) {
      // Byte counts reach at most 8 * W <= 128: no overflow before the final vpsadbw.
      const __m256i bank = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&t.words[w * t.padded + c]));
      for (int g = 0; g < G; ++g) {
        const __m256i x = _mm256_xor_si256(bank, _mm256_set1_epi64x(q.codes[(b0 + g) * q.W + w]));
        bytes[g] = _mm256_add_epi8(bytes[g], popcount_bytes_avx2(x));
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m256i d = _mm256_sad_epu8(bytes[g], _mm256_setzero_si256());
      const __m256i lt = _mm256_cmpgt_epi64(_mm256_set1_epi64x(worst[g]), d);
      if (_mm256_movemask_pd(_mm256_castsi256_pd(lt)) == 0) continue;
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), d);
      const int64_t b = b0 + g;
      for (int l = 0; l < 4; ++l) {
        const int64_t r = c + l;
        if (r >= t.rows || !t.valid[r] || (q.tags && t.tag[r] != q.tags[b])) continue;
        if (lanes[l] < worst[g]) {
          top.insert(b, static_cast<int32_t>(lanes[l]), t.first + r);
          worst[g] = top.worst(b);
        }
      }
    }
  }
}

void scan_avx2(const Query& q, const Tile& t, TopK& top) {
  int64_t b = 0;
  for (; b + kGroup <= q.B; b += kGroup) scan_group_avx2<kGroup>(q, b, t, top);
  for (; b < q.B; ++b) scan_group_avx2<1>(q, b, t, top);
}

#pragma GCC pop_options

// ---------------- AVX-512 VPOPCNTDQ ----------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vpopcntdq,popcnt")

// Exact pass of one query over a tile: every lane below the running k-th enters the top-k.
template <int W>
void rescan_avx512(const Query& q, int64_t b, const Tile& t, TopK& top) {
  __m512i qv[W];
  for (int w = 0; w < W; ++w) qv[w] = _mm512_set1_epi64(q.codes[b * W + w]);
  const __m512i qtag = _mm512_set1_epi64(q.tags ? q.tags[b] : 0);
  __m512i worst = _mm512_set1_epi64(top.worst(b));
  alignas(64) int64_t lanes[8];
  const int64_t* words = t.words.data();
  for (int64_t c = 0; c < t.padded; c += 8) {
    __m512i acc = _mm512_setzero_si512();
    for (int w = 0; w < W; ++w)
      acc = _mm512_add_epi64(
          acc, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(words + w * t.padded + c), qv[w])));
    __mmask8 ok = t.live[c / 8];
    if (q.tags) ok = _mm512_mask_cmpeq_epi64_mask(ok, _mm512_loadu_si512(&t.tag[c]), qtag);
    const __mmask8 lt = _mm512_mask_cmplt_epi64_mask(ok, acc, worst);
    if (!lt) continue;
    _mm512_store_si512(lanes, acc);
    for (int l = 0; l < 8; ++l) {
      if (!((lt >> l) & 1)) continue;
      if (lanes[l] < top.worst(b)) top.insert(b, static_cast<int32_t>(lanes[l]), t.first + c + l);
    }
    worst = _mm512_set1_epi64(top.worst(b));
  }
}

// Filter pass of G queries over a tile: lane-wise min of the eligible distances, one masked
// vpminuq per query and 8 rows, no branch. Only a query whose min ends below its k-th goes
// through the exact pass (rescan_avx512); for k = 1 that is O(log tiles) tiles per query.
template <int W, int G, bool Tags>
void scan_group_avx512(const Query& q, int64_t b0, const Tile& t, TopK& top) {
  __m512i qv[G][W];
  __m512i best[G];
  __m512i qtag[G];
  for (int g = 0; g < G; ++g) {
    for (int w = 0; w < W; ++w) qv[g][w] = _mm512_set1_epi64(q.codes[(b0 + g) * W + w]);
    best[g] = _mm512_set1_epi64(top.worst(b0 + g));
    qtag[g] = _mm512_set1_epi64(Tags ? q.tags[b0 + g] : 0);
  }
  const int64_t* words = t.words.data();
  const uint8_t* live = t.live.data();
  for (int64_t c = 0; c < t.padded; c += 8) {
    __m512i acc[G];
    {
      const __m512i bank = _mm512_loadu_si512(words + c);
      for (int g = 0; g < G; ++g) acc[g] = _mm512_popcnt_epi64(_mm512_xor_si512(bank, qv[g][0]));
    }
    for (int w = 1; w < W; ++w) {
      const __m512i bank = _mm512_loadu_si512(words + w * t.padded + c);
      for (int g = 0; g < G; ++g)
        acc[g] = _mm512_add_epi64(acc[g], _mm512_popcnt_epi64(_mm512_xor_si512(bank, qv[g][w])));
    }
    const __mmask8 ok = live[c / 8];
    const __m512i tags = Tags ? _mm512_loadu_si512(&t.tag[c]) : _mm512_setzero_si512();
    for (int g = 0; g < G; ++g) {
      const __mmask8 m = Tags ? _mm512_mask_cmpeq_epi64_mask(ok, tags, qtag[g]) : ok;
      best[g] = _mm512_mask_min_epu64(best[g], m, best[g], acc[g]);
    }
  }
  for (int g = 0; g < G; ++g)
    if (_mm512_cmplt_epu64_mask(best[g], _mm512_set1_epi64(top.worst(b0 + g))))
      rescan_avx512<W>(q, b0 + g, t, top);
}

// Fills a tile from bank rows [start, start + count) for the AVX-512 path: words transposed to
// [W][padded] (8 rows at a time with two rounds of vpermt2q when W = 4), live bitmasks, tags.
// Pad rows keep whatever words they held: their live bits are 0.
template <int W>
void load_tile_avx512(Tile& t, const int64_t* bank, int64_t start, int64_t count, int64_t cap,
                      const uint8_t* valid_in, const int64_t* tag_in) {
  t.first = start;
  t.rows = count;
  t.padded = (count + 7) / 8 * 8;
  t.words.resize(W * cap);
  t.live.resize(cap / 8);
  if (tag_in) t.tag.resize(cap);
  const int64_t P = t.padded;
  int64_t* out = t.words.data();
  const int64_t* src = bank + start * W;
  int64_t r = 0;
  if (W == 4) {
    const __m512i lo = _mm512_setr_epi64(0, 4, 8, 12, 1, 5, 9, 13);
    const __m512i hi = _mm512_setr_epi64(2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i first = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
    const __m512i second = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
    for (; r + 8 <= count; r += 8) {
      const int64_t* s = src + r * 4;
      const __m512i z0 = _mm512_loadu_si512(s), z1 = _mm512_loadu_si512(s + 8);
      const __m512i z2 = _mm512_loadu_si512(s + 16), z3 = _mm512_loadu_si512(s + 24);
      const __m512i a01 = _mm512_permutex2var_epi64(z0, lo, z1);  // rows 0-3: w0 | w1
      const __m512i a23 = _mm512_permutex2var_epi64(z0, hi, z1);  // rows 0-3: w2 | w3
      const __m512i b01 = _mm512_permutex2var_epi64(z2, lo, z3);  // rows 4-7: w0 | w1
      const __m512i b23 = _mm512_permutex2var_epi64(z2, hi, z3);
      _mm512_storeu_si512(out + r, _mm512_permutex2var_epi64(a01, first, b01));
      _mm512_storeu_si512(out + P + r, _mm512_permutex2var_epi64(a01, second, b01));
      _mm512_storeu_si512(out + 2 * P + r, _mm512_permutex2var_epi64(a23, first, b23));
      _mm512_storeu_si512(out + 3 * P + r, _mm512_permutex2var_epi64(a23, second, b23));
    }
  }
  for (; r < count; ++r)
    for (int w = 0; w < W; ++w) out[w * P + r] = src[r * W + w];
  uint8_t* live = t.live.data();
  if (valid_in) {
    const uint8_t* v = valid_in + start;
    int64_t c = 0;
    for (; c + 64 <= count; c += 64) {
      const uint64_t m = _mm512_test_epi8_mask(_mm512_loadu_si512(v + c), _mm512_set1_epi8(-1));
      std::memcpy(live + c / 8, &m, 8);
    }
    for (; c < P; c += 8) {
      uint8_t m = 0;
      for (int l = 0; l < 8 && c + l < count; ++l) m |= static_cast<uint8_t>((v[c + l] != 0) << l);
      live[c / 8] = m;
    }
  } else {
    std::memset(live, 0xff, count / 8);
    if (count % 8) live[count / 8] = static_cast<uint8_t>((1u << (count % 8)) - 1);
  }
  if (tag_in) std::memcpy(t.tag.data(), tag_in + start, sizeof(int64_t) * count);
}

template <int W, int G, bool Tags>
void scan_tile_avx512(const Query& q, const Tile& t, TopK& top, const int64_t* next, int64_t next_lines) {
  // Spread prefetches of the next tile's rows over the groups, so its loads overlap this scan.
  const int64_t groups = (q.B + G - 1) / G;
  const int64_t per = (next_lines + groups - 1) / groups;
  int64_t line = 0;
  int64_t b = 0;
  for (; b + G <= q.B; b += G) {
    for (int64_t i = 0; i < per && line < next_lines; ++i, ++line)
      _mm_prefetch(reinterpret_cast<const char*>(next + line * 8), _MM_HINT_T0);
    scan_group_avx512<W, G, Tags>(q, b, t, top);
  }
  for (; b < q.B; ++b) scan_group_avx512<W, 1, Tags>(q, b, t, top);
  for (; line < next_lines; ++line) _mm_prefetch(reinterpret_cast<const char*>(next + line * 8), _MM_HINT_T0);
}

template <int W, int G, bool Tags>
void scan_range_avx512(const Query& q, const int64_t* bank, int64_t begin, int64_t end, int64_t tile_rows,
                       const uint8_t* valid, const int64_t* bank_tag, TopK& top) {
  Tile tile;
  for (int64_t start = begin; start < end; start += tile_rows) {
    const int64_t count = std::min(tile_rows, end - start);
    load_tile_avx512<W>(tile, bank, start, count, (tile_rows + 7) / 8 * 8, valid, bank_tag);
    const int64_t next_count = std::max<int64_t>(0, std::min(tile_rows, end - start - count));
    scan_tile_avx512<W, G, Tags>(q, tile, top, bank + (start + count) * W, next_count * W / 8);
  }
}

template <int W>
void range_avx512_w(const Query& q, const int64_t* bank, int64_t begin, int64_t end, int64_t tile_rows,
                    const uint8_t* valid, const int64_t* bank_tag, TopK& top) {
  // Queries per pass such that G * W broadcast query words, G accumulators and G running minima
  // stay within the 32 zmm registers (W = 4: G = 4 uses 24 + the bank vector).
  constexpr int G = W == 1 ? 8 : W == 2 ? 6 : W == 3 ? 5 : W <= 5 ? 4 : W <= 7 ? 3 : 2;
  if (q.tags) return scan_range_avx512<W, G, true>(q, bank, begin, end, tile_rows, valid, bank_tag, top);
  scan_range_avx512<W, G, false>(q, bank, begin, end, tile_rows, valid, bank_tag, top);
}

void range_avx512(const Query& q, const int64_t* bank, int64_t begin, int64_t end, int64_t tile_rows,
                  const uint8_t* valid, const int64_t* bank_tag, TopK& top) {
  switch (q.W) {  // callers guarantee 1 <= W <= 16
#define LLMCACHE_CASE(w) \
  case w:                \
    return range_avx512_w<w>(q, bank, begin, end, tile_rows, valid, bank_tag, top);
    LLMCACHE_CASE(1) LLMCACHE_CASE(2) LLMCACHE_CASE(3) LLMCACHE_CASE(4) LLMCACHE_CASE(5)
    LLMCACHE_CASE(6) LLMCACHE_CASE(7) LLMCACHE_CASE(8) LLMCACHE_CASE(9) LLMCACHE_CASE(10)
    LLMCACHE_CASE(11) LLMCACHE_CASE(12) LLMCACHE_CASE(13) LLMCACHE_CASE(14) LLMCACHE_CASE(15)
    LLMCACHE_CASE(16)
#undef LLMCACHE_CASE
  }
}

// Independent vpopcntq chains on registers: the issue rate of the popcount unit.
double popcount_loop_avx512(int64_t iters) {
  __m512i a0 = _mm512_set1_epi64(0x0123456789abcdefLL), a1 = _mm512_set1_epi64(7),
          a2 = _mm512_set1_epi64(11), a3 = _mm512_set1_epi64(13), a4 = _mm512_set1_epi64(17),
          a5 = _mm512_set1_epi64(19), a6 = _mm512_set1_epi64(23), a7 = _mm512_set1_epi64(29);
  for (int64_t i = 0; i < iters; ++i) {
    a0 = _mm512_popcnt_epi64(a0); a1 = _mm512_popcnt_epi64(a1);
    a2 = _mm512_popcnt_epi64(a2); a3 = _mm512_popcnt_epi64(a3);
    a4 = _mm512_popcnt_epi64(a4); a5 = _mm512_popcnt_epi64(a5);
    a6 = _mm512_popcnt_epi64(a6); a7 = _mm512_popcnt_epi64(a7);
    __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7));
  }
  __m512i s = _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3));
  s = _mm512_add_epi64(s, _mm512_add_epi64(_mm512_add_epi64(a4, a5), _mm512_add_epi64(a6, a7)));
  return static_cast<double>(_mm512_reduce_add_epi64(s)) * 0.0 + 64.0 * iters;  // words popcounted
}

#pragma GCC pop_options
#endif  // LLMCACHE_X86

double popcount_loop_scalar(int64_t iters) {
  uint64_t a[4] = {0x0123456789abcdefULL, 7, 11, 13};
  for (int64_t i = 0; i < iters; ++i) {
    for (auto& v : a) v = static_cast<uint64_t>(__builtin_popcountll(v)) + 0x9e3779b97f4a7c15ULL;
    __asm__ volatile("" : "+r"(a[0]), "+r"(a[1]), "+r"(a[2]), "+r"(a[3]));
  }
  return 4.0 * iters + 0.0 * static_cast<double>(a[0] + a[1] + a[2] + a[3]);
}

// Few queries: a tile's transpose would cost more than it saves, so stream the bank row-major
// (each row's W words are contiguous) with the scalar popcount instruction.
#ifdef LLMCACHE_X86
#pragma GCC push_options
#pragma GCC target("popcnt")
#endif
void scan_rows(const Query& q, const int64_t* bank, int64_t begin, int64_t end, const uint8_t* valid,
               const int64_t* bank_tag, TopK& top) {
  for (int64_t n = begin; n < end; ++n) {
    if (valid && !valid[n]) continue;
    const int64_t* row = bank + n * q.W;
    for (int64_t b = 0; b < q.B; ++b) {
      if (q.tags && bank_tag[n] != q.tags[b]) continue;
      const int64_t* qc = q.codes + b * q.W;
      int32_t d = 0;
      for (int64_t w = 0; w < q.W; ++w) d += __builtin_popcountll(static_cast<uint64_t>(qc[w] ^ row[w]));
      if (d < top.worst(b)) top.insert(b, d, n);
    }
  }
}
#ifdef LLMCACHE_X86
#pragma GCC pop_options
#endif

void scan(Isa isa, const Query& q, const Tile& t, TopK& top) {
#ifdef LLMCACHE_X86
  if (isa == Isa::Avx2) return scan_avx2(q, t, top);
#endif
  (void)isa;
  scan_scalar(q, t, top);  // also AVX-512 machines when W > 16
}

}  // namespace

std::string cpu_kernel_name() {
  switch (pick_isa()) {
    case Isa::Avx512:
      return "avx512_vpopcntdq";
    case Isa::Avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

void hamming_topk(const int64_t* queries, int64_t B, const int64_t* bank, int64_t N, int64_t W,
                  int64_t k, const uint8_t* valid, const int64_t* query_tag,
                  const int64_t* bank_tag, int32_t* dist, int64_t* idx) {
  const int32_t missing = static_cast<int32_t>(64 * W + 1);
  std::fill(dist, dist + B * k, missing);
  std::fill(idx, idx + B * k, int64_t{-1});
  if (B == 0 || N == 0) return;
  const Isa isa = pick_isa();
  const Query q{queries, query_tag, B, W};
  const int64_t tile_rows = std::max<int64_t>(8, kTileBytes / (8 * W) / 8 * 8);
  int threads = 1;
#ifdef _OPENMP
  // No thread gets less than a tile: small banks stay on one thread.
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), N / tile_rows)));
#endif
  std::vector<TopK> partial;
  partial.reserve(threads);
  for (int i = 0; i < threads; ++i) partial.emplace_back(B, k, missing);
  // Few queries: AVX2 streams the rows (scan_rows); the AVX-512 transpose is cheap enough to keep.
  const bool row_major = B < kGroup && isa == Isa::Avx2 && cpu_features().popcnt;
  auto scan_range = [&](int64_t begin, int64_t end, TopK& top) {
    if (row_major) return scan_rows(q, bank, begin, end, valid, bank_tag, top);
#ifdef LLMCACHE_X86
    if (isa == Isa::Avx512 && W <= 16) return range_avx512(q, bank, begin, end, tile_rows, valid, bank_tag, top);
#endif
    Tile tile;
    for (int64_t start = begin; start < end; start += tile_rows) {
      const int64_t count = std::min(tile_rows, end - start);
      tile.load(bank, W, start, count, (count + 7) / 8 * 8, valid, bank_tag);
      scan(isa, q, tile, top);
    }
  };
  if (threads == 1) {
    scan_range(0, N, partial[0]);  // small banks: no parallel region to enter
  } else {
    // Threads claim chunks of kChunkTiles tiles in increasing order (dynamic schedule), so a
    // thread slowed by another process on the machine does not hold up the call; each thread
    // still visits its rows in increasing index, which the tie rule needs.
    // At least ~4 chunks per thread so mid-sized banks still spread over all threads.
    const int64_t chunk_rows =
        tile_rows * std::max<int64_t>(1, std::min<int64_t>(kChunkTiles, N / (4 * threads * tile_rows)));
    const int64_t chunks = (N + chunk_rows - 1) / chunk_rows;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
      TopK& top = partial[omp_get_thread_num()];
#pragma omp for schedule(dynamic, 1)
      for (int64_t c = 0; c < chunks; ++c) scan_range(c * chunk_rows, std::min(N, (c + 1) * chunk_rows), top);
#endif
    }
  }
  // Merge: sorting the (dist, idx) pairs of every thread's list keeps the smaller index first on
  // ties; each list holds its thread's k best with ties already broken toward smaller indices.
  std::vector<std::pair<int32_t, int64_t>> cand;
  for (int64_t b = 0; b < B; ++b) {
    cand.clear();
    for (const TopK& p : partial)
      for (int64_t j = 0; j < k; ++j)
        if (p.idx[b * k + j] >= 0) cand.emplace_back(p.dist[b * k + j], p.idx[b * k + j]);
    std::sort(cand.begin(), cand.end());
    for (int64_t j = 0; j < k && j < static_cast<int64_t>(cand.size()); ++j) {
      dist[b * k + j] = cand[j].first;
      idx[b * k + j] = cand[j].second;
    }
  }
}

double popcount_peak_rate(double seconds) {
  const Isa isa = pick_isa();
  const int64_t iters = 1 << 20;
  double words = 0.0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0.0;
  while (elapsed < seconds) {
#pragma omp parallel reduction(+ : words)
    {
#ifdef LLMCACHE_X86
      if (isa == Isa::Avx512)
        words += popcount_loop_avx512(iters);
      else
#endif
        words += popcount_loop_scalar(iters);
    }
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  return words / elapsed;
}

}  // namespace cpu
}  // namespace llmcache
