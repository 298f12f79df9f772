// The exact tier's host index in C++ (bound in exact_index.cpp): `llmcache.bank.ExactIndex`'s verbs with its table, entry
// fields, page pool and CLOCK hand held here, so that a forward's lookups, reservations and
// commits are one call each, not a few dozen numpy and dict operations (what the Python
// reference, bank/index.py, costs per forward: 0.1-0.8 ms on a twin's host path).
//
// The contract is the reference's (its docstrings; tests/test_index_properties.py runs both):
// keys are bytes objects (kept, so `discard` can compare identity and `key` hands back the very
// object); an entry's pages are a block-table row; CLOCK sweeps a ring of entry ids, sparing
// and lowering reference counts (GCLOCK up to kGclockMax for "staleness"), taking visible,
// unpinned leaves first; a reserved entry is invisible and never evicted; one with children is
// marked dead when evicted and freed with its last child. Where the reference batches a full
// bank's evictions in numpy (`sweep_many`), this makes them key by key, as the reference's own
// fallback does; which victims go may differ, what may go does not.
#pragma once

#include <torch/extension.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace llmcache {

namespace py = pybind11;
using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

namespace index_detail {
inline constexpr int64_t kGclockMax = 8;  // eviction.GCLOCK_MAX

inline std::string_view view_of(PyObject* key) {
  char* data = nullptr;
  Py_ssize_t size = 0;
  if (PyBytes_AsStringAndSize(key, &data, &size) != 0) throw py::error_already_set();
  return {data, static_cast<size_t>(size)};
}

// A list or tuple as is, anything else iterable as a new list (PySequence_Fast).
inline py::object fast(const py::handle& items, const char* what) {
  PyObject* seq = PySequence_Fast(items.ptr(), what);
  if (seq == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(seq);
}

inline py::array_t<int64_t> array_of(const std::vector<int64_t>& values) {
  py::array_t<int64_t> out(static_cast<py::ssize_t>(values.size()));
  if (!values.empty()) std::memcpy(out.mutable_data(), values.data(), values.size() * sizeof(int64_t));
  return out;
}
// int64 [sum lengths]: start, start + 1, ..., start + length - 1 per run (plan.runs).
inline py::array_t<int64_t> runs_array(const std::vector<int64_t>& starts, const std::vector<int64_t>& lengths) {
  int64_t total = 0;
  for (int64_t n : lengths) total += n;
  py::array_t<int64_t> out(total);
  int64_t* o = out.mutable_data();
  for (size_t i = 0; i < starts.size(); ++i)
    for (int64_t t = 0; t < lengths[i]; ++t) *o++ = starts[i] + t;
  return out;
}
}  // namespace index_detail
using namespace index_detail;

class __attribute__((visibility("hidden"))) ExactIndexCore {
 public:
  ExactIndexCore(int64_t page_tokens, int64_t max_pages, std::optional<int64_t> max_entries, bool staleness)
      : page_tokens_(page_tokens), max_pages_(max_pages), max_entries_(max_entries), staleness_(staleness) {
    TORCH_CHECK(page_tokens >= 1, "ExactIndexCore: page_tokens must be >= 1");
  }

  // ---- reading ----------------------------------------------------------------------------
  int64_t num_pages() const { return num_pages_; }
  int64_t entries() const { return static_cast<int64_t>(table_.size()); }
  int64_t held_pages() const { return num_pages_ - static_cast<int64_t>(free_pages_.size()); }
  int64_t evictions() const { return evictions_; }
  int64_t next_serial() const { return next_serial_; }
  void set_next_serial(int64_t s) { next_serial_ = s; }
  int64_t slots() const { return static_cast<int64_t>(keys_.size()); }

  int64_t find(const py::handle& key) const {
    if (key.is_none()) return -1;
    auto it = table_.find(view_of(key.ptr()));
    return it == table_.end() ? -1 : it->second;
  }

  py::array_t<int64_t> find_many(const py::handle& keys) const {
    const py::object seq = fast(keys, "find_many: keys must be a sequence");
    const py::ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
    PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
    py::array_t<int64_t> out(n);
    int64_t* o = out.mutable_data();
    for (py::ssize_t i = 0; i < n; ++i) o[i] = find(items[i]);
    return out;
  }

  void touch(const I64& entries) {
    for (py::ssize_t i = 0; i < entries.size(); ++i) touch_one(checked(entries.data()[i]));
  }

