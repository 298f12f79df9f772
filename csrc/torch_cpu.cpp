// CPU implementations of the llmcache:: ops (schemas: llmcache/ops/*.py), wrapping the raw
// kernels of csrc/cpu/. Argument checks with readable messages live in the Python entry points;
// the TORCH_CHECKs here guard direct torch.ops calls.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/kernels.h"
#include "torch_cpu.h"

namespace llmcache {
namespace {

cpu::Dtype to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cpu::Dtype::F32;
    case at::kHalf:
      return cpu::Dtype::F16;
    case at::kBFloat16:
      return cpu::Dtype::BF16;
    default:
      TORCH_CHECK(false, "llmcache: expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

at::Tensor simhash_cpu(const at::Tensor& x, const at::Tensor& planes) {
  TORCH_CHECK(x.dim() == 2 && planes.dim() == 2 && x.size(1) == planes.size(0),
              "simhash: x [B, d] and planes [d, nbits] expected");
  TORCH_CHECK(planes.size(1) % 64 == 0, "simhash: nbits must be a multiple of 64");
  auto xc = x.contiguous();
  auto pc = planes.to(at::kFloat).contiguous();
  auto codes = at::empty({x.size(0), planes.size(1) / 64}, x.options().dtype(at::kLong));
  cpu::simhash(xc.data_ptr(), to_dtype(xc), xc.size(0), xc.size(1), pc.data_ptr<float>(),
               pc.size(1), codes.data_ptr<int64_t>());
  return codes;
}

at::Tensor simhash_pooled_cpu(const at::Tensor& embeds, const at::Tensor& mask, const at::Tensor& planes) {
  TORCH_CHECK(embeds.dim() == 3 && mask.dim() == 2 && planes.dim() == 2 &&
                  embeds.size(2) == planes.size(0) && mask.size(0) == embeds.size(0) &&
                  mask.size(1) == embeds.size(1),
              "simhash_pooled: embeds [B, T, d], mask [B, T], planes [d, nbits] expected");
  TORCH_CHECK(planes.size(1) % 64 == 0, "simhash_pooled: nbits must be a multiple of 64");
  auto ec = embeds.contiguous();
  auto mc = mask.ne(0).to(at::kByte).contiguous();
  auto pc = planes.to(at::kFloat).contiguous();
  auto codes = at::empty({embeds.size(0), planes.size(1) / 64}, embeds.options().dtype(at::kLong));
  cpu::simhash_pooled(ec.data_ptr(), to_dtype(ec), mc.data_ptr<uint8_t>(), ec.size(0), ec.size(1),
                      ec.size(2), pc.data_ptr<float>(), pc.size(1), codes.data_ptr<int64_t>());
  return codes;
}


at::Tensor gather_with_mask_cpu(const at::Tensor& values, const at::Tensor& slot, const at::Tensor& computed,
                                const at::Tensor& row, at::Tensor& last_used, at::Tensor& hit_count,
                                int64_t tick, bool align_end) {
  TORCH_CHECK(values.dim() >= 2 && computed.dim() == values.dim(), "gather_with_mask: values [N, Tv, *F], computed [M, T, *F]");
  TORCH_CHECK(values.scalar_type() == computed.scalar_type(), "gather_with_mask: values and computed dtypes differ");
  TORCH_CHECK(values.is_contiguous() && computed.is_contiguous() && slot.is_contiguous() && row.is_contiguous() &&
                  last_used.is_contiguous() && hit_count.is_contiguous(),
              "gather_with_mask: contiguous tensors expected");
  const int64_t B = slot.numel();
  std::vector<int64_t> out_shape = computed.sizes().vec();
  out_shape[0] = B;
  auto out = at::empty(out_shape, computed.options());
  // Bytes of one sequence position: the product of the trailing *F dims.
  int64_t inner_bytes = values.element_size();
  for (int64_t i = 2; i < values.dim(); ++i) inner_bytes *= values.size(i);
  const int64_t N = values.size(0), M = computed.size(0);
  const int64_t* s = slot.data_ptr<int64_t>();
  const int64_t* r = row.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK(s[i] < N, "gather_with_mask: slot[", i, "] = ", s[i], " is out of range for a bank of ", N);
    TORCH_CHECK(s[i] >= 0 || (r[i] >= 0 && r[i] < M), "gather_with_mask: row[", i, "] = ", r[i],
                " is out of range for ", M, " computed rows");
  }
  cpu::gather_with_mask(static_cast<const uint8_t*>(values.data_ptr()), values.size(0), values.size(1),
                        slot.data_ptr<int64_t>(), static_cast<const uint8_t*>(computed.data_ptr()),
                        computed.size(1), row.data_ptr<int64_t>(), B, inner_bytes,
                        last_used.data_ptr<int64_t>(), hit_count.data_ptr<int64_t>(), tick, align_end,
                        static_cast<uint8_t*>(out.data_ptr()));
  return out;
}

}  // namespace

// (Outside the anonymous namespace: module.cpp binds it for eager CPU calls too.)
at::Tensor chain_hash_cpu(const at::Tensor& seeds, const at::Tensor& tokens, const at::Tensor& start,
                          const at::Tensor& count, int64_t page, int64_t pages) {
  TORCH_CHECK(tokens.dim() == 3 && tokens.scalar_type() == at::kLong && tokens.is_contiguous(),
              "chain_hash: tokens int64 [C, B, T] contiguous expected");
  const int64_t C = tokens.size(0), B = tokens.size(1), T = tokens.size(2);
  TORCH_CHECK(seeds.scalar_type() == at::kByte && seeds.is_contiguous() && seeds.dim() == 2 && seeds.size(0) == B &&
                  seeds.size(1) == cpu::kChainDigest,
              "chain_hash: seeds uint8 [B, 32] expected");
  TORCH_CHECK(start.scalar_type() == at::kLong && count.scalar_type() == at::kLong && start.is_contiguous() &&
                  count.is_contiguous() && start.numel() == B && count.numel() == B,
              "chain_hash: start and count int64 [B] expected");
  TORCH_CHECK(page > 0 && pages >= 0, "chain_hash: page must be positive and pages non-negative");
  const int64_t* s = start.data_ptr<int64_t>();
  const int64_t* n = count.data_ptr<int64_t>();
  for (int64_t r = 0; r < B; ++r)
    TORCH_CHECK(s[r] >= 0 && n[r] >= 0 && s[r] + n[r] <= T, "chain_hash: row ", r, "'s span leaves [0, T)");
  auto out = at::empty({B, pages, cpu::kChainDigest}, seeds.options());
  cpu::chain_hash(seeds.data_ptr<uint8_t>(), tokens.data_ptr<int64_t>(), C, B, T, s, n, page, pages,
                  out.data_ptr<uint8_t>());
  return out;
}

// (Outside the anonymous namespace: host_ops.cpp binds it for eager CPU calls too.)
std::tuple<at::Tensor, at::Tensor> hamming_topk_cpu(const at::Tensor& queries, const at::Tensor& bank,
                                                    int64_t k, const std::optional<at::Tensor>& valid,
                                                    const std::optional<at::Tensor>& query_tag,
                                                    const std::optional<at::Tensor>& bank_tag) {
  // Every check of the Python wrapper's (llmcache/ops/hamming_topk.py), which calls this directly on
  // CPU tensors and only explains, in its own words, a call refused here.
  TORCH_CHECK(queries.dim() == 2 && bank.dim() == 2 && queries.size(1) == bank.size(1),
              "hamming_topk: queries [B, W] and bank [N, W] expected");
  TORCH_CHECK(queries.size(1) >= 1 && queries.size(1) <= 16, "hamming_topk: W must be in 1..16");
  TORCH_CHECK(queries.scalar_type() == at::kLong && bank.scalar_type() == at::kLong,
              "hamming_topk: codes must be int64");
  TORCH_CHECK(queries.device().is_cpu() && bank.device().is_cpu() && queries.is_contiguous() && bank.is_contiguous(),
              "hamming_topk: contiguous CPU tensors expected");
  TORCH_CHECK(k >= 1, "hamming_topk: k must be >= 1");
  TORCH_CHECK(query_tag.has_value() == bank_tag.has_value(), "hamming_topk: pass both tags or neither");
  const at::Tensor& q = queries;
  const at::Tensor& b = bank;
  const int64_t B = q.size(0), N = b.size(0), W = q.size(1);
  const uint8_t* v = nullptr;
  if (valid.has_value()) {
    TORCH_CHECK(valid->dim() == 1 && valid->numel() == N && valid->scalar_type() == at::kBool &&
                    valid->device().is_cpu() && valid->is_contiguous(),
                "hamming_topk: valid must be a contiguous bool [N] CPU tensor");
    v = reinterpret_cast<const uint8_t*>(valid->data_ptr<bool>());
  }
  const int64_t *qt = nullptr, *bt = nullptr;
  if (query_tag.has_value()) {
    for (const at::Tensor* t : {&*query_tag, &*bank_tag})
      TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->device().is_cpu() && t->is_contiguous(),
                  "hamming_topk: tags must be contiguous int64 CPU tensors");
    TORCH_CHECK(query_tag->numel() == B && bank_tag->numel() == N, "hamming_topk: tags must be [B] and [N]");
    qt = query_tag->data_ptr<int64_t>();
    bt = bank_tag->data_ptr<int64_t>();
  }
  auto dist = at::empty({B, k}, q.options().dtype(at::kInt));
  auto idx = at::empty({B, k}, q.options().dtype(at::kLong));
  cpu::hamming_topk(q.data_ptr<int64_t>(), B, b.data_ptr<int64_t>(), N, W, k, v, qt, bt, dist.data_ptr<int32_t>(),
                    idx.data_ptr<int64_t>());
  return {dist, idx};
}

