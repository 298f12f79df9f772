// row_keys, page_keys: the exact tier's keys of a batch in one pass over its host copy: the spans
// of the mask, each row's seed (its header and what its span holds besides its tokens) and its
// BLAKE2b-256 keys (chain_hash: one page per row for an encoder's whole rows, pages of `page`
// tokens for a decoder's). The contracts are kernels.h's and llmcache.rows.row_keys's /
// page_keys's docstrings; the Python compositions there (rows.spans, marked_header, chain_keys)
// are the references these must equal byte for byte.
#include <cstring>
#include <vector>

#include "kernels.h"

namespace llmcache {
namespace cpu {

namespace {

// A row's real tokens (mask != 0): first s, count n, one past the last `end` (0, 0, 0 for none);
// `all`: the batch has no padding anywhere (s = 0, n = end = T).
void mask_span(const int64_t* m, int64_t T, bool all, int64_t* s, int64_t* n, int64_t* end) {
  *s = 0;
  *n = *end = T;
  if (all) return;
  int64_t count = 0, first = -1, last = -1;
  for (int64_t t = 0; t < T; ++t)
    if (m[t] != 0) {
      ++count;
      if (first < 0) first = t;
      last = t;
    }
  *n = count;
  *s = count > 0 ? first : 0;
  *end = count > 0 ? last + 1 : 0;
}

// The seeds of rows' chains: BLAKE2b-256(kind || header || marks), marks = "M" lead trail (uint32
// LE each) where either is non-zero, then "B" before (uint32 LE) where it is (rows.marked_header,
// rows.chain_seed); rows without marks share the header's own seed, hashed once.
class Seeds {
 public:
  Seeds(uint8_t kind, const uint8_t* header, int64_t header_len) : kind_(kind), header_(header), length_(header_len) {}

  void write(int64_t lead, int64_t trail, int64_t before, uint8_t* seed) {
    if (!lead && !trail && !before) {
      if (!plain_done_) {
        start();
        blake2b(message_.data(), static_cast<int64_t>(message_.size()), plain_, kChainDigest);
        plain_done_ = true;
      }
      std::memcpy(seed, plain_, kChainDigest);
      return;
    }
    start();
    if (lead || trail) {
      message_.push_back(static_cast<uint8_t>('M'));
      word(lead);
      word(trail);
    }
    if (before) {
      message_.push_back(static_cast<uint8_t>('B'));
      word(before);
    }
    blake2b(message_.data(), static_cast<int64_t>(message_.size()), seed, kChainDigest);
  }

 private:
  void start() {
    message_.assign(1, kind_);
    message_.insert(message_.end(), header_, header_ + length_);
  }
  void word(int64_t v) {
    const uint32_t w = static_cast<uint32_t>(v);
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&w);  // (x86-64: little-endian)
    message_.insert(message_.end(), b, b + 4);
  }

  uint8_t kind_;
  const uint8_t* header_;
  int64_t length_;
  std::vector<uint8_t> message_;
  uint8_t plain_[kChainDigest];
  bool plain_done_ = false;
};

bool no_padding(const int64_t* mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (mask[i] == 0) return false;
  return true;
}

}  // namespace

void row_keys(const int64_t* host, int64_t B, int64_t T, const uint8_t* header, int64_t header_len,
              bool lead_visible, bool trail_visible, bool ids_before, int64_t* start, int64_t* count,
              int64_t* marks, uint8_t* keys, uint8_t* keyed, int64_t* no_tokens, int64_t* gaps) {
  const int64_t* mask = host + B * T;
  int64_t* lead = marks;
  int64_t* trail = marks + B;
  int64_t* before = marks + 2 * B;
  *no_tokens = 0;
  *gaps = 0;
  const bool all = no_padding(mask, B * T);  // (every row whole, and no reason is counted)
  std::vector<int64_t> from(B), length(B);
  std::vector<uint8_t> seeds(static_cast<size_t>(B * kChainDigest));
  Seeds seed_of('R', header, header_len);
  for (int64_t r = 0; r < B; ++r) {
    int64_t s, n, end;
    mask_span(mask + r * T, T, all, &s, &n, &end);
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
    seed_of.write(lead[r], trail[r], before[r], seeds.data() + r * kChainDigest);
  }
  const int64_t* channels[3] = {host, host + 2 * B * T, host + 3 * B * T};  // ids, positions, types
  chain_hash_channels(seeds.data(), channels, 3, T, B, from.data(), length.data(), T > 0 ? T : 1, 1, keys);
}

int64_t page_keys(const int64_t* host, int64_t B, int64_t T, const uint8_t* header, int64_t header_len,
                  bool lead_visible, bool trail_visible, int64_t page, int64_t* start, int64_t* count,
                  int64_t* lead, int64_t* trail, uint8_t* keyed, std::vector<uint8_t>* keys, int64_t* no_tokens,
                  int64_t* gaps) {
  const int64_t* mask = host + B * T;
  *no_tokens = 0;
  *gaps = 0;
  const bool all = no_padding(mask, B * T);
  std::vector<int64_t> length(B);
  std::vector<uint8_t> seeds(static_cast<size_t>(B * kChainDigest));
  Seeds seed_of('P', header, header_len);
  int64_t longest = 0;
  for (int64_t r = 0; r < B; ++r) {
    int64_t s, n, end;
    mask_span(mask + r * T, T, all, &s, &n, &end);
    keyed[r] = all || (n > 0 && end - s == n);
    if (!all && n == 0) ++*no_tokens;
    if (!all && n > 0 && !keyed[r]) ++*gaps;
    lead[r] = keyed[r] && lead_visible ? s : 0;
    trail[r] = keyed[r] && trail_visible ? T - s - n : 0;
    start[r] = s - lead[r];
    count[r] = n + lead[r];
    length[r] = keyed[r] ? count[r] : 0;
    longest = length[r] > longest ? length[r] : longest;
    seed_of.write(lead[r], 0, 0, seeds.data() + r * kChainDigest);
  }
  const int64_t P = (longest + page - 1) / page;
  keys->assign(static_cast<size_t>(B * P * kChainDigest), 0);
  const int64_t* channels[3] = {host, host + 2 * B * T, host + 3 * B * T};  // ids, positions, types
  chain_hash_channels(seeds.data(), channels, 3, T, B, start, length.data(), page, P, keys->data());
  return P;
}

}  // namespace cpu
}  // namespace llmcache
