// Hamming top-k over a bank of SimHash codes on the CPU: which popcount path runs, the threads,
// and the merge. The paths themselves are in hamming_{scalar,avx2,avx512}.cpp (hamming_scan.h).
//
// d(q, b) = sum_w popcount(q[w] XOR b[w]). OpenMP threads claim contiguous chunks of the bank
// (up to 32 tiles) in increasing order; each scans its chunk with the chosen path, which visits
// rows in increasing index and keeps "strictly below the k-th", so ties go to the smaller index;
// the per-thread lists are merged by (distance, index) at the end.
//
// Which path: every path the CPU can run is a candidate ("scalar" needs POPCNT on x86-64, "avx2",
// "avx2_harley_seal" and "avx2_tables" AVX2, "avx512_vpopcntdq" AVX-512F/BW + VPOPCNTDQ). Where the features
// leave more than one, the first call of each regime (few queries, B < 8: bound by reading the
// bank; many queries: bound by popcounts) and code width W times every candidate once on a
// synthetic bank that sits in L2 and keeps the fastest for the process: on AMD Zen the scalar POPCNT units beat the
// AVX2 nibble lookup at few queries, and which AVX2 variant wins at many is the machine's call.
// LLMCACHE_CPU_ISA=<path> forces one (read on every call, so tests can run every path).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "hamming_scan.h"
#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace llmcache {
namespace cpu {
namespace {

using hamming::RangeScan;
using hamming::Scan;
using hamming::TopK;

// Plain C++ for a CPU without POPCNT (the compiler's popcount routine): correct, not fast.
void scan_portable(const Scan& s, int64_t begin, int64_t end, TopK& top) {
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t n = begin; n < end; ++n) {
      int32_t d = 0;
      for (int64_t w = 0; w < s.W; ++w)
        d += __builtin_popcountll(static_cast<uint64_t>(s.queries[b * s.W + w] ^ s.bank[n * s.W + w]));
      if (d < top.worst(b)) s.offer(top, b, d, n);
    }
}

struct Path {
  const char* name;
  RangeScan scan;
};
const Path kPaths[] = {{"portable", scan_portable},
                       {"scalar", hamming::scan_scalar},
                       {"avx2", hamming::scan_avx2},
                       {"avx2_harley_seal", hamming::scan_avx2_harley_seal},
                       {"avx2_tables", hamming::scan_avx2_tables},
                       {"avx512_vpopcntdq", hamming::scan_avx512}};
constexpr int kPathCount = sizeof(kPaths) / sizeof(kPaths[0]);

const CpuFeatures& features() {
  static const CpuFeatures f = cpu_features();  // cpuid traps to the hypervisor in a VM: once
  return f;
}

bool runs_here(int path) {
  const CpuFeatures& f = features();
#if defined(__x86_64__) || defined(_M_X64)
  switch (path) {
    case 0: return true;  // forced only, or where POPCNT is missing (calibrate)
    case 1: return f.popcnt;
    case 2: case 3: case 4: return f.avx2;
    default: return f.avx512_vpopcntdq && f.avx512f && f.avx512bw;
  }
#else
  (void)f;
  return path <= 1;  // the scalar path's popcount is the compiler's builtin off x86
#endif
}

constexpr int64_t kFewQueries = 8;  // B below this: the "few" regime
constexpr int64_t kMaxWords = 16;

struct Choice {
  int path = 1;
  std::string why;
};

// Times every path the CPU runs on an L2-sized synthetic bank (256 KiB: N = 32768 / W rows of the
// call's W), B = 1 or 32, best of 3 calls each after a warm-up, and keeps the fastest. Per W: which
// path wins depends on it (on an Intel Xeon with AVX2 only, the scalar path is 3x the nibble lookup
// at W = 1, B = 1, and 0.8x it at W = 4).
Choice calibrate(bool few, int64_t W) {
  const int64_t N = 32768 / W, B = few ? 1 : 32;
  std::vector<int64_t> bank(N * W), queries(B * W);
  uint64_t x = 0x9e3779b97f4a7c15ULL;
  for (auto* v : {&bank, &queries})
    for (auto& word : *v) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      word = static_cast<int64_t>(x);
    }
  const Scan s{queries.data(), nullptr, B, W, bank.data(), nullptr, nullptr};
  Choice best;
  double best_s = 1e30;
  std::string timings;
  int candidates = 0;
  for (int p = 0; p < kPathCount; ++p) {
    if (!runs_here(p) || (p == 0 && runs_here(1))) continue;
    ++candidates;
    double fastest = 1e30;
    for (int rep = 0; rep < 4; ++rep) {
      TopK top(B, 1, 64 * W + 1);
      const auto start = std::chrono::steady_clock::now();
      kPaths[p].scan(s, 0, N, top);
      const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (rep > 0) fastest = std::min(fastest, took);
    }
    char buf[96];
    std::snprintf(buf, sizeof buf, "%s%s %.1f us", timings.empty() ? "" : ", ", kPaths[p].name, 1e6 * fastest);
    timings += buf;
    if (fastest < best_s) best_s = fastest, best.path = p;
  }
  best.why = candidates == 1 ? "the only path this CPU runs"
                             : "fastest at first use (B=" + std::to_string(B) + ", N=" + std::to_string(N) +
                                   ", W=" + std::to_string(W) + "): " + timings;
  return best;
}

