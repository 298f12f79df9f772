// SimHash on the CPU: project on nbits random hyperplanes (fp32 accumulation) and pack the signs.
//
// simhash_pooled fuses the paper's fingerprint f(X) = SimHash(mean_t E(X)_t): one pass sums the
// unmasked token rows into an fp32 accumulator (four rows per sweep for fp32), divides by the
// count, then projects. OpenMP splits the batch into blocks of kBlockRows rows; a block's means
// are projected together as a small GEMM [rows, d] x [d, nbits] (project_rows): on AVX-512 the
// rows x 64 planes of accumulators live in zmm registers over the whole d loop, so each plane
// load feeds 4 * rows FMAs and the [d, nbits] planes (384 KiB at d = 384, nbits = 256: L2, not
// L1) are read once per block instead of once per row. At B = 64, T = 128, d = 384 the
// projection was the larger half of the time before this blocking.
// On AVX2 + FMA the same blocking runs 16 planes per pass (project_rows_avx2: 4 rows x 2 ymm
// accumulators); without either, the projection goes one row at a time, looping over planes
// innermost so the compiler vectorises it along the contiguous nbits axis of `planes`.
// The accumulation loops and that fallback are cloned for AVX-512, AVX2+FMA and baseline x86-64
// (GCC target_clones: the loader picks one per CPU), so a portable build still runs wide
// vectors; the blocked kernels are compiled with `#pragma GCC target` and picked at run time
// from cpu_features(), capped by LLMCACHE_CPU_ISA (simd_level).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMCACHE_X86 1
#endif

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

// Rows projected together by project_rows: each plane load feeds kBlockRows rows.
constexpr int64_t kBlockRows = 4;

#ifdef LLMCACHE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
// codes for R rows of v ([R, d], row stride d) against 64 planes at a time: R x 4 zmm
// accumulators stay in registers over the whole d loop, and each 4-vector load of a plane row
// feeds 4R FMAs (broadcast v[r][i]), so planes are read once per R rows instead of once per row.
template <int R>
void project_rows_avx512(const float* v, int64_t d, const float* planes, int64_t nbits, int64_t* codes) {
  const int64_t words = nbits / 64;
  for (int64_t w = 0; w < words; ++w) {
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    const float* p = planes + w * 64;
    for (int64_t i = 0; i < d; ++i, p += nbits) {
      const __m512 p0 = _mm512_loadu_ps(p), p1 = _mm512_loadu_ps(p + 16);
      const __m512 p2 = _mm512_loadu_ps(p + 32), p3 = _mm512_loadu_ps(p + 48);
      for (int r = 0; r < R; ++r) {
        const __m512 vi = _mm512_set1_ps(v[r * d + i]);
        acc[r][0] = _mm512_fmadd_ps(vi, p0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(vi, p1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(vi, p2, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(vi, p3, acc[r][3]);
      }
    }
    const __m512 zero = _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      uint64_t word = 0;
      for (int c = 0; c < 4; ++c)
        word |= static_cast<uint64_t>(_mm512_cmp_ps_mask(acc[r][c], zero, _CMP_GE_OQ)) << (16 * c);
      codes[r * words + w] = static_cast<int64_t>(word);
    }
  }
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
// The same blocking on AVX2: R rows x 16 planes per pass, 2R ymm accumulators (8 at R = 4: the
// 16 ymm registers leave no room for 64 planes), so each pair of plane loads feeds 2R FMAs.
template <int R>
void project_rows_avx2(const float* v, int64_t d, const float* planes, int64_t nbits, int64_t* codes) {
  const int64_t words = nbits / 64;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t w = 0; w < words; ++w) codes[r * words + w] = 0;
  for (int64_t j0 = 0; j0 < nbits; j0 += 16) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const float* p = planes + j0;
    for (int64_t i = 0; i < d; ++i, p += nbits) {
      const __m256 p0 = _mm256_loadu_ps(p), p1 = _mm256_loadu_ps(p + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 vi = _mm256_broadcast_ss(v + r * d + i);
        acc[r][0] = _mm256_fmadd_ps(vi, p0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(vi, p1, acc[r][1]);
      }
    }
    const __m256 zero = _mm256_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const uint64_t bits = static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(acc[r][0], zero, _CMP_GE_OQ))) |
                            static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(acc[r][1], zero, _CMP_GE_OQ))) << 8;
      codes[r * words + j0 / 64] |= static_cast<int64_t>(bits << (j0 % 64));
    }
  }
}
#pragma GCC pop_options
#endif