// Whether every one of the n indices lies in [0, bound): one pass on the host (at::aminmax and
// its two item() reads are dispatcher calls, which cost more than the pass at these sizes).
static bool within(const int64_t* index, int64_t n, int64_t bound, int64_t least = 0) {
  int64_t lo = 0, hi = -1;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, index[i]);
    hi = std::max(hi, index[i]);
  }
  return lo >= least && hi < bound;
}

// llmcache::write_rows's CPU kernel (schema and contract: llmcache/ops/write_rows.py): arena [R, F]
// (rows contiguous), dst int64 [S], src int64 [S] or None, pieces [M, A, T, C] of the arena's dtype
// (C contiguous). Returns finite bool [S]. (Outside the anonymous namespace: module.cpp binds it too.)
at::Tensor write_rows_cpu(const at::Tensor& arena, const at::Tensor& dst, const std::optional<at::Tensor>& src,
                          const std::vector<at::Tensor>& pieces) {
  TORCH_CHECK(arena.device().is_cpu() && arena.dim() == 2 && arena.stride(1) == 1 && arena.stride(0) == arena.size(1),
              "write_rows: arena must be a CPU [R, F] tensor with contiguous rows");
  const auto dtype = arena.scalar_type();
  uint64_t exponent = 0;
  if (dtype == at::kHalf) exponent = 0x7c00;
  else if (dtype == at::kBFloat16) exponent = 0x7f80;
  else if (dtype == at::kFloat) exponent = 0x7f800000u;
  else if (dtype == at::kDouble) exponent = 0x7ff0000000000000ull;
  TORCH_CHECK(exponent, "write_rows: the arena must hold float16, bfloat16, float32 or float64");
  auto check_index = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(),
                "write_rows: ", name, " must be a contiguous CPU int64 [S] tensor");
  };
  check_index(dst, "dst");
  const int64_t S = dst.size(0), F = arena.size(1), R = arena.size(0);
  TORCH_CHECK(!pieces.empty(), "write_rows: no pieces");
  const int64_t M = pieces[0].size(0), T = pieces[0].dim() == 4 ? pieces[0].size(2) : 0;
  const int64_t elem = arena.element_size();
  std::vector<cpu::RowPiece> spec;
  int64_t width = 0;
  for (const auto& p : pieces) {
    TORCH_CHECK(p.device().is_cpu() && p.dim() == 4 && p.scalar_type() == dtype && p.size(0) == M && p.size(2) == T &&
                    (p.stride(3) == 1 || p.size(3) == 1),
                "write_rows: every piece must be a CPU [M, A, T, C] tensor of the arena's dtype, C contiguous");
    spec.push_back({static_cast<const uint8_t*>(p.data_ptr()), p.stride(0) * elem, p.stride(1) * elem,
                    p.stride(2) * elem, p.size(1), p.size(3)});
    width += p.size(1) * p.size(3);
  }
  TORCH_CHECK(width == F, "write_rows: the pieces give ", width, " elements a row, the arena holds ", F);
  const int64_t* src_ptr = nullptr;
  if (src.has_value()) {
    check_index(*src, "src");
    TORCH_CHECK(src->size(0) == S, "write_rows: src and dst must have the same length");
    src_ptr = src->data_ptr<int64_t>();
    TORCH_CHECK(within(src_ptr, S, M * T), "write_rows: src out of [0, M * T)");
  } else {
    TORCH_CHECK(S <= M * T, "write_rows: more rows than the pieces hold tokens");
  }
  TORCH_CHECK(within(dst.data_ptr<int64_t>(), S, R), "write_rows: dst out of the arena's rows");
  at::Tensor finite = at::empty({S}, arena.options().dtype(at::kBool));
  uint8_t* out = reinterpret_cast<uint8_t*>(finite.data_ptr<bool>());
  uint8_t* base = static_cast<uint8_t*>(arena.data_ptr());
  const int64_t* dst_ptr = dst.data_ptr<int64_t>();
  {
    // (~256 KiB of rows a task: small writes stay on the calling thread)
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, F * elem));
    at::parallel_for(0, S, grain, [&](int64_t begin, int64_t end) {
      cpu::write_rows(base, F * elem, dst_ptr, src_ptr, begin, end, spec.data(), static_cast<int64_t>(spec.size()), T,
                      elem, exponent, out);
    });
  }
  return finite;
}

