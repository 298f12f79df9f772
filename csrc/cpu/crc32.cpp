// crc32_copy: CRC-32 (ISO-HDLC, zlib's crc32: reflected polynomial 0xEDB88320, pre- and
// post-inverted) of a buffer, copying it to `dst` in the same pass (the shared tier checks a
// fetched value's payload and moves it into its host buffer with one read of the bytes).
// Folding with carry-less multiplication (PCLMULQDQ) four 128-bit lanes at a time, then one
// lane, then a Barrett reduction: Gopal et al., "Fast CRC Computation for Generic Polynomials
// Using PCLMULQDQ Instruction" (Intel, 2009); the constants are x^(4*128+32), x^(4*128-32),
// x^(128+32), x^(128-32), x^64 mod P and floor(x^64 / P), bit-reflected. Bytes before and after
// the 16-byte lanes go through a table. Equal to zlib.crc32 byte for byte (tests/test_crc32.py).
#include <immintrin.h>

#include <cstring>

#include "kernels.h"

namespace llmcache {
namespace cpu {
namespace {

struct Table {
  uint32_t t[256];
  Table() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
  }
};
const Table kTable;

// The running (inverted) CRC over n bytes, one byte at a time, copying them.
uint32_t bytewise(uint32_t crc, const uint8_t* src, uint8_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (dst) dst[i] = src[i];
    crc = kTable.t[(crc ^ src[i]) & 0xFF] ^ (crc >> 8);
  }
  return crc;
}

#define LLMCACHE_CLMUL __attribute__((target("pclmul,sse4.1")))

LLMCACHE_CLMUL inline __m128i take(const uint8_t* src, uint8_t* dst, int64_t at) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + at));
  if (dst) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + at), v);
  return v;
}

// x folded 128 bits forward (by the constants k: their low half for x's low half, high for high), plus next.
LLMCACHE_CLMUL inline __m128i fold(__m128i x, __m128i k, __m128i next) {
  return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x11), _mm_clmulepi64_si128(x, k, 0x00)), next);
}

// n >= 64 and a multiple of 16; crc is the running (inverted) value.
LLMCACHE_CLMUL uint32_t folded(uint32_t crc, const uint8_t* src, uint8_t* dst, int64_t n) {
  const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL);
  const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);
  const __m128i k5k0 = _mm_set_epi64x(0, 0x0163cd6124LL);
  const __m128i poly = _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL);
  __m128i x1 = take(src, dst, 0), x2 = take(src, dst, 16), x3 = take(src, dst, 32), x4 = take(src, dst, 48);
  x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128(static_cast<int>(crc)));
  int64_t at = 64;
  for (; at + 64 <= n; at += 64) {  // four independent lanes, 512 bits forward each step
    x1 = fold(x1, k1k2, take(src, dst, at));
    x2 = fold(x2, k1k2, take(src, dst, at + 16));
    x3 = fold(x3, k1k2, take(src, dst, at + 32));
    x4 = fold(x4, k1k2, take(src, dst, at + 48));
  }
  x1 = fold(x1, k3k4, x2);  // the four lanes into one
  x1 = fold(x1, k3k4, x3);
  x1 = fold(x1, k3k4, x4);
  for (; at + 16 <= n; at += 16) x1 = fold(x1, k3k4, take(src, dst, at));
  // 128 bits to 64, then 32 (Barrett).
  const __m128i mask32 = _mm_setr_epi32(~0, 0, ~0, 0);
  x2 = _mm_clmulepi64_si128(x1, k3k4, 0x10);
  x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2);
  x2 = _mm_srli_si128(x1, 4);
  x1 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), k5k0, 0x00), x2);
  x2 = _mm_clmulepi64_si128(_mm_and_si128(x1, mask32), poly, 0x10);
  x2 = _mm_clmulepi64_si128(_mm_and_si128(x2, mask32), poly, 0x00);
  x1 = _mm_xor_si128(x1, x2);
  return static_cast<uint32_t>(_mm_extract_epi32(x1, 1));
}

}  // namespace

uint32_t crc32_copy(uint32_t crc, const uint8_t* src, uint8_t* dst, int64_t n) {
  static const bool pclmul = cpu_features().pclmul;  // (cpuid once: in a VM it is an exit)
  crc = ~crc;
  const int64_t lanes = n >= 64 && pclmul ? n & ~int64_t{15} : 0;
  if (lanes) crc = folded(crc, src, dst, lanes);
  crc = bytewise(crc, src + lanes, dst ? dst + lanes : nullptr, n - lanes);
  return ~crc;
}

}  // namespace cpu
}  // namespace llmcache
