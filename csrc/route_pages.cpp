// A decoder forward's page routing on the C++ index: each row's longest run of cached pages
// (`longest_runs`) and the reservation of the pages its computing rows add (`reserve_pages`).
// The references are llmcache/tiers/exact/prefix.py's `_longest_runs` and `_reserve` (numpy over
// the batch's pages, a dozen calls of 1-30 us each), which route where the index is the Python
// one; tests/test_route_pages.py drives both with the same batches.
#include <unordered_map>

#include "exact_index.h"

namespace llmcache {

// Per row (`keys`: its pages' chained keys, row after row, `per_row` each; `count`: its tokens),
// the entries of its longest run of pages held from its start and the tokens they cover:
// (list of lists, list).
py::tuple longest_runs(const ExactIndexCore& index, const py::handle& keys_, int64_t per_row, const I64& count) {
  const py::object keys = fast(keys_, "longest_runs: keys must be a sequence");
  const int64_t batch = count.size(), page = index.page_tokens();
  TORCH_CHECK(PySequence_Fast_GET_SIZE(keys.ptr()) == batch * per_row, "longest_runs: per_row keys a row");
  PyObject** key = PySequence_Fast_ITEMS(keys.ptr());
  py::list found(batch), covered(batch);
  for (int64_t r = 0; r < batch; ++r) {
    const int64_t pages = std::min(per_row, (count.data()[r] + page - 1) / page);
    py::list run;
    int64_t j = 0;
    for (; j < pages; ++j) {
      const int64_t e = index.find(key[r * per_row + j]);
      if (e < 0) break;
      run.append(e);
    }
    found[r] = run;
    covered[r] = std::min(j * page, count.data()[r]);
  }
  return py::make_tuple(found, covered);
}

// Reserve the pages each computing row adds, one reservation per distinct key at its first place
// in the batch (its parent page is before it there: a key is chained over the pages before it).
// `todo`: the rows, each with `first` pages it keeps (their last entry `opens` it, or -1); a row's
// pages run to its `n_real` tokens; labels name (headers[row], host, row, start[row] + token, n).
// Returns (entries reserved, and per entry its row, token offset in the row's span, ntokens, as
// int64 arrays; the rows a reservation failed for, ascending; with `chains`, per todo row the
// entry (or -1) of each of its pages, else None; None too where no row adds a page).
py::tuple reserve_pages(ExactIndexCore& index, const py::handle& keys_, int64_t per_row, const I64& todo,
                        const I64& first, const I64& opens, const I64& n_real, const I64& start,
                        const py::handle& headers_, const py::object& host, bool chains) {
  const py::object keys = fast(keys_, "reserve_pages: keys must be a sequence");
  const py::object headers = fast(headers_, "reserve_pages: headers must be a sequence");
  const int64_t page = index.page_tokens(), rows = todo.size();
  TORCH_CHECK(first.size() == rows && opens.size() == rows, "reserve_pages: one first and opens per row");
  PyObject** key = PySequence_Fast_ITEMS(keys.ptr());
  PyObject** header = PySequence_Fast_ITEMS(headers.ptr());
  const int64_t n_keys = PySequence_Fast_GET_SIZE(keys.ptr()), batch = n_real.size();
  TORCH_CHECK(start.size() == batch && PySequence_Fast_GET_SIZE(headers.ptr()) == batch,
              "reserve_pages: one n_real, start and header per row of the batch");
  // Candidate pages, row after row; `place`: where each one's key is first reserved.
  std::unordered_map<std::string_view, int64_t> firsts;
  std::vector<int64_t> place, cand_row;
  std::vector<PyObject*> o_key;
  std::vector<py::object> o_label;
  std::vector<int64_t> o_row, o_at, o_n, o_parent;
  for (int64_t k = 0; k < rows; ++k) {
    const int64_t r = todo.data()[k];
    TORCH_CHECK(r >= 0 && r < batch && first.data()[k] >= 0, "reserve_pages: no row ", r, " or a negative first page");
    const int64_t n = n_real.data()[r], end = (n + page - 1) / page;
    TORCH_CHECK(end <= per_row && r * per_row + end <= n_keys, "reserve_pages: a row has more pages than keys");
    for (int64_t number = first.data()[k]; number < end; ++number) {
      PyObject* page_key = key[r * per_row + number];
      const int64_t at = number * page, ntokens = std::min(page, n - at);
      const auto [it, fresh] = firsts.emplace(view_of(page_key), static_cast<int64_t>(o_key.size()));
      if (fresh) {
        o_key.push_back(page_key);
        o_row.push_back(r);
        o_at.push_back(at);
        o_n.push_back(ntokens);
        o_parent.push_back(number == first.data()[k] ? opens.data()[k] : -2 - place.back());
        o_label.push_back(py::make_tuple(py::handle(header[r]), host, r, start.data()[r] + at, ntokens));
      }
      place.push_back(it->second);
      cand_row.push_back(k);
    }
  }
  std::vector<PyObject*> labels;
  for (const auto& l : o_label) labels.push_back(l.ptr());
  const std::vector<int64_t> got = index.reserve_batch(static_cast<int64_t>(o_key.size()), o_key.data(), o_n.data(),
                                                       o_parent.data(), labels.data());
  std::vector<int64_t> entries, w_row, w_at, w_n, failed;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] < 0) continue;
    entries.push_back(got[i]);
    w_row.push_back(o_row[i]);
    w_at.push_back(o_at[i]);
    w_n.push_back(o_n[i]);
  }
  std::vector<uint8_t> row_failed(static_cast<size_t>(rows), 0);
  for (size_t i = 0; i < place.size(); ++i)
    if (got[place[i]] < 0) row_failed[cand_row[i]] = 1;
  for (int64_t k = 0; k < rows; ++k)
    if (row_failed[k]) failed.push_back(todo.data()[k]);
  std::sort(failed.begin(), failed.end());
  failed.erase(std::unique(failed.begin(), failed.end()), failed.end());
  py::object per_row_pages = py::none();
  if (chains && !place.empty()) {  // (no page to add: the reference leaves the chains alone)
    py::list out(rows);
    for (int64_t k = 0; k < rows; ++k) out[k] = py::list();
    for (size_t i = 0; i < place.size(); ++i) out[cand_row[i]].cast<py::list>().append(got[place[i]]);
    per_row_pages = out;
  }
  return py::make_tuple(py::cast(entries), array_of(w_row), array_of(w_at), array_of(w_n), py::cast(failed),
                        per_row_pages);
}

}  // namespace llmcache
