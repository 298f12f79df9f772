// The CPU op kernels that are also bound outside the dispatcher (host_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace llmcache {

// llmcache::chain_hash's CPU kernel (schema and contract: llmcache/ops/chain_hash.py).
at::Tensor chain_hash_cpu(const at::Tensor& seeds, const at::Tensor& tokens, const at::Tensor& start,
                          const at::Tensor& count, int64_t page, int64_t pages);

// llmcache::hamming_topk's CPU kernel (schema and contract: llmcache/ops/hamming_topk.py).
std::tuple<at::Tensor, at::Tensor> hamming_topk_cpu(const at::Tensor& queries, const at::Tensor& bank, int64_t k,
                                                    const std::optional<at::Tensor>& valid,
                                                    const std::optional<at::Tensor>& query_tag,
                                                    const std::optional<at::Tensor>& bank_tag);

// llmcache::write_rows's CPU kernel (schema and contract: llmcache/ops/write_rows.py).
at::Tensor write_rows_cpu(const at::Tensor& arena, const at::Tensor& dst, const std::optional<at::Tensor>& src,
                          const std::vector<at::Tensor>& pieces);

// llmcache::read_rows's CPU kernel (schema and contract: llmcache/ops/read_rows.py).
void read_rows_cpu(const at::Tensor& arena, const at::Tensor& rows, const at::Tensor& out,
                   const std::optional<at::Tensor>& kv);

}  // namespace llmcache