// llmcache::read_rows's CPU kernel (schema and contract: llmcache/ops/read_rows.py): arena [R, F]
// (rows contiguous), rows int64 [M * T] (-1: zeros), out [M, Tcap >= T, D] and kv [blocks, 2, M,
// heads, Tcap, head dim] or None, of the arena's dtype (last dimension contiguous), written in place
// at t < T.
// (Outside the anonymous namespace: module.cpp binds it too.)
void read_rows_cpu(const at::Tensor& arena, const at::Tensor& rows, const at::Tensor& out,
                   const std::optional<at::Tensor>& kv) {
  TORCH_CHECK(arena.device().is_cpu() && arena.dim() == 2 && arena.stride(1) == 1 && arena.stride(0) == arena.size(1),
              "read_rows: arena must be a CPU [R, F] tensor with contiguous rows");
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous(),
              "read_rows: rows must be a contiguous CPU int64 [S] tensor");
  const auto dtype = arena.scalar_type();
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 3 && out.scalar_type() == dtype && (out.stride(2) == 1 || out.size(2) == 1),
              "read_rows: out must be a CPU [M, Tcap, D] tensor of the arena's dtype, D contiguous");
  const int64_t S = rows.size(0), F = arena.size(1), R = arena.size(0), M = out.size(0), Tcap = out.size(1);
  TORCH_CHECK(M > 0 ? S % M == 0 : S == 0, "read_rows: ", S, " rows do not split over out's ", M, " rows");
  const int64_t T = M > 0 ? S / M : 0, elem = arena.element_size();
  TORCH_CHECK(T <= Tcap, "read_rows: ", T, " tokens a row, out holds ", Tcap);
  std::vector<cpu::RowSlot> spec;
  spec.push_back({static_cast<uint8_t*>(out.data_ptr()), out.stride(0) * elem, 0, out.stride(1) * elem, 1,
                  out.size(2) * elem});
  int64_t width = out.size(2);
  if (kv.has_value()) {
    const at::Tensor& k = *kv;
    TORCH_CHECK(k.device().is_cpu() && k.dim() == 6 && k.scalar_type() == dtype && k.size(1) == 2 && k.size(2) == M &&
                    k.size(4) == Tcap && (k.stride(5) == 1 || k.size(5) == 1),
                "read_rows: kv must be a CPU [blocks, 2, M, heads, Tcap, head dim] tensor of the arena's dtype and "
                "out's M and Tcap, head dim contiguous");
    uint8_t* base = static_cast<uint8_t*>(k.data_ptr());
    for (int64_t b = 0; b < k.size(0); ++b)
      for (int64_t w = 0; w < 2; ++w)
        spec.push_back({base + (b * k.stride(0) + w * k.stride(1)) * elem, k.stride(2) * elem, k.stride(3) * elem,
                        k.stride(4) * elem, k.size(3), k.size(5) * elem});
    width += k.size(0) * 2 * k.size(3) * k.size(5);
  }
  TORCH_CHECK(width == F, "read_rows: out and kv take ", width, " elements a row, the arena holds ", F);
  TORCH_CHECK(within(rows.data_ptr<int64_t>(), S, R, -1), "read_rows: rows out of the arena's rows (or -1)");
  const uint8_t* data = static_cast<const uint8_t*>(arena.data_ptr());
  const int64_t* rows_ptr = rows.data_ptr<int64_t>();
  // (~256 KiB of rows a task: small reads stay on the calling thread)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, F * elem));
  at::parallel_for(0, S, grain, [&](int64_t begin, int64_t end) {
    cpu::read_rows(data, F * elem, rows_ptr, begin, end, spec.data(), static_cast<int64_t>(spec.size()), T);
  });
}

TORCH_LIBRARY_IMPL(llmcache, CPU, m) {
  m.impl("chain_hash", &chain_hash_cpu);
  m.impl("simhash", &simhash_cpu);
  m.impl("simhash_pooled", &simhash_pooled_cpu);
  m.impl("hamming_topk", &hamming_topk_cpu);
  m.impl("gather_with_mask", &gather_with_mask_cpu);
  m.impl("write_rows", &write_rows_cpu);
  m.impl("read_rows", &read_rows_cpu);
}

}  // namespace llmcache
