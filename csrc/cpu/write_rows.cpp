// write_rows: a forward's computed tokens written into the arena's token rows in one pass, each
// row's finiteness checked as it is written (llmcache.ops.write_rows; the specification is
// llmcache/ops/reference.py). Row i of the arena's flat view takes token tok = src[i] (or i) of
// every piece in order: piece p [M, A, T, C], tok = m * T + t, gives its A runs of C elements
// at [m, a, t, :] (a K or V of one block: its heads' vectors of token t; a hidden state: A = 1).
// So the K/V of every block go straight from the model's own [M, heads, T, head dim] tensors to
// the rows, where the composition of torch ops gathered them into a [M * T, F] copy first, read
// it again for the finiteness sum, and then wrote it. The check reads the row back while it is
// in L1: an element is not finite when its exponent bits are all ones (inf and NaN, in every
// IEEE format), tested on the integer bits so the loop vectorises.
#include <cstring>

#include "kernels.h"

namespace llmcache {
namespace cpu {
namespace {

template <typename Bits>
bool row_finite(const Bits* row, int64_t n, Bits exponent) {
  Bits bad = 0;
  for (int64_t j = 0; j < n; ++j) bad |= static_cast<Bits>((row[j] & exponent) == exponent);
  return bad == 0;
}

}  // namespace

void write_rows(uint8_t* arena, int64_t row_bytes, const int64_t* dst, const int64_t* src, int64_t begin,
                int64_t end, const RowPiece* pieces, int64_t n_pieces, int64_t T, int64_t elem_bytes,
                uint64_t exponent, uint8_t* finite) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t tok = src ? src[i] : i;
    const int64_t m = tok / T, t = tok % T;
    uint8_t* row = arena + dst[i] * row_bytes;
    uint8_t* at = row;
    for (int64_t p = 0; p < n_pieces; ++p) {
      const RowPiece& piece = pieces[p];
      const uint8_t* base = piece.data + m * piece.stride_m + t * piece.stride_t;
      const int64_t run = piece.C * elem_bytes;
      for (int64_t a = 0; a < piece.A; ++a, at += run) std::memcpy(at, base + a * piece.stride_a, run);
    }
    const int64_t n = row_bytes / elem_bytes;
    bool ok = true;
    if (elem_bytes == 2) ok = row_finite(reinterpret_cast<const uint16_t*>(row), n, static_cast<uint16_t>(exponent));
    else if (elem_bytes == 4) ok = row_finite(reinterpret_cast<const uint32_t*>(row), n, static_cast<uint32_t>(exponent));
    else if (elem_bytes == 8) ok = row_finite(reinterpret_cast<const uint64_t*>(row), n, exponent);
    if (finite) finite[i] = ok ? 1 : 0;
  }
}

}  // namespace cpu
}  // namespace llmcache