  void touch_one(int64_t x) {
    ref_[x] = staleness_ ? std::min(ref_[x] + 1, kGclockMax) : 1;
    hits_[x] += 1;
  }

  py::object key(int64_t entry) const { return keys_[checked(entry)]; }

  py::object parent_key(int64_t entry) const {
    const int64_t parent = parent_[checked(entry)];
    return parent >= 0 ? keys_[parent] : py::bytes("");
  }

  bool is_live(int64_t entry, const py::handle& key) const { return find(key) == entry; }

  // (key, ntokens, pages, hits, serial, parent serial, label)
  py::tuple describe(int64_t entry) const {
    const int64_t e = checked(entry);
    return py::make_tuple(keys_[e], ntokens_[e], pages_for(ntokens_[e]), hits_[e], serial_[e], parent_serial_[e],
                          labels_[e]);
  }

  void pin(const I64& entries) {
    for (py::ssize_t i = 0; i < entries.size(); ++i) pin_one(checked(entries.data()[i]));
  }

  void pin_one(int64_t x) {
    if (!pinned_[x]) {
      pinned_[x] = 1;
      pin_list_.push_back(x);
    }
  }

  void unpin_all() {
    for (int64_t x : pin_list_) pinned_[x] = 0;
    pin_list_.clear();
  }

  // Whether a partial page (fewer than page_tokens tokens) extends each entry (-1: extends none).
  py::array_t<bool> partial_after(const I64& entries) const {
    py::array_t<bool> out(entries.size());
    for (py::ssize_t i = 0; i < entries.size(); ++i) {
      const int64_t e = entries.data()[i];
      out.mutable_data()[i] = e >= 0 ? partial_kids_[checked(e)] > 0 : partial_roots_ > 0;
    }
    return out;
  }

  py::array_t<int64_t> token_counts(const I64& entries) const {
    py::array_t<int64_t> out(entries.size());
    int64_t* o = out.mutable_data();
    for (py::ssize_t i = 0; i < entries.size(); ++i) o[i] = ntokens_[checked(entries.data()[i])];
    return out;
  }

  // The flat arena rows (page * page_tokens + offset) of the entries' tokens, one after another.
  py::array_t<int64_t> token_rows(const I64& entries) const {
    return token_rows_of(entries.data(), entries.size());
  }

  py::array_t<int64_t> token_rows_of(const int64_t* entries, int64_t n) const {
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) total += ntokens_[checked(entries[i])];
    py::array_t<int64_t> out(total);
    int64_t* o = out.mutable_data();
    for (int64_t i = 0; i < n; ++i) o = write_token_rows(entries[i], o);
    return out;
  }

  int64_t ntokens(int64_t e) const { return ntokens_[e]; }
  int64_t page_tokens() const { return page_tokens_; }

  // Entry e's flat arena rows at o (ntokens(e) of them); past the last.
  int64_t* write_token_rows(int64_t e, int64_t* o) const {
    const int64_t n = ntokens_[e];
    const int64_t* pages = &pages_[e * width_];
    for (int64_t t = 0; t < n; ++t) *o++ = pages[t / page_tokens_] * page_tokens_ + t % page_tokens_;
    return o;
  }

  std::vector<int64_t> live() const {
    std::vector<int64_t> out;
    for (int64_t e = 0; e < slots(); ++e)
      if (valid_[e]) out.push_back(e);
    return out;
  }

  // Live entries a walk can reach (none under a dead parent), ordered by serial.
  std::vector<int64_t> walkable() const {
    std::vector<int64_t> live_ = live(), out;
    std::sort(live_.begin(), live_.end(), [&](int64_t a, int64_t b) { return serial_[a] < serial_[b]; });
    std::unordered_map<int64_t, bool> kept{{-1, true}};
    for (int64_t e : live_) {
      if (kept.count(parent_serial_[e])) {
        out.push_back(e);
        kept[serial_[e]] = true;
      }
    }
    return out;
  }

  // int64 [len(entries)] of one field: "ntokens", "ref", "hits", "serial", "parent_serial".
  py::array_t<int64_t> field(const std::string& name, const I64& entries) const {
    const std::vector<int64_t>& f = field_ref(name);
    py::array_t<int64_t> out(entries.size());
    for (py::ssize_t i = 0; i < entries.size(); ++i) out.mutable_data()[i] = f[checked(entries.data()[i])];
    return out;
  }

