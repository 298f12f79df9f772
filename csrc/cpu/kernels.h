// llmcache CPU kernels on raw pointers: no torch, no Python, so CMake can build and ctest them
// alone (csrc/test_cpu_kernels.cpp). csrc/torch_cpu.cpp wraps them as the CPU implementations
// of the llmcache:: torch.library ops; llmcache/ops/reference.py is their specification.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace llmcache {
namespace cpu {

// ---- CPU features, detected at run time (cpu_features.cpp) ----
struct CpuFeatures {
  bool popcnt = false;
  bool avx2 = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512_vpopcntdq = false;
  bool pclmul = false;  // PCLMULQDQ and SSE4.1 (crc32_copy's folding)
};
// Detected now; LLMCACHE_CPU_CAP=avx2|scalar hides wider ones (the kernels read them once, at first use).
CpuFeatures cpu_features();

// The popcount path hamming_topk uses with many queries (B >= 8): "avx512_vpopcntdq", "avx2",
// "avx2_harley_seal", "avx2_tables", "scalar" (the POPCNT instruction) or "portable" (x86-64 without POPCNT).
// LLMCACHE_CPU_ISA=<path> forces one the CPU runs (for testing every path on one machine).
std::string cpu_kernel_name();

// The path per regime (few queries, B < 8; many) and why it was picked (hamming_topk.cpp).
struct KernelChoice {
  std::string few, few_why, many, many_why;
};
KernelChoice cpu_kernel_choice(int64_t W = 4);  // the paths for W-word codes

// Elements the kernels read: fp32, IEEE fp16 or bfloat16 as raw bits.
enum class Dtype { F32, F16, BF16 };

// ---- simhash.cpp ----
// codes[b, j/64] bit j%64 = (sum_i x[b,i] * planes[i,j] >= 0), accumulated in fp32.
// x: [B, d] of `dtype`; planes: fp32 [d, nbits]; codes: int64 [B, nbits/64].
void simhash(const void* x, Dtype dtype, int64_t B, int64_t d, const float* planes,
             int64_t nbits, int64_t* codes);

// SimHash of the masked mean over T: embeds [B, T, d] of `dtype`, mask uint8 [B, T] (0 = pad).
void simhash_pooled(const void* embeds, Dtype dtype, const uint8_t* mask, int64_t B, int64_t T,
                    int64_t d, const float* planes, int64_t nbits, int64_t* codes);

// ---- hamming_topk.cpp ----
// For each query b the k eligible bank rows nearest in Hamming distance, ascending, ties to the
// smaller index. Eligible: (valid == nullptr || valid[n]) && (query_tag == nullptr ||
// bank_tag[n] == query_tag[b]). Missing answers: idx = -1, dist = 64 * W + 1.
// queries int64 [B, W]; bank int64 [N, W]; dist int32 [B, k]; idx int64 [B, k].
void hamming_topk(const int64_t* queries, int64_t B, const int64_t* bank, int64_t N, int64_t W,
                  int64_t k, const uint8_t* valid, const int64_t* query_tag,
                  const int64_t* bank_tag, int32_t* dist, int64_t* idx);

// ---- floors.cpp: what the hardware allows, for the benchmark's floors ----
// 64-bit popcounts per second on all OpenMP threads with `path`'s popcount instruction(s) (a
// register-resident loop of independent chains; "" = the path hamming_topk picks for many queries).
double popcount_peak_rate(double seconds, const std::string& path);
// Bytes per second that all OpenMP threads read from `data` (`bytes` long, each thread its slice),
// repeated for about `seconds`: the bandwidth of wherever that buffer lives (DRAM, L3, ...).
double read_rate(const void* data, int64_t bytes, double seconds);

// ---- gather_with_mask.cpp ----
// out[r] = slot[r] >= 0 ? values[slot[r]] : computed[row[r]], rows of `row_bytes` bytes laid out
// as [seq, inner]: values [N, Tv, inner], computed [M, T, inner], out [B, T, inner] (inner in
// bytes). A hit copies min(T, Tv) positions aligned at the start (or the end with align_end) and
// zero-fills the rest. Every slot read gets last_used = tick, hit_count += 1.
void gather_with_mask(const uint8_t* values, int64_t N, int64_t Tv, const int64_t* slot,
                      const uint8_t* computed, int64_t T, const int64_t* row, int64_t B,
                      int64_t inner_bytes, int64_t* last_used, int64_t* hit_count, int64_t tick,
                      bool align_end, uint8_t* out);

// ---- chain_hash.cpp ----
// BLAKE2b (RFC 7693, no key) of n bytes, an `outlen`-byte digest (1..64).
void blake2b(const uint8_t* data, int64_t n, uint8_t* out, int outlen);

// Content-addressed page keys, kChainDigest bytes each: for every row r of tokens int64 [C, B, T]
// (channels, rows, positions), the span start[r] .. start[r] + count[r] in pages of `page` tokens;
// out [B, P, kChainDigest], page j = BLAKE2b(previous page's digest, seeds[r] for page 0, 32 bytes
// || its token count as uint32 LE || uint8 width || per token its C channels LE, as int32 (width 4)
// where every value of the page fits one, else as int64 (width 8)). Pages past a row's
// span (or past P) are zero. seeds: uint8 [B, kChainDigest].
constexpr int kChainDigest = 32;
void chain_hash(const uint8_t* seeds, const int64_t* tokens, int64_t C, int64_t B, int64_t T,
                const int64_t* start, const int64_t* count, int64_t page, int64_t P, uint8_t* out);
// The same with channel c of row r at channels[c] + r * T (channels that are not one block).
void chain_hash_channels(const uint8_t* seeds, const int64_t* const* channels, int64_t C, int64_t T, int64_t B,
                         const int64_t* start, const int64_t* count, int64_t page, int64_t P, uint8_t* out);

// ---- crc32.cpp ----
// zlib's crc32 (CRC-32/ISO-HDLC) of n bytes at src, continuing from `crc` (0 to start), and the
// bytes copied to dst in the same pass (dst nullptr: none).
uint32_t crc32_copy(uint32_t crc, const uint8_t* src, uint8_t* dst, int64_t n);

// ---- write_rows.cpp ----
// One piece of a token's row: [M, A, T, C] elements, C contiguous, strides in bytes.
struct RowPiece {
  const uint8_t* data;
  int64_t stride_m, stride_a, stride_t;
  int64_t A, C;
};
// Rows i in [begin, end): arena row dst[i] (row_bytes each) = token tok = src[i] (src null: i) of
// every piece in order, tok = m * T + t giving piece[m, a, t, :] for a = 0..A-1; the pieces' A * C
// elements add up to the row. finite[i] (if not null) = 1 unless an element of the row has every
// bit of `exponent` set (inf or NaN: 0x7c00 half, 0x7f80 bfloat16, 0x7f800000 float, 0x7ff0...0
// double; elem_bytes 2, 4 or 8). Rows dst[i] must be distinct for the rows to be well defined.
void write_rows(uint8_t* arena, int64_t row_bytes, const int64_t* dst, const int64_t* src, int64_t begin,
                int64_t end, const RowPiece* pieces, int64_t n_pieces, int64_t T, int64_t elem_bytes,
                uint64_t exponent, uint8_t* finite);

// ---- read_rows.cpp ----
// A piece a read writes: data at [0, 0, 0, 0], byte strides of its M, A and T dimensions, A runs of
// `run` bytes a token (its C contiguous elements).
struct RowSlot {
  uint8_t* data;
  int64_t stride_m, stride_a, stride_t;
  int64_t A, run;
};
// Tokens i in [begin, end), i = m * T + t: arena row rows[i] (row_bytes each) split, in order,
// over every piece's [m, a, t, :] for a = 0..A-1; the pieces' runs add up to the row.
void read_rows(const uint8_t* arena, int64_t row_bytes, const int64_t* rows, int64_t begin, int64_t end,
               const RowSlot* pieces, int64_t n_pieces, int64_t T);

// ---- row_keys.cpp ----
// The exact tier's whole-row keys of a batch in one pass (llmcache.rows.row_keys states the
// contract; its Python composition is the reference). host: int64 [4, B, T] (ids, mask,
// positions, types). Per row: its real tokens (mask != 0) start s and count n; keyed when n > 0
// and they have no gap; lead = s and trail = T - s - n where the caller sees that padding
// (`lead_visible`, `trail_visible`; 0 elsewhere and on rows not keyed); the key's span starts
// at s - lead (start[r]) and holds n + lead + trail tokens (count[r], 0 when not keyed);
// before = that start where `ids_before` (the ids left of it decide positions), else 0. The key
// is chain_hash's one page over tokens start - before .. start + count of channels ids,
// positions, types, seeded by BLAKE2b-256("R" || header || marks), marks = "M" lead trail
// (uint32 LE each) where either is non-zero, then "B" before (uint32 LE) where it is.
// Writes start, count, marks [3, B] (lead, trail, before), keys [B, 32] (zero where not keyed),
// keyed [B]; returns the rows with no real token in *no_tokens and those with gaps in *gaps.
void row_keys(const int64_t* host, int64_t B, int64_t T, const uint8_t* header, int64_t header_len,
              bool lead_visible, bool trail_visible, bool ids_before, int64_t* start, int64_t* count,
              int64_t* marks, uint8_t* keys, uint8_t* keyed, int64_t* no_tokens, int64_t* gaps);
// A decoder's page keys of a batch in one pass (llmcache.rows.page_keys states the contract; its
// Python composition is the reference). Per row: s, n and keyed as row_keys's (counted the same
// way); lead = s where keyed and `lead_visible` (leading padding is keyed with
// the row), trail = T - s - n where keyed and `trail_visible` (not keyed: computed after the row);
// start[r] = s - lead, count[r] = n + lead (rows not keyed too). Keys [B, P, 32] into *keys:
// chain_hash over pages of `page` tokens of each keyed row's span (none for the others), seeded
// by BLAKE2b-256("P" || header || marks), marks = "M" lead 0 where lead is non-zero; returns P.
int64_t page_keys(const int64_t* host, int64_t B, int64_t T, const uint8_t* header, int64_t header_len,
                  bool lead_visible, bool trail_visible, int64_t page, int64_t* start, int64_t* count,
                  int64_t* lead, int64_t* trail, uint8_t* keyed, std::vector<uint8_t>* keys, int64_t* no_tokens,
                  int64_t* gaps);

}  // namespace cpu
}  // namespace llmcache
