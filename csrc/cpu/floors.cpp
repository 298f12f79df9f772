// What the hardware allows, measured the way the kernels use it: the benchmark's floors
// (bench/micro/kernels.py). A Hamming scan is bound by its popcount rate or by reading the bank.
#include <chrono>

#include "hamming_scan.h"
#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace llmcache {
namespace cpu {
namespace {

double since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Sum of a slice's words with four independent accumulators (vectorised by the compiler).
uint64_t sum_words(const uint64_t* p, int64_t n) {
  uint64_t a = 0, b = 0, c = 0, d = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) a += p[i], b += p[i + 1], c += p[i + 2], d += p[i + 3];
  for (; i < n; ++i) a += p[i];
  return a + b + c + d;
}

}  // namespace

double popcount_peak_rate(double seconds, const std::string& path) {
  const std::string name = path.empty() ? cpu_kernel_name() : path;
  const int64_t iters = 1 << 20;
  double words = 0.0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0.0;
  while (elapsed < seconds) {
#pragma omp parallel reduction(+ : words)
    words += hamming::popcount_loop(name, iters);
    elapsed = since(start);
  }
  return words / elapsed;
}

double read_rate(const void* data, int64_t bytes, double seconds) {
  const auto* words = static_cast<const uint64_t*>(data);
  const int64_t n = bytes / 8;
  volatile uint64_t sink = 0;  // keeps the sums, hence the reads
  double read = 0.0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0.0;
  while (elapsed < seconds) {
    uint64_t total = 0;
#pragma omp parallel reduction(+ : read, total)
    {
      int64_t begin = 0, end = n;
#ifdef _OPENMP
      const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
      begin = n * t / T, end = n * (t + 1) / T;
#endif
      total += sum_words(words + begin, end - begin);
      read += 8.0 * (end - begin);
    }
    sink = sink + total;
    elapsed = since(start);
  }
  return read / elapsed;
}

}  // namespace cpu
}  // namespace llmcache
