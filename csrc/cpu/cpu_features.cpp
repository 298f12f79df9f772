// Run-time CPU feature detection (cpuid + xgetbv), so the build never needs -march=native.
// LLMCACHE_CPU_CAP=avx2 (or =scalar) hides the wider features, so one machine can stand in for an
// AVX2-only (or pre-AVX2) one: the dispatch and build_info() then see that machine.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace llmcache {
namespace cpu {

CpuFeatures cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  f.popcnt = (c >> 23) & 1;
  f.pclmul = ((c >> 1) & 1) && ((c >> 19) & 1);
  const bool osxsave = (c >> 27) & 1;
  const bool avx = (c >> 28) & 1;
  unsigned long long xcr0 = 0;
  if (osxsave) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  const bool ymm_os = (xcr0 & 0x6) == 0x6;            // SSE + AVX state saved by the OS
  const bool zmm_os = ymm_os && (xcr0 & 0xe0) == 0xe0;  // opmask + ZMM state
  if (__get_cpuid_max(0, nullptr) >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f.avx2 = avx && ymm_os && ((b >> 5) & 1);
    f.avx512f = zmm_os && ((b >> 16) & 1);
    f.avx512bw = zmm_os && ((b >> 30) & 1);
    f.avx512_vpopcntdq = zmm_os && ((c >> 14) & 1);
  }
#endif
  const char* cap = std::getenv("LLMCACHE_CPU_CAP");
  if (cap && (std::strcmp(cap, "avx2") == 0 || std::strcmp(cap, "scalar") == 0))
    f.avx512f = f.avx512bw = f.avx512_vpopcntdq = false;
  if (cap && std::strcmp(cap, "scalar") == 0) f.avx2 = f.pclmul = false;
  return f;
}

}  // namespace cpu
}  // namespace llmcache
