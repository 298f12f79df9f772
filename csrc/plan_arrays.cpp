// plan_arrays: the host arrays of the exact tier's block-splice plan (llmcache/tiers/exact/plan.py's
// `build`, whose numpy is the reference and routes where the index is the Python one): the served
// tokens' arena rows and where they go in the output, the repeats' sources among the computing rows,
// and the written tokens' arena rows and where they come from. One pass over the batch's rows and
// entries, where numpy took a dozen calls of 1-20 us each. route_rows.cpp builds its plans with it.
#include "exact_index.h"

namespace llmcache {
namespace {

std::vector<int64_t> vec(const I64& a) { return {a.data(), a.data() + a.size()}; }

// Where each of `rows` stands among `computing` (ascending; every one of `rows` is in it).
std::vector<int64_t> place_in(const std::vector<int64_t>& computing, const std::vector<int64_t>& rows) {
  std::vector<int64_t> out;
  out.reserve(rows.size());
  for (int64_t r : rows) out.push_back(std::lower_bound(computing.begin(), computing.end(), r) - computing.begin());
  return out;
}

}  // namespace

PlanParts plan_parts(const ExactIndexCore& index, int64_t batch, int64_t seq, int64_t width, const PlanRows& p) {
  PlanParts out;
  if (static_cast<int64_t>(p.computing.size()) < batch) out.parts["compute"] = array_of(p.computing);
  if (!p.served.empty()) {
    // Each served row's tokens: its entries' (`sizes`: how many entries a row takes; none: one each).
    std::vector<int64_t> lengths, dst_starts;
    bool whole = static_cast<int64_t>(p.served.size()) == batch;
    size_t e = 0;
    for (size_t i = 0; i < p.served.size(); ++i) {
      const int64_t take = p.sizes ? (*p.sizes)[i] : 1;
      int64_t n = 0;
      TORCH_CHECK(take >= 0 && static_cast<int64_t>(e) + take <= static_cast<int64_t>(p.held.size()),
                  "plan_arrays: sizes must add up to the entries held");
      for (int64_t k = 0; k < take; ++k) n += index.ntokens(index.checked(p.held[e++]));
      lengths.push_back(n);
      dst_starts.push_back(p.served[i] * seq + p.served_starts[i]);
      whole = whole && p.served_starts[i] == 0 && n == seq;
    }
    TORCH_CHECK(e == p.held.size(), "plan_arrays: sizes must add up to the entries held");
    out.parts["served_src"] = index.token_rows_of(p.held.data(), static_cast<int64_t>(p.held.size()));
    out.served_all = whole;  // (every position of every row served, in order: the states are the output)
    if (!whole) out.parts["served_dst"] = runs_array(dst_starts, lengths);
  }
  if (!p.copy_rows.empty()) {
    out.parts["repeat_rows"] = array_of(p.copy_rows);
    out.parts["repeat_src"] = array_of(place_in(p.computing, p.copy_src));
  }
  if (!p.entries.empty()) {
    TORCH_CHECK(p.w_rows.size() == p.entries.size() && p.w_first.size() == p.entries.size() &&
                    p.w_n.size() == p.entries.size(),
                "plan_arrays: one write per entry");
    out.parts["store_dst"] = index.token_rows_of(p.entries.data(), static_cast<int64_t>(p.entries.size()));
    std::vector<int64_t> starts = place_in(p.computing, p.w_rows);
    bool in_order = true;  // (every computed token written, in order: the block's output as it is)
    int64_t end = 0;
    for (size_t i = 0; i < starts.size(); ++i) {
      starts[i] = starts[i] * width + p.w_first[i];
      in_order = in_order && starts[i] == end;
      end = starts[i] + p.w_n[i];
    }
    out.store_all = in_order && end == static_cast<int64_t>(p.computing.size()) * width;
    if (!out.store_all) out.parts["store_src"] = runs_array(starts, p.w_n);
  }
  return out;
}

py::tuple plan_arrays(const ExactIndexCore& index, int64_t batch, int64_t seq, int64_t width, const I64& served,
                      const I64& served_starts, const I64& held, const py::object& sizes, const I64& computing,
                      const I64& copy_rows, const I64& copy_src, const I64& entries, const I64& w_rows,
                      const I64& w_first, const I64& w_n) {
  PlanRows p{vec(served), vec(served_starts), vec(held), std::nullopt, vec(computing), vec(copy_rows),
             vec(copy_src), vec(entries), vec(w_rows), vec(w_first), vec(w_n)};
  if (!sizes.is_none()) p.sizes = vec(sizes.cast<I64>());
  TORCH_CHECK(p.served_starts.size() == p.served.size() && (!p.sizes || p.sizes->size() == p.served.size()),
              "plan_arrays: one start (and size) per served row");
  TORCH_CHECK(p.copy_src.size() == p.copy_rows.size(), "plan_arrays: one source per repeat");
  const PlanParts out = plan_parts(index, batch, seq, width, p);
  return py::make_tuple(out.parts, out.served_all, out.store_all);
}

}  // namespace llmcache
