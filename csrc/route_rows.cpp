// route_rows: the exact tier's routing of a forward whose rows are stored whole (encoders,
// pixel models), on the C++ index in one call. The reference is llmcache/tiers/exact/route.py's
// `route` with `plan.build` (which still routes a batch the verified semantic tier takes part in,
// and every batch where the index is the Python one): each row's key is looked up; hits are
// touched and pinned; a missing row computes, or copies an earlier computing row of the batch
// with its key; each distinct missing key is reserved an entry; and the plan's host arrays (the
// `parts` `plan.upload` takes, plan_arrays.cpp) are made here, where numpy took a dozen calls of
// 1-20 us each.
// Returns (plan fields, parts, too_long), or (None, None, too_long) when nothing is served or
// stored and nothing is cut: the forward runs as it is.
#include <unordered_map>
#include <utility>

#include "exact_index.h"

namespace llmcache {

py::object route_rows(ExactIndexCore& index, const py::handle& keys_, const I64& start_, const I64& count_,
                      int64_t seq, const py::object& header, const py::object& host, const py::object& mask_) {
  const py::object keys = fast(keys_, "route_rows: keys must be a sequence");
  const int64_t batch = PySequence_Fast_GET_SIZE(keys.ptr());
  PyObject** key = PySequence_Fast_ITEMS(keys.ptr());
  TORCH_CHECK(start_.size() == batch && count_.size() == batch, "route_rows: one start and count per row");
  const int64_t *start = start_.data(), *count = count_.data();

  // Every row's lookup; the hits are touched, and pinned (the reservations below must not evict
  // them before they are read).
  std::vector<int64_t> served, held, compute, repeat_rows, repeat_of, misses;
  std::unordered_map<std::string_view, int64_t> first;  // a missing key -> its first row
  for (int64_t r = 0; r < batch; ++r) {
    const int64_t found = index.find(key[r]);
    if (found >= 0) {
      served.push_back(r);
      held.push_back(found);
      continue;
    }
    if (key[r] == Py_None) {  // (a row that cannot be keyed computes, unstored)
      compute.push_back(r);
      continue;
    }
    const auto [at, fresh] = first.emplace(view_of(key[r]), r);
    if (fresh) {
      compute.push_back(r);
      misses.push_back(r);
    } else {
      repeat_rows.push_back(r);
      repeat_of.push_back(at->second);
    }
  }
  for (int64_t e : held) index.touch_one(e);
  for (int64_t e : held) index.pin_one(e);

  // One entry per distinct missing key, labelled for `held`/`save` (None: pixel rows).
  std::vector<int64_t> stored, entries;
  int64_t too_long = 0;
  for (int64_t r : misses) {
    py::object label = py::none();
    if (!header.is_none()) label = py::make_tuple(header, host, r, start[r], count[r]);
    const int64_t entry = index.reserve(py::reinterpret_borrow<py::object>(key[r]), count[r], -1, label);
    if (entry >= 0) {
      stored.push_back(r);
      entries.push_back(entry);
    } else if (index.find(key[r]) < 0) {
      ++too_long;
    }
  }

  // Where the caller sees no padding: the computing rows run up to the last real token among
  // them; their padding holds zeros in the output (route._padding).
  int64_t width = seq;
  std::vector<int64_t> zeros;
  if (!mask_.is_none() && !compute.empty()) {
    const I64 mask = mask_.cast<I64>();
    TORCH_CHECK(mask.ndim() == 2 && mask.shape(0) == batch && mask.shape(1) == seq, "route_rows: mask must be [B, T]");
    const int64_t* m = mask.data();
    bool padded = false;
    for (int64_t i = 0; i < batch * seq && !padded; ++i) padded = m[i] == 0;
    if (padded) {
      width = 0;
      for (int64_t r : compute) {
        int64_t last = seq;  // (a row with no real token keeps every position)
        for (int64_t t = seq - 1; t >= 0; --t)
          if (m[r * seq + t] != 0) {
            last = t + 1;
            break;
          }
        width = std::max(width, last);
      }
      std::vector<int64_t> rows(compute);
      rows.insert(rows.end(), repeat_rows.begin(), repeat_rows.end());
      for (int64_t r : rows)
        for (int64_t t = 0; t < seq; ++t)
          if (m[r * seq + t] == 0) zeros.push_back(r * seq + t);
    }
  }
  if (served.empty() && repeat_rows.empty() && entries.empty() && width == seq && zeros.empty())
    return py::make_tuple(py::none(), py::none(), too_long);

  // The plan (plan.build's arrays: plan_arrays.cpp).
  int64_t served_tokens = 0, computed_tokens = 0;
  for (int64_t r : served) served_tokens += count[r];
  for (int64_t r : compute) computed_tokens += count[r];
  PlanRows rows;
  for (int64_t r : served) rows.served_starts.push_back(start[r]);
  for (int64_t r : stored) {
    rows.w_first.push_back(start[r]);
    rows.w_n.push_back(count[r]);
  }
  rows.served = std::move(served);
  rows.held = std::move(held);
  rows.computing = std::move(compute);
  rows.copy_rows = std::move(repeat_rows);
  rows.copy_src = std::move(repeat_of);
  rows.entries = std::move(entries);
  rows.w_rows = std::move(stored);
  PlanParts plan = plan_parts(index, batch, seq, width, rows);
  py::dict parts = plan.parts;
  if (!zeros.empty()) parts["zeros"] = array_of(zeros);
  py::dict fields;
  fields["batch"] = batch;
  fields["seq"] = seq;
  fields["width"] = width;
  fields["m"] = static_cast<int64_t>(rows.computing.size());
  fields["entries"] = py::cast(rows.entries);
  fields["store_n"] = py::cast(rows.w_n);
  fields["served"] = static_cast<int64_t>(rows.served.size());
  fields["repeats"] = static_cast<int64_t>(rows.copy_rows.size());
  fields["tokens"] = py::make_tuple(served_tokens, computed_tokens);
  fields["served_all"] = plan.served_all;
  fields["store_all"] = plan.store_all;
  return py::make_tuple(fields, parts, too_long);
}

}  // namespace llmcache
