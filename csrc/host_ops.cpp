// Host ops called once per forward on the router's host copy of a batch, bound without the
// dispatcher (a plain Python call: a dispatched op costs microseconds to enter, more than the
// work of a small batch). Kernels in cpu/; contracts in cpu/kernels.h.
#include <torch/extension.h>

#include "cpu/kernels.h"

namespace llmcache {

namespace py = pybind11;

// (B, T) of a host copy of a batch, int64 [4, B, T] C-contiguous (any buffer), checked.
std::pair<int64_t, int64_t> host_shape(const py::buffer_info& info, const char* op) {
  // (numpy names int64 "l" on LP64 platforms, the buffer protocol's own name for it is "q")
  const bool int64 = info.itemsize == 8 && (info.format == "l" || info.format == "q");
  TORCH_CHECK(info.ndim == 3 && info.shape[0] == 4 && int64, op, ": host int64 [4, B, T] expected");
  const int64_t B = info.shape[1], T = info.shape[2];
  TORCH_CHECK(info.strides[2] == 8 && info.strides[1] == 8 * T && info.strides[0] == 8 * B * T, op,
              ": host must be C-contiguous");
  return {B, T};
}

// The n 32-byte keys at `data`, one after another, as a list of bytes.
py::list key_list(const char* data, int64_t n) {
  py::list out(n);
  for (int64_t i = 0; i < n; ++i) {
    PyObject* key = PyBytes_FromStringAndSize(data + i * cpu::kChainDigest, cpu::kChainDigest);
    if (key == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), i, key);
  }
  return out;
}

// rows.row_keys's kernel: host int64 [4, B, T] (C-contiguous, any buffer), header bytes, the
// flags. Returns (keys: a list of B 32-byte bytes, None where a row is not keyed; spans: bytes
// of int64 [5, B] = start, count, lead, trail, before; rows with no real token; rows with gaps).
py::tuple row_keys(const py::buffer& host, const py::bytes& header, bool lead_visible, bool trail_visible,
                   bool ids_before) {
  const py::buffer_info info = host.request();
  const auto [B, T] = host_shape(info, "row_keys");
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

// rows.page_keys's kernel: host int64 [4, B, T] (C-contiguous), header bytes, the flags, tokens
// per page. Returns (keys: a list of B x P 32-byte bytes, row after row; P; spans: bytes of int64
// [4, B] = start, count, lead, trail; keyed: bytes of B bools; rows with no real token; rows
// with gaps).
py::tuple page_keys(const py::buffer& host, const py::bytes& header, bool lead_visible, bool trail_visible,
                    int64_t page) {
  const py::buffer_info info = host.request();
  const auto [B, T] = host_shape(info, "page_keys");
  TORCH_CHECK(page > 0, "page_keys: page must be positive");
  char* text = nullptr;
  Py_ssize_t length = 0;
  PyBytes_AsStringAndSize(header.ptr(), &text, &length);
  std::vector<int64_t> spans(static_cast<size_t>(4 * B));
  std::vector<uint8_t> keys, keyed(static_cast<size_t>(B));
  int64_t no_tokens = 0, gaps = 0, pages = 0;
  {
    py::gil_scoped_release free;
    pages = cpu::page_keys(static_cast<const int64_t*>(info.ptr), B, T, reinterpret_cast<const uint8_t*>(text),
                           length, lead_visible, trail_visible, page, spans.data(), spans.data() + B,
                           spans.data() + 2 * B, spans.data() + 3 * B, keyed.data(), &keys, &no_tokens, &gaps);
  }
  return py::make_tuple(key_list(reinterpret_cast<const char*>(keys.data()), B * pages), pages,
                        py::bytes(reinterpret_cast<const char*>(spans.data()), spans.size() * 8),
                        py::bytes(reinterpret_cast<const char*>(keyed.data()), keyed.size()), no_tokens, gaps);
}

// rows.split_keys's kernel: the 32-byte keys of a C-contiguous uint8 buffer [..., 32], flattened,
// as a list of bytes (a comprehension over every page of a batch in Python).
py::list split_keys(const py::buffer& keys) {
  const py::buffer_info info = keys.request();
  TORCH_CHECK(info.itemsize == 1 && info.ndim >= 1 && info.shape[info.ndim - 1] == cpu::kChainDigest,
              "split_keys: uint8 [..., 32] expected");
  int64_t n = 1;
  for (py::ssize_t d = 0; d + 1 < info.ndim; ++d) n *= info.shape[d];
  py::ssize_t expect = 1;
  for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
    TORCH_CHECK(info.shape[d] == 1 || info.strides[d] == expect, "split_keys: keys must be C-contiguous");
    expect *= info.shape[d];
  }
  return key_list(static_cast<const char*>(info.ptr), n);
}

bool contiguous(const py::buffer_info& b) {
  py::ssize_t expect = b.itemsize;
  for (py::ssize_t d = b.ndim - 1; d >= 0; --d) {
    if (b.shape[d] != 1 && b.strides[d] != expect) return false;
    expect *= b.shape[d];
  }
  return true;
}

// zlib.crc32(src, crc), the bytes copied into `dst` (a writable buffer of at least as many bytes,
// or None) in the same pass. The GIL is released for large buffers.
uint32_t crc32_copy(const py::buffer& src, const py::object& dst, uint32_t crc) {
  const py::buffer_info in = src.request();
  TORCH_CHECK(contiguous(in), "crc32_copy: src must be a contiguous buffer");
  const int64_t n = in.size * in.itemsize;
  uint8_t* out = nullptr;
  py::buffer_info target;
  if (!dst.is_none()) {
    target = py::reinterpret_borrow<py::buffer>(dst).request(true);
    TORCH_CHECK(contiguous(target) && target.size * target.itemsize >= n,
                "crc32_copy: dst must be a contiguous writable buffer of at least as many bytes as src");
    out = static_cast<uint8_t*>(target.ptr);
  }
  py::gil_scoped_release free;
  return cpu::crc32_copy(crc, static_cast<const uint8_t*>(in.ptr), out, n);
}

}  // namespace llmcache

