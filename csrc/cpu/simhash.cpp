// SimHash on the CPU: project on nbits random hyperplanes (fp32 accumulation) and pack the signs.
//
// simhash_pooled fuses the paper's fingerprint f(X) = SimHash(mean_t E(X)_t): one pass sums the
// unmasked token rows into an fp32 accumulator, divides by the count, then projects. Rows are
// independent, so OpenMP splits the batch; the projection loops over planes innermost so the
// compiler vectorises it along the contiguous nbits axis of `planes` (row-major [d, nbits]).
// The two hot loops are cloned for AVX-512, AVX2+FMA and baseline x86-64 (GCC target_clones:
// the loader picks one per CPU), so a portable build still runs wide vectors.
#include <cstring>
#include <vector>

#include "kernels.h"

namespace llmcache {
namespace cpu {
namespace {

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float f16_to_float(uint16_t h) {
  // IEEE binary16 -> binary32, subnormals and inf/nan included.
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ff;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LLMCACHE_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define LLMCACHE_CLONES
#endif

// acc[i] += row[i] as fp32, for `d` elements of `dtype` at `row`.
LLMCACHE_CLONES void accumulate(const void* row, Dtype dtype, int64_t d, float* acc) {
  if (dtype == Dtype::F32) {
    const float* p = static_cast<const float*>(row);
    for (int64_t i = 0; i < d; ++i) acc[i] += p[i];
  } else if (dtype == Dtype::BF16) {
    const uint16_t* p = static_cast<const uint16_t*>(row);
    for (int64_t i = 0; i < d; ++i) acc[i] += bf16_to_float(p[i]);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(row);
    for (int64_t i = 0; i < d; ++i) acc[i] += f16_to_float(p[i]);
  }
}

// acc[i] += sum over the listed fp32 rows, four rows per sweep of acc (fewer acc loads/stores).
LLMCACHE_CLONES void accumulate_f32_rows(const float* const* rows, int64_t count, int64_t d, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const float *p0 = rows[r], *p1 = rows[r + 1], *p2 = rows[r + 2], *p3 = rows[r + 3];
    for (int64_t i = 0; i < d; ++i) acc[i] += (p0[i] + p1[i]) + (p2[i] + p3[i]);
  }
  for (; r < count; ++r) accumulate(rows[r], Dtype::F32, d, acc);
}

inline int64_t element_size(Dtype dtype) { return dtype == Dtype::F32 ? 4 : 2; }

// codes = sign bits of v . planes; proj is scratch of nbits floats.
LLMCACHE_CLONES void project_and_pack(const float* v, int64_t d, const float* planes, int64_t nbits, float* proj,
                      int64_t* codes) {
  std::memset(proj, 0, sizeof(float) * nbits);
  for (int64_t i = 0; i < d; ++i) {
    const float vi = v[i];
    const float* plane_row = planes + i * nbits;
    for (int64_t j = 0; j < nbits; ++j) proj[j] += vi * plane_row[j];
  }
  for (int64_t w = 0; w < nbits / 64; ++w) {
    uint64_t word = 0;
    for (int j = 0; j < 64; ++j) word |= static_cast<uint64_t>(proj[w * 64 + j] >= 0.0f) << j;
    codes[w] = static_cast<int64_t>(word);
  }
}

}  // namespace

void simhash(const void* x, Dtype dtype, int64_t B, int64_t d, const float* planes, int64_t nbits,
             int64_t* codes) {
  const int64_t words = nbits / 64;
  const auto* base = static_cast<const uint8_t*>(x);
  const int64_t row_bytes = d * element_size(dtype);
#pragma omp parallel
  {
    std::vector<float> v(d), proj(nbits);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      std::fill(v.begin(), v.end(), 0.0f);
      accumulate(base + b * row_bytes, dtype, d, v.data());
      project_and_pack(v.data(), d, planes, nbits, proj.data(), codes + b * words);
    }
  }
}

void simhash_pooled(const void* embeds, Dtype dtype, const uint8_t* mask, int64_t B, int64_t T,
                    int64_t d, const float* planes, int64_t nbits, int64_t* codes) {
  const int64_t words = nbits / 64;
  const auto* base = static_cast<const uint8_t*>(embeds);
  const int64_t token_bytes = d * element_size(dtype);
#pragma omp parallel
  {
    std::vector<float> v(d), proj(nbits);
    std::vector<const float*> tokens(T);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      std::fill(v.begin(), v.end(), 0.0f);
      int64_t count = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (!mask[b * T + t]) continue;
        if (dtype == Dtype::F32)
          tokens[count] = reinterpret_cast<const float*>(base + (b * T + t) * token_bytes);
        else
          accumulate(base + (b * T + t) * token_bytes, dtype, d, v.data());
        ++count;
      }
      if (dtype == Dtype::F32) accumulate_f32_rows(tokens.data(), count, d, v.data());
      const float denom = count > 0 ? static_cast<float>(count) : 1.0f;
      for (int64_t i = 0; i < d; ++i) v[i] /= denom;
      project_and_pack(v.data(), d, planes, nbits, proj.data(), codes + b * words);
    }
  }
}

}  // namespace cpu
}  // namespace llmcache
