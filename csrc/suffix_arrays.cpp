// suffix_arrays: the host arrays of a decoder forward whose rows compute from their cached prefixes
// on (llmcache/tiers/exact/suffix.py's `plan`, whose numpy `suffix_arrays` is the reference and
// routes where the index is the Python one): each row's suffix ids, positions and types
// left-aligned in [B, S], the [B, Pmax + S] mask, where the prefix tokens are read from and go,
// where the suffix's outputs go, and the written tokens' sources and arena rows. One pass over
// the batch's rows, where numpy took some thirty calls of 1-20 us each.
#include "exact_index.h"

namespace llmcache {

// (parts by name, cached int64 [B], Pmax, S, uniform, straddle): the reference's contract.
py::tuple suffix_arrays(const ExactIndexCore& index, int64_t seq, const I64& host, const I64& start, const I64& n_real,
                        const I64& covered, const I64& keyed, const I64& trailing, const I64& found, const I64& sizes,
                        const I64& entries, const I64& w_rows, const I64& w_at, const I64& w_n) {
  const int64_t batch = n_real.size();
  TORCH_CHECK(batch > 0, "suffix_arrays: no row");
  TORCH_CHECK(host.ndim() == 3 && host.shape(0) == 4 && host.shape(1) == batch,
              "suffix_arrays: host must be int64 [4, B, T]");
  TORCH_CHECK(start.size() == batch && covered.size() == batch && keyed.size() == batch &&
                  trailing.size() == batch && sizes.size() == batch,
              "suffix_arrays: one start, covered, keyed, trailing and size per row");
  TORCH_CHECK(w_rows.size() == entries.size() && w_at.size() == entries.size() && w_n.size() == entries.size(),
              "suffix_arrays: one write per entry");
  const int64_t T = host.shape(2);
  const int64_t *s = start.data(), *n = n_real.data(), *c = covered.data(), *t = trailing.data();
  std::vector<int64_t> p(batch), k(batch), found_at(batch + 1, 0);
  int64_t pmax = 0, smax = 1;
  for (int64_t r = 0; r < batch; ++r) {
    TORCH_CHECK(sizes.data()[r] >= 0, "suffix_arrays: a negative size");
    found_at[r + 1] = found_at[r] + sizes.data()[r];
    p[r] = keyed.data()[r] && sizes.data()[r] > 0 ? std::min(c[r], n[r] - (t[r] == 0 ? 1 : 0)) : 0;
    k[r] = n[r] - p[r] + t[r];
    pmax = std::max(pmax, p[r]);
    smax = std::max(smax, k[r]);
  }
  TORCH_CHECK(found_at[batch] == found.size(), "suffix_arrays: sizes must add up to the entries found");
  const int64_t width = pmax + smax;
  bool uniform = seq == width;
  for (int64_t r = 0; r < batch; ++r) uniform = uniform && s[r] == 0 && p[r] == pmax && k[r] == smax;

  // Row r's suffix: its tokens from s + p on, k of them; after them (up to S) its last id again
  // and positions counting on (masked slots), types 0.
  const int64_t *ids = host.data(), *positions = ids + 2 * batch * T, *types = ids + 3 * batch * T;
  py::array_t<int64_t> ids_out(batch * smax), positions_out(batch * smax), types_out(batch * smax),
      mask(batch * width);
  int64_t *io = ids_out.mutable_data(), *po = positions_out.mutable_data(), *to = types_out.mutable_data(),
          *mo = mask.mutable_data();
  for (int64_t r = 0; r < batch; ++r) {
    const int64_t last = s[r] + p[r] + std::max<int64_t>(k[r] - 1, 0);
    TORCH_CHECK(s[r] >= 0 && p[r] >= 0 && last < T, "suffix_arrays: row ", r, "'s span is outside its T positions");
    const int64_t row = r * T;
    for (int64_t col = 0; col < smax; ++col) {
      const int64_t at = row + s[r] + p[r] + std::min(col, std::max<int64_t>(k[r] - 1, 0));
      const bool live = col < k[r], some = k[r] > 0;
      *io++ = some ? ids[at] : 0;
      *po++ = some ? (live ? positions[at] : positions[row + last] + col - k[r] + 1) : 0;
      *to++ = live ? types[at] : 0;
    }
    for (int64_t col = 0; col < width; ++col) *mo++ = col >= pmax - p[r] && col < pmax + n[r] - p[r];
  }
  py::dict parts;
  parts["ids"] = ids_out;
  parts["positions"] = positions_out;
  parts["types"] = types_out;
  parts["mask"] = mask;

  // The prefix rows' tokens held: their entries' arena rows, one row after another; row r's
  // start among them counts `covered` tokens a row before it (as the reference's offsets), and
  // it reads its first p.
  std::vector<int64_t> held;
  for (int64_t r = 0; r < batch; ++r) {
    if (p[r] == 0) continue;
    for (int64_t i = found_at[r]; i < found_at[r + 1]; ++i) {
      const int64_t e = index.checked(found.data()[i]);
      held.resize(held.size() + index.ntokens(e));
      index.write_token_rows(e, held.data() + held.size() - index.ntokens(e));
    }
  }
  std::vector<int64_t> src_starts, slot_starts, dst_starts, s_src_starts, s_dst_starts, cum_p(batch);
  int64_t first = 0, total_p = 0;
  for (int64_t r = 0; r < batch; ++r) {
    cum_p[r] = total_p;  // (the prefix tokens of the rows before r: row r's place among the states read)
    total_p += p[r];
    if (p[r] > 0) {
      TORCH_CHECK(first + p[r] <= static_cast<int64_t>(held.size()),
                  "suffix_arrays: row ", r, " reads more tokens than its entries hold");
      src_starts.push_back(first);
      first += c[r];
    }
    slot_starts.push_back(r * pmax + pmax - p[r]);
    dst_starts.push_back(r * seq + s[r]);
    s_src_starts.push_back(r * smax);
    s_dst_starts.push_back(r * seq + s[r] + p[r]);
  }
  py::array_t<int64_t> prefix_src(total_p);
  int64_t* ps = prefix_src.mutable_data();
  for (int64_t r = 0, i = 0; r < batch; ++r)
    if (p[r] > 0) ps = std::copy_n(held.data() + src_starts[i++], p[r], ps);
  parts["prefix_src"] = prefix_src;
  parts["prefix_slot"] = runs_array(slot_starts, p);
  parts["prefix_dst"] = runs_array(dst_starts, p);
  parts["suffix_src"] = runs_array(s_src_starts, k);
  parts["suffix_dst"] = runs_array(s_dst_starts, k);

  // A reserved page of row r covers its tokens [at, at + n): computed ones, and where it replaces a
  // partial page that ended the row's cached prefix, cached ones before them (`store_src` then
  // indexes those cached tokens first, `store_prefix` their rows among the prefix states read,
  // then the computed tokens; into the prefix tensors, token t of row r is r * (P + S) + t).
  bool straddle = false;
  if (entries.size() > 0) {
    const bool into_kv = uniform && pmax > 0;
    std::vector<int64_t> computed, store_prefix;
    std::vector<uint8_t> before;
    for (py::ssize_t e = 0; e < entries.size(); ++e) {
      const int64_t row = w_rows.data()[e];
      TORCH_CHECK(row >= 0 && row < batch, "suffix_arrays: a write names no row");
      for (int64_t tok = w_at.data()[e]; tok < w_at.data()[e] + w_n.data()[e]; ++tok) {
        before.push_back(tok < p[row]);
        computed.push_back(into_kv ? row * width + tok : row * smax + tok - p[row]);
        if (tok < p[row]) store_prefix.push_back(cum_p[row] + tok);
      }
    }
    straddle = !store_prefix.empty() && !into_kv;
    if (straddle) {
      const int64_t cached_tokens = static_cast<int64_t>(store_prefix.size());
      for (size_t i = 0, seen = 0; i < computed.size(); ++i)
        computed[i] = before[i] ? static_cast<int64_t>(seen++) : computed[i] + cached_tokens;
      parts["store_prefix"] = array_of(store_prefix);
    }
    parts["store_src"] = array_of(computed);
    parts["store_dst"] = index.token_rows_of(entries.data(), entries.size());
  }
  return py::make_tuple(parts, array_of(p), pmax, smax, uniform, straddle);
}

}  // namespace llmcache
