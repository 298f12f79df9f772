// The fused gather-with-mask on the GPU: out[r] = values[slot[r]] if slot[r] >= 0 (a hit) else
// computed[row[r]] (a miss), rows of [seq, inner] bytes.
//
// A hit copies span = min(T, Tv) positions: values positions [Tv - span, Tv) to out positions
// [T - span, T) with align_end (left padding), or [0, span) to [0, span) without; the other
// out positions are zero. Each output row is cut into chunks of kChunkUnits copy units, one
// block per (row, chunk), grid-strided; a unit is 16 bytes (uint4) when inner_bytes and the
// three base pointers allow it, else the largest of 8, 4, 2, 1 that does. Because the unit
// divides inner_bytes, a unit never straddles two positions, so a unit is either copied or
// zeroed as a whole. The block of chunk 0 of a hit row also does the bookkeeping:
// last_used[slot] = tick (a plain store: rows reading one slot all write the same tick) and
// hit_count[slot] += 1 with atomicAdd, so duplicate slots count once per reading row as in the
// reference's index_add_. A slot >= N or a miss row outside [0, M) cannot be reported without a
// host sync: that output row is zero-filled and no counter moves.
#include "cuda_kernels.h"

namespace llmcache {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kUnitsPerThread = 8;
constexpr int64_t kChunkUnits = kThreads * kUnitsPerThread;
constexpr int64_t kMaxBlocks = 1 << 20;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename U>
__global__ void __launch_bounds__(kThreads)
    gather_with_mask_kernel(const U* __restrict__ values, int64_t N, int64_t Tv,
                            const int64_t* __restrict__ slot, const U* __restrict__ computed,
                            int64_t M, int64_t T, const int64_t* __restrict__ row, int64_t B,
                            int64_t inner_units, int64_t chunks_per_row, int64_t* last_used,
                            unsigned long long* hit_count, int64_t tick, bool align_end,
                            U* __restrict__ out) {
  const int64_t row_units = T * inner_units;
  const int64_t span = T < Tv ? T : Tv;
  const int64_t total = B * chunks_per_row;
  for (int64_t block = blockIdx.x; block < total; block += gridDim.x) {
    const int64_t r = block / chunks_per_row;
    const int64_t chunk = block % chunks_per_row;
    const int64_t s = slot[r];
    // Out units [copy_begin, copy_end) come from src[u + shift]; the rest are zero.
    const U* src = nullptr;
    int64_t copy_begin = 0, copy_end = 0, shift = 0;
    if (s < 0) {
      const int64_t m = row[r];
      if (m >= 0 && m < M) {
        src = computed;
        copy_end = row_units;
        shift = m * row_units;
      }
    } else if (s < N) {
      const int64_t dst_start = align_end ? T - span : 0;
      const int64_t src_start = align_end ? Tv - span : 0;
      src = values;
      copy_begin = dst_start * inner_units;
      copy_end = (dst_start + span) * inner_units;
      shift = s * Tv * inner_units + (src_start - dst_start) * inner_units;
      if (chunk == 0 && threadIdx.x == 0) {
        last_used[s] = tick;
        atomicAdd(hit_count + s, 1ull);
      }
    }
    U* dst = out + r * row_units;
    const int64_t u_begin = chunk * kChunkUnits;
    const int64_t u_end = row_units < u_begin + kChunkUnits ? row_units : u_begin + kChunkUnits;
#pragma unroll 4
    for (int64_t u = u_begin + threadIdx.x; u < u_end; u += kThreads) {
      U v{};
      if (u >= copy_begin && u < copy_end) v = src[u + shift];
      dst[u] = v;
    }
  }
}

// The widest copy unit (16, 8, 4, 2 or 1 bytes) that divides inner_bytes and the address bits
// of every base pointer (`addresses`: the three pointers OR-ed together).
int64_t unit_bytes(int64_t inner_bytes, uintptr_t addresses) {
  int64_t unit = 16;
  while (unit > 1 && (inner_bytes % unit != 0 || addresses % unit != 0)) unit /= 2;
  return unit;
}

struct Plan {
  int64_t unit = 1;
  int64_t chunks_per_row = 1;
  int64_t blocks = 0;
};

Plan make_plan(int64_t T, int64_t B, int64_t inner_bytes, uintptr_t addresses) {
  Plan p;
  p.unit = unit_bytes(inner_bytes, addresses);
  // At least one chunk per row, even an empty one: its block still counts the hit.
  const int64_t row_units = T * (inner_bytes / p.unit);
  p.chunks_per_row = row_units > 0 ? ceil_div(row_units, kChunkUnits) : 1;
  const int64_t total = B * p.chunks_per_row;
  p.blocks = total < kMaxBlocks ? total : kMaxBlocks;  // the kernel strides over the rest
  return p;
}

template <typename U>
cudaError_t launch(const void* values, int64_t N, int64_t Tv, const int64_t* slot,
                   const void* computed, int64_t M, int64_t T, const int64_t* row, int64_t B,
                   int64_t inner_bytes, int64_t* last_used, int64_t* hit_count, int64_t tick,
                   bool align_end, void* out, const Plan& p, cudaStream_t stream) {
  gather_with_mask_kernel<U><<<static_cast<unsigned>(p.blocks), kThreads, 0, stream>>>(
      static_cast<const U*>(values), N, Tv, slot, static_cast<const U*>(computed), M, T, row, B,
      inner_bytes / static_cast<int64_t>(sizeof(U)), p.chunks_per_row, last_used,
      reinterpret_cast<unsigned long long*>(hit_count), tick, align_end, static_cast<U*>(out));
  return cudaGetLastError();
}

uintptr_t address_bits(const void* values, const void* computed, const void* out) {
  return reinterpret_cast<uintptr_t>(values) | reinterpret_cast<uintptr_t>(computed) |
         reinterpret_cast<uintptr_t>(out);
}

}  // namespace

std::array<int64_t, 3> gather_with_mask_plan(int64_t T, int64_t B, int64_t inner_bytes,
                                             int64_t address_bits) {
  const Plan p = make_plan(T, B, inner_bytes, static_cast<uintptr_t>(address_bits));
  return {p.unit, p.chunks_per_row, p.blocks};
}

cudaError_t gather_with_mask_cuda(const void* values, int64_t N, int64_t Tv, const int64_t* slot,
                                  const void* computed, int64_t M, int64_t T, const int64_t* row,
                                  int64_t B, int64_t inner_bytes, int64_t* last_used,
                                  int64_t* hit_count, int64_t tick, bool align_end, void* out,
                                  cudaStream_t stream) {
  if (N < 0 || Tv < 0 || M < 0 || T < 0 || B < 0 || inner_bytes < 0) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  const Plan p = make_plan(T, B, inner_bytes, address_bits(values, computed, out));
  switch (p.unit) {
#define LLMCACHE_UNIT_CASE(bytes, U)                                                             \
  case bytes:                                                                                     \
    return launch<U>(values, N, Tv, slot, computed, M, T, row, B, inner_bytes, last_used,        \
                     hit_count, tick, align_end, out, p, stream);
    LLMCACHE_UNIT_CASE(16, uint4) LLMCACHE_UNIT_CASE(8, uint2) LLMCACHE_UNIT_CASE(4, uint32_t)
    LLMCACHE_UNIT_CASE(2, uint16_t)
#undef LLMCACHE_UNIT_CASE
    default:
      return launch<uint8_t>(values, N, Tv, slot, computed, M, T, row, B, inner_bytes, last_used,
                             hit_count, tick, align_end, out, p, stream);
  }
}

}  // namespace gpu
}  // namespace llmcache
