// CUDA implementations of the llmcache:: ops (schemas: llmcache/ops/*.py), wrapping the raw
// launchers of kernels/*.cu on the current stream of the inputs' device. Argument checks with
// readable messages live in the Python entry points; the TORCH_CHECKs here guard direct
// torch.ops calls, on shapes and dtypes only: nothing here reads device memory on the host
// (no synchronisation), so slot/row contents are not validated (see kernels/cuda_kernels.h).
// The stream comes from c10/cuda/CUDAStream.h (the function at::cuda::getCurrentCUDAStream
// forwards to): ATen/cuda/CUDAContext.h would also pull in cuBLAS/cuSPARSE headers, which a
// bare CUDA toolkit (nvcc + runtime only) does not ship.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_kernels.h"

namespace llmcache {
namespace {

int to_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return gpu::kFloat32;
    case at::kHalf:
      return gpu::kFloat16;
    case at::kBFloat16:
      return gpu::kBFloat16;
    default:
      TORCH_CHECK(false, "llmcache: expected float32, float16 or bfloat16, got ", type);
  }
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but expected ",
              like.device());
}

// Scratch memory of a launcher, on the inputs' device (empty when none is needed).
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void* data_or_null(const at::Tensor& t) { return t.numel() > 0 ? t.data_ptr() : nullptr; }

at::Tensor simhash_cuda(const at::Tensor& x, const at::Tensor& planes) {
  TORCH_CHECK(x.is_cuda(), "simhash: x must be a CUDA tensor");
  check_device("simhash", "planes", planes, x);
  TORCH_CHECK(x.dim() == 2 && planes.dim() == 2 && x.size(1) == planes.size(0),
              "simhash: x [B, d] and planes [d, nbits] expected");
  TORCH_CHECK(planes.size(1) > 0 && planes.size(1) % 64 == 0, "simhash: nbits must be a positive multiple of 64");
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto pc = planes.to(at::kFloat).contiguous();
  const int64_t B = xc.size(0), d = xc.size(1), nbits = pc.size(1);
  auto codes = at::empty({B, nbits / 64}, x.options().dtype(at::kLong));
  auto scratch = workspace(gpu::simhash_workspace_bytes(B, d, nbits), xc);
  C10_CUDA_CHECK(gpu::simhash_cuda(data_or_null(xc), to_dtype(xc.scalar_type()), B, d, pc.data_ptr<float>(), nbits,
                                   codes.data_ptr<int64_t>(), data_or_null(scratch), current_stream()));
  return codes;
}

at::Tensor simhash_pooled_cuda(const at::Tensor& embeds, const at::Tensor& mask, const at::Tensor& planes) {
  TORCH_CHECK(embeds.is_cuda(), "simhash_pooled: embeds must be a CUDA tensor");
  check_device("simhash_pooled", "mask", mask, embeds);
  check_device("simhash_pooled", "planes", planes, embeds);
  TORCH_CHECK(embeds.dim() == 3 && mask.dim() == 2 && planes.dim() == 2 &&
                  embeds.size(2) == planes.size(0) && mask.size(0) == embeds.size(0) &&
                  mask.size(1) == embeds.size(1),
              "simhash_pooled: embeds [B, T, d], mask [B, T], planes [d, nbits] expected");
  TORCH_CHECK(planes.size(1) > 0 && planes.size(1) % 64 == 0,
              "simhash_pooled: nbits must be a positive multiple of 64");
  const c10::cuda::CUDAGuard guard(embeds.device());
  auto ec = embeds.contiguous();
  // The kernel reads bool and integer masks as they are (no conversion kernel on the hot path);
  // any other dtype becomes a bool mask first.
  const bool integral = at::isIntegralType(mask.scalar_type(), /*includeBool=*/true);
  auto mc = integral ? mask.contiguous() : mask.ne(0).contiguous();
  auto pc = planes.to(at::kFloat).contiguous();
  const int64_t B = ec.size(0), T = ec.size(1), d = ec.size(2);
  const int dtype = to_dtype(ec.scalar_type());
  const int64_t nbits = pc.size(1);
  auto codes = at::empty({B, nbits / 64}, embeds.options().dtype(at::kLong));
  auto scratch = workspace(gpu::simhash_pooled_workspace_bytes(dtype, B, T, d, nbits), ec);
  const int mask_bytes = static_cast<int>(mc.element_size());
  C10_CUDA_CHECK(gpu::simhash_pooled_cuda(data_or_null(ec), dtype, data_or_null(mc), mask_bytes, B, T, d,
                                          pc.data_ptr<float>(), nbits, codes.data_ptr<int64_t>(),
                                          data_or_null(scratch), current_stream()));
  return codes;
}

