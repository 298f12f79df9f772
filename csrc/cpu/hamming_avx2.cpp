// Hamming scan with AVX2: nibble-lookup popcount (Mula: two vpshufb into a 16-entry table, the
// byte counts summed by vpsadbw) on tiles of the bank transposed to word-major order, so one ymm
// holds word w of 4 consecutive rows and the same load serves G queries.
//
// Per 4 rows and query the loop is: per word xor + lookup popcount + byte add; then one vpsadbw,
// one or (ineligible rows carry a penalty that keeps them out of the minimum) and one vpminsd into
// a lane-wise running minimum. No branch per row: only a query whose minimum ends a tile below its
// k-th rescans that tile exactly (rescan_scalar), a handful of tiles per query for k = 1.
//
// Few queries (B < 8) with W = 4 stream the rows instead (stream_w4): half of each 8 rows through
// the lookup, half through the scalar POPCNT units, which run alongside (1.5x the scalar path
// alone on an L2-resident bank on Zen 4 with AVX-512 hidden).
//
// Harley-Seal variant (W = 4 only, other W run the plain lookup; no stream): the four xor words are first
// reduced by carry-save adders to ones/twos/fours (a half adder, a full adder, a half adder:
// 9 logic ops), then counted with three lookups whose tables hold 1x, 2x and 4x the nibble's
// popcount: 3 lookups instead of 4, i.e. 9 shuffles/shifts instead of 12 per 4 rows and query,
// for 3 more logic ops. It pays where vpshufb and the shifts, not the logic ops, bind (they
// share two of the four vector pipes on AMD Zen); dispatch measures which.
// Compiled with `#pragma GCC target("avx2,popcnt")`, picked at run time only where the CPU has AVX2.
#include <algorithm>
#include <vector>

#include "hamming_scan.h"

