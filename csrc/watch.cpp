// What llmcache.state.ModelState's watch reads every forward, in one pass: the module tree's
// dicts (the ids of their values, their lengths) and the tensors' version counters and data
// pointers, as int64 words in one bytes object that Python compares with the last one. The same
// words the pure-Python watch lists (llmcache/state.py), at C speed: a changed word is a changed
// model, so nothing is hashed and nothing can collide.
//
// `watch_stamp` reads, in one call, everything ModelState.check reads (the tree, the tensors and
// every switch of the state header and of the reasons to run uncached): while the stamp equals
// the last one, check returns its last answer without running Python over any of it.
#include <ATen/autocast_mode.h>
#include <torch/extension.h>

#include <vector>

namespace llmcache {

namespace py = pybind11;

namespace {

// The ids of every value of `filled` (dicts, in order), then the length of every dict of `containers`.
void tree_words(const py::list& filled, const py::list& containers, std::vector<int64_t>& words) {
  for (const auto& d : filled) {
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(d.ptr(), &pos, &key, &value)) words.push_back(reinterpret_cast<intptr_t>(value));
  }
  for (const auto& d : containers) words.push_back(PyDict_Size(d.ptr()));
}

// The version counter and the data pointer of every tensor of `tensors`.
void tensor_words(const py::list& tensors, std::vector<int64_t>& words) {
  for (const auto& obj : tensors) {
    TORCH_CHECK(THPVariable_Check(obj.ptr()), "watch: a list of tensors expected");
    const at::Tensor& t = THPVariable_Unpack(obj.ptr());
    words.push_back(static_cast<int64_t>(t._version()));
    words.push_back(reinterpret_cast<intptr_t>(t.data_ptr()));
  }
}

py::bytes as_bytes(const std::vector<int64_t>& words) {
  return py::bytes(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(int64_t));
}

// A value compared by equality later: lists (peft's active or merged adapters, changed in place)
// as tuples of their items, everything else as it is.
py::object frozen(const py::handle& value) {
  if (!PyList_Check(value.ptr())) return py::reinterpret_borrow<py::object>(value);
  py::list items(value.cast<py::list>().size());
  size_t i = 0;
  for (const auto& item : value.cast<py::list>()) items[i++] = frozen(item);
  return py::tuple(items);
}

// A legacy precision getter's answer, or -1 where torch refuses it (once the newer per-backend
// fp32_precision API is set: as state._legacy).
template <typename Read>
void legacy(Read read, std::vector<int64_t>& words) {
  try {
    words.push_back(static_cast<int64_t>(read()));
  } catch (const c10::Error&) {
    words.push_back(-1);
  }
}

// The global switches state._precision and state._autocast read for `device`'s type (the raw
// values of every level they resolve through).
void switch_words(const c10::Device& device, std::vector<int64_t>& words) {
  auto& ctx = at::globalContext();
  using B = at::Float32Backend;
  using O = at::Float32Op;
  const auto precision = [&](B backend, O op) { words.push_back(static_cast<int64_t>(ctx.float32Precision(backend, op))); };
  try {
    words.push_back(at::autocast::is_autocast_enabled(device.type()));
    words.push_back(static_cast<int64_t>(at::autocast::get_autocast_dtype(device.type())));
  } catch (const c10::Error&) {  // (a device type without autocast, e.g. meta: as state._autocast)
    words.insert(words.end(), {-1, -1});
  }
  legacy([&] { return static_cast<int64_t>(ctx.float32MatmulPrecision()); }, words);
  words.push_back(ctx.deterministicAlgorithms());
  precision(B::GENERIC, O::ALL);
  if (device.is_cuda()) {
    for (O op : {O::ALL, O::CONV, O::RNN, O::MATMUL}) precision(B::CUDA, op);
    legacy([&] { return ctx.allowTF32CuBLAS(); }, words);
    legacy([&] { return ctx.allowTF32CuDNN(); }, words);
    words.insert(words.end(), {static_cast<int64_t>(ctx.allowFP16ReductionCuBLAS()),
                               static_cast<int64_t>(ctx.allowBF16ReductionCuBLAS()), ctx.allowFP16AccumulationCuBLAS(),
                               static_cast<int64_t>(ctx.blasPreferredBackend()), ctx.userEnabledCuDNN(),
                               ctx.benchmarkCuDNN(), ctx.deterministicCuDNN(), ctx.userEnabledFlashSDP(),
                               ctx.userEnabledMemEfficientSDP(), ctx.userEnabledMathSDP(), ctx.userEnabledCuDNNSDP()});
  } else if (device.is_cpu()) {
    for (O op : {O::ALL, O::CONV, O::RNN, O::MATMUL}) precision(B::MKLDNN, op);
    words.insert(words.end(), {ctx.userEnabledMkldnn(), ctx.deterministicMkldnn()});
  }
}

// Whether `name` is true of any of `objects` (`name` an interned string: made once, never freed).
bool any_attr(const py::list& objects, PyObject* name) {
  for (const auto& obj : objects) {
    PyObject* value = PyObject_GetAttr(obj.ptr(), name);
    if (value == nullptr) throw py::error_already_set();
    const int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    if (truth < 0) throw py::error_already_set();
    if (truth) return true;
  }
  return false;
}

PyObject* interned(const char* name) { return PyUnicode_InternFromString(name); }

}  // namespace

