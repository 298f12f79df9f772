// What llmcache.state.ModelState's watch reads every forward, in one pass: the module tree's
// dicts (the ids of their values, their lengths) and the tensors' version counters and data
// pointers, as int64 words in one bytes object that Python compares with the last one. The same
// words the pure-Python watch lists (llmcache/state.py), at C speed: a changed word is a changed
// model, so nothing is hashed and nothing can collide.
#include <torch/extension.h>

#include <vector>

namespace llmcache {

namespace py = pybind11;

// The ids of every value of `filled` (dicts, in order), then the length of every dict of `containers`.
py::bytes watch_tree(const py::list& filled, const py::list& containers) {
  std::vector<int64_t> words;
  for (const auto& d : filled) {
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(d.ptr(), &pos, &key, &value)) words.push_back(reinterpret_cast<intptr_t>(value));
  }
  for (const auto& d : containers) words.push_back(PyDict_Size(d.ptr()));
  return py::bytes(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(int64_t));
}

// The version counter and the data pointer of every tensor of `tensors`.
py::bytes watch_tensors(const py::list& tensors) {
  std::vector<int64_t> words;
  words.reserve(2 * tensors.size());
  for (const auto& obj : tensors) {
    TORCH_CHECK(THPVariable_Check(obj.ptr()), "watch_tensors: a list of tensors expected");
    const at::Tensor& t = THPVariable_Unpack(obj.ptr());
    words.push_back(static_cast<int64_t>(t._version()));
    words.push_back(reinterpret_cast<intptr_t>(t.data_ptr()));
  }
  return py::bytes(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(int64_t));
}

}  // namespace llmcache
