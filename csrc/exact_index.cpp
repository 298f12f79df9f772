// Python bindings of the exact tier's host index (exact_index.h) and its routing ops (route_rows.cpp,
// route_pages.cpp, plan_arrays.cpp, suffix_arrays.cpp).
#include "exact_index.h"

namespace llmcache {

void bind_exact_index(py::module& m) {
  py::class_<ExactIndexCore>(m, "ExactIndexCore",
                             "the exact tier's host index (llmcache.bank.native.NativeIndex wraps it)")
      .def(py::init<int64_t, int64_t, std::optional<int64_t>, bool>(), py::arg("page_tokens"), py::arg("max_pages"),
           py::arg("max_entries"), py::arg("staleness"))
      .def_property_readonly("num_pages", &ExactIndexCore::num_pages)
      .def_property_readonly("entries", &ExactIndexCore::entries)
      .def_property_readonly("held_pages", &ExactIndexCore::held_pages)
      .def_property_readonly("evictions", &ExactIndexCore::evictions)
      .def_property("next_serial", &ExactIndexCore::next_serial, &ExactIndexCore::set_next_serial)
      .def("find", &ExactIndexCore::find)
      .def("find_many", &ExactIndexCore::find_many)
      .def("touch", &ExactIndexCore::touch)
      .def("key", &ExactIndexCore::key)
      .def("parent_key", &ExactIndexCore::parent_key)
      .def("is_live", &ExactIndexCore::is_live)
      .def("describe", &ExactIndexCore::describe)
      .def("pin", &ExactIndexCore::pin)
      .def("unpin_all", &ExactIndexCore::unpin_all)
      .def("partial_after", &ExactIndexCore::partial_after)
      .def("token_counts", &ExactIndexCore::token_counts)
      .def("token_rows", &ExactIndexCore::token_rows)
      .def("live", &ExactIndexCore::live)
      .def("walkable", &ExactIndexCore::walkable)
      .def("field", &ExactIndexCore::field)
      .def("restore", &ExactIndexCore::restore)
      .def("reserve", &ExactIndexCore::reserve)
      .def("reserve_many", &ExactIndexCore::reserve_many)
      .def("commit", &ExactIndexCore::commit)
      .def("commit_many", &ExactIndexCore::commit_many)
      .def("release", &ExactIndexCore::release)
      .def("evict", &ExactIndexCore::evict)
      .def("discard", &ExactIndexCore::discard)
      .def("route_rows", &route_rows, py::arg("keys"), py::arg("start"), py::arg("count"), py::arg("seq"),
           py::arg("header"), py::arg("host"), py::arg("mask"))
      .def("plan_arrays", &plan_arrays, py::arg("batch"), py::arg("seq"), py::arg("width"), py::arg("served"),
           py::arg("served_starts"), py::arg("held"), py::arg("sizes"), py::arg("computing"), py::arg("copy_rows"),
           py::arg("copy_src"), py::arg("entries"), py::arg("w_rows"), py::arg("w_first"), py::arg("w_n"))
      .def("suffix_arrays", &suffix_arrays, py::arg("seq"), py::arg("host"), py::arg("start"), py::arg("n_real"),
           py::arg("covered"), py::arg("keyed"), py::arg("trailing"), py::arg("found"), py::arg("sizes"),
           py::arg("entries"), py::arg("w_rows"), py::arg("w_at"), py::arg("w_n"))
      .def("longest_runs", &longest_runs, py::arg("keys"), py::arg("per_row"), py::arg("count"))
      .def("reserve_pages", &reserve_pages, py::arg("keys"), py::arg("per_row"), py::arg("todo"), py::arg("first"),
           py::arg("opens"), py::arg("n_real"), py::arg("start"), py::arg("headers"), py::arg("host"),
           py::arg("chains"));
}

}  // namespace llmcache