std::tuple<at::Tensor, at::Tensor> hamming_topk_cuda(const at::Tensor& queries, const at::Tensor& bank,
                                                     int64_t k, const std::optional<at::Tensor>& valid,
                                                     const std::optional<at::Tensor>& query_tag,
                                                     const std::optional<at::Tensor>& bank_tag) {
  TORCH_CHECK(queries.is_cuda(), "hamming_topk: queries must be a CUDA tensor");
  check_device("hamming_topk", "bank", bank, queries);
  TORCH_CHECK(queries.dim() == 2 && bank.dim() == 2 && queries.size(1) == bank.size(1),
              "hamming_topk: queries [B, W] and bank [N, W] expected");
  TORCH_CHECK(queries.scalar_type() == at::kLong && bank.scalar_type() == at::kLong,
              "hamming_topk: codes must be int64");
  TORCH_CHECK(k >= 1 && k <= gpu::kHammingMaxK, "hamming_topk: the CUDA kernel supports 1 <= k <= ",
              gpu::kHammingMaxK, ", got k = ", k, " (use backend='triton' or 'reference' for more)");
  const int64_t B = queries.size(0), N = bank.size(0), W = queries.size(1);
  TORCH_CHECK(W >= 1 && W <= gpu::kHammingMaxWords, "hamming_topk: W (words per code) must be in 1..",
              gpu::kHammingMaxWords, ", got ", W);
  TORCH_CHECK(N < gpu::kHammingMaxRows, "hamming_topk: the CUDA kernel supports banks of fewer than 2^40 rows");
  TORCH_CHECK(query_tag.has_value() == bank_tag.has_value(), "hamming_topk: pass both tags or neither");
  const c10::cuda::CUDAGuard guard(queries.device());
  auto q = queries.contiguous();
  auto b = bank.contiguous();
  at::Tensor v, qt, bt;
  if (valid.has_value()) {
    check_device("hamming_topk", "valid", *valid, queries);
    TORCH_CHECK(valid->numel() == N, "hamming_topk: valid must have N entries");
    v = valid->to(at::kByte).contiguous();
  }
  if (query_tag.has_value()) {
    check_device("hamming_topk", "query_tag", *query_tag, queries);
    check_device("hamming_topk", "bank_tag", *bank_tag, queries);
    TORCH_CHECK(query_tag->numel() == B && bank_tag->numel() == N, "hamming_topk: tags must be [B] and [N]");
    TORCH_CHECK(query_tag->scalar_type() == at::kLong && bank_tag->scalar_type() == at::kLong,
                "hamming_topk: tags must be int64");
    qt = query_tag->contiguous();
    bt = bank_tag->contiguous();
  }
  auto dist = at::empty({B, k}, q.options().dtype(at::kInt));
  auto idx = at::empty({B, k}, q.options().dtype(at::kLong));
  auto scratch = workspace(gpu::hamming_topk_workspace_bytes(B, N, k), q);
  C10_CUDA_CHECK(gpu::hamming_topk_cuda(
      q.data_ptr<int64_t>(), B, b.data_ptr<int64_t>(), N, W, k, v.defined() ? v.data_ptr<uint8_t>() : nullptr,
      qt.defined() ? qt.data_ptr<int64_t>() : nullptr, bt.defined() ? bt.data_ptr<int64_t>() : nullptr,
      dist.data_ptr<int32_t>(), idx.data_ptr<int64_t>(), data_or_null(scratch),
      current_stream()));
  return {dist, idx};
}

