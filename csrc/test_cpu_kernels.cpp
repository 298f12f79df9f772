// ctest binary for the CPU kernels, without torch or Python: every popcount path against a
// naive loop on random codes (run by ctest under LLMCACHE_CPU_ISA=<each path> too), SimHash
// against a double-precision projection, and the gather's copies and counters.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/kernels.h"

using namespace llmcache::cpu;

static int failures = 0;
#define EXPECT(cond, ...)                              \
  do {                                                 \
    if (!(cond)) {                                     \
      ++failures;                                      \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                        \
      std::printf("\n");                               \
    }                                                  \
  } while (0)

// Naive top-k with the contract's tie rule, for one query.
static void naive_topk(const int64_t* q, const int64_t* bank, int64_t N, int64_t W, int64_t k,
                       const uint8_t* valid, const int64_t* qtag, const int64_t* btag,
                       std::vector<int32_t>& dist, std::vector<int64_t>& idx) {
  std::vector<std::pair<int32_t, int64_t>> all;
  for (int64_t n = 0; n < N; ++n) {
    if (valid && !valid[n]) continue;
    if (qtag && btag[n] != *qtag) continue;
    int32_t d = 0;
    for (int64_t w = 0; w < W; ++w) d += __builtin_popcountll(static_cast<uint64_t>(q[w] ^ bank[n * W + w]));
    all.emplace_back(d, n);
  }
  std::sort(all.begin(), all.end());
  dist.assign(k, static_cast<int32_t>(64 * W + 1));
  idx.assign(k, -1);
  for (int64_t j = 0; j < k && j < static_cast<int64_t>(all.size()); ++j) {
    dist[j] = all[j].first;
    idx[j] = all[j].second;
  }
}

static void test_hamming(std::mt19937_64& rng, int64_t B, int64_t N, int64_t W, int64_t k, bool with_valid,
                         bool with_tags, bool low_entropy) {
  std::vector<int64_t> q(B * W), bank(N * W), qtag(B), btag(N);
  std::vector<uint8_t> valid(N);
  // Low-entropy codes (few bits set) make many ties, which exercise the tie rule.
  for (auto& v : q) v = low_entropy ? static_cast<int64_t>(rng() & rng() & rng() & rng()) : static_cast<int64_t>(rng());
  for (auto& v : bank) v = low_entropy ? static_cast<int64_t>(rng() & rng() & rng() & rng()) : static_cast<int64_t>(rng());
  for (auto& v : valid) v = (rng() % 4) != 0;
  for (auto& v : qtag) v = static_cast<int64_t>(rng() % 3);
  for (auto& v : btag) v = static_cast<int64_t>(rng() % 3);
  std::vector<int32_t> dist(B * k);
  std::vector<int64_t> idx(B * k);
  hamming_topk(q.data(), B, bank.data(), N, W, k, with_valid ? valid.data() : nullptr,
               with_tags ? qtag.data() : nullptr, with_tags ? btag.data() : nullptr, dist.data(), idx.data());
  std::vector<int32_t> ed;
  std::vector<int64_t> ei;
  for (int64_t b = 0; b < B; ++b) {
    naive_topk(q.data() + b * W, bank.data(), N, W, k, with_valid ? valid.data() : nullptr,
               with_tags ? &qtag[b] : nullptr, btag.data(), ed, ei);
    for (int64_t j = 0; j < k; ++j) {
      EXPECT(dist[b * k + j] == ed[j] && idx[b * k + j] == ei[j],
             "hamming B%lld-N%lld-W%lld-k%lld valid=%d tags=%d: query %lld rank %lld got (%d, %lld) want (%d, %lld)",
             (long long)B, (long long)N, (long long)W, (long long)k, with_valid, with_tags, (long long)b,
             (long long)j, dist[b * k + j], (long long)idx[b * k + j], ed[j], (long long)ei[j]);
    }
  }
}

