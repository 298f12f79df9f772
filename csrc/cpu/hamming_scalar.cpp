// Hamming scan with the scalar POPCNT instruction on rows as the bank stores them (no transpose).
//
// d(q, r) = sum_w popcount(q[w] ^ r[w]), W fixed at compile time so the word loop unrolls into
// independent xor/popcnt/add chains. G queries are scored per row load (their words stay in
// registers or L1); with more than G queries the bank is walked in tiles of ~16 KiB, each tile
// scored against every query group while it sits in L1, so the bank streams from memory once.
// The hot loop has one compare and a branch that is almost never taken per (row, query):
// eligibility (valid, tags) is checked only for a row that beats the query's k-th.
// On AMD Zen, POPCNT issues on every integer ALU (4 per cycle), which is why this path beats the
// AVX2 nibble lookup there at few queries; faiss's IndexBinaryFlat runs the same instruction.
// Compiled with `#pragma GCC target("popcnt")` on x86-64 and picked only where the CPU has it;
// elsewhere __builtin_popcountll is the compiler's portable routine.
#include <algorithm>

#include "hamming_scan.h"
#include "kernels.h"

namespace llmcache {
namespace cpu {
namespace hamming {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("popcnt")
#endif

template <int W, int G>
void rows(const Scan& s, int64_t b0, int64_t begin, int64_t end, TopK& top) {
  uint64_t q[G][W];
  int32_t worst[G];
  for (int g = 0; g < G; ++g) {
    for (int w = 0; w < W; ++w) q[g][w] = static_cast<uint64_t>(s.queries[(b0 + g) * W + w]);
    worst[g] = top.worst(b0 + g);
  }
  const uint64_t* row = reinterpret_cast<const uint64_t*>(s.bank) + begin * W;
  for (int64_t n = begin; n < end; ++n, row += W) {
    for (int g = 0; g < G; ++g) {
      int32_t d = 0;
      for (int w = 0; w < W; ++w) d += __builtin_popcountll(q[g][w] ^ row[w]);
      if (__builtin_expect(d < worst[g], 0)) {
        s.offer(top, b0 + g, d, n);
        worst[g] = top.worst(b0 + g);
      }
    }
  }
}

// Query groups of 4 (G * W words must not crowd out the row's; 4 keeps W = 4 in 16 GPRs + L1).
template <int W>
void scan_w(const Scan& s, int64_t begin, int64_t end, TopK& top) {
  constexpr int G = W <= 2 ? 4 : 2;
  const int64_t tile = s.B <= G ? end - begin : tile_rows(W);
  for (int64_t start = begin; start < end; start += tile) {
    const int64_t stop = std::min(end, start + tile);
    int64_t b = 0;
    for (; b + G <= s.B; b += G) rows<W, G>(s, b, start, stop, top);
    for (; b < s.B; ++b) rows<W, 1>(s, b, start, stop, top);
  }
}

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC pop_options
#endif

}  // namespace

void scan_scalar(const Scan& s, int64_t begin, int64_t end, TopK& top) {
  for_words(s.W, [&](auto w) { scan_w<w()>(s, begin, end, top); });
}

void rescan_scalar(const Scan& s, int64_t b, int64_t begin, int64_t end, TopK& top) {
  for_words(s.W, [&](auto w) { rows<w(), 1>(s, b, begin, end, top); });
}

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("popcnt")
#endif
// Eight independent popcount chains in registers: the issue rate of the POPCNT units.
double popcount_loop_scalar(int64_t iters) {
  uint64_t a0 = 0x0123456789abcdefULL, a1 = 7, a2 = 11, a3 = 13, a4 = 17, a5 = 19, a6 = 23, a7 = 29;
  for (int64_t i = 0; i < iters; ++i) {
    a0 = __builtin_popcountll(a0); a1 = __builtin_popcountll(a1);
    a2 = __builtin_popcountll(a2); a3 = __builtin_popcountll(a3);
    a4 = __builtin_popcountll(a4); a5 = __builtin_popcountll(a5);
    a6 = __builtin_popcountll(a6); a7 = __builtin_popcountll(a7);
    __asm__ volatile("" : "+r"(a0), "+r"(a1), "+r"(a2), "+r"(a3), "+r"(a4), "+r"(a5), "+r"(a6), "+r"(a7));
  }
  return 8.0 * iters + 0.0 * static_cast<double>(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7);
}
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC pop_options
#endif

}  // namespace hamming
}  // namespace cpu
}  // namespace llmcache