at::Tensor gather_with_mask_cuda(const at::Tensor& values, const at::Tensor& slot, const at::Tensor& computed,
                                 const at::Tensor& row, at::Tensor& last_used, at::Tensor& hit_count,
                                 int64_t tick, bool align_end) {
  TORCH_CHECK(values.is_cuda(), "gather_with_mask: values must be a CUDA tensor");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"slot", &slot},
                                {"computed", &computed},
                                {"row", &row},
                                {"last_used", &last_used},
                                {"hit_count", &hit_count}})
    check_device("gather_with_mask", name, *t, values);
  TORCH_CHECK(values.dim() >= 2 && computed.dim() == values.dim(),
              "gather_with_mask: values [N, Tv, *F], computed [M, T, *F]");
  TORCH_CHECK(values.sizes().slice(2) == computed.sizes().slice(2),
              "gather_with_mask: values and computed trailing shapes differ");
  TORCH_CHECK(values.scalar_type() == computed.scalar_type(), "gather_with_mask: values and computed dtypes differ");
  TORCH_CHECK(slot.scalar_type() == at::kLong && row.scalar_type() == at::kLong &&
                  last_used.scalar_type() == at::kLong && hit_count.scalar_type() == at::kLong,
              "gather_with_mask: slot, row, last_used and hit_count must be int64");
  TORCH_CHECK(slot.dim() == 1 && row.dim() == 1 && row.size(0) == slot.size(0),
              "gather_with_mask: slot and row must be [B]");
  TORCH_CHECK(last_used.dim() == 1 && hit_count.dim() == 1 && last_used.size(0) == values.size(0) &&
                  hit_count.size(0) == values.size(0),
              "gather_with_mask: last_used and hit_count must be [N]");
  TORCH_CHECK(values.is_contiguous() && computed.is_contiguous() && slot.is_contiguous() && row.is_contiguous() &&
                  last_used.is_contiguous() && hit_count.is_contiguous(),
              "gather_with_mask: contiguous tensors expected");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t B = slot.size(0);
  std::vector<int64_t> out_shape = computed.sizes().vec();
  out_shape[0] = B;
  auto out = at::empty(out_shape, computed.options());
  // Bytes of one sequence position: the product of the trailing *F dims.
  int64_t inner_bytes = values.element_size();
  for (int64_t i = 2; i < values.dim(); ++i) inner_bytes *= values.size(i);
  C10_CUDA_CHECK(gpu::gather_with_mask_cuda(
      data_or_null(values), values.size(0), values.size(1), slot.data_ptr<int64_t>(), data_or_null(computed),
      computed.size(0), computed.size(1), row.data_ptr<int64_t>(), B, inner_bytes,
      last_used.data_ptr<int64_t>(), hit_count.data_ptr<int64_t>(), tick, align_end, data_or_null(out),
      current_stream()));
  return out;
}

template <size_t n>
std::vector<int64_t> as_list(const std::array<int64_t, n>& a) {
  return {a.begin(), a.end()};
}

}  // namespace

// The launchers' plans for tests without a GPU (see kernels/cuda_kernels.h); host arithmetic only.
TORCH_LIBRARY(llmcache_plan, m) {
  m.def("hamming_topk(int B, int N, int k) -> int[]",
        [](int64_t B, int64_t N, int64_t k) { return as_list(gpu::hamming_topk_plan(B, N, k)); });
  m.def("simhash(int B, int d, int nbits) -> int[]",
        [](int64_t B, int64_t d, int64_t nbits) { return as_list(gpu::simhash_plan(B, d, nbits)); });
  m.def("simhash_pooled(ScalarType dtype, int B, int T, int d) -> int[]",
        [](at::ScalarType dtype, int64_t B, int64_t T, int64_t d) {
          return as_list(gpu::simhash_pooled_plan(to_dtype(dtype), B, T, d));
        });
  m.def("gather_with_mask(int T, int B, int inner_bytes, int address_bits) -> int[]",
        [](int64_t T, int64_t B, int64_t inner_bytes, int64_t address_bits) {
          return as_list(gpu::gather_with_mask_plan(T, B, inner_bytes, address_bits));
        });
}

TORCH_LIBRARY_IMPL(llmcache, CUDA, m) {
  m.impl("simhash", &simhash_cuda);
  m.impl("simhash_pooled", &simhash_pooled_cuda);
  m.impl("hamming_topk", &hamming_topk_cuda);
  m.impl("gather_with_mask", &gather_with_mask_cuda);
}

}  // namespace llmcache