static void test_simhash(std::mt19937_64& rng, int64_t B, int64_t T, int64_t d, int64_t nbits) {
  std::normal_distribution<float> normal;
  std::vector<float> x(B * T * d), planes(d * nbits);
  std::vector<uint8_t> mask(B * T);
  for (auto& v : x) v = normal(rng);
  for (auto& v : planes) v = normal(rng);
  for (auto& v : mask) v = (rng() % 3) != 0;
  const int64_t W = nbits / 64;
  std::vector<int64_t> codes(B * W);
  simhash_pooled(x.data(), Dtype::F32, mask.data(), B, T, d, planes.data(), nbits, codes.data());
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> mean(d, 0.0);
    int64_t count = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (!mask[b * T + t]) continue;
      ++count;
      for (int64_t i = 0; i < d; ++i) mean[i] += x[(b * T + t) * d + i];
    }
    for (auto& m : mean) m /= count ? count : 1;
    for (int64_t j = 0; j < nbits; ++j) {
      double proj = 0.0, scale = 0.0;
      for (int64_t i = 0; i < d; ++i) {
        proj += mean[i] * planes[i * nbits + j];
        scale += std::fabs(mean[i] * planes[i * nbits + j]);
      }
      // Rule: bits whose projection is within fp32 rounding of zero may go either way.
      if (std::fabs(proj) <= 1e-5 * scale) continue;
      const bool bit = (static_cast<uint64_t>(codes[b * W + j / 64]) >> (j % 64)) & 1;
      EXPECT(bit == (proj >= 0), "simhash_pooled B%lld-T%lld-d%lld-bits%lld: row %lld bit %lld", (long long)B,
             (long long)T, (long long)d, (long long)nbits, (long long)b, (long long)j);
    }
  }
}

static void test_gather(std::mt19937_64& rng, bool align_end) {
  const int64_t N = 5, Tv = 3, T = 4, inner = 8, B = 6;
  std::vector<uint8_t> values(N * Tv * inner), computed(B * T * inner), out(B * T * inner);
  for (auto& v : values) v = static_cast<uint8_t>(rng() | 1);
  for (auto& v : computed) v = static_cast<uint8_t>(rng() | 1);
  std::vector<int64_t> slot = {2, -1, 2, 4, -1, 0}, row = {0, 3, 0, 0, 1, 0};
  std::vector<int64_t> last_used(N, 0), hit_count(N, 0);
  gather_with_mask(values.data(), N, Tv, slot.data(), computed.data(), T, row.data(), B, inner,
                   last_used.data(), hit_count.data(), 7, align_end, out.data());
  for (int64_t r = 0; r < B; ++r)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < inner; ++i) {
        uint8_t want;
        if (slot[r] < 0) {
          want = computed[(row[r] * T + t) * inner + i];
        } else {
          const int64_t src_t = align_end ? t - (T - Tv) : t;
          want = (src_t >= 0 && src_t < Tv) ? values[(slot[r] * Tv + src_t) * inner + i] : 0;
        }
        EXPECT(out[(r * T + t) * inner + i] == want, "gather align_end=%d row %lld pos %lld", align_end,
               (long long)r, (long long)t);
      }
  EXPECT(hit_count[2] == 2 && hit_count[4] == 1 && hit_count[0] == 1 && hit_count[1] == 0, "gather hit counts");
  EXPECT(last_used[2] == 7 && last_used[1] == 0, "gather last_used");
}

// BLAKE2b against RFC 7693's test vector ("abc", 64-byte digest), and the chain's first page
// against BLAKE2b of its message written out by hand.
static void test_blake2b() {
  const uint8_t abc[3] = {'a', 'b', 'c'};
  uint8_t out[64];
  blake2b(abc, 3, out, 64);
  const char* want = "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d1"
                     "7d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923";
  char got[129];
  for (int i = 0; i < 64; ++i) std::snprintf(got + 2 * i, 3, "%02x", out[i]);
  EXPECT(std::strcmp(got, want) == 0, "blake2b(abc) = %s", got);
  // Two rows, two channels, T = 5: row 1's span 1..4 in pages of 2.
  std::vector<int64_t> tokens(2 * 2 * 5);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int64_t>(i * 7919) << 33;
  std::vector<uint8_t> seeds(2 * kChainDigest, 3), keys(2 * 2 * kChainDigest);
  const int64_t start[2] = {0, 1}, count[2] = {1, 3};
  chain_hash(seeds.data(), tokens.data(), 2, 2, 5, start, count, 2, 2, keys.data());
  std::vector<uint8_t> msg(kChainDigest, 3);
  msg.insert(msg.end(), {2, 0, 0, 0, 8});  // (values past int32: width 8)
  for (int t = 1; t < 3; ++t)
    for (int c = 0; c < 2; ++c) {
      const uint8_t* w = reinterpret_cast<const uint8_t*>(&tokens[(c * 2 + 1) * 5 + t]);
      msg.insert(msg.end(), w, w + 8);
    }
  uint8_t first[kChainDigest];
  blake2b(msg.data(), static_cast<int64_t>(msg.size()), first, kChainDigest);
  EXPECT(std::memcmp(first, &keys[2 * kChainDigest], kChainDigest) == 0, "chain_hash row 1 page 0");
  bool zero = true;
  for (int i = 0; i < kChainDigest; ++i) zero = zero && keys[kChainDigest + i] == 0;
  EXPECT(zero, "chain_hash: a page past the span is zero");
}