// The widest projection the CPU runs, capped by LLMCACHE_CPU_ISA (the switch that forces the
// Hamming path: any non-AVX-512 value also keeps this op off AVX-512, "scalar"/"portable" off AVX2).
int simd_level() {
  static const CpuFeatures f = cpu_features();
  const char* cap = std::getenv("LLMCACHE_CPU_ISA");
  const std::string forced = cap ? cap : "";
  const bool plain = forced == "scalar" || forced == "portable";
  if (f.avx512f && (forced.empty() || forced.rfind("avx512", 0) == 0)) return 512;
  return f.avx2 && !plain ? 256 : 0;
}

// codes for `rows` (<= kBlockRows) rows of v ([rows, d]); proj is scratch of nbits floats; `level`
// is simd_level(), read once per call of the op.
void project_rows(const float* v, int64_t rows, int64_t d, const float* planes, int64_t nbits, float* proj,
                  int64_t* codes, int level) {
  const int64_t words = nbits / 64;
#ifdef LLMCACHE_X86
  if (level == 512) {
    switch (rows) {
      case 4: return project_rows_avx512<4>(v, d, planes, nbits, codes);
      case 3: return project_rows_avx512<3>(v, d, planes, nbits, codes);
      case 2: return project_rows_avx512<2>(v, d, planes, nbits, codes);
      case 1: return project_rows_avx512<1>(v, d, planes, nbits, codes);
      default: break;
    }
  } else if (level == 256) {
    switch (rows) {
      case 4: return project_rows_avx2<4>(v, d, planes, nbits, codes);
      case 3: return project_rows_avx2<3>(v, d, planes, nbits, codes);
      case 2: return project_rows_avx2<2>(v, d, planes, nbits, codes);
      case 1: return project_rows_avx2<1>(v, d, planes, nbits, codes);
      default: break;
    }
  }
#endif
  (void)level;  // (off x86-64: one projection)
  for (int64_t r = 0; r < rows; ++r) project_and_pack(v + r * d, d, planes, nbits, proj, codes + r * words);
}

}  // namespace

void simhash(const void* x, Dtype dtype, int64_t B, int64_t d, const float* planes, int64_t nbits,
             int64_t* codes) {
  const int level = simd_level();
  const int64_t words = nbits / 64;
  const auto* base = static_cast<const uint8_t*>(x);
  const int64_t row_bytes = d * element_size(dtype);
  const int64_t blocks = (B + kBlockRows - 1) / kBlockRows;
#pragma omp parallel
  {
    std::vector<float> v(kBlockRows * d), proj(nbits);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t b0 = blk * kBlockRows, rows = std::min(kBlockRows, B - b0);
      std::fill(v.begin(), v.end(), 0.0f);
      for (int64_t r = 0; r < rows; ++r) accumulate(base + (b0 + r) * row_bytes, dtype, d, v.data() + r * d);
      project_rows(v.data(), rows, d, planes, nbits, proj.data(), codes + b0 * words, level);
    }
  }
}

void simhash_pooled(const void* embeds, Dtype dtype, const uint8_t* mask, int64_t B, int64_t T,
                    int64_t d, const float* planes, int64_t nbits, int64_t* codes) {
  const int level = simd_level();
  const int64_t words = nbits / 64;
  const auto* base = static_cast<const uint8_t*>(embeds);
  const int64_t token_bytes = d * element_size(dtype);
  const int64_t blocks = (B + kBlockRows - 1) / kBlockRows;
#pragma omp parallel
  {
    std::vector<float> v(kBlockRows * d), proj(nbits);
    std::vector<const float*> tokens(T);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t b0 = blk * kBlockRows, rows = std::min(kBlockRows, B - b0);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = b0 + r;
        float* vr = v.data() + r * d;
        std::fill(vr, vr + d, 0.0f);
        int64_t count = 0;
        for (int64_t t = 0; t < T; ++t) {
          if (!mask[b * T + t]) continue;
          if (dtype == Dtype::F32)
            tokens[count] = reinterpret_cast<const float*>(base + (b * T + t) * token_bytes);
          else
            accumulate(base + (b * T + t) * token_bytes, dtype, d, vr);
          ++count;
        }
        if (dtype == Dtype::F32) accumulate_f32_rows(tokens.data(), count, d, vr);
        const float denom = count > 0 ? static_cast<float>(count) : 1.0f;
        for (int64_t i = 0; i < d; ++i) vr[i] /= denom;
      }
      project_rows(v.data(), rows, d, planes, nbits, proj.data(), codes + b0 * words, level);
    }
  }
}

}  // namespace cpu
}  // namespace llmcache