// The path for a call of B queries of W words: forced, or calibrated once per (regime, W).
Choice choose(int64_t B, int64_t W) {
  if (const char* forced = std::getenv("LLMCACHE_CPU_ISA")) {
    const std::string name = std::strcmp(forced, "avx512") == 0 ? "avx512_vpopcntdq" : forced;
    for (int p = 0; p < kPathCount; ++p)
      if (name == kPaths[p].name && runs_here(p)) return {p, std::string("forced by LLMCACHE_CPU_ISA=") + forced};
  }
  static std::once_flag once[2][kMaxWords + 1];
  static Choice choice[2][kMaxWords + 1];
  const int few = B < kFewQueries ? 1 : 0;
  const int64_t w = std::clamp<int64_t>(W, 1, kMaxWords);
  std::call_once(once[few][w], [&] { choice[few][w] = calibrate(few, w); });
  return choice[few][w];
}

}  // namespace

std::string cpu_kernel_name() { return kPaths[choose(kFewQueries, 4).path].name; }

KernelChoice cpu_kernel_choice(int64_t W) {
  const Choice few = choose(1, W), many = choose(kFewQueries, W);
  return {kPaths[few.path].name, few.why, kPaths[many.path].name, many.why};
}

namespace hamming {
double popcount_loop(const std::string& path, int64_t iters) {
  if (path == "avx512_vpopcntdq") return popcount_loop_avx512(iters);
  if (path == "avx2_tables") return popcount_loop_avx2_tables(iters);
  if (path.rfind("avx2", 0) == 0) return popcount_loop_avx2(iters);
  return popcount_loop_scalar(iters);
}
}  // namespace hamming

void hamming_topk(const int64_t* queries, int64_t B, const int64_t* bank, int64_t N, int64_t W,
                  int64_t k, const uint8_t* valid, const int64_t* query_tag,
                  const int64_t* bank_tag, int32_t* dist, int64_t* idx) {
  const int32_t missing = static_cast<int32_t>(64 * W + 1);
  std::fill(dist, dist + B * k, missing);
  std::fill(idx, idx + B * k, int64_t{-1});
  if (B == 0 || N == 0) return;
  const RangeScan scan = kPaths[choose(B, W).path].scan;
  const Scan s{queries, query_tag, B, W, bank, valid, bank_tag};
  const int64_t tile_rows = hamming::tile_rows(W);
  int threads = 1;
#ifdef _OPENMP
  // No thread gets less than a tile, nor less than ~64 K word comparisons (about the cost of
  // entering a parallel region on a VM): small lookups stay on one thread.
  const int64_t work = std::min(N / tile_rows, N * B * W / (int64_t{1} << 16));
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), work)));
#endif
  if (threads == 1) {  // small banks: no parallel region to enter, no merge
    TopK top(B, k, missing);
    scan(s, 0, N, top);
    std::copy(top.dist.begin(), top.dist.end(), dist);
    std::copy(top.idx.begin(), top.idx.end(), idx);
    return;
  }
  std::vector<TopK> partial;
  partial.reserve(threads);
  for (int i = 0; i < threads; ++i) partial.emplace_back(B, k, missing);
  // Threads claim chunks of up to 32 tiles in increasing order (dynamic schedule), so a thread
  // slowed by another process on the machine does not hold up the call; each thread still visits
  // its rows in increasing index, which the tie rule needs. At least ~4 chunks per thread so
  // mid-sized banks still spread over all threads.
  const int64_t chunk_rows = tile_rows * std::max<int64_t>(1, std::min<int64_t>(32, N / (4 * threads * tile_rows)));
  const int64_t chunks = (N + chunk_rows - 1) / chunk_rows;
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    TopK& top = partial[omp_get_thread_num()];
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) scan(s, c * chunk_rows, std::min(N, (c + 1) * chunk_rows), top);
#endif
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

}  // namespace cpu
}  // namespace llmcache
