// The fused gather-with-mask on the CPU: each output row is one memcpy from the bank (a hit) or
// from the computed sub-batch (a miss). Rows are independent, so OpenMP splits the batch; the
// bookkeeping of the slots read (last_used, hit_count) runs after, on one thread, so that two
// rows hitting the same slot count twice without atomics.
#include <algorithm>
#include <cstring>

#include "kernels.h"

namespace llmcache {
namespace cpu {

void gather_with_mask(const uint8_t* values, int64_t N, int64_t Tv, const int64_t* slot,
                      const uint8_t* computed, int64_t T, const int64_t* row, int64_t B,
                      int64_t inner_bytes, int64_t* last_used, int64_t* hit_count, int64_t tick,
                      bool align_end, uint8_t* out) {
  (void)N;
  const int64_t span = std::min(T, Tv);
  const int64_t out_row = T * inner_bytes;
#pragma omp parallel for schedule(static) if (B * out_row > (1 << 16))
  for (int64_t r = 0; r < B; ++r) {
    uint8_t* dst = out + r * out_row;
    if (slot[r] < 0) {
      std::memcpy(dst, computed + row[r] * out_row, out_row);
      continue;
    }
    const uint8_t* src = values + slot[r] * Tv * inner_bytes;
    const int64_t dst_start = align_end ? T - span : 0;
    const int64_t src_start = align_end ? Tv - span : 0;
    std::memset(dst, 0, dst_start * inner_bytes);
    std::memcpy(dst + dst_start * inner_bytes, src + src_start * inner_bytes, span * inner_bytes);
    std::memset(dst + (dst_start + span) * inner_bytes, 0, (T - dst_start - span) * inner_bytes);
  }
  for (int64_t r = 0; r < B; ++r) {
    if (slot[r] < 0) continue;
    last_used[slot[r]] = tick;
    hit_count[slot[r]] += 1;
  }
}

}  // namespace cpu
}  // namespace llmcache
