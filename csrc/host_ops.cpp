// Host ops called once per forward on the router's host copy of a batch, bound without the
// dispatcher (a plain Python call: a dispatched op costs microseconds to enter, more than the
// work of a small batch). Kernels in cpu/; contracts in cpu/kernels.h.
#include <torch/extension.h>

#include "cpu/kernels.h"

namespace llmcache {

namespace py = pybind11;

// rows.row_keys's kernel: host int64 [4, B, T] (C-contiguous, any buffer), header bytes, the
// flags. Returns (keys: a list of B 32-byte bytes, None where a row is not keyed; spans: bytes
// of int64 [5, B] = start, count, lead, trail, before; rows with no real token; rows with gaps).
py::tuple row_keys(const py::buffer& host, const py::bytes& header, bool lead_visible, bool trail_visible,
                   bool ids_before) {
  const py::buffer_info info = host.request();
  // (numpy names int64 "l" on LP64 platforms, the buffer protocol's own name for it is "q")
  const bool int64 = info.itemsize == 8 && (info.format == "l" || info.format == "q");
  TORCH_CHECK(info.ndim == 3 && info.shape[0] == 4 && int64, "row_keys: host int64 [4, B, T] expected");
  const int64_t B = info.shape[1], T = info.shape[2];
  TORCH_CHECK(info.strides[2] == 8 && info.strides[1] == 8 * T && info.strides[0] == 8 * B * T,
              "row_keys: host must be C-contiguous");
  char* text = nullptr;
  Py_ssize_t length = 0;
  PyBytes_AsStringAndSize(header.ptr(), &text, &length);
  std::vector<int64_t> spans(static_cast<size_t>(5 * B));
  std::vector<uint8_t> keys(static_cast<size_t>(B * cpu::kChainDigest)), keyed(static_cast<size_t>(B));
  int64_t no_tokens = 0, gaps = 0;
  {
    py::gil_scoped_release free;  // (the buffer and header stay referenced by the caller)
    cpu::row_keys(static_cast<const int64_t*>(info.ptr), B, T, reinterpret_cast<const uint8_t*>(text), length,
                  lead_visible, trail_visible, ids_before, spans.data(), spans.data() + B, spans.data() + 2 * B,
                  keys.data(), keyed.data(), &no_tokens, &gaps);
  }
  py::list out(B);
  for (int64_t r = 0; r < B; ++r) {
    if (keyed[r]) {
      out[r] = py::bytes(reinterpret_cast<const char*>(keys.data() + r * cpu::kChainDigest), cpu::kChainDigest);
    } else {
      out[r] = py::none();
    }
  }
  return py::make_tuple(out, py::bytes(reinterpret_cast<const char*>(spans.data()), spans.size() * 8), no_tokens,
                        gaps);
}

}  // namespace llmcache