namespace llmcache {
namespace cpu {
namespace hamming {

#ifdef LLMCACHE_X86
namespace {

constexpr int64_t kPenalty = 1 << 20;  // above any distance (64 * 16)

// A tile of the bank, word-major: data[w * padded + r]; rows padded to a multiple of 4. With one
// word per row the bank already is word-major: a tile of whole quads without tags reads it in
// place (the copy cost more than the scan at W = 1), with a penalty only where `valid` is given.
struct Tile {
  int64_t first = 0, rows = 0, padded = 0;
  const int64_t* data = nullptr;  // words: the copy below, or the bank itself
  const int64_t* pen = nullptr;   // penalty per row: kPenalty where ineligible or padding
  std::vector<int64_t> words, penalty, tag, zeros;
  void load(const Scan& s, int64_t start, int64_t count, int64_t cap) {
    first = start;
    rows = count;
    padded = (count + 3) / 4 * 4;
    penalty.resize(cap);
    if (s.W == 1 && count == padded && !s.query_tag) {
      data = s.bank + start;
      if (s.valid) {
        for (int64_t r = 0; r < count; ++r) penalty[r] = s.valid[start + r] ? 0 : kPenalty;
        pen = penalty.data();
      } else {
        zeros.resize(cap, 0);
        pen = zeros.data();
      }
      return;
    }
    words.resize(s.W * cap);
    const int64_t W = s.W, P = padded;
    const int64_t* src = s.bank + start * W;
    for (int64_t r = 0; r < count; ++r)
      for (int64_t w = 0; w < W; ++w) words[w * P + r] = src[r * W + w];
    for (int64_t r = count; r < P; ++r) {
      for (int64_t w = 0; w < W; ++w) words[w * P + r] = 0;
      penalty[r] = kPenalty;
    }
    for (int64_t r = 0; r < count; ++r) penalty[r] = s.valid && !s.valid[start + r] ? kPenalty : 0;
    if (s.query_tag) {
      tag.resize(cap);
      std::copy(s.bank_tag + start, s.bank_tag + start + count, tag.begin());
      std::fill(tag.begin() + count, tag.begin() + P, 0);
    }
    data = words.data();
    pen = penalty.data();
  }
};

#pragma GCC push_options
#pragma GCC target("avx2,popcnt")

struct Lut {
  __m256i ones, twos, fours, low;
  Lut() {
    ones = nibble_popcounts();
    twos = _mm256_add_epi8(ones, ones);
    fours = _mm256_add_epi8(twos, twos);
    low = _mm256_set1_epi8(0x0f);
  }
};

// Per byte: table[popcount of the low nibble] + table[popcount of the high nibble].
inline __m256i count_bytes(__m256i x, __m256i table, __m256i low) {
  const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(x, low));
  const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(x, 4), low));
  return _mm256_add_epi8(lo, hi);
}

inline __m256i load4(const int64_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Byte counts of 4 rows' distances to one query (bytes reach at most 8 * W <= 128: no overflow).
template <int W, bool HarleySeal>
inline __m256i distance_bytes(const int64_t* words, int64_t P, int64_t c, const int64_t* q, const Lut& lut) {
  if (HarleySeal && W == 4) {
    const __m256i x0 = _mm256_xor_si256(load4(words + c), _mm256_set1_epi64x(q[0]));
    const __m256i x1 = _mm256_xor_si256(load4(words + P + c), _mm256_set1_epi64x(q[1]));
    const __m256i x2 = _mm256_xor_si256(load4(words + 2 * P + c), _mm256_set1_epi64x(q[2]));
    const __m256i x3 = _mm256_xor_si256(load4(words + 3 * P + c), _mm256_set1_epi64x(q[3]));
    const __m256i h = _mm256_xor_si256(x0, x1), c1 = _mm256_and_si256(x0, x1);
    const __m256i u = _mm256_xor_si256(h, x2);
    const __m256i c2 = _mm256_or_si256(_mm256_and_si256(h, x2), _mm256_and_si256(u, x3));
    const __m256i ones = _mm256_xor_si256(u, x3);
    const __m256i twos = _mm256_xor_si256(c1, c2), fours = _mm256_and_si256(c1, c2);
    return _mm256_add_epi8(_mm256_add_epi8(count_bytes(ones, lut.ones, lut.low), count_bytes(twos, lut.twos, lut.low)),
                           count_bytes(fours, lut.fours, lut.low));
  }
  __m256i bytes = count_bytes(_mm256_xor_si256(load4(words + c), _mm256_set1_epi64x(q[0])), lut.ones, lut.low);
  for (int w = 1; w < W; ++w)
    bytes = _mm256_add_epi8(
        bytes, count_bytes(_mm256_xor_si256(load4(words + w * P + c), _mm256_set1_epi64x(q[w])), lut.ones, lut.low));
  return bytes;
}

inline int32_t min_lane(__m256i v) {
  const __m128i m = _mm_min_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  return _mm_cvtsi128_si32(_mm_min_epi32(m, _mm_shuffle_epi32(m, 0x4e)));
}

// Filter pass of G queries over a tile: lane-wise minimum of the eligible distances (64-bit lanes
// whose high halves are 0, so a 32-bit min is exact); a query whose minimum beats its k-th
// rescans the tile's rows exactly.
template <int W, int G, bool Tags, bool HarleySeal>
void group(const Scan& s, int64_t b0, const Tile& t, TopK& top, const Lut& lut) {
  __m256i best[G], qtag[G];
  for (int g = 0; g < G; ++g) {
    best[g] = _mm256_set1_epi64x(top.worst(b0 + g));
    qtag[g] = _mm256_set1_epi64x(Tags ? s.query_tag[b0 + g] : 0);
  }
  const __m256i zero = _mm256_setzero_si256(), penalty = _mm256_set1_epi64x(kPenalty);
  const int64_t* words = t.data;
  for (int64_t c = 0; c < t.padded; c += 4) {
    const __m256i pen = load4(t.pen + c);
    const __m256i tags = Tags ? load4(&t.tag[c]) : zero;
    for (int g = 0; g < G; ++g) {
      __m256i d = _mm256_sad_epu8(distance_bytes<W, HarleySeal>(words, t.padded, c, s.queries + (b0 + g) * W, lut), zero);
      d = _mm256_or_si256(d, pen);
      if (Tags) d = _mm256_or_si256(d, _mm256_andnot_si256(_mm256_cmpeq_epi64(tags, qtag[g]), penalty));
      best[g] = _mm256_min_epi32(best[g], d);
    }
  }
  for (int g = 0; g < G; ++g)
    if (min_lane(best[g]) < top.worst(b0 + g)) rescan_scalar(s, b0 + g, t.first, t.first + t.rows, top);
}

template <int W, bool Tags, bool HarleySeal>
void tiles(const Scan& s, int64_t begin, int64_t end, TopK& top) {
  constexpr int G = 4;  // 4 accumulators + 4 minima + tables and temporaries: the 16 ymm registers
  const Lut lut;
  const int64_t rows = tile_rows(W);
  Tile t;
  for (int64_t start = begin; start < end; start += rows) {
    t.load(s, start, std::min(rows, end - start), rows);
    int64_t b = 0;
    for (; b + G <= s.B; b += G) group<W, G, Tags, HarleySeal>(s, b, t, top, lut);
    for (; b < s.B; ++b) group<W, 1, Tags, HarleySeal>(s, b, t, top, lut);
  }
}

// Few queries, W = 4: each query streams the rows as stored, 8 at a time: rows 0-3 through the
// vector pipes (a 4x4 transpose in registers, then the nibble lookup and one vpsadbw), rows 4-7
// through the scalar POPCNT units, which the vector code leaves idle, so the core runs both at
// once. Candidates are offered in row order (the vector lanes first), the tail row by row.
constexpr int64_t kAhead = 256;  // words prefetched ahead of the stream

void stream_w4(const Scan& s, int64_t b, int64_t begin, int64_t end, TopK& top) {
  const Lut lut;
  const int64_t* q = s.queries + b * 4;
  const uint64_t q0 = static_cast<uint64_t>(q[0]), q1 = static_cast<uint64_t>(q[1]);
  const uint64_t q2 = static_cast<uint64_t>(q[2]), q3 = static_cast<uint64_t>(q[3]);
  const __m256i qv0 = _mm256_set1_epi64x(q[0]), qv1 = _mm256_set1_epi64x(q[1]);
  const __m256i qv2 = _mm256_set1_epi64x(q[2]), qv3 = _mm256_set1_epi64x(q[3]);
  const __m256i zero = _mm256_setzero_si256();
  int32_t worst = top.worst(b);
  __m256i worst_v = _mm256_set1_epi64x(worst);
  alignas(32) int64_t lanes[4];
  int64_t n = begin;
  for (; n + 8 <= end; n += 8) {
    const int64_t* r = s.bank + n * 4;
    for (int line = 0; line < 4; ++line)  // (2 KiB ahead: the bank streams from DRAM at B = 1)
      _mm_prefetch(reinterpret_cast<const char*>(r + kAhead + 8 * line), _MM_HINT_T0);
    const __m256i r0 = load4(r), r1 = load4(r + 4), r2 = load4(r + 8), r3 = load4(r + 12);
    const __m256i t0 = _mm256_unpacklo_epi64(r0, r1), t1 = _mm256_unpackhi_epi64(r0, r1);
    const __m256i t2 = _mm256_unpacklo_epi64(r2, r3), t3 = _mm256_unpackhi_epi64(r2, r3);
    __m256i bytes = count_bytes(_mm256_xor_si256(_mm256_permute2x128_si256(t0, t2, 0x20), qv0), lut.ones, lut.low);
    bytes = _mm256_add_epi8(bytes, count_bytes(_mm256_xor_si256(_mm256_permute2x128_si256(t1, t3, 0x20), qv1),
                                               lut.ones, lut.low));
    bytes = _mm256_add_epi8(bytes, count_bytes(_mm256_xor_si256(_mm256_permute2x128_si256(t0, t2, 0x31), qv2),
                                               lut.ones, lut.low));
    bytes = _mm256_add_epi8(bytes, count_bytes(_mm256_xor_si256(_mm256_permute2x128_si256(t1, t3, 0x31), qv3),
                                               lut.ones, lut.low));
    const __m256i d = _mm256_sad_epu8(bytes, zero);
    const uint64_t* u = reinterpret_cast<const uint64_t*>(r + 16);
    int32_t ds[4];
    for (int l = 0; l < 4; ++l)
      ds[l] = __builtin_popcountll(q0 ^ u[4 * l]) + __builtin_popcountll(q1 ^ u[4 * l + 1]) +
              __builtin_popcountll(q2 ^ u[4 * l + 2]) + __builtin_popcountll(q3 ^ u[4 * l + 3]);
    const int mask = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(worst_v, d)));
    const bool scalar_hit = (ds[0] < worst) | (ds[1] < worst) | (ds[2] < worst) | (ds[3] < worst);
    if (__builtin_expect(mask == 0 && !scalar_hit, 1)) continue;
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), d);
    for (int l = 0; l < 4; ++l)
      if (lanes[l] < top.worst(b)) s.offer(top, b, static_cast<int32_t>(lanes[l]), n + l);
    for (int l = 0; l < 4; ++l)
      if (ds[l] < top.worst(b)) s.offer(top, b, ds[l], n + 4 + l);
    worst = top.worst(b);
    worst_v = _mm256_set1_epi64x(worst);
  }
  if (n < end) rescan_scalar(s, b, n, end, top);
}

