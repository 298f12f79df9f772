// row_keys: the exact tier's whole-row keys of a batch in one pass over its host copy: the spans
// of the mask, each row's seed (its header and what its span holds besides its tokens) and the
// row's BLAKE2b-256 key (chain_hash's one page). The contract is kernels.h's and
// llmcache.rows.row_keys's docstring; the Python composition there (rows.spans, marked_header,
// chain_keys) is the reference this must equal byte for byte.
#include <cstring>
#include <vector>

#include "kernels.h"

namespace llmcache {
namespace cpu {

void row_keys(const int64_t* host, int64_t B, int64_t T, const uint8_t* header, int64_t header_len,
              bool lead_visible, bool trail_visible, bool ids_before, int64_t* start, int64_t* count,
              int64_t* marks, uint8_t* keys, uint8_t* keyed, int64_t* no_tokens, int64_t* gaps) {
  const int64_t* mask = host + B * T;
  int64_t* lead = marks;
  int64_t* trail = marks + B;
  int64_t* before = marks + 2 * B;
  *no_tokens = 0;
  *gaps = 0;
  bool all = true;  // (no padding anywhere: every row is whole, and no reason is counted)
  for (int64_t i = 0; i < B * T && all; ++i) all = mask[i] != 0;
  std::vector<int64_t> from(B), length(B);
  std::vector<uint8_t> seeds(static_cast<size_t>(B * kChainDigest)), message;
  uint8_t plain[kChainDigest];
  bool plain_done = false;
  for (int64_t r = 0; r < B; ++r) {
    const int64_t* m = mask + r * T;
    int64_t s = 0, n = T, end = T;
    if (!all) {
      n = 0;
      int64_t first = -1, last = -1;
      for (int64_t t = 0; t < T; ++t)
        if (m[t] != 0) {
          ++n;
          if (first < 0) first = t;
          last = t;
        }
      s = n > 0 ? first : 0;
      end = n > 0 ? last + 1 : 0;
    }
    const bool whole = (n > 0 || all) && end - s == n;
    if (!all && n == 0) ++*no_tokens;
    if (!all && n > 0 && !whole) ++*gaps;
    lead[r] = whole && lead_visible ? s : 0;
    trail[r] = whole && trail_visible ? T - s - n : 0;
    start[r] = s - lead[r];
    count[r] = whole ? n + lead[r] + trail[r] : 0;
    before[r] = ids_before ? start[r] : 0;
    keyed[r] = whole && count[r] > 0;
    from[r] = start[r] - before[r];
    length[r] = keyed[r] ? count[r] + before[r] : 0;
    // The seed: BLAKE2b-256("R" || header || marks), as rows.chain_seed(b"R", marked header);
    // rows without marks share the header's own (hashed once).
    uint8_t* seed = seeds.data() + r * kChainDigest;
    if (!lead[r] && !trail[r] && !before[r]) {
      if (!plain_done) {
        message.assign(1, static_cast<uint8_t>('R'));
        message.insert(message.end(), header, header + header_len);
        blake2b(message.data(), static_cast<int64_t>(message.size()), plain, kChainDigest);
        plain_done = true;
      }
      std::memcpy(seed, plain, kChainDigest);
      continue;
    }
    message.assign(1, static_cast<uint8_t>('R'));
    message.insert(message.end(), header, header + header_len);
    auto word = [&message](int64_t v) {
      const uint32_t w = static_cast<uint32_t>(v);
      const uint8_t* b = reinterpret_cast<const uint8_t*>(&w);  // (x86-64: little-endian)
      message.insert(message.end(), b, b + 4);
    };
    if (lead[r] || trail[r]) {
      message.push_back(static_cast<uint8_t>('M'));
      word(lead[r]);
      word(trail[r]);
    }
    if (before[r]) {
      message.push_back(static_cast<uint8_t>('B'));
      word(before[r]);
    }
    blake2b(message.data(), static_cast<int64_t>(message.size()), seed, kChainDigest);
  }
  const int64_t* channels[3] = {host, host + 2 * B * T, host + 3 * B * T};  // ids, positions, types
  chain_hash_channels(seeds.data(), channels, 3, T, B, from.data(), length.data(), T > 0 ? T : 1, 1, keys);
}

}  // namespace cpu
}  // namespace llmcache