  void restore(int64_t entry, int64_t ref, int64_t hits, int64_t serial, int64_t parent_serial) {
    const int64_t e = checked(entry);
    ref_[e] = ref;
    hits_[e] = hits;
    serial_[e] = serial;
    parent_serial_[e] = parent_serial;
  }

  // ---- writing ----------------------------------------------------------------------------
  int64_t reserve(const py::object& key, int64_t ntokens, int64_t parent, const py::object& label) {
    if (find(key) >= 0) return -1;
    if (parent >= 0) kids_[checked(parent)] += 1;  // first: the evictions below must spare it
    if (!make_room(pages_for(ntokens))) {
      if (parent >= 0) drop_kid(parent);
      return -1;
    }
    return fill(key, ntokens, parent, label);
  }

  // `reserve` of each key in order; parents[i]: an entry, -1, or -2 - j for the entry this call
  // reserves for key j < i (-1 where key j got none). The batch's outer parents are spared.
  py::array_t<int64_t> reserve_many(const py::handle& keys_, const I64& ntokens, const I64& parents,
                                    const py::handle& labels_) {
    const py::object keys = fast(keys_, "reserve_many: keys must be a sequence");
    const py::object labels = labels_.is_none() ? py::none() : fast(labels_, "reserve_many: labels must be a sequence");
    const py::ssize_t n = PySequence_Fast_GET_SIZE(keys.ptr());
    TORCH_CHECK(labels.is_none() || PySequence_Fast_GET_SIZE(labels.ptr()) == n, "reserve_many: one label per key");
    TORCH_CHECK(ntokens.size() == n && parents.size() == n, "reserve_many: one ntokens and parent per key");
    return array_of(reserve_batch(n, PySequence_Fast_ITEMS(keys.ptr()), ntokens.data(), parents.data(),
                                  labels.is_none() ? nullptr : PySequence_Fast_ITEMS(labels.ptr())));
  }

  // `reserve_many` of n keys (labels: nullptr for none).
  std::vector<int64_t> reserve_batch(int64_t n, PyObject* const* keys, const int64_t* ntokens, const int64_t* par,
                                     PyObject* const* labels) {
    for (int64_t i = 0; i < n; ++i)
      if (par[i] >= 0) kids_[checked(par[i])] += 1;
    std::vector<int64_t> out(static_cast<size_t>(n), -1);
    for (int64_t i = 0; i < n; ++i) {
      int64_t parent = par[i];
      if (parent <= -2) {
        const int64_t j = -2 - parent;
        TORCH_CHECK(j < i, "reserve_many: a parent code names a later key");
        parent = out[j];
        if (parent < 0) continue;
      }
      const py::object label = labels ? py::reinterpret_borrow<py::object>(labels[i]) : py::none();
      out[i] = reserve(py::reinterpret_borrow<py::object>(keys[i]), ntokens[i], parent, label);
    }
    for (int64_t i = 0; i < n; ++i)
      if (par[i] >= 0) drop_kid(par[i]);
    return out;
  }

  bool commit(int64_t entry) {
    const int64_t e = checked(entry);
    unreserve(e);
    const std::string_view k = view_of(keys_[e].ptr());
    if (table_.count(k)) {
      drop(e);
      return false;
    }
    valid_[e] = 1;
    table_.emplace(k, e);
    return true;
  }

  // `commit` of each entry: (the entries, -1 where another entry took its key meanwhile; their keys).
  py::tuple commit_many(const I64& entries) {
    const py::ssize_t n = entries.size();
    py::list committed(n), keys(n);
    for (py::ssize_t i = 0; i < n; ++i) {
      const int64_t e = checked(entries.data()[i]);
      keys[i] = keys_[e];  // (before `commit`, which drops an entry whose key was taken)
      committed[i] = commit(e) ? e : -1;
    }
    return py::make_tuple(committed, keys);
  }

  void release(int64_t entry) {
    const int64_t e = checked(entry);
    if (reserved_[e]) {
      unreserve(e);
      drop(e);
    }
  }

  void evict(int64_t entry) {
    const int64_t e = checked(entry);
    if (!valid_[e]) return;
    table_.erase(view_of(keys_[e].ptr()));
    valid_[e] = 0;
    drop(e);
  }

  bool discard(int64_t entry, const py::handle& key) {
    if (entry < 0 || entry >= slots() || keys_[entry].ptr() != key.ptr() || !valid_[entry]) return false;
    evict(entry);
    return true;
  }