// CRC-32's check value, and a long buffer (folded lanes and a tail) hashed whole against in two
// pieces, each piece below the folding threshold then above it; the copy is exact.
static void test_crc32() {
  const char* check = "123456789";
  EXPECT(crc32_copy(0, reinterpret_cast<const uint8_t*>(check), nullptr, 9) == 0xCBF43926u, "crc32 check value");
  std::vector<uint8_t> data(1000), copy(1000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 131 + 7);
  const uint32_t whole = crc32_copy(0, data.data(), copy.data(), 1000);
  EXPECT(copy == data, "crc32_copy copies its bytes");
  for (int64_t cut : {1, 37, 63, 64, 500, 999}) {
    const uint32_t head = crc32_copy(0, data.data(), nullptr, cut);
    EXPECT(crc32_copy(head, data.data() + cut, nullptr, 1000 - cut) == whole, "crc32 continued from a prefix");
  }
}

// write_rows: rows gathered from two strided pieces into the arena, tokens picked by src, the
// row holding an inf flagged (float32), the rows not written untouched.
static void test_write_rows() {
  const int64_t M = 2, T = 3, A = 2, C = 3, D = 4, F = D + A * C, R = 8;
  std::vector<float> hidden(M * T * D), kv(M * A * (T + 1) * C), arena(R * F, -1.0f);
  for (size_t i = 0; i < hidden.size(); ++i) hidden[i] = static_cast<float>(i);
  for (size_t i = 0; i < kv.size(); ++i) kv[i] = 1000.0f + static_cast<float>(i);
  kv[(1 * A + 1) * (T + 1) * C + 2 * C + 1] = INFINITY;  // m 1, a 1, t 2: token 5
  const RowPiece pieces[2] = {
      {reinterpret_cast<const uint8_t*>(hidden.data()), T * D * 4, 0, D * 4, 1, D},
      {reinterpret_cast<const uint8_t*>(kv.data()), A * (T + 1) * C * 4, (T + 1) * C * 4, C * 4, A, C}};  // t < T of T + 1
  const int64_t src[3] = {5, 0, 4}, dst[3] = {6, 1, 3};
  uint8_t finite[3] = {9, 9, 9};
  write_rows(reinterpret_cast<uint8_t*>(arena.data()), F * 4, dst, src, 0, 3, pieces, 2, T, 4, 0x7f800000u, finite);
  for (int i = 0; i < 3; ++i) {
    const int64_t m = src[i] / T, t = src[i] % T;
    const float* row = arena.data() + dst[i] * F;
    bool same = true;
    for (int64_t d = 0; d < D; ++d) same &= row[d] == hidden[(m * T + t) * D + d];
    for (int64_t a = 0; a < A; ++a)
      for (int64_t c = 0; c < C; ++c) {
        const float want = kv[((m * A + a) * (T + 1) + t) * C + c];
        same &= std::isinf(want) ? std::isinf(row[D + a * C + c]) : row[D + a * C + c] == want;
      }
    EXPECT(same, "write_rows: row %d holds token %lld", i, static_cast<long long>(src[i]));
    EXPECT(finite[i] == (i == 0 ? 0 : 1), "write_rows: row %d finite flag %d", i, finite[i]);
  }
  for (int64_t r : {0, 2, 4, 5, 7}) EXPECT(arena[r * F] == -1.0f, "write_rows: row %lld untouched", static_cast<long long>(r));
}

