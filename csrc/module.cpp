// The Python module llmcache._C: importing it loads the op kernels (TORCH_LIBRARY_IMPL blocks in
// torch_cpu.cpp and kernels/*.cu) and exposes what build_info() reports.
#include <torch/extension.h>

#include "cpu/kernels.h"
#include "torch_cpu.h"

namespace llmcache {
pybind11::bytes watch_tree(const pybind11::list& filled, const pybind11::list& containers);
pybind11::bytes watch_tensors(const pybind11::list& tensors);
pybind11::tuple watch_stamp(const pybind11::tuple& watched, const c10::Device& device);
pybind11::tuple row_keys(const pybind11::buffer& host, const pybind11::bytes& header, bool lead_visible,
                         bool trail_visible, bool ids_before);
pybind11::tuple page_keys(const pybind11::buffer& host, const pybind11::bytes& header, bool lead_visible,
                          bool trail_visible, int64_t page);
uint32_t crc32_copy(const pybind11::buffer& src, const pybind11::object& dst, uint32_t crc);
pybind11::list split_keys(const pybind11::buffer& keys);
void bind_exact_index(pybind11::module& m);
}  // namespace llmcache

#ifndef LLMCACHE_CUDA_ARCHS
#define LLMCACHE_CUDA_ARCHS ""
#endif
#ifndef LLMCACHE_TORCH_VERSION
#define LLMCACHE_TORCH_VERSION "unknown"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "llmcache compiled kernels (CPU C++ and, when built with it, CUDA)";
  m.def("has_cuda", []() {
#ifdef LLMCACHE_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_archs", []() {
    std::vector<std::string> archs;
    std::string s = LLMCACHE_CUDA_ARCHS, cur;
    for (char c : s) {
      if (c == ';') {
        if (!cur.empty()) archs.push_back(cur);
        cur.clear();
      } else {
        cur += c;
      }
    }
    if (!cur.empty()) archs.push_back(cur);
    return archs;
  });
  m.def("built_with_torch", []() { return std::string(LLMCACHE_TORCH_VERSION); });
  m.def("cpu_features", []() {
    auto f = llmcache::cpu::cpu_features();
    pybind11::dict d;
    d["popcnt"] = f.popcnt;
    d["avx2"] = f.avx2;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512_vpopcntdq"] = f.avx512_vpopcntdq;
    return d;
  });
  m.def("cpu_kernel", &llmcache::cpu::cpu_kernel_name);
  m.def("watch_tree", &llmcache::watch_tree, "ids of the dicts' values, then the containers' lengths (int64 bytes)");
  m.def("watch_tensors", &llmcache::watch_tensors, "version counter and data pointer per tensor (int64 bytes)");
  m.def("watch_stamp", &llmcache::watch_stamp, "everything ModelState.check reads, as (int64 bytes, values)");
  m.def("row_keys", &llmcache::row_keys, pybind11::arg("host"), pybind11::arg("header"),
        pybind11::arg("lead_visible"), pybind11::arg("trail_visible"), pybind11::arg("ids_before"),
        "the exact tier's whole-row keys of a batch (llmcache.rows.row_keys)");
  m.def("page_keys", &llmcache::page_keys, pybind11::arg("host"), pybind11::arg("header"),
        pybind11::arg("lead_visible"), pybind11::arg("trail_visible"), pybind11::arg("page"),
        "a decoder's page keys of a batch (llmcache.rows.page_keys)");
  m.def("split_keys", &llmcache::split_keys, pybind11::arg("keys"),
        "the 32-byte keys of a uint8 [..., 32] array, flattened, as bytes (llmcache.rows.split_keys)");
  // (The same kernel as the dispatcher's CPU hamming_topk: eager CPU calls take this, a few µs cheaper.)
  m.def("hamming_topk", &llmcache::hamming_topk_cpu, "llmcache::hamming_topk on CPU tensors, outside the dispatcher");
  m.def("crc32_copy", &llmcache::crc32_copy, pybind11::arg("src"), pybind11::arg("dst"), pybind11::arg("crc") = 0,
        "zlib.crc32(src, crc), src's bytes copied into dst (a writable buffer, or None) in the same pass");
  // (The dispatcher's CPU chain_hash, bound for the routing's eager calls: one or two a decoder forward.)
  m.def("chain_hash", &llmcache::chain_hash_cpu, pybind11::arg("seeds"), pybind11::arg("tokens"),
        pybind11::arg("start"), pybind11::arg("count"), pybind11::arg("page"), pybind11::arg("pages"),
        pybind11::call_guard<pybind11::gil_scoped_release>(), "llmcache::chain_hash on CPU tensors, outside the dispatcher");
  // (The dispatcher's CPU write_rows, bound for eager calls: one per forward, where entering the dispatcher costs µs.)
  m.def("write_rows", &llmcache::write_rows_cpu, pybind11::arg("arena"), pybind11::arg("dst"), pybind11::arg("src"),
        pybind11::arg("pieces"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "llmcache::write_rows on CPU tensors, outside the dispatcher");
  m.def("read_rows", &llmcache::read_rows_cpu, pybind11::arg("arena"), pybind11::arg("rows"), pybind11::arg("out"),
        pybind11::arg("kv"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "llmcache::read_rows on CPU tensors, outside the dispatcher");
  m.def("storage_use_count", [](const at::Tensor& t) { return static_cast<int64_t>(t.storage().use_count()); },
        pybind11::arg("tensor"), "how many tensors (this one, its views) hold this tensor's storage");
  llmcache::bind_exact_index(m);  // (bank/native.py: the exact tier's host index)
  m.def("cpu_kernel_paths", [](int64_t words) {
    TORCH_CHECK(words >= 1 && words <= 16, "cpu_kernel_paths: words must be in 1..16");
    const auto c = llmcache::cpu::cpu_kernel_choice(words);
    pybind11::dict few, many, d;
    few["path"] = c.few;
    few["why"] = c.few_why;
    many["path"] = c.many;
    many["why"] = c.many_why;
    d["few_queries"] = few;  // B < 8
    d["many_queries"] = many;
    return d;
  }, pybind11::arg("words") = 4, "the popcount path per regime for codes of `words` 64-bit words, and why");
  m.def("popcount_peak_rate", &llmcache::cpu::popcount_peak_rate, pybind11::arg("seconds") = 0.2,
        pybind11::arg("path") = "",
        "64-bit popcounts per second on all OpenMP threads with a path's popcount (default: the many-query path)");
  m.def(
      "read_rate",
      [](const at::Tensor& data, double seconds) {
        TORCH_CHECK(data.device().is_cpu() && data.is_contiguous(), "read_rate: a contiguous CPU tensor");
        return llmcache::cpu::read_rate(data.data_ptr(), data.numel() * data.element_size(), seconds);
      },
      pybind11::arg("data"), pybind11::arg("seconds") = 0.2,
      "bytes per second all OpenMP threads read from this tensor's memory (where it lives now)");
}