  int64_t checked(int64_t entry) const {
    TORCH_CHECK(entry >= 0 && entry < slots(), "ExactIndex: no entry ", entry);
    return entry;
  }

 private:
  int64_t pages_for(int64_t ntokens) const { return (ntokens + page_tokens_ - 1) / page_tokens_; }

  const std::vector<int64_t>& field_ref(const std::string& name) const {
    if (name == "ntokens") return ntokens_;
    if (name == "ref") return ref_;
    if (name == "hits") return hits_;
    if (name == "serial") return serial_;
    if (name == "parent_serial") return parent_serial_;
    TORCH_CHECK(false, "ExactIndex: no field ", name);
  }

  void unreserve(int64_t e) {
    if (reserved_[e]) {
      reserved_[e] = 0;
      --reserved_count_;
    }
  }

  // A free entry id (the most recently freed first), its fields set.
  int64_t fill(const py::object& key, int64_t ntokens, int64_t parent, const py::object& label) {
    int64_t e;
    if (!free_entries_.empty()) {
      e = free_entries_.back();
      free_entries_.pop_back();
    } else {
      e = slots();
      keys_.emplace_back(py::none());
      labels_.emplace_back(py::none());
      for (auto* f : {&ntokens_, &ref_, &hits_, &serial_, &parent_serial_, &parent_, &kids_, &partial_kids_})
        f->push_back(0);
      for (auto* f : {&valid_, &dead_, &reserved_, &pinned_}) f->push_back(0);
      pages_.resize(pages_.size() + static_cast<size_t>(width_), 0);
    }
    const int64_t need = pages_for(ntokens);
    if (need > width_) widen(std::max(need, 2 * width_));
    keys_[e] = key;
    labels_[e] = label;
    ntokens_[e] = ntokens;
    ref_[e] = hits_[e] = kids_[e] = partial_kids_[e] = 0;
    dead_[e] = valid_[e] = 0;
    serial_[e] = next_serial_++;
    parent_[e] = parent;
    parent_serial_[e] = parent >= 0 ? serial_[parent] : -1;
    count_partial(e, 1);
    for (int64_t p = 0; p < need; ++p) {  // (off the top of the free stack)
      pages_[e * width_ + p] = free_pages_.back();
      free_pages_.pop_back();
    }
    reserved_[e] = 1;
    ++reserved_count_;
    return e;
  }

  void widen(int64_t width) {
    std::vector<int64_t> wider(static_cast<size_t>(slots() * width), 0);
    for (int64_t e = 0; e < slots(); ++e) std::copy_n(&pages_[e * width_], width_, &wider[e * width]);
    pages_.swap(wider);
    width_ = width;
  }

  bool grow(int64_t need) {
    if (num_pages_ >= max_pages_) return false;
    const int64_t free = static_cast<int64_t>(free_pages_.size());
    const int64_t grown = std::min(max_pages_, std::max({2 * num_pages_, num_pages_ + need - free, int64_t{16}}));
    for (int64_t p = grown - 1; p >= num_pages_; --p) free_pages_.push_back(p);
    num_pages_ = grown;
    return true;
  }

  bool make_room(int64_t need) {
    const bool full = max_entries_ && entries() + reserved_count_ >= *max_entries_;
    if (need > max_pages_ || (full && !evict_one())) return false;
    while (static_cast<int64_t>(free_pages_.size()) < need)
      if (!grow(need) && !evict_one()) return false;
    return true;
  }

  // CLOCK: from the hand, the first visible unpinned leaf whose count is zero, sparing (and
  // lowering) the others; each full turn lowers every spared count, so kGclockMax + 1 turns
  // find a victim if any can be one.
  bool evict_one() {
    const int64_t total = slots();
    if (table_.empty() || total == 0) return false;
    for (int64_t i = 0; i < (kGclockMax + 1) * total + 1; ++i) {
      const int64_t e = hand_;
      hand_ = (hand_ + 1) % total;
      if (!valid_[e] || kids_[e] || pinned_[e]) continue;
      if (ref_[e] > 0) {
        ref_[e] -= 1;
        continue;
      }
      evict(e);
      ++evictions_;
      return true;
    }
    return false;
  }

  void drop(int64_t e) {  // an invisible entry: freed, or dead while children name it
    if (kids_[e])
      dead_[e] = 1;
    else
      free_entry(e);
  }

