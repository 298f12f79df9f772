// The CPU op kernels that are also bound outside the dispatcher (host_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace llmcache {

// llmcache::hamming_topk's CPU kernel (schema and contract: llmcache/ops/hamming_topk.py).
std::tuple<at::Tensor, at::Tensor> hamming_topk_cpu(const at::Tensor& queries, const at::Tensor& bank, int64_t k,
                                                    const std::optional<at::Tensor>& valid,
                                                    const std::optional<at::Tensor>& query_tag,
                                                    const std::optional<at::Tensor>& bank_tag);

}  // namespace llmcache