// read_rows: arena rows (one twice, in any order, and a -1) read into two pieces with room after T
// tokens; token m * T + t of each gets its run of the row (zeros for -1), the room untouched.
static void test_read_rows() {
  const int64_t M = 2, T = 3, A = 2, C = 64, D = 5, F = D + A * C, R = 7, Tcap = T + 1;
  std::vector<float> arena(R * F), hidden(M * Tcap * D, -1.0f), kv(M * A * Tcap * C, -1.0f);
  for (size_t i = 0; i < arena.size(); ++i) arena[i] = static_cast<float>(i);
  RowSlot pieces[2] = {{reinterpret_cast<uint8_t*>(hidden.data()), Tcap * D * 4, 0, D * 4, 1, D * 4},
                       {reinterpret_cast<uint8_t*>(kv.data()), A * Tcap * C * 4, Tcap * C * 4, C * 4, A, C * 4}};
  const int64_t rows[M * T] = {6, 0, 3, 3, -1, 5};
  read_rows(reinterpret_cast<const uint8_t*>(arena.data()), F * 4, rows, 0, M * T, pieces, 2, T);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t t = 0; t < Tcap; ++t) {
      const int64_t r = t < T ? rows[m * T + t] : -2;  // (-2: the room after T, untouched: -1.0f)
      const std::vector<float> zeros(F, 0.0f);
      const float* row = r >= 0 ? arena.data() + r * F : r == -1 ? zeros.data() : nullptr;
      bool same = true;
      for (int64_t d = 0; d < D; ++d) same &= hidden[(m * Tcap + t) * D + d] == (row ? row[d] : -1.0f);
      for (int64_t a = 0; a < A; ++a)
        for (int64_t c = 0; c < C; ++c) same &= kv[((m * A + a) * Tcap + t) * C + c] == (row ? row[D + a * C + c] : -1.0f);
      EXPECT(same, "read_rows: token m %lld t %lld", static_cast<long long>(m), static_cast<long long>(t));
    }
}

int main() {
  test_blake2b();
  test_crc32();
  test_write_rows();
  test_read_rows();
  std::mt19937_64 rng(std::random_device{}());
  std::printf("cpu kernel path: %s\n", cpu_kernel_name().c_str());
  const int64_t sizes[][4] = {{1, 1, 1, 1},     {3, 0, 2, 1},     {1, 4097, 3, 1},  {5, 1000, 4, 5},
                              {7, 3001, 16, 3},  {4, 50, 2, 80},   {9, 20000, 4, 1}, {2, 777, 9, 16},
                              {17, 5003, 4, 2},  {8, 255, 4, 1},   {12, 999, 1, 3},  {1, 70001, 4, 1}};
  for (const auto& s : sizes)
    for (int v = 0; v < 2; ++v)
      for (int t = 0; t < 2; ++t)
        for (int low = 0; low < 2; ++low) test_hamming(rng, s[0], s[1], s[2], s[3], v, t, low);
  // The only eligible answers 255 and 256 bits away (17 copies of one query, W = 4, k = 2): exact
  // on every path, though the table path's byte counters saturate at 255.
  {
    const int64_t B = 17, W = 4, N = 700, k = 2;
    std::vector<int64_t> q(B * W), bank(N * W);
    for (int64_t w = 0; w < W; ++w) q[w] = static_cast<int64_t>(rng());
    for (int64_t b = 1; b < B; ++b) std::copy(q.begin(), q.begin() + W, q.begin() + b * W);
    for (auto& v : bank) v = static_cast<int64_t>(rng());
    for (int64_t w = 0; w < W; ++w) bank[600 * W + w] = bank[601 * W + w] = ~q[w];
    bank[601 * W] ^= 1;
    std::vector<uint8_t> valid(N, 0);
    valid[600] = valid[601] = 1;
    std::vector<int32_t> dist(B * k);
    std::vector<int64_t> idx(B * k);
    hamming_topk(q.data(), B, bank.data(), N, W, k, valid.data(), nullptr, nullptr, dist.data(), idx.data());
    for (int64_t b = 0; b < B; ++b)
      EXPECT(dist[b * k] == 255 && idx[b * k] == 601 && dist[b * k + 1] == 256 && idx[b * k + 1] == 600,
             "far answers of query %lld: (%d, %lld), (%d, %lld)", (long long)b, dist[b * k], (long long)idx[b * k],
             dist[b * k + 1], (long long)idx[b * k + 1]);
  }
  // All slots invalid: every answer missing.
  {
    std::vector<int64_t> q(4, 1), bank(40, 1);
    std::vector<uint8_t> valid(10, 0);
    std::vector<int32_t> dist(4);
    std::vector<int64_t> idx(4);
    hamming_topk(q.data(), 2, bank.data(), 10, 2, 2, valid.data(), nullptr, nullptr, dist.data(), idx.data());
    for (int j = 0; j < 4; ++j) EXPECT(idx[j] == -1 && dist[j] == 129, "all-invalid answer %d", j);
  }
  test_simhash(rng, 3, 7, 33, 64);
  test_simhash(rng, 1, 1, 384, 256);
  test_simhash(rng, 4, 16, 100, 1024);
  test_gather(rng, false);
  test_gather(rng, true);
  std::printf("%s: %d failures\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
