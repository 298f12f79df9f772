// chain_hash: content-addressed keys of token pages, BLAKE2b (RFC 7693) chained over each row.
// Page j of row r covers tokens start[r] + j*page .. min(start[r] + count[r], start[r] + (j+1)*page);
// its digest is BLAKE2b(digest of page j-1, or seeds[r] for j = 0 || uint32 LE token count ||
// uint8 width || the page's tokens, each as its C channels in order, little-endian, as int32
// (width 4) where every value of the page fits one, else as int64 (width 8)). The same prefix gives the same
// key in every process; a page's key names everything before it.
#include <cstring>
#include <vector>

#include "kernels.h"

namespace llmcache {
namespace cpu {
namespace {

constexpr uint64_t kIV[8] = {0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
                             0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
                             0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

constexpr uint8_t kSigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

inline uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);  // x86-64: little-endian, as BLAKE2b reads its words
  return v;
}

// One compression of the 128-byte block at `block`, `t` bytes hashed so far including it.
void compress(uint64_t h[8], const uint8_t* block, uint64_t t, bool last) {
  uint64_t m[16], v[16];
  for (int i = 0; i < 16; ++i) m[i] = load64(block + 8 * i);
  for (int i = 0; i < 8; ++i) {
    v[i] = h[i];
    v[i + 8] = kIV[i];
  }
  v[12] ^= t;  // (the high 64 bits of the counter stay 0: no message here nears 2^64 bytes)
  if (last) v[14] = ~v[14];
#define LLMCACHE_G(a, b, c, d, x, y) \
  a = a + b + (x);                   \
  d = rotr(d ^ a, 32);               \
  c = c + d;                         \
  b = rotr(b ^ c, 24);               \
  a = a + b + (y);                   \
  d = rotr(d ^ a, 16);               \
  c = c + d;                         \
  b = rotr(b ^ c, 63);
  for (int r = 0; r < 12; ++r) {
    const uint8_t* s = kSigma[r];
    LLMCACHE_G(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
    LLMCACHE_G(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
    LLMCACHE_G(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
    LLMCACHE_G(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
    LLMCACHE_G(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
    LLMCACHE_G(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
    LLMCACHE_G(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
    LLMCACHE_G(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
  }
#undef LLMCACHE_G
  for (int i = 0; i < 8; ++i) h[i] ^= v[i] ^ v[i + 8];
}

// Streaming BLAKE2b without a key: bytes are buffered; a full block is compressed only once more
// bytes follow (the last block, full or not, carries the final flag).
struct Blake2b {
  uint64_t h[8];
  uint8_t buf[128];
  size_t fill = 0;
  uint64_t total = 0;
  int outlen;

  explicit Blake2b(int out) : outlen(out) {
    for (int i = 0; i < 8; ++i) h[i] = kIV[i];
    h[0] ^= 0x01010000ULL ^ static_cast<uint64_t>(out);
  }
  void update(const uint8_t* p, size_t n) {
    while (n > 0) {
      if (fill == 128) {
        total += 128;
        compress(h, buf, total, false);
        fill = 0;
      }
      size_t take = n < 128 - fill ? n : 128 - fill;
      std::memcpy(buf + fill, p, take);
      fill += take;
      p += take;
      n -= take;
    }
  }
  void final(uint8_t* out) {
    total += fill;
    std::memset(buf + fill, 0, 128 - fill);
    compress(h, buf, total, true);
    uint8_t full[64];
    std::memcpy(full, h, 64);
    std::memcpy(out, full, outlen);
  }
};

}  // namespace

void blake2b(const uint8_t* data, int64_t n, uint8_t* out, int outlen) {
  Blake2b s(outlen);
  s.update(data, static_cast<size_t>(n));
  s.final(out);
}

void chain_hash(const uint8_t* seeds, const int64_t* tokens, int64_t C, int64_t B, int64_t T,
                const int64_t* start, const int64_t* count, int64_t page, int64_t P, uint8_t* out) {
  std::vector<const int64_t*> channels(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) channels[c] = tokens + c * B * T;
  chain_hash_channels(seeds, channels.data(), C, T, B, start, count, page, P, out);
}

void chain_hash_channels(const uint8_t* seeds, const int64_t* const* channels, int64_t C, int64_t T, int64_t B,
                         const int64_t* start, const int64_t* count, int64_t page, int64_t P, uint8_t* out) {
  std::memset(out, 0, static_cast<size_t>(B * P * kChainDigest));
  std::vector<uint8_t> msg;  // one page's message, gathered token-major, then hashed at once
  for (int64_t r = 0; r < B; ++r) {
    const uint8_t* prev = seeds + r * kChainDigest;
    for (int64_t j = 0; j * page < count[r] && j < P; ++j) {
      const int64_t a = start[r] + j * page;
      const int64_t n = count[r] - j * page < page ? count[r] - j * page : page;
      // Narrow: every value of the page fits int32 (ids, positions, token types nearly always do).
      bool narrow = true;
      for (int64_t c = 0; c < C && narrow; ++c) {
        const int64_t* channel = channels[c] + r * T + a;
        for (int64_t t = 0; t < n; ++t) narrow = narrow && channel[t] == static_cast<int32_t>(channel[t]);
      }
      const int64_t width = narrow ? 4 : 8;
      msg.resize(static_cast<size_t>(kChainDigest + 5 + n * C * width));
      uint8_t* p = msg.data();
      std::memcpy(p, prev, kChainDigest);
      const uint32_t n32 = static_cast<uint32_t>(n);
      std::memcpy(p + kChainDigest, &n32, 4);  // (x86-64: little-endian)
      p[kChainDigest + 4] = static_cast<uint8_t>(width);
      uint8_t* body = p + kChainDigest + 5;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t* channel = channels[c] + r * T + a;
        if (narrow) {
          int32_t* words = reinterpret_cast<int32_t*>(body);
          for (int64_t t = 0; t < n; ++t) {
            const int32_t v = static_cast<int32_t>(channel[t]);
            std::memcpy(words + t * C + c, &v, 4);
          }
        } else {
          int64_t* words = reinterpret_cast<int64_t*>(body);
          for (int64_t t = 0; t < n; ++t) std::memcpy(words + t * C + c, channel + t, 8);
        }
      }
      p = msg.data();
      uint8_t* dst = out + (r * P + j) * kChainDigest;
      blake2b(p, static_cast<int64_t>(msg.size()), dst, kChainDigest);
      prev = dst;
    }
  }
}

}  // namespace cpu
}  // namespace llmcache
