// read_rows: arena token rows read straight into the tensors a forward uses them as, the inverse
// of write_rows (llmcache.ops.read_rows; the specification is llmcache/ops/reference.py). Token
// i = m * T + t of every piece takes arena row rows[i]: piece p [M, A, Tcap >= T, C] gets the row's
// next A runs of C elements at [m, a, t, :] (a block's K or V: [M, heads, Tcap, head dim]; a hidden
// state: A = 1). So a cached prefix lands in each block's own K and V tensors, in the layout the
// model's attention reads, with room after it for the tokens the forward computes; where one
// index_select of whole rows followed by strided views left every block's K/V spread over the
// rows (48 KB apart for a 30-block model: a TLB miss per token per block in every attention read).
// Each arena row is read once, front to back; each piece is written front to back. A row of -1
// writes zeros (a position no token is held for: a served batch's padding, read in its layout).
#include <algorithm>
#include <cstring>

#include "kernels.h"

namespace llmcache {
namespace cpu {
namespace {

// A run of n bytes: in 64-byte moves the compiler inlines where n is a multiple of 64 (a head
// vector of 16 floats or 32 halves and up), where a call to memcpy a run cost more than the copy.
inline void copy_run(uint8_t* dst, const uint8_t* src, int64_t n) {
#if defined(__x86_64__)
  if (n >= 256) {  // (rep movsb writes whole lines without reading them first)
    size_t count = static_cast<size_t>(n);
    asm volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(count) : : "memory");
    return;
  }
#endif
  if (n % 64 == 0) {
    for (int64_t j = 0; j < n; j += 64) std::memcpy(dst + j, src + j, 64);
  } else {
    std::memcpy(dst, src, n);
  }
}

}  // namespace

void read_rows(const uint8_t* arena, int64_t row_bytes, const int64_t* rows, int64_t begin, int64_t end,
               const RowSlot* pieces, int64_t n_pieces, int64_t T) {
  // Tokens in chunks of kChunk that do not cross a piece row m: per chunk, each piece's runs for
  // every token of it, so each destination gets kChunk consecutive token vectors at once.
  constexpr int64_t kChunk = 8;
  for (int64_t i0 = begin; i0 < end;) {
    const int64_t m = i0 / T, t0 = i0 % T;
    const int64_t n = std::min({kChunk, end - i0, T - t0});
    int64_t offset = 0;  // of the piece's runs in an arena row
    for (int64_t p = 0; p < n_pieces; ++p) {
      const RowSlot& piece = pieces[p];
      uint8_t* base = piece.data + m * piece.stride_m + t0 * piece.stride_t;
      for (int64_t a = 0; a < piece.A; ++a, offset += piece.run)
        for (int64_t j = 0; j < n; ++j) {
          uint8_t* dst = base + a * piece.stride_a + j * piece.stride_t;
          if (rows[i0 + j] < 0)
            std::memset(dst, 0, piece.run);
          else
            copy_run(dst, arena + rows[i0 + j] * row_bytes + offset, piece.run);
        }
    }
    i0 += n;
  }
}

}  // namespace cpu
}  // namespace llmcache