template <bool HarleySeal>
void dispatch(const Scan& s, int64_t begin, int64_t end, TopK& top) {
  const bool tags = s.query_tag != nullptr;
  if (!HarleySeal && s.W == 4 && s.B < 8) {  // few queries: stream (16 KiB tiles: B > 1 rereads them from L1)
    const int64_t rows = tile_rows(4);
    for (int64_t start = begin; start < end; start += rows)
      for (int64_t b = 0; b < s.B; ++b) stream_w4(s, b, start, std::min(end, start + rows), top);
    return;
  }
  for_words(s.W, [&](auto w) {
    if (tags) return tiles<w(), true, HarleySeal>(s, begin, end, top);
    tiles<w(), false, HarleySeal>(s, begin, end, top);
  });
}

}  // namespace

// Eight independent lookup-popcount chains on registers: the AVX2 path's popcount rate.
double popcount_loop_avx2(int64_t iters) {
  const Lut lut;
  __m256i a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_set1_epi64x(0x0123456789abcdefLL + i);
  for (int64_t i = 0; i < iters; ++i) {
    for (auto& v : a) v = count_bytes(v, lut.ones, lut.low);
    __asm__ volatile("" : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]), "+x"(a[4]), "+x"(a[5]), "+x"(a[6]), "+x"(a[7]));
  }
  return 32.0 * iters + 0.0 * _mm256_extract_epi64(a[0], 0);  // 8 vectors x 4 words
}

#pragma GCC pop_options

void scan_avx2(const Scan& s, int64_t begin, int64_t end, TopK& top) { dispatch<false>(s, begin, end, top); }
void scan_avx2_harley_seal(const Scan& s, int64_t begin, int64_t end, TopK& top) {
  dispatch<true>(s, begin, end, top);
}
#else
void scan_avx2(const Scan& s, int64_t begin, int64_t end, TopK& top) { scan_scalar(s, begin, end, top); }
void scan_avx2_harley_seal(const Scan& s, int64_t begin, int64_t end, TopK& top) { scan_scalar(s, begin, end, top); }
double popcount_loop_avx2(int64_t iters) { return popcount_loop_scalar(iters); }
#endif

}  // namespace hamming
}  // namespace cpu
}  // namespace llmcache
