// Hamming scan with AVX-512 VPOPCNTDQ (vpopcntq: 8 words per instruction).
//
// Few queries (B < 8, W = 1, 2 or 4): rows stream through registers. 8 rows are loaded as they
// are stored and transposed in registers (vpermt2q) to word-major order, so word w of the 8 rows
// is one zmm; per query the 8 distances are W xor + popcount + add, and one compare against the
// query's k-th gives a mask that is almost always empty. The bank is read once, at memory speed.
//
// Many queries: tiles of ~16 KiB transposed to word-major order, scored against G queries per pass:
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
// xor/ternlog/add ops than it frees, so it is not used here.
// Compiled with `#pragma GCC target`, never -march, so one build runs on any x86-64 machine.
#include <algorithm>
#include <cstring>
#include <vector>

#include "hamming_scan.h"

namespace llmcache {
namespace cpu {
namespace hamming {

#ifdef LLMCACHE_X86
namespace {

// A tile of the bank in word-major order, rows padded to a multiple of 8 (pad rows not live).
struct Tile {
  int64_t rows = 0, padded = 0, first = 0;
  std::vector<int64_t> words;  // [W][padded]
  std::vector<uint8_t> live;   // [padded / 8], bit l of live[c / 8] = valid[c + l]
  std::vector<int64_t> tag;    // [padded] when tags are used
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vpopcntdq,popcnt")

// Exact pass of one query over a tile: every lane below the running k-th enters the top-k.
template <int W>
void rescan_avx512(const Scan& q, int64_t b, const Tile& t, TopK& top) {
  __m512i qv[W];
  for (int w = 0; w < W; ++w) qv[w] = _mm512_set1_epi64(q.queries[b * W + w]);
  const __m512i qtag = _mm512_set1_epi64(q.query_tag ? q.query_tag[b] : 0);
  __m512i worst = _mm512_set1_epi64(top.worst(b));
  alignas(64) int64_t lanes[8];
  const int64_t* words = t.words.data();
  for (int64_t c = 0; c < t.padded; c += 8) {
    __m512i acc = _mm512_setzero_si512();
    for (int w = 0; w < W; ++w)
      acc = _mm512_add_epi64(
          acc, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(words + w * t.padded + c), qv[w])));
    __mmask8 ok = t.live[c / 8];
    if (q.query_tag) ok = _mm512_mask_cmpeq_epi64_mask(ok, _mm512_loadu_si512(&t.tag[c]), qtag);
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
void scan_group_avx512(const Scan& q, int64_t b0, const Tile& t, TopK& top) {
  __m512i qv[G][W];
  __m512i best[G];
  __m512i qtag[G];
  for (int g = 0; g < G; ++g) {
    for (int w = 0; w < W; ++w) qv[g][w] = _mm512_set1_epi64(q.queries[(b0 + g) * W + w]);
    best[g] = _mm512_set1_epi64(top.worst(b0 + g));
    qtag[g] = _mm512_set1_epi64(Tags ? q.query_tag[b0 + g] : 0);
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
void scan_tile_avx512(const Scan& q, const Tile& t, TopK& top, const int64_t* next, int64_t next_lines) {
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
void scan_range_avx512(const Scan& q, const int64_t* bank, int64_t begin, int64_t end, int64_t tile_rows,
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
void range_avx512_w(const Scan& q, const int64_t* bank, int64_t begin, int64_t end, int64_t tile_rows,
                    const uint8_t* valid, const int64_t* bank_tag, TopK& top) {
  // Queries per pass such that G * W broadcast query words, G accumulators and G running minima
  // stay within the 32 zmm registers (W = 4: G = 4 uses 24 + the bank vector).
  constexpr int G = W == 1 ? 8 : W == 2 ? 6 : W == 3 ? 5 : W <= 5 ? 4 : W <= 7 ? 3 : 2;
  if (q.query_tag) return scan_range_avx512<W, G, true>(q, bank, begin, end, tile_rows, valid, bank_tag, top);
  scan_range_avx512<W, G, false>(q, bank, begin, end, tile_rows, valid, bank_tag, top);
}

// 8 rows as stored -> word w of the 8 rows in t[w] (W = 1: the rows themselves).
template <int W>
inline void transpose8(const int64_t* rows, __m512i* t) {
  if (W == 1) {
    t[0] = _mm512_loadu_si512(rows);
  } else if (W == 2) {  // rows 0-3 | rows 4-7, words interleaved
    const __m512i z0 = _mm512_loadu_si512(rows), z1 = _mm512_loadu_si512(rows + 8);
    t[0] = _mm512_permutex2var_epi64(z0, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), z1);
    t[1] = _mm512_permutex2var_epi64(z0, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), z1);
  } else {  // W == 4: the load_tile_avx512 transpose, kept in registers
    const __m512i lo = _mm512_setr_epi64(0, 4, 8, 12, 1, 5, 9, 13);
    const __m512i hi = _mm512_setr_epi64(2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i first = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
    const __m512i second = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
    const __m512i z0 = _mm512_loadu_si512(rows), z1 = _mm512_loadu_si512(rows + 8);
    const __m512i z2 = _mm512_loadu_si512(rows + 16), z3 = _mm512_loadu_si512(rows + 24);
    const __m512i a01 = _mm512_permutex2var_epi64(z0, lo, z1), a23 = _mm512_permutex2var_epi64(z0, hi, z1);
    const __m512i b01 = _mm512_permutex2var_epi64(z2, lo, z3), b23 = _mm512_permutex2var_epi64(z2, hi, z3);
    t[0] = _mm512_permutex2var_epi64(a01, first, b01);
    t[1] = _mm512_permutex2var_epi64(a01, second, b01);
    t[2] = _mm512_permutex2var_epi64(a23, first, b23);
    t[3] = _mm512_permutex2var_epi64(a23, second, b23);
  }
}

// Few queries: rows stream through registers (header comment). A lane below the query's k-th is
// offered to the top-k (eligibility checked there); the rows past the last multiple of 8 are
// scored one by one.
template <int W>
void stream_avx512(const Scan& q, int64_t begin, int64_t end, TopK& top) {
  constexpr int kMaxB = 7;
  __m512i qv[kMaxB][W], worst[kMaxB];
  for (int64_t b = 0; b < q.B; ++b) {
    for (int w = 0; w < W; ++w) qv[b][w] = _mm512_set1_epi64(q.queries[b * W + w]);
    worst[b] = _mm512_set1_epi64(top.worst(b));
  }
  alignas(64) int64_t lanes[8];
  int64_t n = begin;
  for (; n + 8 <= end; n += 8) {
    __m512i t[W];
    transpose8<W>(q.bank + n * W, t);
    for (int64_t b = 0; b < q.B; ++b) {
      __m512i acc = _mm512_popcnt_epi64(_mm512_xor_si512(t[0], qv[b][0]));
      for (int w = 1; w < W; ++w) acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(t[w], qv[b][w])));
      const __mmask8 lt = _mm512_cmplt_epi64_mask(acc, worst[b]);
      if (__builtin_expect(lt == 0, 1)) continue;
      _mm512_store_si512(lanes, acc);
      for (int l = 0; l < 8; ++l)
        if (((lt >> l) & 1) && lanes[l] < top.worst(b)) q.offer(top, b, static_cast<int32_t>(lanes[l]), n + l);
      worst[b] = _mm512_set1_epi64(top.worst(b));
    }
  }
  if (n < end)
    for (int64_t b = 0; b < q.B; ++b) rescan_scalar(q, b, n, end, top);
}

}  // namespace

void scan_avx512(const Scan& q, int64_t begin, int64_t end, TopK& top) {
  if (q.B < 8 && (q.W == 1 || q.W == 2 || q.W == 4)) {
    if (q.W == 1) return stream_avx512<1>(q, begin, end, top);
    if (q.W == 2) return stream_avx512<2>(q, begin, end, top);
    return stream_avx512<4>(q, begin, end, top);
  }
  const int64_t rows = tile_rows(q.W);
  for_words(q.W, [&](auto w) { range_avx512_w<w()>(q, q.bank, begin, end, rows, q.valid, q.bank_tag, top); });
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
#else
void scan_avx512(const Scan& s, int64_t begin, int64_t end, TopK& top) { scan_scalar(s, begin, end, top); }
double popcount_loop_avx512(int64_t iters) { return popcount_loop_scalar(iters); }
#endif  // LLMCACHE_X86

}  // namespace hamming
}  // namespace cpu
}  // namespace llmcache