py::bytes watch_tree(const py::list& filled, const py::list& containers) {
  std::vector<int64_t> words;
  tree_words(filled, containers, words);
  return as_bytes(words);
}

py::bytes watch_tensors(const py::list& tensors) {
  std::vector<int64_t> words;
  words.reserve(2 * tensors.size());
  tensor_words(tensors, words);
  return as_bytes(words);
}

// (words, values): `watched` is ModelState's (filled, containers, tensors, opaque, tuners,
// mode_modules, params, base); `device` the weights' device. Words: the tree and tensors as
// above, the ids of the opaque attributes, the global switches, whether a mode module is
// training, whether autograd would record; values: the attention implementation and each
// tuner's active, disabled and merged adapters (by value, copied).
py::tuple watch_stamp(const py::tuple& watched, const c10::Device& device) {
  TORCH_CHECK(watched.size() == 8, "watch_stamp: (filled, containers, tensors, opaque, tuners, modes, params, base)");
  const py::list filled = watched[0], containers = watched[1], tensors = watched[2], opaque = watched[3],
                 tuners = watched[4], modes = watched[5], params = watched[6];
  std::vector<int64_t> words;
  words.reserve(2 * tensors.size() + 4 * containers.size() + 32);
  tree_words(filled, containers, words);
  tensor_words(tensors, words);
  for (const auto& pair : opaque) {  // (namespace dict, name): the id of what the name holds now
    const py::tuple p = pair.cast<py::tuple>();
    PyObject* value = PyDict_GetItemWithError(p[0].ptr(), p[1].ptr());
    if (value == nullptr && PyErr_Occurred()) throw py::error_already_set();
    words.push_back(reinterpret_cast<intptr_t>(value));
  }
  switch_words(device, words);
  static PyObject* const training = interned("training");
  static PyObject* const requires_grad = interned("requires_grad");
  words.push_back(any_attr(modes, training));
  words.push_back(at::GradMode::is_enabled() && any_attr(params, requires_grad));
  const py::object config = py::getattr(watched[7], "config", py::none());  // (read now: it may be replaced)
  py::list values;
  values.append(config.is_none() ? py::none() : py::getattr(config, "_attn_implementation", py::none()));
  for (const auto& tuner : tuners)
    for (const char* name : {"_active_adapter", "_disable_adapters", "merged_adapters"})
      values.append(frozen(tuner.attr(name)));
  return py::make_tuple(as_bytes(words), py::tuple(values));
}

}  // namespace llmcache