  void free_entry(int64_t e) {
    for (int64_t p = 0; p < pages_for(ntokens_[e]); ++p) free_pages_.push_back(pages_[e * width_ + p]);
    keys_[e] = py::none();
    labels_[e] = py::none();
    free_entries_.push_back(e);
    count_partial(e, -1);
    const int64_t parent = parent_[e];
    parent_[e] = -1;
    if (parent >= 0) drop_kid(parent);
  }

  void count_partial(int64_t e, int64_t sign) {  // (a partial page counted on what it extends)
    if (ntokens_[e] >= page_tokens_) return;
    if (parent_[e] >= 0)
      partial_kids_[parent_[e]] += sign;
    else
      partial_roots_ += sign;
  }

  void drop_kid(int64_t parent) {
    kids_[parent] -= 1;
    if (kids_[parent] == 0 && dead_[parent]) {
      dead_[parent] = 0;
      free_entry(parent);
    }
  }

  const int64_t page_tokens_, max_pages_;
  const std::optional<int64_t> max_entries_;
  const bool staleness_;
  // key bytes -> entry; each view points into the bytes object keys_[entry] holds
  std::unordered_map<std::string_view, int64_t> table_;
  std::vector<py::object> keys_, labels_;
  std::vector<int64_t> ntokens_, ref_, hits_, serial_, parent_serial_, parent_, kids_, partial_kids_;
  std::vector<uint8_t> valid_, dead_, reserved_, pinned_;
  std::vector<int64_t> pages_;  // block table [slots, width_]
  int64_t width_ = 1;
  std::vector<int64_t> free_entries_, free_pages_, pin_list_;
  int64_t partial_roots_ = 0;
  int64_t num_pages_ = 0, reserved_count_ = 0, next_serial_ = 0, hand_ = 0, evictions_ = 0;
};

// The exact tier's routing of a forward of whole rows on this index (route_rows.cpp).
py::object route_rows(ExactIndexCore& index, const py::handle& keys, const I64& start, const I64& count, int64_t seq,
                      const py::object& header, const py::object& host, const py::object& mask);

// What a block-splice plan serves, computes, copies and writes (plan.build's arguments), and the
// host arrays made of it (plan_arrays.cpp): `parts` by the names plan.upload takes.
struct __attribute__((visibility("hidden"))) PlanRows {
  std::vector<int64_t> served, served_starts, held;  // rows served (ascending), their first positions, their entries
  std::optional<std::vector<int64_t>> sizes;          // entries per served row (none: one each)
  std::vector<int64_t> computing, copy_rows, copy_src;  // rows that run (ascending); repeats and their rows
  std::vector<int64_t> entries, w_rows, w_first, w_n;   // entries written: computing row, first position, ntokens
};
struct __attribute__((visibility("hidden"))) PlanParts {
  py::dict parts;
  bool served_all = false, store_all = false;
};
PlanParts plan_parts(const ExactIndexCore& index, int64_t batch, int64_t seq, int64_t width, const PlanRows& rows);
py::tuple plan_arrays(const ExactIndexCore& index, int64_t batch, int64_t seq, int64_t width, const I64& served,
                      const I64& served_starts, const I64& held, const py::object& sizes, const I64& computing,
                      const I64& copy_rows, const I64& copy_src, const I64& entries, const I64& w_rows,
                      const I64& w_first, const I64& w_n);

// The host arrays of a decoder forward whose rows compute from their cached prefixes on
// (suffix_arrays.cpp): (parts by the names plan.upload takes, cached [B], Pmax, S, uniform, straddle).
py::tuple suffix_arrays(const ExactIndexCore& index, int64_t seq, const I64& host, const I64& start, const I64& n_real,
                        const I64& covered, const I64& keyed, const I64& trailing, const I64& found, const I64& sizes,
                        const I64& entries, const I64& w_rows, const I64& w_at, const I64& w_n);

// A decoder forward's page routing on this index (route_pages.cpp).
py::tuple longest_runs(const ExactIndexCore& index, const py::handle& keys, int64_t per_row, const I64& count);
py::tuple reserve_pages(ExactIndexCore& index, const py::handle& keys, int64_t per_row, const I64& todo,
                        const I64& first, const I64& opens, const I64& n_real, const I64& start,
                        const py::handle& headers, const py::object& host, bool chains);

}  // namespace llmcache
